"""Who is unwell: the bus, or a worker — decided from heartbeats and the supervisor's own echo.

The supervisor publishes a heartbeat of its own every ``PROBE_S``; when it
comes back promptly, the bus demonstrably passes messages, and so would the
workers' heartbeats. A worker's silence counts against it only over such time —
otherwise a hung bus would look like every worker hanging at once, and healthy
workers would be killed while the real culprit stayed.

A late echo is not a hung bus, though. A flood of any kind the supervisor
subscribes to (subscriptions are prefixes: ``sys.flood`` fills a ``sys.``
subscription) fills its receive queue, and its probe then waits behind the
flood or is dropped with it. Any frame received (``traffic``) proves the bus
forwards; so the bus is hung only when *nothing at all* arrived for the whole
timeout. While the echo is late but traffic flows, nobody is judged: a
worker's heartbeat may have been dropped in the same queue, and killing a
healthy worker costs its loaded model, where waiting out the flood costs only
time.

"Late" is measured on each echo, not only by when the last one arrived: under a
flood the queue sits at its high-water mark and ZeroMQ drops whatever does not
fit, so some probes still get through — seconds after they were sent — while a
worker's heartbeats are dropped. An echo that waited longer than ``PROMPT_S``
shows a backlog, and a backlog means drops; it proves traffic, not health.
(A separate socket for health would not escape this: a flood of
``sys.heartbeat.x`` matches any subscription that lets heartbeats in.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

PROBE_S = 0.5
"""How often the supervisor sends its own heartbeat through the bus."""
FRESH_S = 1.5
"""A prompt echo younger than this means the bus is passing messages now."""
PROMPT_S = 0.5
"""An echo that spent longer than this on its way waited in a backlog (a flood); see above."""
FIRST_HEARTBEAT_GRACE_S = 15.0
"""A new child may take this long (interpreter, imports, bus handshake) before its first heartbeat."""
BUS_RESTART_GRACE_S = 2.0
"""After the bus restarts, workers get this long to reconnect before silence counts."""


@dataclass
class Verdict:
    bus_hung: bool = False
    """the bus passed nothing at all for the whole timeout"""
    bus_quiet: bool = False
    """our echo did not come back lately (the bus is hung, or a flood holds it up): workers are not judged now"""
    stale: dict[int, float] = field(default_factory=dict)
    """pid → the silence limit it exceeded"""


@dataclass
class HealthMonitor:
    timeout_s: float
    _last_echo: float = 0.0
    _last_traffic: float = 0.0
    _grace_until: float = 0.0
    _bus_silent_until: float = 0.0
    _heartbeats: dict[int, float] = field(default_factory=dict)
    _started: dict[int, float] = field(default_factory=dict)

    def bus_up(self, now: float, *, restarted: bool = False) -> None:
        """The bus is (back) up: start counting from ``now`` (plus a grace after a restart)."""
        self._last_echo = now
        self._grace_until = now + (BUS_RESTART_GRACE_S if restarted else 0.0)

    def echoed(self, now: float, sent: float) -> None:
        """Our probe sent at ``sent`` came back at ``now``; only a prompt one shows heartbeats get through."""
        self._last_traffic = now
        if now - sent <= PROMPT_S:
            self._last_echo = now

    def traffic(self, now: float) -> None:
        """Frames arrived (of any kind, even undecodable): the bus forwards, however late our echo is."""
        self._last_traffic = now

    def started(self, pid: int, now: float) -> None:
        self._started[pid] = now

    def heartbeat(self, pid: int, now: float) -> None:
        self._heartbeats[pid] = now

    def forget(self, pid: int) -> None:
        self._heartbeats.pop(pid, None)
        self._started.pop(pid, None)

    def check(self, now: float) -> Verdict:
        quiet = now - max(self._last_echo, self._grace_until)
        if quiet > FRESH_S:
            self._bus_silent_until = now
            silent = now - max(self._last_echo, self._last_traffic, self._grace_until)
            return Verdict(bus_hung=silent > self.timeout_s, bus_quiet=True)
        verdict = Verdict()
        for pid, started in self._started.items():
            heard = self._heartbeats.get(pid)
            limit = self.timeout_s if heard is not None else max(self.timeout_s, FIRST_HEARTBEAT_GRACE_S)
            since = max(heard or 0.0, started, self._grace_until, self._bus_silent_until)
            if now - since > limit:
                verdict.stale[pid] = limit
        return verdict
