"""The supervisor: starts the bus and the workers, watches them, restarts each on its own.

It runs in the foreground of ``voicebus up``. One loop, ticking every 50 ms:
read the bus (heartbeats, errors, ``ctl.shutdown``), reap exited children,
kill children whose heartbeats stopped, start the restarts that are due.
Collaborators do the parts: ``Child`` (process), ``RestartPolicy`` (when and
whether), and a ``View`` (what the user sees). It knows nothing about voice.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from voicebus.engine.client import BusClient
from voicebus.engine.messages import Envelope, Error, Exited, GaveUp, Heartbeat, Hello, Restarting, Shutdown, Started
from voicebus.engine.health import PROBE_S, HealthMonitor
from voicebus.engine.restart_policy import RestartPolicy
from voicebus.engine.settings import SupervisorSettings
from voicebus.engine.spawner import Child, WorkerSpec, describe_exit

TICK_S = 0.05
LOADING = ("starting", "loading")
"""Slot states of a child that has not said it is ready."""
DIAGNOSE = "voicebus doctor"
"""What to run when a worker crashed while loading: it checks each backend, the local model in a child process."""


@dataclass
class ChildStatus:
    name: str
    pid: int | None
    state: str
    """starting | loading | ready | restarting | stopped | gave up"""
    restarts: int
    uptime: float


class View(Protocol):
    def child_line(self, name: str, line: str) -> None: ...
    def event(self, text: str) -> None: ...
    def status(self, rows: list[ChildStatus]) -> None: ...
    def message(self, env: Envelope) -> None: ...


class Slot:
    """One supervised name: its spec, its current child, its restart policy."""

    def __init__(self, spec: WorkerSpec, policy: RestartPolicy) -> None:
        self.spec = spec
        self.policy = policy
        self.child: Child | None = None
        self.state = "starting"
        self.restart_at: float | None = None
        self.last_error = ""
        self.backends: dict[str, str] = {}
        """What the worker said it loads (its ``sys.hello``); kept across restarts, the spec is the same."""

    def status(self) -> ChildStatus:
        child = self.child
        return ChildStatus(
            name=self.spec.name,
            pid=child.pid if child else None,
            state=self.state,
            restarts=self.policy.restarts,
            uptime=child.uptime if child else 0.0,
        )


def _exit_reason(slot: Slot, returncode: int | None, sig: str) -> str:
    """Why a child ended, as the user reads it; a signal before ready names what the worker was loading."""
    if not sig:
        return f"exit code {returncode}"
    if slot.state not in LOADING:
        return f"killed by {sig}"
    if not slot.backends:
        return f"killed by {sig} while starting"
    loading = ", ".join(f"{stage}={name}" for stage, name in slot.backends.items())
    return f"killed by {sig} while loading its backends ({loading})"


class Supervisor:
    """Run ``bus`` (optional) and ``workers`` until shutdown; ``run()`` returns the exit code."""

    def __init__(
        self,
        *,
        client_factory,
        workers: Sequence[WorkerSpec],
        bus: WorkerSpec | None,
        settings: SupervisorSettings,
        view: View,
        watch: Sequence[str] = (),
    ) -> None:
        self._client_factory = client_factory
        self.settings = settings
        self.view = view
        self.watch = tuple(watch)
        self.bus_slot = Slot(bus, self._policy()) if bus else None
        self.slots = [Slot(spec, self._policy()) for spec in workers]
        self.client: BusClient | None = None
        self._stop = threading.Event()
        self._stop_reason = ""
        self.exit_code = 0
        self.failure = ""
        self.health = HealthMonitor(settings.heartbeat_timeout_s)
        self._started = time.monotonic()
        self._next_probe = 0.0
        self._reported_quiet_bus = False
        """A remote bus that went quiet was reported (once per quiet spell)."""
        self._received = 0
        """Frames our connection had received at the last tick: more since then is traffic (see health)."""

    def _policy(self) -> RestartPolicy:
        s = self.settings
        return RestartPolicy(s.backoff_initial_s, s.backoff_max_s, s.max_restarts, s.restart_window_s, s.stable_after_s)

    @property
    def all_slots(self) -> list[Slot]:
        return ([self.bus_slot] if self.bus_slot else []) + self.slots

    def request_stop(self, reason: str) -> None:
        if not self._stop.is_set():
            self._stop_reason = reason
            self._stop.set()

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        self._install_signal_handlers()
        try:
            if self.bus_slot:
                self._spawn(self.bus_slot)
            self.client = self._connect()
            if self.client is not None:
                for slot in self.slots:
                    self._spawn(slot)
                self.health.bus_up(time.monotonic())
                while not self._stop.is_set():
                    self._step()
                self.view.event(f"stopping: {self._stop_reason}")
        finally:
            self._shutdown()
        return self.exit_code

    def _connect(self) -> BusClient | None:
        """Our own bus connection, proven by the hello echo; retried while the bus child starts."""
        deadline = time.monotonic() + 15
        while not self._stop.is_set():
            client = self._client_factory()
            client.subscribe("sys.", "ctl.shutdown", *self.watch)
            try:
                client.announce(timeout=1.0)
                return client
            except ConnectionError as exc:
                client.close()
                if self.bus_slot and self.bus_slot.child and self.bus_slot.child.poll() is not None:
                    self._reap()
                if self._stop.is_set():
                    return None
                if time.monotonic() > deadline:
                    self._fail("bus", str(exc))
                    return None
        return None

    def _step(self) -> None:
        assert self.client is not None
        deadline = time.monotonic() + TICK_S
        while (remaining := deadline - time.monotonic()) > 0:
            env = self.client.recv(timeout=remaining)
            if env is None:
                break
            self._on_message(env)
        received = self.client.counters["received"]  # every frame, bad ones too
        if received != self._received:
            self._received = received
            self.health.traffic(time.monotonic())
        self._probe_bus()
        self._reap()
        self._check_heartbeats()
        self._start_due()
        self.view.status([slot.status() for slot in self.all_slots])

    def _on_message(self, env: Envelope) -> None:
        body = env.body
        if isinstance(body, Heartbeat) and self.client is not None and env.src == self.client.src:
            self.health.echoed(time.monotonic(), sent=self._started + body.uptime)  # our probe came back
        elif isinstance(body, Heartbeat):
            slot = self._slot_by_pid(body.pid)
            if slot is not None:
                self.health.heartbeat(body.pid, time.monotonic())
                if slot.state != "restarting":
                    slot.state = body.state
        elif isinstance(body, Hello):
            slot = self._slot_by_pid(body.pid)
            if slot is not None and body.backends:
                slot.backends = dict(body.backends)
        elif isinstance(body, Error):
            slot = self._slot_by_src(env.src)
            if slot is not None:
                slot.last_error = body.message
        elif isinstance(body, Shutdown):
            if body.failed and not self.exit_code:
                self.exit_code = 1
                self.failure = body.reason
            self.request_stop(body.reason)
        if self.watch and env.kind.startswith(self.watch):
            self.view.message(env)

    def _slot_by_pid(self, pid: int) -> Slot | None:
        return next((s for s in self.slots if s.child and s.child.pid == pid), None)

    def _slot_by_src(self, src: str) -> Slot | None:
        pid = src.rsplit(":", 1)[-1]
        return self._slot_by_pid(int(pid)) if pid.isdigit() else None

    def _reap(self) -> None:
        now = time.monotonic()
        for slot in self.all_slots:
            child = slot.child
            if child is None or (code := child.poll()) is None:
                continue
            child.wait_output()
            slot.child = None
            self.health.forget(child.pid)
            returncode, sig = describe_exit(code)
            self._publish(Exited(worker=slot.spec.name, pid=child.pid, returncode=returncode, signal=sig))
            if self._stop.is_set():
                slot.state = "stopped"
                continue
            reason = _exit_reason(slot, returncode, sig)
            crashed_loading = bool(sig) and slot.state in LOADING
            delay = slot.policy.on_exit(now, child.uptime)
            if delay is None:
                slot.state = "gave up"
                last = slot.last_error or child.last_error()
                self._publish(GaveUp(worker=slot.spec.name, restarts=slot.policy.restarts, last_error=last))
                if crashed_loading:
                    # A signal before ready is most likely a native crash in a backend's loader
                    # (a model library built for another CPU), which the worker cannot report itself.
                    reason += f"; run '{DIAGNOSE}' to check them"
                self._fail(slot.spec.name, f"{reason}; last error:\n{child.last_error()}")
                return
            slot.state = "restarting"
            slot.restart_at = now + delay
            self.view.event(f"{slot.spec.name} {reason}; restarting in {delay:.1f} s")
            self._publish(Restarting(worker=slot.spec.name, restarts=slot.policy.restarts, delay_s=delay, reason=reason))

    def _probe_bus(self) -> None:
        now = time.monotonic()
        if now >= self._next_probe:
            self._next_probe = now + PROBE_S
            uptime = round(now - self._started, 3)
            self._publish(Heartbeat(name="supervisor", pid=os.getpid(), uptime=uptime, state="ready"))

    def _check_heartbeats(self) -> None:
        verdict = self.health.check(time.monotonic())
        timeout = self.settings.heartbeat_timeout_s
        if verdict.bus_hung:
            bus = self.bus_slot.child if self.bus_slot else None
            if bus is not None and bus.poll() is None:
                # Ours, and it passes nothing (hung, stopped): repair the bus, not the workers.
                self.view.event(f"the bus (pid {bus.pid}) passed nothing for {timeout:.0f} s; killing it")
                self.bus_slot.last_error = f"passed nothing for {timeout:.0f} s"
                bus.kill()
            elif self.bus_slot is None and not self._reported_quiet_bus:
                self.view.event(f"no answer through the bus for {timeout:.0f} s; waiting for it")
                self._reported_quiet_bus = True
        if not verdict.bus_quiet:
            self._reported_quiet_bus = False
        for slot in self.slots:
            child = slot.child
            if child is not None and child.pid in verdict.stale:
                limit = verdict.stale[child.pid]
                self.view.event(f"{slot.spec.name} (pid {child.pid}) sent no heartbeat for {limit:.0f} s; killing it")
                slot.last_error = f"no heartbeat for {limit:.0f} s"
                child.kill()

    def _start_due(self) -> None:
        now = time.monotonic()
        for slot in self.all_slots:
            if slot.child is None and slot.restart_at is not None and now >= slot.restart_at:
                slot.restart_at = None
                self._spawn(slot)
                if slot is self.bus_slot:
                    # Workers lose the bus while it restarts; give their heartbeats time to resume.
                    self.health.bus_up(now, restarted=True)

    def _spawn(self, slot: Slot) -> None:
        slot.child = Child(slot.spec, self.view.child_line)
        # The bus sends no heartbeats; our own connection (re)proves it, so it counts as running.
        slot.state = "starting" if slot.spec.heartbeats else "running"
        if slot.spec.heartbeats:
            self.health.started(slot.child.pid, time.monotonic())
        if slot is not self.bus_slot:
            self._publish(Started(worker=slot.spec.name, pid=slot.child.pid))

    def _publish(self, body) -> None:
        if self.client is not None:
            self.client.publish(body)

    def _fail(self, name: str, message: str) -> None:
        self.exit_code = 1
        self.failure = f"gave up on {name}: {message}"
        self.request_stop(f"gave up on {name}")

    # --- stopping ----------------------------------------------------------------------------

    def _shutdown(self) -> None:
        """ctl.shutdown, then SIGTERM, then SIGKILL; the bus goes last so workers hear the shutdown."""
        self._stop.set()
        budget = self.settings.stop_timeout_s
        start = time.monotonic()
        if self.client is not None and any(s.child for s in self.slots):
            self._publish(Shutdown(reason=self._stop_reason or "supervisor stopping"))
        for sig, share in ((None, 0.4), (signal.SIGTERM, 0.7), (signal.SIGKILL, 1.0)):
            alive = [s.child for s in self.slots if s.child and s.child.poll() is None]
            for child in alive:
                if sig is not None:
                    child.signal(sig)
            self._wait_children(alive, start + budget * share)
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.bus_slot and self.bus_slot.child:
            bus_child = self.bus_slot.child
            bus_child.signal(signal.SIGTERM)
            self._wait_children([bus_child], time.monotonic() + 1.0)
            bus_child.kill()
            bus_child.proc.wait()
        for slot in self.all_slots:
            if slot.child is not None:
                slot.child.proc.wait()
                slot.child.wait_output(0.5)
                slot.child = None
            if slot.state != "gave up":
                slot.state = "stopped"
        self.view.status([slot.status() for slot in self.all_slots])

    @staticmethod
    def _wait_children(children: list[Child], deadline: float) -> None:
        for child in children:
            remaining = deadline - time.monotonic()
            if remaining > 0:
                try:
                    child.proc.wait(timeout=remaining)
                except Exception:  # TimeoutExpired: the next, harder signal follows
                    pass

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda signum, _f: self.request_stop(signal.Signals(signum).name))

