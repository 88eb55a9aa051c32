"""The Actor base with real sockets: dispatch, errors, shutdown, urgency, readiness, bad frames.

Each actor runs ``run()`` in a thread against the ``bus`` fixture; an observer
client watches what it publishes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from voicebus.engine.actor import EXIT_FAILED, LOOP_STALL_S, Actor
from voicebus.engine.bus import Bus
from voicebus.engine.client import BusClient
from voicebus.engine.messages import Envelope, Error, Heartbeat, Interrupt, Shutdown

from conftest import wait_for
from support.actors import CrashingLoad, FailingLoad, Note, Recorder
from support.fuzz import RawPublisher, bad_frames, packed, random_frames


class Running:
    """An actor running in a thread; ``code`` is run()'s return value once it has ended."""

    def __init__(self, actor: Actor) -> None:
        self.actor = actor
        self.code: int | None = None
        self.thread = threading.Thread(target=self._run, name=f"actor-{actor.name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.code = self.actor.run()

    @property
    def src(self) -> str:
        return self.actor.bus.src

    def join(self, timeout: float) -> int | None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"{self.actor.name} did not stop within {timeout} s"
        return self.code


@pytest.fixture
def start_actor(bus: Bus) -> Iterator[Callable[..., Running]]:
    running: list[Running] = []

    def start(cls: type[Actor], **kwargs: object) -> Running:
        run = Running(cls(BusClient(bus.endpoints, name=cls.name), **kwargs))
        running.append(run)
        return run

    yield start
    for run in running:
        run.actor.stop("test over")
        if isinstance(run.actor, Recorder):
            run.actor.gate.set()
        run.thread.join(10)


@pytest.fixture
def observer(make_client) -> BusClient:
    return make_client("observer", subscribe=("sys.",))


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not met within {timeout} s")
        time.sleep(0.01)


def wait_ready(observer: BusClient, run: Running) -> Envelope:
    return wait_for(observer, lambda e: e.kind == "sys.ready" and e.src == run.src, timeout=10)


def test_handler_registered_by_kind_is_called(start_actor, observer, make_client):
    run = start_actor(Recorder)
    wait_ready(observer, run)
    sender = make_client("sender")
    sender.publish(Note(text="one"))
    sender.publish(Interrupt(reason="two"))
    sender.publish_kind("test.other", {"text": "ignored"})  # no handler, not subscribed
    # (if both arrive in one batch the interrupt, being urgent, goes first)
    wait_until(lambda: sorted(run.actor.handled) == ["interrupt:two", "one"], what="both handled")
    beat = wait_for(observer, lambda e: e.kind == "sys.heartbeat" and e.src == run.src
                    and e.body.counters.get("handled.test.note") == 1, timeout=5)
    assert beat.body.state == "ready" and beat.body.name == "recorder"


def test_handler_error_is_reported_and_the_loop_goes_on(start_actor, observer, make_client):
    run = start_actor(Recorder)
    wait_ready(observer, run)
    sender = make_client("sender")
    for text in ("raise-voicebus", "after-1", "raise-plain", "after-2"):
        sender.publish(Note(text=text))
    first = wait_for(observer, lambda e: e.kind == "sys.error" and e.src == run.src, timeout=5)
    assert first.body == Error(where="recorder.test.note", code="backend.broken", message="the backend broke",
                               detail=first.body.detail, transient=True)
    assert "Traceback" in first.body.detail
    second = wait_for(observer, lambda e: e.kind == "sys.error" and e.src == run.src, timeout=5)
    assert (second.body.where, second.body.code, second.body.message) == (
        "recorder.test.note", "ValueError", "plain failure")
    assert second.body.transient is False
    wait_until(lambda: run.actor.handled == ["after-1", "after-2"], what="later messages handled")
    wait_for(observer, lambda e: e.kind == "sys.heartbeat" and e.src == run.src
             and e.body.counters.get("handler_errors") == 2, timeout=5)
    assert run.thread.is_alive()


def test_shutdown_stops_with_bye(start_actor, observer, make_client):
    run = start_actor(Recorder)
    wait_ready(observer, run)
    make_client("sender").publish(Shutdown(reason="test says stop"))
    bye = wait_for(observer, lambda e: e.kind == "sys.bye" and e.src == run.src, timeout=5)
    assert bye.body.reason == "test says stop" and bye.body.name == "recorder"
    assert run.join(5) == 0


def test_stop_from_another_thread_exits_zero(start_actor, observer):
    run = start_actor(Recorder)
    wait_ready(observer, run)
    run.actor.stop("stopped by test")
    assert run.join(5) == 0
    assert wait_for(observer, lambda e: e.kind == "sys.bye" and e.src == run.src).body.reason == "stopped by test"


def test_urgent_kind_jumps_the_queue(start_actor, observer, make_client):
    run = start_actor(Recorder)
    wait_ready(observer, run)
    sender = make_client("sender")
    # A probe subscribed like the actor tells when everything has passed the proxy.
    probe = make_client("probe", subscribe=("test.note", "ctl.interrupt"))
    sender.publish(Note(text="gate"))
    assert run.actor.gate_entered.wait(5), "the blocking handler never ran"
    for i in range(50):
        sender.publish(Note(text=f"n{i}"))
    sender.publish(Interrupt(reason="now"))
    wait_for(probe, lambda e: e.kind == "ctl.interrupt", timeout=5)
    time.sleep(0.2)  # not readiness: lets the actor's own socket take in what the probe already has
    run.actor.gate.set()
    wait_until(lambda: len(run.actor.handled) == 52, what="all 52 handled")
    assert run.actor.handled == ["gate", "interrupt:now"] + [f"n{i}" for i in range(50)]


def test_shutdown_is_urgent_too(start_actor, observer, make_client):
    run = start_actor(Recorder)
    wait_ready(observer, run)
    sender = make_client("sender")
    probe = make_client("probe", subscribe=("test.note", "ctl.shutdown"))
    sender.publish(Note(text="gate"))
    assert run.actor.gate_entered.wait(5)
    for i in range(20):
        sender.publish(Note(text=f"n{i}"))
    sender.publish(Shutdown(reason="urgent stop"))
    wait_for(probe, lambda e: e.kind == "ctl.shutdown", timeout=5)
    time.sleep(0.2)  # as above: ordering margin, not readiness
    run.actor.gate.set()
    assert run.join(5) == 0
    assert run.actor.handled == ["gate"], "queued notes were handled before the shutdown"


def test_message_right_after_ready_is_received(start_actor, observer, make_client):
    sender = make_client("sender")
    for i in range(5):  # fresh actors: each must have its subscriptions in place when it says ready
        run = start_actor(Recorder)
        wait_ready(observer, run)
        sender.publish(Note(text=f"first-{i}"))
        wait_until(lambda: run.actor.handled == [f"first-{i}"], timeout=3, what=f"actor {i} got the first note")
        run.actor.stop("next")
        assert run.join(5) == 0


def test_bad_frames_are_counted_reported_rate_limited_and_survived(bus, start_actor, observer, make_client):
    run = start_actor(Recorder)
    wait_ready(observer, run)
    raw = RawPublisher(bus.endpoints, make_client("witness"))
    try:
        cases = bad_frames("test.note", {"text": "x"})
        for _, frames in cases:
            raw.send(frames)
        # Every expected code is reported once, from the actor's decoder.
        expected = {f"bad_frame.{code}" for code, _ in cases if code}
        seen: dict[str, Envelope] = {}
        deadline = time.monotonic() + 10
        while not expected <= set(seen) and time.monotonic() < deadline:
            env = observer.recv(timeout=0.2)
            if env is not None and env.kind == "sys.error" and env.src == run.src:
                seen[env.body.code] = env
        assert expected <= set(seen), f"codes reported: {sorted(seen)}"
        assert all(e.body.where == "recorder.decode" for e in seen.values())

        # A flood of garbage becomes a handful of errors, not a thousand.
        flood = random_frames("test.note", 1000)
        for frames in flood:
            raw.send(frames)
        total = len(cases) + len(flood)
        errors_after_flood = 0
        beat = None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            env = observer.recv(timeout=0.2)
            if env is None or env.src != run.src:
                continue
            if env.kind == "sys.error":
                errors_after_flood += 1
            if isinstance(env.body, Heartbeat) and env.body.counters.get("bad_frames", 0) >= total:
                beat = env
                break
        assert beat is not None, "heartbeat counters never reached the number of bad frames sent"
        assert beat.body.counters["bad_frames"] == total
        per_code = {k: v for k, v in beat.body.counters.items() if k.startswith("bad_frames.")}
        assert sum(per_code.values()) == total
        assert errors_after_flood <= 4, f"{errors_after_flood} sys.error for a flood of 1000"

        # Unknown kinds and unknown fields are not errors; and the actor still works.
        raw.send(["test.note.v2".encode(), packed("test.note.v2", {"whatever": 1})])
        raw.send([b"test.note", packed("test.note", {"text": "extra fields ok", "mood": "fine"})])
        make_client("sender").publish(Note(text="still here"))
        wait_until(lambda: run.actor.handled == ["extra fields ok", "still here"], what="good notes handled")
        assert run.thread.is_alive()
        beat = wait_for(observer, lambda e: e.kind == "sys.heartbeat" and e.src == run.src
                        and e.body.counters.get("handled.test.note") == 2, timeout=5)
        assert beat.body.counters["bad_frames"] == total
    finally:
        raw.close()


def test_bad_shutdown_frame_does_not_stop_the_actor(bus, start_actor, observer, make_client):
    run = start_actor(Recorder)
    wait_ready(observer, run)
    raw = RawPublisher(bus.endpoints, make_client("witness"))
    try:
        for _, frames in bad_frames("ctl.shutdown", {"reason": "fuzz"}):
            raw.send(frames)
        wait_for(observer, lambda e: e.kind == "sys.error" and e.src == run.src
                 and e.body.code.startswith("bad_frame."), timeout=5)
        make_client("sender").publish(Note(text="alive"))
        wait_until(lambda: run.actor.handled == ["alive"], what="note after bad shutdown frames")
        assert run.thread.is_alive()
    finally:
        raw.close()


def test_load_failure_reports_and_exits_2(start_actor, observer):
    run = start_actor(FailingLoad)
    assert run.join(10) == EXIT_FAILED == 2
    error = wait_for(observer, lambda e: e.kind == "sys.error" and e.src == run.src, timeout=5)
    assert (error.body.where, error.body.code) == ("failing.start", "model")
    assert FailingLoad.MODEL in error.body.message
    bye = wait_for(observer, lambda e: e.kind == "sys.bye" and e.src == run.src, timeout=5)
    assert bye.body.reason == "exit 2"


def test_load_bug_reports_with_traceback_and_exits_1(start_actor, observer):
    run = start_actor(CrashingLoad)
    assert run.join(10) == 1
    error = wait_for(observer, lambda e: e.kind == "sys.error" and e.src == run.src, timeout=5)
    assert (error.body.where, error.body.code) == ("crashing.start", "ZeroDivisionError")
    assert "Traceback" in error.body.detail


def test_stuck_loop_falls_silent_then_resumes(start_actor, observer, make_client):
    run = start_actor(Recorder)
    wait_ready(observer, run)
    make_client("sender").publish(Note(text=f"sleep:{LOOP_STALL_S + 1.5}"))
    beats: list[float] = []
    handled_at = None
    deadline = time.monotonic() + LOOP_STALL_S + 10
    while time.monotonic() < deadline:
        if handled_at is None and run.actor.handled:
            handled_at = time.monotonic()
        if handled_at is not None and time.monotonic() - handled_at > 0.6:
            break
        env = observer.recv(timeout=0.05)
        if env is not None and env.kind == "sys.heartbeat" and env.src == run.src:
            beats.append(time.monotonic())
    assert handled_at is not None, "the sleeping handler never returned"
    before = [b for b in beats if b < handled_at]
    after = [b for b in beats if b >= handled_at]
    gaps = [b - a for a, b in zip(before, before[1:] + [handled_at])]
    assert max(gaps) > 1.0, f"heartbeats went on while the loop was stuck: {gaps}"
    assert len(after) >= 3, "heartbeats did not resume after the loop came back"
