"""The supervisor with real processes: restarts, hangs, crash loops, signals, garbage, two hosts.

Every ``voicebus up`` here runs without audio (``--input none --output none``)
on a bus of its own (a private ipc folder) with a private state dir, and is killed with its whole process
group when the test ends, pass or fail. The restart policy's own arithmetic is
tested first, without processes.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

import pytest

from voicebus.engine.bus import Endpoints
from voicebus.engine.client import BusClient
from voicebus.engine.messages import Heartbeat
from voicebus.engine.restart_policy import RestartPolicy
from voicebus.engine.settings import SupervisorSettings

from support.fuzz import RawPublisher, bad_frames, packed, random_frames
from support.procs import WORKER_NAMES, BusWatcher, Launcher, Up, ask, gone, poll

# --- the restart policy alone ----------------------------------------------------------------


def test_backoff_doubles_from_0_2_and_caps_at_5():
    policy = RestartPolicy(max_restarts=100, window_s=1e9)
    delays = [policy.on_exit(now=float(i), uptime_s=0.1) for i in range(9)]
    assert delays == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0, 5.0])


def test_gives_up_after_max_restarts_in_the_window():
    policy = RestartPolicy()  # 5 restarts in 60 s
    assert [policy.on_exit(now=t, uptime_s=1.0) is not None for t in (0, 1, 2, 3, 4)] == [True] * 5
    assert policy.restarts == 5
    assert policy.on_exit(now=5, uptime_s=1.0) is None


def test_restarts_older_than_the_window_no_longer_count():
    policy = RestartPolicy(max_restarts=3, window_s=10.0)
    for t in (0.0, 1.0, 2.0):
        assert policy.on_exit(now=t, uptime_s=0.5) is not None
    assert policy.on_exit(now=9.0, uptime_s=0.5) is None  # 3 in the last 10 s
    assert policy.on_exit(now=10.5, uptime_s=0.5) is not None  # the one at t=0 has left the window
    assert policy.restarts == 3  # t=1, t=2, t=10.5


def test_a_stable_run_resets_the_backoff_but_not_the_window():
    policy = RestartPolicy(max_restarts=5, window_s=60.0, stable_after_s=30.0)
    assert policy.on_exit(now=0.0, uptime_s=1.0) == pytest.approx(0.2)
    assert policy.on_exit(now=1.0, uptime_s=1.0) == pytest.approx(0.4)
    assert policy.on_exit(now=2.0, uptime_s=1.0) == pytest.approx(0.8)
    assert policy.on_exit(now=40.0, uptime_s=35.0) == pytest.approx(0.2)  # ran cleanly: backoff afresh
    assert policy.on_exit(now=41.0, uptime_s=1.0) == pytest.approx(0.4)
    assert policy.on_exit(now=42.0, uptime_s=40.0) is None  # but 5 restarts in 60 s is still the limit


def test_policy_defaults_match_the_supervisor_settings():
    s = SupervisorSettings()
    assert (s.backoff_initial_s, s.backoff_max_s, s.max_restarts, s.restart_window_s, s.heartbeat_timeout_s) == (
        0.2, 5.0, 5, 60.0, 3.0)


# --- real processes --------------------------------------------------------------------------

NO_AUDIO = ("--input", "none", "--output", "none")


@dataclass
class Stack:
    up: Up
    watcher: BusWatcher
    pids: dict[str, int]
    url: str


def start_stack(launcher: Launcher, *extra: str, **env: str) -> Stack:
    url = launcher.bus_url()
    up = launcher.up(*NO_AUDIO, "--bus", url, *extra, **env)
    watcher = launcher.watch(Endpoints.parse(url))
    pids = watcher.wait_ready(WORKER_NAMES, timeout=90)
    poll(lambda: up.worker_pids() == pids, 10, "the ready workers are the supervisor's children")
    return Stack(up, watcher, pids, url)


@pytest.fixture
def stack(launcher) -> Stack:
    """A whole ``voicebus up`` without audio, every worker ready."""
    return start_stack(launcher)


def pid_of(src: str) -> int:
    return int(src.rsplit(":", 1)[1])


def of_kind(kind: str, **fields):
    def match(env) -> bool:
        return env.kind == kind and all(getattr(env.body, k, None) == v for k, v in fields.items())

    return match


@pytest.mark.slow
def test_kill_9_restarts_only_that_worker(stack):
    up, watcher = stack.up, stack.watcher
    original = dict(stack.pids)
    pids = dict(original)
    for victim in WORKER_NAMES:
        mark = watcher.mark()
        old = pids[victim]
        os.kill(old, signal.SIGKILL)
        new = watcher.wait_new_hello(victim, old, 60, since=mark)
        watcher.wait(lambda e: isinstance(e.body, Heartbeat) and e.body.pid == new and e.body.state == "ready",
                     60, f"ready heartbeat from the new {victim}", since=mark)
        exited = watcher.wait(of_kind("sup.exited", worker=victim), 5, f"sup.exited for {victim}", since=mark)
        assert (exited.body.pid, exited.body.signal) == (old, "SIGKILL")
        restarting = watcher.wait(of_kind("sup.restarting", worker=victim), 5, "sup.restarting", since=mark)
        assert restarting.body.restarts == 1 and restarting.body.delay_s == pytest.approx(0.2)
        watcher.wait(of_kind("sup.started", worker=victim, pid=new), 5, "sup.started", since=mark)
        assert gone(old)
        pids[victim] = new
        # the others kept their processes
        poll(lambda: up.worker_pids() == pids, 10, f"only {victim} has a new pid")

    exits = [(e.body.worker, e.body.pid) for e in watcher.select(of_kind("sup.exited"))]
    assert exits == [(name, original[name]) for name in WORKER_NAMES]
    for name in WORKER_NAMES:
        assert watcher.heartbeat_pids(name) == {original[name], pids[name]}
    assert up.proc.poll() is None


@pytest.mark.slow
def test_sigstopped_worker_is_replaced(stack):
    up, watcher = stack.up, stack.watcher
    old = stack.pids["thinker"]
    mark = watcher.mark()
    stopped_at = time.monotonic()
    os.kill(old, signal.SIGSTOP)
    new = watcher.wait_new_hello("thinker", old, 10, since=mark)
    assert time.monotonic() - stopped_at < 10
    exited = watcher.wait(of_kind("sup.exited", worker="thinker"), 5, "sup.exited for thinker", since=mark)
    assert (exited.body.pid, exited.body.signal) == (old, "SIGKILL")
    poll(lambda: gone(old), 5, "the stopped thinker is gone")
    expected = {**stack.pids, "thinker": new}
    poll(lambda: up.worker_pids() == expected, 10, "only the thinker was replaced")
    assert [e.body.worker for e in watcher.select(of_kind("sup.exited"), since=mark)] == ["thinker"]
    # and the new one works
    watcher.wait(lambda e: isinstance(e.body, Heartbeat) and e.body.pid == new and e.body.state == "ready",
                 60, "ready heartbeat from the new thinker", since=mark)


@pytest.mark.slow
def test_worker_failing_at_startup_is_given_up(launcher, tmp_path):
    url = launcher.bus_url()
    # A file that exists (preflight refuses a missing one at once) but is no model: the thinker fails to load it.
    model = str(tmp_path / "broken.gguf")
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf model" * 64)
    up = launcher.up(*NO_AUDIO, "--bus", url, VOICEBUS_LLM_MODEL_PATH=model)
    watcher = launcher.watch(Endpoints.parse(url), "sup.", "sys.error")
    started = time.monotonic()
    code = up.wait(45)
    took = time.monotonic() - started
    stderr = up.stderr()
    assert code == 1, stderr[-3000:]
    assert took < 40, f"gave up only after {took:.0f} s"
    last = [line for line in stderr.splitlines() if line.startswith("voicebus:")]
    assert last and "thinker" in last[-1], stderr[-3000:]
    final = stderr[stderr.rindex("voicebus: gave up"):]
    assert "ModelError" in final and model in final
    gave_up = watcher.select(of_kind("sup.gave_up"))
    assert [e.body.worker for e in gave_up] == ["thinker"]
    assert model in gave_up[0].body.last_error
    exits = watcher.select(of_kind("sup.exited", worker="thinker"))
    assert len(exits) >= 5 and all(e.body.returncode == 2 for e in exits)
    assert {e.body.worker for e in watcher.select(of_kind("sup.exited"))} - {"thinker"} == set(), (
        "another worker died before the shutdown")
    errors = watcher.select(lambda e: e.kind == "sys.error" and e.body.where == "thinker.start")
    assert errors and errors[0].body.code == "model"
    poll(lambda: all(gone(pid) for pid in up.seen_pids), 5, "no child left behind")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_stop_everything_cleanly(stack, sig):
    up, watcher = stack.up, stack.watcher
    children = up.descendants()
    assert len(children) == 4, [c.cmdline() for c in children]  # bus + three workers
    mark = watcher.mark()
    signalled = time.monotonic()
    os.kill(up.pid, sig)
    assert up.wait(15) == 0, up.stderr()[-3000:]
    poll(lambda: all(gone(c.pid) for c in children), max(0.1, signalled + 5 - time.monotonic()),
         "every child gone within 5 s of the signal")
    watcher.wait(of_kind("ctl.shutdown"), 1, "ctl.shutdown from the supervisor", since=mark)
    byes = {e.body.name for e in watcher.select(of_kind("sys.bye"), since=mark)}
    assert byes == set(WORKER_NAMES), "a worker did not stop on ctl.shutdown"


@pytest.mark.slow
def test_ctrl_c_to_the_whole_group_stops_without_restarts(stack):
    """A terminal's Ctrl-C reaches every process of the group at once, not just the supervisor."""
    up, watcher = stack.up, stack.watcher
    children = up.descendants()
    mark = watcher.mark()
    signalled = time.monotonic()
    os.killpg(up.pid, signal.SIGINT)
    assert up.wait(15) == 0, up.stderr()[-3000:]
    poll(lambda: all(gone(c.pid) for c in children), max(0.1, signalled + 5 - time.monotonic()),
         "every child gone within 5 s of the signal")
    assert watcher.select(lambda e: e.kind in ("sup.restarting", "sup.started"), since=mark) == []
    assert "Traceback" not in up.stderr()


@pytest.mark.slow
def test_killed_bus_is_restarted_and_workers_carry_on(stack, tmp_path):
    up, watcher = stack.up, stack.watcher
    bus_pid = up.bus_pid()
    assert bus_pid is not None
    os.kill(bus_pid, signal.SIGKILL)
    poll(lambda: up.bus_pid() not in (None, bus_pid), 15, "a new bus process")
    mark = watcher.mark()
    # our watcher reconnects by itself (ZeroMQ resends its subscriptions)
    for name in WORKER_NAMES:
        watcher.wait(lambda e, n=name: isinstance(e.body, Heartbeat) and e.body.name == n, 15,
                     f"a heartbeat from {name} through the new bus", since=mark)
    result = ask(stack.url, "Is the bus back?", tmp_path)
    assert result.returncode == 0, result.stderr
    assert up.worker_pids() == stack.pids, "a worker was restarted because the bus was"
    assert watcher.select(lambda e: e.kind == "sup.exited" and e.body.worker != "bus") == []


@pytest.mark.slow
def test_stopped_bus_is_replaced_not_the_workers(stack, tmp_path):
    """A hung bus silences every heartbeat at once: the bus is the one to replace."""
    up, watcher = stack.up, stack.watcher
    bus_pid = up.bus_pid()
    assert bus_pid is not None
    os.kill(bus_pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    poll(lambda: gone(bus_pid), 15, "the stopped bus killed")
    poll(lambda: up.bus_pid() not in (None, bus_pid), 15, "a new bus")
    mark = watcher.mark()
    for name in WORKER_NAMES:
        watcher.wait(lambda e, n=name: isinstance(e.body, Heartbeat) and e.body.name == n, 15,
                     f"a heartbeat from {name} through the new bus", since=mark)
    assert time.monotonic() - stopped_at < 20
    result = ask(stack.url, "Are you still there?", tmp_path)
    assert result.returncode == 0, result.stderr
    assert up.worker_pids() == stack.pids, "workers were killed for the bus's silence"
    assert "the bus" in up.stderr() and "killing it" in up.stderr()


@pytest.mark.slow
def test_sigkill_on_the_supervisor_leaves_no_orphan(stack):
    up = stack.up
    children = up.descendants()
    assert len(children) == 4
    killed = time.monotonic()
    os.kill(up.pid, signal.SIGKILL)
    assert up.wait(5) == -signal.SIGKILL
    poll(lambda: all(gone(c.pid) for c in children), max(0.1, killed + 5 - time.monotonic()),
         "every child gone within 5 s of the supervisor's death")


FUZZ_TOPICS = {
    # topic: a valid body; between them every worker and the supervisor hear some of them
    "ctl.ask": {"text": "hello"},
    "ctl.say": {"text": "hello"},
    "ctl.interrupt": {"reason": "fuzz"},
    "ctl.shutdown": {"reason": "fuzz"},
    "play.start": {"index": 0, "text": "hi"},
    "play.stopped": {"index": 0},
    "llm.sentence": {"text": "Hi.", "index": 0},
    "sys.heartbeat": {"name": "thinker", "pid": 1, "uptime": 1.0, "state": "ready"},
}


@pytest.mark.slow
def test_fuzzed_bus_leaves_every_worker_alive_and_answering(stack, tmp_path):
    up, watcher = stack.up, stack.watcher
    endpoints = Endpoints.parse(stack.url)
    mark = watcher.mark()
    witness = BusClient(endpoints, name="witness")
    witness.announce(timeout=10)
    raw = RawPublisher(endpoints, witness)
    try:
        sent = 0
        for topic, body in FUZZ_TOPICS.items():
            for _, frames in bad_frames(topic, body):
                raw.send(frames)
                sent += 1
            for frames in random_frames(topic, 300):
                raw.send(frames)
                sent += 1
            # unknown kinds that share a prefix with a real one, and a wholly unknown kind
            raw.send([f"{topic}.v9".encode(), packed(f"{topic}.v9", {"n": 1})])
        raw.send([b"zz.unknown", packed("zz.unknown", {"n": 1})])
        raw.send([b"ctl.ask", os.urandom(3 * 1024 * 1024)])  # under the limit: decoded and refused
    finally:
        raw.close()
    # A 10 MiB frame: the proxy drops that sender's connection, nobody else notices.
    big = RawPublisher(endpoints, witness)
    try:
        big.send([b"ctl.ask", b"\x00" * (10 * 1024 * 1024)])
    finally:
        big.close()
        witness.close()

    # every worker counted garbage, and kept its pid and heartbeat
    for name in WORKER_NAMES:
        beat = watcher.wait(lambda e, n=name: isinstance(e.body, Heartbeat) and e.body.name == n
                            and e.body.counters.get("bad_frames", 0) > 0, 30, f"bad_frames counted by {name}",
                            since=mark)
        assert beat.body.pid == stack.pids[name]
    reports = watcher.select(lambda e: e.kind == "sys.error" and e.body.code.startswith("bad_frame."), since=mark)
    reporters = {e.src.split("@")[0] for e in reports}
    assert reporters >= {*WORKER_NAMES, "supervisor"}, reporters
    assert len(reports) < sent / 20, f"{len(reports)} error reports for {sent} bad frames: not rate limited"

    result = ask(stack.url, "What colour is the sky?", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    after_ask = watcher.mark()
    for name in WORKER_NAMES:
        watcher.wait(lambda e, n=name: isinstance(e.body, Heartbeat) and e.body.name == n, 5,
                     f"a heartbeat from {name} after the answer", since=after_ask)
    assert up.worker_pids() == stack.pids
    assert watcher.select(of_kind("sup.exited"), since=mark) == []
    assert up.proc.poll() is None


@pytest.mark.slow
def test_two_supervisors_share_one_bus(launcher, tmp_path):
    url = launcher.bus_url()
    a = launcher.up("--only", "listener,thinker", "--start-bus", "--bus", url, *NO_AUDIO, label="a")
    b = launcher.up("--only", "speaker", "--join-bus", "--bus", url, "--output", "none", label="b")
    watcher = launcher.watch(Endpoints.parse(url))
    pids = watcher.wait_ready(WORKER_NAMES, timeout=90)
    poll(lambda: a.worker_pids() == {"listener": pids["listener"], "thinker": pids["thinker"]}
         and b.worker_pids() == {"speaker": pids["speaker"]}, 10, "each supervisor runs its own workers")

    mark = watcher.mark()
    result = ask(url, "Say hello to me.", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    play = watcher.wait(of_kind("play.start"), 60, "play.start", since=mark)
    assert pid_of(play.src) == pids["speaker"]
    assert pids["speaker"] in {p.pid for p in b.descendants()}

    mark = watcher.mark()
    old = pids["speaker"]
    os.kill(old, signal.SIGKILL)
    new = watcher.wait_new_hello("speaker", old, 60, since=mark)
    assert new in {p.pid for p in b.descendants()}
    assert new not in {p.pid for p in a.descendants()}
    exited = watcher.wait(of_kind("sup.exited", worker="speaker"), 5, "sup.exited for speaker", since=mark)
    assert pid_of(exited.src) == b.pid
    watcher.wait(of_kind("sup.started", worker="speaker", pid=new), 5, "sup.started from B", since=mark)
    from_a = watcher.select(lambda e: e.kind.startswith("sup.") and pid_of(e.src) == a.pid, since=mark)
    assert from_a == [], f"A reacted to B's worker: {from_a}"
    assert a.worker_pids() == {"listener": pids["listener"], "thinker": pids["thinker"]}
    assert a.proc.poll() is None and b.proc.poll() is None
