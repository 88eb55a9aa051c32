"""A connection to the bus: one PUB and one SUB socket, the codec, and counters.

``publish`` may be called from any thread (a lock serialises the PUB socket
and the sequence counter, so a sender's ``seq`` is gap-free and in order);
``recv`` belongs to one thread. A frame that fails to decode is counted by
its error code and reported as a rate-limited ``sys.error``; it never raises.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import zmq

from voicebus.engine.bus import Endpoints, tune
from voicebus.engine.errors import ProtocolError
from voicebus.engine.messages import (
    MAX_MESSAGE_BYTES,
    Body,
    Envelope,
    Error,
    Hello,
    decode,
    encode,
    new_envelope,
)
from voicebus.engine.security import Security

ERROR_REPORT_INTERVAL_S = 1.0
ZERO_COPY_BYTES = 64 * 1024
"""Payloads at least this big are sent without copying (pyzmq's own copy threshold)."""
_SNDMORE, _RCVMORE, _NOBLOCK = int(zmq.SNDMORE), int(zmq.RCVMORE), int(zmq.NOBLOCK)


def source_name(name: str) -> str:
    return f"{name}@{socket.gethostname()}:{os.getpid()}"


@dataclass
class SequenceTracker:
    """Per-sender sequence numbers seen; a jump is lost messages."""

    last: dict[str, int] = field(default_factory=dict)
    lost: Counter[str] = field(default_factory=Counter)

    def see(self, env: Envelope) -> int:
        """Record ``env``; return how many of its sender's messages were missed just before it."""
        prev = self.last.get(env.src)
        self.last[env.src] = env.seq
        if prev is None or env.seq <= prev:
            return 0  # first sight, or the sender restarted its counter
        gap = env.seq - prev - 1
        if gap:
            self.lost[env.src] += gap
        return gap


class BusClient:
    """Publish and subscribe on the bus under one sender name."""

    def __init__(
        self,
        endpoints: Endpoints,
        security: Security = Security(),
        *,
        name: str,
        session: str = "default",
        max_bytes: int = MAX_MESSAGE_BYTES,
        version: str = "",
    ) -> None:
        endpoints.prepare()  # an ipc bus: its folder is ours and private, before we connect
        self.endpoints = endpoints
        self.name = name
        self.src = source_name(name)
        self.session = session
        self.max_bytes = max_bytes
        self.version = version
        self.counters: Counter[str] = Counter()
        self._seq = 0
        self._lock = threading.Lock()
        self._ctx = zmq.Context()
        self._pub = tune(self._ctx.socket(zmq.PUB))
        self._sub = tune(self._ctx.socket(zmq.SUB))
        security.apply_client(self._pub)
        security.apply_client(self._sub)
        self._pub.connect(endpoints.publish)
        self._sub.connect(endpoints.subscribe)
        self._rcvtimeo = -1
        """The SUB socket's receive timeout as last set, ms (-1: block)."""
        self._last_report: dict[str, float] = {}
        self._closed = False
        self._secure = security.enabled
        self._pending: deque[Envelope] = deque()

    # --- sending -------------------------------------------------------------------------

    def publish(self, body: Body, *, turn: int = 0, session: str | None = None) -> Envelope:
        return self.publish_kind(body.kind, body, turn=turn, session=session)

    def publish_kind(
        self, kind: str, body: Body | dict, *, turn: int = 0, session: str | None = None
    ) -> Envelope:
        """Publish any kind, including ones this process has no class for."""
        with self._lock:
            if self._closed:
                raise RuntimeError("bus client is closed")
            self._seq += 1
            env = new_envelope(kind, self.src, self._seq, time.time(), session or self.session, turn, body)
            topic, payload = encode(env)
            # Two plain sends: send_multipart's checks cost ~1.5 µs a message. Zero-copy only
            # pays for big frames; for small ones its bookkeeping costs more than the copy.
            self._pub.send(topic, _SNDMORE)
            self._pub.send(payload, copy=len(payload) < ZERO_COPY_BYTES)
            self.counters["sent"] += 1
        return env

    def report(self, where: str, exc: BaseException, *, detail: str = "") -> None:
        """Publish a failure as ``sys.error`` (code and transience from voicebus errors)."""
        self.publish(
            Error(
                where=where,
                code=getattr(exc, "code", type(exc).__name__),
                message=str(exc) or type(exc).__name__,
                detail=detail,
                transient=bool(getattr(exc, "transient", False)),
            )
        )

    # --- receiving -----------------------------------------------------------------------

    def subscribe(self, *prefixes: str) -> None:
        for prefix in prefixes:
            self._sub.setsockopt(zmq.SUBSCRIBE, prefix.encode())

    def recv(self, timeout: float | None) -> Envelope | None:
        """The next valid message, or None when ``timeout`` seconds pass without one."""
        if self._pending:
            return self._pending.popleft()
        return self._recv_socket(timeout)

    def _recv_socket(self, timeout: float | None) -> Envelope | None:
        # A blocking receive bounded by the socket's own timeout: no poll before each message
        # (~3 µs) and no exception while messages flow (a failed non-blocking receive is ~5 µs).
        deadline = None if timeout is None else time.monotonic() + timeout
        wait_ms = -1 if timeout is None else math.ceil(max(0.0, timeout) * 1000)
        while True:
            if wait_ms != self._rcvtimeo:
                self._sub.setsockopt(zmq.RCVTIMEO, wait_ms)
                self._rcvtimeo = wait_ms
            try:
                frames = self._recv_frames(0)
            except zmq.Again:
                return None
            env = self._decode(frames)
            if env is not None:
                return env
            if deadline is not None:  # a stream of bad frames must not hold the caller past its timeout
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                wait_ms = math.ceil(remaining * 1000)

    def recv_nowait(self) -> Envelope | None:
        """A message already waiting, else None (bad frames are consumed and counted)."""
        if self._pending:
            return self._pending.popleft()
        while True:
            try:
                frames = self._recv_frames(_NOBLOCK)
            except zmq.Again:
                return None
            env = self._decode(frames)
            if env is not None:
                return env

    def _recv_frames(self, flags: int) -> list[bytes]:
        """``recv_multipart`` without its per-call overhead (~1 µs); the rest of a message is always there."""
        sub = self._sub
        frames = [sub.recv(flags)]
        while sub.getsockopt(_RCVMORE):
            frames.append(sub.recv())
        return frames

    def _decode(self, frames: list[bytes]) -> Envelope | None:
        self.counters["received"] += 1
        try:
            return decode(frames, max_bytes=self.max_bytes)
        except ProtocolError as exc:
            self._bad_frame(exc)
            return None

    def _bad_frame(self, exc: ProtocolError) -> None:
        self.counters["bad_frames"] += 1
        self.counters[f"bad_frames.{exc.code}"] += 1
        # One report per code per interval: a flood of garbage must not become a flood of errors.
        now = time.monotonic()
        if now - self._last_report.get(exc.code, -1e9) >= ERROR_REPORT_INTERVAL_S:
            self._last_report[exc.code] = now
            self.publish(
                Error(
                    where=f"{self.name}.decode",
                    code=f"bad_frame.{exc.code}",
                    message=str(exc),
                    detail=f"{self.counters['bad_frames']} bad frames so far",
                )
            )

    # --- readiness -----------------------------------------------------------------------

    def announce(self, backends: dict[str, str] | None = None, *, timeout: float = 10.0) -> None:
        """Publish ``sys.hello`` until it comes back through the bus (both directions proven).

        PUB/SUB drops everything sent before the subscription has reached the
        proxy (the slow joiner), so no fixed sleep can prove readiness; the echo can.
        Subscribe first: the echo then also proves those subscriptions reached the
        proxy. Other messages that arrive meanwhile are kept for ``recv``.
        """
        self.subscribe("sys.hello")
        hello = Hello(
            name=self.name, pid=os.getpid(), host=socket.gethostname(), version=self.version,
            backends=backends or {},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sent = self.publish(hello)
            resend_at = time.monotonic() + 0.1
            while time.monotonic() < resend_at:
                env = self._recv_socket(timeout=resend_at - time.monotonic())
                if env is None:
                    continue
                if env.src == self.src and env.kind == "sys.hello":
                    if env.seq == sent.seq:
                        self._sub.setsockopt(zmq.UNSUBSCRIBE, b"sys.hello")
                        return
                else:
                    self._pending.append(env)
        hint = (" (is this client's key allowed there? 'voicebus keys allow')" if self._secure
                else " (is voicebus up running? it starts the bus)")
        raise ConnectionError(f"no answer from the bus at {self.endpoints.url} within {timeout:.0f} s{hint}")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._pub.close(linger=200)
            self._sub.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> BusClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
