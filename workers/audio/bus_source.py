"""Audio in from the bus: the frames of ``audio.in`` messages that another process publishes.

``--input bus`` makes the listener hear what a remote microphone, or ``voicebus
replay``, sends: it yields each ``audio.in`` frame from any *other* process
(the listener republishes its own input as ``audio.in`` when recording is on,
and must not hear itself) and ends at an ``audio.end`` from one of them. The
sender sets the pace; a frame at another rate is resampled, and any block
size is cut into the internal 20 ms frames.

Opening it only connects (``voicebus up`` opens the input once to check it,
before the bus runs); the first read proves the connection (the hello echo)
and then publishes ``sys.ready`` under the name ``listener-input``. A sender
that waits for that message loses no frame to the slow joiner.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np

from voicebus.engine.client import BusClient
from voicebus.engine.errors import AudioError
from voicebus.engine.messages import Envelope, Ready

from .pcm import RATE, SAMPLE_WIDTH, Closing, FrameChunker, Resampler

NAME = "listener-input"
"""The source's name on the bus: its ``sys.ready`` says frames sent from now on are heard."""
POLL_S = 0.1
"""How often a waiting source looks whether it was closed."""


def _own_suffix() -> str:
    return f"@{socket.gethostname()}:{os.getpid()}"


class BusSource(Closing):
    """Yield internal-format frames from ``audio.in`` messages on the bus (see the module docstring)."""

    def __init__(self, client: BusClient, *, announce_timeout: float = 30.0, own: str | None = None) -> None:
        """Read ``audio.in`` through ``client``, ignoring senders whose name ends with ``own``
        (default: ``@HOST:PID`` of this process)."""
        self.client = client
        self.announce_timeout = announce_timeout
        self._own = _own_suffix() if own is None else own
        self._closed = threading.Event()
        self._iterating = False
        self._lock = threading.Lock()
        self._chunker = FrameChunker()
        self._resamplers: dict[int, Resampler] = {}
        self.frames = 0
        client.subscribe("audio.in", "audio.end")

    @classmethod
    def from_settings(cls, settings: object) -> BusSource:
        """A source on the bus that ``settings`` (a ``workers.config.Settings``) names."""
        from voicebus.engine.endpoints import Endpoints
        from voicebus.engine.security import Security
        from voicebus.engine.settings import expand

        bus = settings.bus  # type: ignore[attr-defined]
        endpoints = Endpoints.parse(bus.url)
        security = Security.resolve(endpoints, keys_dir=expand(bus.keys_dir), mode=bus.security)
        client = BusClient(endpoints, security, name=NAME, max_bytes=bus.max_message_bytes,
                           session=settings.state.session)  # type: ignore[attr-defined]
        return cls(client)

    @classmethod
    def from_environment(cls) -> BusSource:
        """A source on this process's bus, as its settings (file, environment) name it."""
        from voicebus.engine.settings import load
        from voicebus.workers.config import Settings

        return cls.from_settings(load(Settings))

    def _mine(self, env: Envelope) -> bool:
        return env.src.endswith(self._own)

    def __iter__(self) -> Iterator[bytes]:
        with self._lock:
            if self._closed.is_set():
                return
            self._iterating = True
        try:
            self._connect()
            while not self._closed.is_set():
                env = self.client.recv(timeout=POLL_S)
                if env is None or self._mine(env):
                    continue
                if env.kind == "audio.end":
                    yield from self._chunker.finish()
                    return
                yield from self._chunker.push(self._convert(env))
        finally:
            with self._lock:
                self._iterating = False
                if self._closed.is_set():
                    self.client.close()

    def _connect(self) -> None:
        started = time.monotonic()
        try:
            self.client.announce(timeout=self.announce_timeout)
        except ConnectionError as exc:
            raise AudioError(f"audio input 'bus': {exc}") from None
        self.client.publish(Ready(name=NAME, pid=os.getpid(), load_s=round(time.monotonic() - started, 3)))

    def _convert(self, env: Envelope) -> bytes:
        body = env.body
        pcm = getattr(body, "pcm", None) if not isinstance(body, dict) else body.get("pcm")
        rate = getattr(body, "rate", None) if not isinstance(body, dict) else body.get("rate")
        width = (getattr(body, "width", 2) if not isinstance(body, dict) else body.get("width", 2)) or 2
        channels = (getattr(body, "channels", 1) if not isinstance(body, dict) else body.get("channels", 1)) or 1
        if not isinstance(pcm, bytes) or not isinstance(rate, int) or rate <= 0:
            return b""
        if width != SAMPLE_WIDTH:
            raise AudioError(f"audio.in from {env.src} has {width}-byte samples; only 16-bit PCM is supported")
        if channels > 1:
            usable = len(pcm) - len(pcm) % (SAMPLE_WIDTH * channels)
            samples = np.frombuffer(pcm[:usable], "<i2").reshape(-1, channels)
            pcm = samples.mean(axis=1).astype("<i2").tobytes()
        if rate != RATE:
            pcm = self._resamplers.setdefault(rate, Resampler(rate, RATE)).process(pcm)
        self.frames += 1
        return pcm

    def close(self) -> None:
        """Stop (from any thread): the iterator ends within ``POLL_S``; the connection closes with it."""
        with self._lock:
            self._closed.set()
            if not self._iterating:
                self.client.close()
