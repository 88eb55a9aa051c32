"""Recordings of the bus: every message, byte for byte, with its arrival time.

The file format (version 1)
---------------------------

A recording is a plain stream of msgpack objects, one after the other, with no
framing of its own, so any msgpack library reads it (``msgpack.Unpacker(file)``
in Python) and a file can grow by appending:

1. a **segment header**: a map whose first key is ``"magic"`` (the string
   ``"voicebus-recording"``), so the file begins with the bytes
   ``8? a5 "magic" b2 "voicebus-recording"``. Its keys:

   ============  ==============================================================
   magic         "voicebus-recording"
   format        1 (this version); a reader refuses a newer one
   created       wall clock (epoch seconds, float) at the segment's time 0
   host          where it was recorded
   voicebus      the recorder's voicebus version
   bus           the bus URL it tapped
   kinds         the kind prefixes kept ([] = every kind)
   audio         false when audio frames were left out (``--no-audio``)
   backends      {stage: backend} when the recorder knew them, else {}
   settings      {"section.key": value} (secrets masked) when known, else {}
   ============  ==============================================================

   Unknown keys are kept by readers (forward compatible).

2. then one **record** per message: an array ``[t, topic, payload]`` where
   ``t`` is the arrival time in seconds since the segment's ``created``,
   measured on the recorder's monotonic clock (float64), and ``topic`` and
   ``payload`` are the message's two frames exactly as they came off the bus
   (msgpack bin). Nothing is decoded and re-encoded, so unknown kinds, unknown
   fields and even undecodable frames survive; decode a payload with
   ``voicebus.engine.messages.decode([topic, payload])``. A message of more
   than two frames (a future audio kind may carry its PCM as a third) keeps
   the rest as further bin elements: ``[t, topic, payload, frame3, …]``.

3. Appending (``RecordingWriter(..., append=True)``) adds a new segment header,
   then its records. The segments of one file are joined on the wall clock:
   a record's time in the file is ``t + (segment.created - first.created)``.

Crash safety: each record is handed to the kernel with one ``write`` as soon as
its message arrives (the file is unbuffered). A recorder killed with ``kill -9``
therefore loses at most the message it was writing: the page cache holds the
rest whatever happens to the process. (Only the machine losing power can lose
more; the file is ``fsync``-ed when it is closed, not per message, which would
cost milliseconds each.) A reader stops cleanly at a cut tail and says how many
bytes it ignored; a writer appending to such a file first cuts that tail off.
One ``write`` per message is a syscall of a few microseconds: a voice session
carries ~60 messages a second (50 of them audio frames), so flushing per message
costs nothing worth batching, and batching by time would lose the last interval.

This module knows nothing about voice: kinds are just topics here.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import msgpack

from voicebus.engine import __version__
from voicebus.engine.errors import ProtocolError, VoicebusError
from voicebus.engine.messages import Envelope, decode

MAGIC = "voicebus-recording"
FORMAT_VERSION = 1
SUFFIX = ".vbrec"
"""The customary file suffix (nothing depends on it)."""
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
"""A record larger than this is damage, not a message (the bus's own limit is a few MiB)."""
_HEADER_KEYS = ("magic", "format", "created", "host", "voicebus", "bus", "kinds", "audio", "backends", "settings")


class RecordingError(VoicebusError):
    """A file that is missing, not a recording, or cannot be written."""

    code = "recording"


@dataclass(frozen=True)
class Header:
    """One segment's header (see the module docstring)."""

    created: float
    host: str = ""
    voicebus: str = ""
    bus: str = ""
    kinds: tuple[str, ...] = ()
    audio: bool = True
    backends: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    format: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys this version does not know, kept as read."""

    def to_map(self) -> dict[str, Any]:
        return {
            "magic": MAGIC, "format": self.format, "created": self.created, "host": self.host,
            "voicebus": self.voicebus, "bus": self.bus, "kinds": list(self.kinds), "audio": self.audio,
            "backends": dict(self.backends), "settings": dict(self.settings), **self.extra,
        }

    @classmethod
    def from_map(cls, data: dict[str, Any], where: str) -> Header:
        version = data.get("format")
        if type(version) is not int:
            raise RecordingError(f"{where}: the header has no format version")
        if version > FORMAT_VERSION:
            raise RecordingError(f"{where} is in recording format {version}; this voicebus reads format "
                                 f"{FORMAT_VERSION}: upgrade voicebus to read it")
        created = data.get("created")
        if type(created) not in (int, float):
            raise RecordingError(f"{where}: the header has no creation time")
        return cls(
            created=float(created), host=str(data.get("host", "")), voicebus=str(data.get("voicebus", "")),
            bus=str(data.get("bus", "")), kinds=tuple(str(k) for k in data.get("kinds") or ()),
            audio=bool(data.get("audio", True)), backends=dict(data.get("backends") or {}),
            settings=dict(data.get("settings") or {}), format=version,
            extra={k: v for k, v in data.items() if k not in _HEADER_KEYS},
        )


@dataclass(frozen=True)
class Record:
    """One message as recorded: its time in the file, and its frames untouched."""

    t: float
    """seconds since the recording began (the first segment's ``created``)"""
    topic: bytes
    payload: bytes
    segment: int = 0
    extra: tuple[bytes, ...] = ()
    """frames after the payload, if the message had more than two"""

    @property
    def kind(self) -> str:
        return self.topic.decode("utf-8", errors="replace")

    def envelope(self, *, max_bytes: int = MAX_PAYLOAD_BYTES) -> Envelope:
        """The decoded message; ProtocolError (with a code) if the frames were not a valid one."""
        return decode([self.topic, self.payload], max_bytes=max_bytes)


@dataclass
class ReadStats:
    """What a reader met besides records."""

    records: int = 0
    segments: int = 0
    undecodable: int = 0
    """records whose frames are not a valid voicebus message (skipped by ``messages``)"""
    truncated_bytes: int = 0
    """bytes of a cut last record (a recorder killed mid-write), ignored"""
    damaged_at: int | None = None
    """byte offset where something other than a record or header was found; reading stopped there"""

    def problems(self) -> list[str]:
        out = []
        if self.truncated_bytes:
            out.append(f"the last {self.truncated_bytes} byte(s) are a cut record (the recorder was stopped "
                       "mid-write) and were ignored")
        if self.damaged_at is not None:
            out.append(f"the file is damaged at byte {self.damaged_at}; what follows was ignored")
        if self.undecodable:
            out.append(f"{self.undecodable} record(s) are not valid voicebus messages")
        return out


# --- writing ----------------------------------------------------------------------------------


class RecordingWriter:
    """Append records to a recording file, one unbuffered ``write`` per message.

    ``append=True`` continues an existing recording with a new segment (a cut
    tail is cut off first); otherwise the file must not exist unless
    ``overwrite``. Use from one thread.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        bus: str = "",
        kinds: Iterable[str] = (),
        audio: bool = True,
        backends: dict[str, str] | None = None,
        settings: dict[str, Any] | None = None,
        append: bool = False,
        overwrite: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self._clock = clock
        keep = 0
        if append and self.path.exists() and self.path.stat().st_size:
            keep = _end_of_complete_objects(self.path)
        mode = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
        if not append and not overwrite:
            mode |= os.O_EXCL
        elif not append:
            mode |= os.O_TRUNC
        try:
            self._fd = os.open(self.path, mode, 0o600)  # it may hold a voice: private by default
        except FileExistsError:
            raise RecordingError(f"{self.path} exists: choose another name, or --append / --force") from None
        except OSError as exc:
            raise RecordingError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        if append:
            os.ftruncate(self._fd, keep)
            os.lseek(self._fd, keep, os.SEEK_SET)
        self.header = Header(
            created=time.time(), host=socket.gethostname(), voicebus=__version__, bus=bus, kinds=tuple(kinds),
            audio=audio, backends=dict(backends or {}), settings=dict(settings or {}),
        )
        self._t0 = clock()
        self.bytes_written = keep
        self.records = 0
        self._write(msgpack.packb(self.header.to_map(), use_bin_type=True))

    def now(self) -> float:
        """Seconds since this segment began, on the writer's clock (stamp messages as they arrive)."""
        return self._clock() - self._t0

    def write(self, topic: bytes, payload: bytes, *extra: bytes, t: float | None = None) -> int:
        """Record one message (``t``: its arrival, from ``now()``); returns the bytes written."""
        when = self.now() if t is None else t
        record = msgpack.packb([when, bytes(topic), bytes(payload), *map(bytes, extra)], use_bin_type=True)
        self._write(record)
        self.records += 1
        return len(record)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            raise RecordingError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        self.bytes_written += len(data)

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            os.fsync(self._fd)
        except OSError:
            pass  # a pipe or a special file: nothing to sync
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> RecordingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _end_of_complete_objects(path: Path) -> int:
    """The byte offset after the last whole header or record (where an append may start)."""
    recording = Recording(path)
    for _ in recording.records():
        pass
    return recording.end_offset


# --- reading ----------------------------------------------------------------------------------


class Recording:
    """A recording file, read lazily: ``header``, then ``records()`` or ``messages()``.

    Opening checks the first header (RecordingError for a missing, empty, foreign
    or too-new file). Iterating stops cleanly at a cut tail or at damage;
    ``stats`` then says what was ignored.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.stats = ReadStats()
        self.end_offset = 0
        """after iterating: where the last whole object ended"""
        self.segments: list[Header] = []
        with self._open() as fh:
            first = self._unpacker(fh)
            try:
                obj = next(first)
            except StopIteration:
                what = "empty" if not self.path.stat().st_size else "not a voicebus recording (or its header is cut)"
                raise RecordingError(f"{self.path} is {what}") from None
            except Exception:  # msgpack raises several types for bytes that are not msgpack
                raise RecordingError(f"{self.path} is not a voicebus recording") from None
            if not isinstance(obj, dict) or obj.get("magic") != MAGIC:
                raise RecordingError(f"{self.path} is not a voicebus recording")
            self.header = Header.from_map(obj, str(self.path))

    def _open(self) -> BinaryIO:
        try:
            return open(self.path, "rb")
        except FileNotFoundError:
            raise RecordingError(f"{self.path} not found") from None
        except IsADirectoryError:
            raise RecordingError(f"{self.path} is a folder, not a recording") from None
        except OSError as exc:
            raise RecordingError(f"cannot read {self.path}: {exc.strerror or exc}") from None

    @staticmethod
    def _unpacker(fh: BinaryIO) -> msgpack.Unpacker:
        return msgpack.Unpacker(
            fh, raw=False, strict_map_key=False, max_buffer_size=2 * MAX_PAYLOAD_BYTES,
            max_bin_len=MAX_PAYLOAD_BYTES,
        )

    def wall_time(self, t: float) -> float:
        """A file time ``t`` as wall-clock epoch seconds."""
        return self.header.created + t

    def records(self, kinds: Iterable[str] = ()) -> Iterator[Record]:
        """Every record in order (``kinds``: topic prefixes to keep; none = all)."""
        prefixes = tuple(k.encode() for k in kinds)
        self.stats = ReadStats()
        self.segments = []
        offset = 0.0
        segment = -1
        with self._open() as fh:
            size = os.fstat(fh.fileno()).st_size
            unpacker = self._unpacker(fh)
            self.end_offset = 0
            while True:
                try:
                    obj = next(unpacker)
                except StopIteration:
                    break
                except Exception:  # bytes that are not msgpack: damage
                    self.stats.damaged_at = self.end_offset
                    return
                if isinstance(obj, dict) and obj.get("magic") == MAGIC:
                    header = Header.from_map(obj, str(self.path))
                    self.segments.append(header)
                    segment += 1
                    offset = header.created - self.segments[0].created
                    self.stats.segments += 1
                elif (
                    segment >= 0 and isinstance(obj, list) and len(obj) >= 3 and type(obj[0]) in (float, int)
                    and all(type(frame) is bytes for frame in obj[1:])
                ):
                    self.stats.records += 1
                    if not prefixes or obj[1].startswith(prefixes):
                        self.end_offset = unpacker.tell()
                        yield Record(offset + obj[0], obj[1], obj[2], segment, tuple(obj[3:]))
                else:
                    self.stats.damaged_at = self.end_offset
                    return
                self.end_offset = unpacker.tell()
            self.stats.truncated_bytes = size - self.end_offset

    def messages(self, kinds: Iterable[str] = (), turns: Iterable[int] = ()) -> Iterator[tuple[float, Envelope]]:
        """(t, Envelope) for every valid message (``kinds`` prefixes, ``turns`` ids; none = all).

        Records that are not valid messages are skipped and counted in ``stats.undecodable``.
        """
        wanted = set(turns)
        for record in self.records(kinds):
            try:
                env = record.envelope()
            except ProtocolError:
                self.stats.undecodable += 1
                continue
            if not wanted or env.turn in wanted:
                yield record.t, env
