"""The Actor base class: a worker is a class whose handlers are registered by kind.

    class Echo(Actor):
        name = "echo"

        @handles("ctl.say")
        def say(self, env): ...

The loop lives here: connect, prove readiness (own hello echoed), load the
backends while heartbeating ``loading``, announce ``sys.ready``, then dispatch
messages — urgent kinds (``ctl.interrupt``, ``ctl.shutdown``) ahead of anything
already queued. A handler's exception is reported as ``sys.error`` and the loop
goes on: one bad message must not take a worker (and its loaded model) down.
Handlers must return quickly; long work belongs on the worker's own threads.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import ClassVar

from voicebus.engine.client import BusClient
from voicebus.engine.errors import VoicebusError
from voicebus.engine.messages import Bye, Envelope, Heartbeat, Ready, Shutdown, body_class

log = logging.getLogger(__name__)

Handler = Callable[["Actor", Envelope], None]
HEARTBEAT_S = 0.5
LOOP_STALL_S = 2.0
"""A loop silent this long stops the heartbeats, so the supervisor sees the hang."""
EXIT_FAILED = 2
"""Exit code when the worker could not start (its backends failed to load)."""


def handles(*kinds: str) -> Callable[[Handler], Handler]:
    """Mark a method as the handler of one or more message kinds."""

    def mark(fn: Handler) -> Handler:
        fn._voicebus_kinds = kinds  # type: ignore[attr-defined]
        return fn

    return mark


class Actor:
    name: ClassVar[str] = "actor"
    _handlers: ClassVar[dict[str, Handler]]

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        handlers: dict[str, Handler] = {}
        for klass in reversed(cls.__mro__):
            for attr in vars(klass).values():
                for kind in getattr(attr, "_voicebus_kinds", ()):
                    handlers[kind] = attr
        cls._handlers = handlers

    def __init__(self, client: BusClient, *, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.bus = client
        self.heartbeat_s = heartbeat_s
        self.state = "starting"
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._stop_reason = ""
        self._failed = False
        self._loop_tick = time.monotonic()
        self._parent = os.getppid()

    # --- hooks for subclasses ------------------------------------------------------------

    def backends(self) -> dict[str, str]:
        """Backend names for ``sys.hello`` (e.g. ``{"asr": "pocketsphinx"}``)."""
        return {}

    def load(self) -> None:
        """Load models and open devices; runs after the bus is proven, before ``sys.ready``."""

    def tick(self) -> None:
        """Called on every loop turn (at least every 100 ms)."""

    def close(self) -> None:
        """Release resources; called once on the way out."""

    # --- running -------------------------------------------------------------------------

    def stop(self, reason: str) -> None:
        if not self._stop.is_set():
            self._stop_reason = reason
            self._stop.set()

    def fail(self, exc: VoicebusError) -> None:
        """A thread of the worker met an error it cannot go on from (an output that cannot be written):
        said as a failure to start is (one line, ``sys.error``), and the worker exits with EXIT_FAILED,
        so that its supervisor replaces it."""
        self._fail(exc, f"{type(exc).__name__}: {exc}")
        self._failed = True
        self.stop(f"{type(exc).__name__}: {exc}")

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> int:
        """Run until ``ctl.shutdown``, SIGTERM/SIGINT or ``stop()``; returns the exit code."""
        self._install_signal_handlers()
        code = 0
        heartbeat = threading.Thread(target=self._heartbeat_loop, name=f"{self.name}-heartbeat", daemon=True)
        try:
            self.bus.subscribe(*self._subscriptions())
            self.bus.announce(self.backends())
            heartbeat.start()
            self.state = "loading"
            t0 = time.monotonic()
            self.load()
            self.state = "ready"
            self.bus.publish(Ready(name=self.name, pid=os.getpid(), load_s=round(time.monotonic() - t0, 3)))
            self._loop()
            if self._failed:
                code = EXIT_FAILED
        except VoicebusError as exc:
            self._fail(exc, f"{type(exc).__name__}: {exc}")
            code = EXIT_FAILED
        except ConnectionError as exc:
            print(f"{self.name}: {exc}", file=sys.stderr, flush=True)
            code = EXIT_FAILED
        except Exception as exc:  # the worker must say why it died, on the bus and on stderr
            self._fail(exc, traceback.format_exc())
            code = 1
        finally:
            self.state = "stopping"
            self._stop.set()
            try:
                self.close()
            finally:
                self._say_bye(code)
        return code

    def _subscriptions(self) -> list[str]:
        return sorted(set(self._handlers) | {"ctl.shutdown"})

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._loop_tick = time.monotonic()
            batch = []
            first = self.bus.recv(timeout=0.1)
            if first is not None:
                batch.append(first)
                # Drain what is already waiting so urgent kinds can jump the queue.
                while len(batch) < 256 and (env := self.bus.recv_nowait()) is not None:
                    batch.append(env)
                batch.sort(key=lambda e: not _is_urgent(e.kind))
            for env in batch:
                if env.kind == "ctl.shutdown" and env.kind not in self._handlers:
                    reason = env.body.reason if isinstance(env.body, Shutdown) else "shutdown"
                    self.stop(reason)
                    break
                self._dispatch(env)
                if self._stop.is_set():
                    break
            self._safely("tick", self.tick)

    def _dispatch(self, env: Envelope) -> None:
        handler = self._handlers.get(env.kind)
        if handler is None:
            return
        self.bus.counters[f"handled.{env.kind}"] += 1
        self._safely(env.kind, lambda: handler(self, env))

    def _safely(self, where: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:  # report and go on: one bad message must not kill the worker
            self.bus.counters["handler_errors"] += 1
            detail = traceback.format_exc()
            print(f"{self.name}: error in {where}: {exc}", file=sys.stderr, flush=True)
            self.bus.report(f"{self.name}.{where}", exc, detail=detail)

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if os.getppid() != self._parent:
                # Our supervisor is gone (SIGKILLed); don't linger as an orphan.
                self.stop("supervisor gone")
                return
            if self.state == "ready" and time.monotonic() - self._loop_tick > LOOP_STALL_S:
                continue  # the loop is stuck: fall silent so the supervisor replaces us
            try:
                self.bus.publish(
                    Heartbeat(
                        name=self.name,
                        pid=os.getpid(),
                        uptime=round(time.monotonic() - self.started, 3),
                        state=self.state,
                        counters=dict(self.bus.counters),
                    )
                )
            except RuntimeError:
                return  # closed under us on the way out

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: self.stop(signal.Signals(signum).name))

    def _fail(self, exc: BaseException, detail: str) -> None:
        print(f"{self.name}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        if not isinstance(exc, VoicebusError):
            print(detail, file=sys.stderr, flush=True)
        try:
            self.bus.report(f"{self.name}.start" if self.state != "ready" else self.name, exc, detail=detail)
        except RuntimeError:
            pass

    def _say_bye(self, code: int) -> None:
        try:
            self.bus.publish(Bye(name=self.name, pid=os.getpid(), reason=self._stop_reason or f"exit {code}"))
        except RuntimeError:
            pass
        self.bus.close()


def _is_urgent(kind: str) -> bool:
    cls = body_class(kind)
    return cls is not None and cls.urgent

