"""Envelope, message kinds and the msgpack codec.

Every message on the bus is two frames, ``[topic, payload]``: the topic is the
kind as bytes (so subscriptions filter by prefix, ``b"asr."``), the payload a
msgpack map — the envelope — whose ``body`` holds the kind's fields.

A kind is a frozen dataclass registered under its wire name by subclassing
``Body`` with ``kind="..."``. Wire names never depend on Python paths. Unknown
kinds decode to a plain dict body and pass through; unknown fields are ignored
(forward compatible). Anything else wrong with a frame raises ``ProtocolError``
with a short ``code``, which receivers count and report instead of crashing.

Voice-level kinds live in ``voicebus.workers.kinds``; this module holds the
engine's own (``sys.*``, ``sup.*``, ``ctl.*``) and the machinery.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from voicebus.engine.errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
"""Default limit for one payload frame; the socket limit is set a little above it."""

_REGISTRY: dict[str, type[Body]] = {}
_ENVELOPE_KEYS = ("v", "kind", "src", "seq", "ts", "session", "turn", "body")


class Body:
    """Base of every message kind's fields.

    Subclass as ``@dataclass(frozen=True, kw_only=True) class Hello(Body, kind="sys.hello")``.
    ``urgent=True`` kinds are dispatched ahead of everything already queued.
    """

    kind: ClassVar[str] = ""
    urgent: ClassVar[bool] = False
    _field_types: ClassVar[dict[str, tuple[type, ...]]]

    def __init_subclass__(cls, *, kind: str, urgent: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if kind in _REGISTRY:
            raise ValueError(f"message kind {kind!r} registered twice")
        cls.kind = kind
        cls.urgent = urgent
        _REGISTRY[kind] = cls

    def to_dict(self) -> dict[str, Any]:
        # Field names from the per-class cache: dataclasses.fields() costs ~1 µs a call.
        return {name: getattr(self, name) for name in _field_types(type(self))}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Body:
        """Build from a decoded map: unknown fields ignored, types checked."""
        types_by_name = _field_types(cls)
        known = {}
        for name, value in data.items():
            accepted = types_by_name.get(name)
            if accepted is None:
                continue
            if not isinstance(value, accepted) or (isinstance(value, bool) and bool not in accepted):
                raise ProtocolError(
                    f"{cls.kind}: field {name!r} is {type(value).__name__}", code="bad_field"
                )
            known[name] = value
        try:
            return cls(**known)
        except TypeError as exc:  # a required field is missing
            raise ProtocolError(f"{cls.kind}: {exc}", code="bad_field") from None


def _field_types(cls: type[Body]) -> dict[str, tuple[type, ...]]:
    """The runtime types each field accepts, resolved once per class."""
    cached = cls.__dict__.get("_field_types")
    if cached is not None:
        return cached
    hints = typing.get_type_hints(cls)
    result = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        result[f.name] = _runtime_types(hints[f.name])
    cls._field_types = result
    return result


def _runtime_types(hint: Any) -> tuple[type, ...]:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        out: tuple[type, ...] = ()
        for arg in typing.get_args(hint):
            out += _runtime_types(arg)
        return out
    if hint is type(None):
        return (type(None),)
    if hint is float:
        return (float, int)  # msgpack turns 1.0 into 1 on some senders
    if origin is not None:
        return (origin,)
    return (hint,)


def kinds() -> dict[str, type[Body]]:
    """Every registered kind, by wire name."""
    return dict(_REGISTRY)


def body_class(kind: str) -> type[Body] | None:
    return _REGISTRY.get(kind)


@dataclass(frozen=True, kw_only=True)
class Envelope:
    """One message: who sent it, when, in which conversation turn, and its body."""

    kind: str
    src: str
    seq: int
    ts: float = field(default_factory=time.time)
    """Sender wall-clock time, seconds since the epoch."""
    session: str = "default"
    turn: int = 0
    """Conversation turn id (0 = not part of a turn)."""
    body: Body | dict[str, Any] = field(default_factory=dict)
    """A typed body for registered kinds; the raw map for unknown ones."""
    v: int = PROTOCOL_VERSION


def encode(env: Envelope) -> list[bytes]:
    """Envelope → ``[topic, payload]`` frames."""
    body = env.body.to_dict() if isinstance(env.body, Body) else env.body
    payload = msgpack.packb(
        {
            "v": env.v,
            "kind": env.kind,
            "src": env.src,
            "seq": env.seq,
            "ts": env.ts,
            "session": env.session,
            "turn": env.turn,
            "body": body,
        },
        use_bin_type=True,
    )
    return [env.kind.encode(), payload]


def decode(frames: list[bytes], *, max_bytes: int = MAX_MESSAGE_BYTES) -> Envelope:
    """``[topic, payload]`` frames → Envelope, or ProtocolError with a code."""
    if len(frames) != 2:
        raise ProtocolError(f"expected 2 frames, got {len(frames)}", code="frame_count")
    topic, payload = frames
    if len(payload) > max_bytes:
        raise ProtocolError(f"payload of {len(payload)} bytes over the {max_bytes} limit", code="too_large")
    try:
        data = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"not msgpack: {type(exc).__name__}", code="not_msgpack") from None
    # msgpack yields exact builtin types, so ``type(x) is T`` is exact here (and refuses bool for int).
    if type(data) is not dict:
        raise ProtocolError("payload is not a map", code="bad_envelope")
    version = data.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(f"unknown protocol version {version!r}", code="bad_version")
    try:
        kind, src, seq, ts = data["kind"], data["src"], data["seq"], data["ts"]
        session, turn, body = data["session"], data["turn"], data["body"]
    except KeyError:
        missing = [k for k in _ENVELOPE_KEYS if k not in data]
        raise ProtocolError(f"envelope lacks {', '.join(missing)}", code="bad_envelope") from None
    if not (
        type(kind) is str and type(src) is str and type(seq) is int and type(ts) in (float, int)
        and type(session) is str and type(turn) is int and type(body) is dict
    ):
        raise ProtocolError("envelope field of the wrong type", code="bad_envelope")
    if topic != kind.encode():
        try:
            topic_text = topic.decode()
        except UnicodeDecodeError:
            raise ProtocolError("topic is not UTF-8", code="bad_envelope") from None
        raise ProtocolError(f"topic {topic_text!r} does not match kind {kind!r}", code="topic_mismatch")
    cls = _REGISTRY.get(kind)
    return new_envelope(kind, src, seq, float(ts), session, turn, cls.from_dict(body) if cls is not None else body)


def new_envelope(
    kind: str, src: str, seq: int, ts: float, session: str, turn: int, body: Body | dict[str, Any]
) -> Envelope:
    """``Envelope(...)`` for the hot paths (decode, publish), without the frozen dataclass ``__init__``.

    A frozen ``__init__`` sets each field through ``object.__setattr__``; for the
    eight envelope fields that is over a microsecond per message, a quarter of a
    decode. The result is an ordinary (still frozen) Envelope; the caller vouches
    for the values, as ``__init__`` checks nothing either.
    """
    env = object.__new__(Envelope)
    env.__dict__.update(v=PROTOCOL_VERSION, kind=kind, src=src, seq=seq, ts=ts, session=session, turn=turn, body=body)
    return env


def new_turn_id() -> int:
    """A turn id unique across processes, hosts and restarts, with no coordination.

    Milliseconds since the epoch, times 1000, plus a random 0–999: ids still sort
    by time, and two askers that start a turn in the same millisecond (on any
    hosts) get the same id once in a thousand instead of every time — a shared
    id would make the second question a "repeat" of the first and get its answer.
    Below 2**53, so JSON readers keep it exact.
    """
    return time.time_ns() // 1_000_000 * 1000 + secrets.randbelow(1000)


def first_turn_id_at(ts: float) -> int:
    """The smallest id ``new_turn_id`` gives at or after ``ts`` (seconds since the epoch)."""
    return int(ts * 1000) * 1000


# --- the engine's own kinds ------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Hello(Body, kind="sys.hello"):
    name: str
    pid: int
    host: str
    version: str
    backends: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Ready(Body, kind="sys.ready"):
    """The worker's backends are loaded; it handles messages from now on."""

    name: str
    pid: int
    load_s: float


@dataclass(frozen=True, kw_only=True)
class Heartbeat(Body, kind="sys.heartbeat"):
    name: str
    pid: int
    uptime: float
    state: str
    """starting | loading | ready | stopping"""
    counters: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Bye(Body, kind="sys.bye"):
    name: str
    pid: int
    reason: str


@dataclass(frozen=True, kw_only=True)
class Error(Body, kind="sys.error"):
    """A reportable failure; never a crash."""

    where: str
    code: str
    message: str
    detail: str = ""
    transient: bool = False


@dataclass(frozen=True, kw_only=True)
class Started(Body, kind="sup.started"):
    worker: str
    pid: int


@dataclass(frozen=True, kw_only=True)
class Exited(Body, kind="sup.exited"):
    worker: str
    pid: int
    returncode: int | None
    signal: str = ""


@dataclass(frozen=True, kw_only=True)
class Restarting(Body, kind="sup.restarting"):
    worker: str
    restarts: int
    delay_s: float
    reason: str


@dataclass(frozen=True, kw_only=True)
class GaveUp(Body, kind="sup.gave_up"):
    worker: str
    restarts: int
    last_error: str


@dataclass(frozen=True, kw_only=True)
class Shutdown(Body, kind="ctl.shutdown", urgent=True):
    reason: str
    failed: bool = False
    """the deployment stops because its job could not be done: ``voicebus up`` exits non-zero"""


@dataclass(frozen=True, kw_only=True)
class Interrupt(Body, kind="ctl.interrupt", urgent=True):
    """Stop the envelope's turn: speaker stops playing, thinker stops generating."""

    reason: str
