"""A sustained flood through a real ``voicebus up``: nobody crashes, memory stays bounded.

libzmq aborts a process whose receive queue is full when a ZMTP heartbeat times out
(``Assertion failed: _input_stopped``, libzmq issue 3937); 500k-message queues let a
flooded worker grow by ~160 MB and keep it. With no ZMTP heartbeats and queues of
``HWM`` messages, the flood costs dropped messages (counted) and nothing else.
"""

from __future__ import annotations

import subprocess
import threading
import time

import psutil
import pytest

from voicebus.engine.bus import Endpoints
from voicebus.engine.messages import Heartbeat

from support.procs import FLOOD, WORKER_NAMES, ask, poll

pytestmark = pytest.mark.slow

FLOOD_S = 8.0
RATE = 150_000
"""Messages per second, as in the report that found the abort."""
TOPICS = "ctl.interrupt.flood,llm.token.flood"
"""Subscriptions are prefixes: the thinker and speaker take ``ctl.interrupt``, the listener and speaker
``llm.token``, so this fills every worker's queue; the kinds themselves are unknown and pass through.
The supervisor subscribes to neither: a flood of its own kinds is its health check's business (a full
queue drops its echo probe, and it replaces the bus as hung)."""
QUEUE_MB = 50_000 * 400 / 2**20
"""One full queue of small messages: the engine's HWM (50k, checked in test_bus) at ~400 bytes each in
memory (two zmq_msg_t, the payload, malloc's share). A literal, so that raising HWM fails here."""
WORKER_GROWTH_MB = QUEUE_MB + 24
"""A worker holds at most its SUB's queue, plus Python's own churn decoding what it reads (~24 MB slack).
Measured here: +22 to +25 MB; with 500k queues and ZMTP heartbeats the same flood grew workers by
61 to 188 MB (and once aborted the speaker)."""
BUS_GROWTH_MB = 8 * QUEUE_MB + 24
"""The proxy holds four queues: the flooder's connection, and one per subscriber that wants the flood
(the three workers). Each costs up to ~1.5 times a worker's queue in the proxy (ypipe chunks, ZMTP
batches, the I/O thread's malloc arena; measured +64 to +117 MB in all), so twice each, plus slack."""




def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def rss_now(pid: int) -> int | None:
    try:
        return round(rss_mb(pid))
    except psutil.Error:
        return None  # gone: the pid checks below say who


class PeakRss(threading.Thread):
    """The highest RSS of each process, sampled every 100 ms until stopped."""

    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.peak = {name: rss_mb(pid) for name, pid in pids.items()}
        self._done = threading.Event()
        self.start()

    def run(self) -> None:
        while not self._done.wait(0.1):
            for name, pid in self.pids.items():
                try:
                    self.peak[name] = max(self.peak[name], rss_mb(pid))
                except psutil.Error:
                    pass

    def stop(self) -> dict[str, float]:
        self._done.set()
        self.join(2)
        return self.peak


def received(watcher, name: str, since: int = 0) -> int:
    beats = watcher.select(lambda e: isinstance(e.body, Heartbeat) and e.body.name == name, since)
    return beats[-1].body.counters.get("received", 0) if beats else 0


def test_flood_leaves_every_worker_on_its_first_pid_with_bounded_memory(launcher, tmp_path):
    url = launcher.bus_url()
    started = time.monotonic()
    up = launcher.up("--input", "none", "--output", "none", "--bus", url)
    watcher = launcher.watch(Endpoints.parse(url), "sys.", "sup.")
    pids = watcher.wait_ready(WORKER_NAMES, timeout=90)
    poll(lambda: up.worker_pids() == pids and up.bus_pid() is not None, 10, "the supervisor's children")
    ready_s = time.monotonic() - started
    everyone = {**pids, "bus": up.bus_pid(), "supervisor": up.pid}
    before = {name: rss_mb(pid) for name, pid in everyone.items()}
    counted = {name: received(watcher, name) for name in WORKER_NAMES}
    mark = watcher.mark()

    peaks = PeakRss(everyone)
    flooder = subprocess.run([*FLOOD, Endpoints.parse(url).publish, str(FLOOD_S), str(RATE),
                              TOPICS], capture_output=True, text=True, timeout=FLOOD_S + 30)
    assert flooder.returncode == 0, flooder.stderr
    sent, took = flooder.stdout.split()
    sent = int(sent)

    # Everyone heard from after the flood (a heartbeat sent after it ended), then the figures, then the verdicts.
    after_flood = watcher.mark()
    deadline = time.monotonic() + 15
    silent = set(WORKER_NAMES)
    while silent and time.monotonic() < deadline:
        silent -= {e.body.name for e in watcher.select(lambda e: isinstance(e.body, Heartbeat), after_flood)}
        time.sleep(0.1)
    peak = peaks.stop()  # queues keep filling for a moment after the flood: sample until now
    figures = {
        "ready_s": round(ready_s, 1), "sent": sent, "flood_s": float(took), "rate": round(sent / float(took)),
        "received": {n: received(watcher, n) - counted[n] for n in WORKER_NAMES},
        "rss_before_mb": {n: round(v) for n, v in before.items()},
        "rss_peak_mb": {n: round(v) for n, v in peak.items()},
        "rss_after_mb": {n: rss_now(p) for n, p in everyone.items()},
        "bounds_mb": {"worker": round(WORKER_GROWTH_MB), "bus": round(BUS_GROWTH_MB)},
    }
    print(f"\nflood figures: {figures}")
    assert not silent, f"no heartbeat after the flood from {silent}; {figures}"
    assert_unharmed(up, watcher, pids, everyone["bus"], mark)
    for name in WORKER_NAMES:
        assert peak[name] - before[name] < WORKER_GROWTH_MB, figures
    assert peak["bus"] - before["bus"] < BUS_GROWTH_MB, figures
    assert peak["supervisor"] - before["supervisor"] < WORKER_GROWTH_MB, figures
    # The assistant still answers, and a queue still full after the flood harmed nobody later either
    # (with ZMTP heartbeats, the abort came seconds after the flood had stopped).
    result = ask(url, "Are you still there?", tmp_path)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert_unharmed(up, watcher, pids, everyone["bus"], mark)


def assert_unharmed(up, watcher, pids: dict[str, int], bus_pid: int, mark: int) -> None:
    restarts = [(e.kind, getattr(e.body, "worker", "")) for e in watcher.select(lambda e: e.kind.startswith("sup."), mark)]
    assert restarts == [], f"restarted: {restarts}"
    assert up.worker_pids() == pids and up.bus_pid() == bus_pid and up.proc.poll() is None
    stderr = up.stderr()
    assert "Assertion failed" not in stderr, [line for line in stderr.splitlines() if "Assertion" in line]
