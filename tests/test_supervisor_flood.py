"""A flood of the supervisor's own kinds must not make it replace a healthy bus (or kill healthy workers),
nor keep ``voicebus ask`` from answering.

ZeroMQ subscriptions match by prefix: the supervisor takes ``sys.`` and ``ctl.shutdown``, so a flood of
``sys.flood`` or ``ctl.shutdown.flood`` fills its receive queue. Its own echo probe then comes back late or
not at all. Judged by the echo alone, the bus "passed nothing" and was killed as hung. Any frame that
arrives proves the bus forwards; a late echo only means the supervisor cannot tell a silent worker from a
dropped heartbeat, so it judges nobody until the echo is prompt again.
"""

from __future__ import annotations

import subprocess

import pytest

from voicebus.engine.bus import Endpoints
from voicebus.engine.health import FRESH_S, HealthMonitor

from support.procs import FLOOD, WORKER_NAMES, ask, poll

# --- the rule, on a fake clock ---------------------------------------------------------------


def test_traffic_without_an_echo_is_a_busy_bus_not_a_hung_one():
    h = HealthMonitor(timeout_s=3.0)
    h.bus_up(0.0)
    h.started(7, 0.0)
    h.heartbeat(7, 0.5)
    for t in range(1, 21):  # ten seconds of flood: frames every half second, no echo, no heartbeat
        h.traffic(t / 2)
        verdict = h.check(t / 2)
        assert not verdict.bus_hung and verdict.stale == {}, t / 2
    assert verdict.bus_quiet  # workers are not judged while the echo is late
    # the flood ends: the echo is prompt again, and the worker's silence counts from then on
    h.echoed(10.2, sent=10.2)
    assert h.check(10.2).stale == {}
    h.heartbeat(7, 10.4)
    h.echoed(12.0, sent=12.0)
    assert h.check(12.0).stale == {}


def test_echoes_that_waited_in_a_backlog_do_not_prove_heartbeats_get_through():
    """Found by CI: during a flood some probes still got through, two seconds late, so the echo looked
    fresh while the workers' heartbeats were being dropped at the same full queue; three healthy workers
    were killed. An echo that waited in a backlog shows drops, not health."""
    h = HealthMonitor(timeout_s=3.0)
    h.bus_up(0.0)
    h.started(7, 0.0)
    h.heartbeat(7, 0.5)
    for t in range(2, 26):  # an echo arrives every half second, each sent two seconds earlier
        now = t / 2
        h.echoed(now, sent=now - 2.0)
        verdict = h.check(now)
        assert not verdict.bus_hung and verdict.stale == {}, now
    assert verdict.bus_quiet
    for now in (12.6, 13.1, 13.6, 14.1, 14.6, 15.1, 15.6):  # the backlog drained: silence counts from here
        h.echoed(now, sent=now - 0.01)
    assert h.check(15.5).stale == {}
    assert h.check(15.7).stale == {7: 3.0}


def test_no_traffic_at_all_is_still_a_hung_bus():
    h = HealthMonitor(timeout_s=3.0)
    h.bus_up(0.0)
    h.traffic(0.4)
    assert h.check(FRESH_S + 0.5).bus_quiet
    assert not h.check(3.3).bus_hung
    assert h.check(3.5).bus_hung


# --- a real flood through a real voicebus up ---------------------------------------------------



@pytest.mark.slow
def test_a_flood_of_the_supervisors_and_an_askers_kinds_restarts_nothing_and_ask_answers(launcher, tmp_path):
    """Also found by scripts/chaos.py: 'voicebus ask' subscribed to all of llm., so a flood of llm.token.*
    (or just many concurrent answers' tokens) held up the hello that proves its connection: it exited 1
    with 'no answer from the bus'. It now reads only the kinds it handles."""
    url = launcher.bus_url()
    up = launcher.up("--input", "none", "--output", "none", "--bus", url)
    watcher = launcher.watch(Endpoints.parse(url), "sys.ready", "sup.")
    for name in WORKER_NAMES:
        watcher.wait(lambda e, n=name: e.kind == "sys.ready" and e.body.name == n, 90, f"{name} ready")
    poll(lambda: len(up.worker_pids()) == 3 and up.bus_pid() is not None, 10, "the supervisor's children")
    workers, bus = up.worker_pids(), up.bus_pid()
    mark = watcher.mark()
    flooder = subprocess.Popen(
        [*FLOOD, Endpoints.parse(url).publish, "12", "150000",
         "sys.flood,ctl.shutdown.flood,llm.token.flood"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        result = ask(url, "Still there?", tmp_path, timeout=60)  # asked while the flood runs (12 s)
        assert result.returncode == 0, result.stderr
        out, err = flooder.communicate(timeout=60)
        assert flooder.returncode == 0 and int(out.split()[0]) > 500_000, err
    finally:
        if flooder.poll() is None:
            flooder.kill()
            flooder.wait(10)
    assert "passed nothing" not in up.stderr(), up.stderr()[-2000:]
    sup = [(e.kind, e.body) for e in watcher.select(lambda e: e.kind.startswith("sup."), mark)]
    assert sup == [], (sup, up.stderr()[-3000:])
    assert up.worker_pids() == workers and up.bus_pid() == bus
