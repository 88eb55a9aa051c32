"""Small actors for the engine tests, and a test-only message kind."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from voicebus.engine.actor import Actor, handles
from voicebus.engine.client import BusClient
from voicebus.engine.errors import BackendError, ModelError
from voicebus.engine.messages import Body, Envelope


@dataclass(frozen=True, kw_only=True)
class Note(Body, kind="test.note"):
    """A test message: its text tells the Recorder what to do."""

    text: str


class Recorder(Actor):
    """Records what it handles, in order. Some texts make the handler misbehave:

    ``raise-voicebus`` / ``raise-plain`` raise; ``gate`` blocks until ``gate`` is set;
    ``sleep:S`` blocks S seconds.
    """

    name = "recorder"

    def __init__(self, client: BusClient, *, heartbeat_s: float = 0.1) -> None:
        super().__init__(client, heartbeat_s=heartbeat_s)
        self.handled: list[str] = []
        self.gate = threading.Event()
        self.gate_entered = threading.Event()

    @handles("test.note")
    def on_note(self, env: Envelope) -> None:
        assert isinstance(env.body, Note)
        text = env.body.text
        if text == "raise-voicebus":
            raise BackendError("the backend broke", code="backend.broken", transient=True)
        if text == "raise-plain":
            raise ValueError("plain failure")
        if text == "gate":
            self.gate_entered.set()
            self.gate.wait(10)
        if text.startswith("sleep:"):
            time.sleep(float(text.partition(":")[2]))
        self.handled.append(text)

    @handles("ctl.interrupt")
    def on_interrupt(self, env: Envelope) -> None:
        self.handled.append(f"interrupt:{env.body.reason}")  # type: ignore[union-attr]


class FailingLoad(Actor):
    """An actor whose backend cannot be loaded."""

    name = "failing"
    MODEL = "/nowhere/model.gguf"

    def load(self) -> None:
        raise ModelError(f"no model file at {self.MODEL}")


class CrashingLoad(Actor):
    """An actor whose load() has a plain bug (not a VoicebusError)."""

    name = "crashing"

    def load(self) -> None:
        raise ZeroDivisionError("a bug in load")
