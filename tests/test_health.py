"""The health monitor's decisions, on a fake clock (pure logic)."""

from __future__ import annotations

from voicebus.engine.health import BUS_RESTART_GRACE_S, FIRST_HEARTBEAT_GRACE_S, HealthMonitor


def test_a_silent_worker_is_stale_after_the_timeout():
    h = HealthMonitor(timeout_s=3.0)
    h.bus_up(0.0)
    h.started(7, 0.0)
    h.heartbeat(7, 1.0)
    for t in (1.5, 2.5, 3.5):
        h.echoed(t, sent=t)
    assert h.check(3.9).stale == {}
    h.echoed(4.1, sent=4.1)
    assert h.check(4.2).stale == {7: 3.0}


def test_a_new_worker_gets_a_first_heartbeat_grace():
    h = HealthMonitor(timeout_s=3.0)
    h.bus_up(0.0)
    h.started(7, 0.0)
    for t in range(1, 20):
        h.echoed(float(t), sent=float(t))
        if t < FIRST_HEARTBEAT_GRACE_S:
            assert h.check(float(t)).stale == {}
    assert h.check(19.0).stale == {7: FIRST_HEARTBEAT_GRACE_S}


def test_a_quiet_bus_is_blamed_not_the_workers():
    h = HealthMonitor(timeout_s=3.0)
    h.bus_up(0.0)
    h.started(7, 0.0)
    h.heartbeat(7, 0.5)
    verdict = h.check(2.0)  # no echo since 0.0
    assert verdict.bus_quiet and not verdict.bus_hung and verdict.stale == {}
    assert h.check(3.5).bus_hung
    # the bus comes back: the worker's silence counts only from then on
    h.bus_up(10.0, restarted=True)
    h.echoed(12.0, sent=12.0)
    assert h.check(12.0).stale == {}
    later = 10.0 + BUS_RESTART_GRACE_S + 3.5
    h.echoed(later, sent=later)
    assert h.check(later).stale == {7: 3.0}


def test_forgotten_workers_are_not_judged():
    h = HealthMonitor(timeout_s=3.0)
    h.bus_up(0.0)
    h.started(7, 0.0)
    h.forget(7)
    h.echoed(20.0, sent=20.0)
    assert h.check(20.0).stale == {}
