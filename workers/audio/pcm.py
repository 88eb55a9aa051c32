"""The internal PCM format and the small tools every source and sink shares.

Inside voicebus audio is 16 kHz, mono, little-endian int16 PCM, cut into 20 ms
frames of 640 bytes. Everything that enters (files, microphones, the bus) is
converted to that once, at the edge; sinks take mono int16 at their own rate.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, TypeVar

import numpy as np

RATE = 16000
"""Hertz of the internal format."""
FRAME_MS = 20
"""Milliseconds per internal frame."""
SAMPLE_WIDTH = 2
"""Bytes per sample (int16)."""
FRAME_SAMPLES = RATE * FRAME_MS // 1000
"""Samples per internal frame (320)."""
FRAME_BYTES = FRAME_SAMPLES * SAMPLE_WIDTH
"""Bytes per internal frame (640)."""


def float_to_int16(samples: np.ndarray) -> bytes:
    """Convert float samples in [-1, 1) to int16 PCM bytes, clipping overshoot.

    Resampling filters ring a little above full scale on clipped material;
    clipping here keeps that from wrapping around into loud clicks.
    """
    scaled: np.ndarray = np.clip(np.rint(np.asarray(samples, dtype=np.float32) * 32768.0), -32768, 32767)
    return scaled.astype("<i2").tobytes()


class Resampler:
    """Streaming sample-rate converter for mono int16 PCM (libsoxr).

    Feed any number of ``process`` calls and end with ``flush``, which returns
    the samples the filter still holds; after ``flush`` the resampler starts a
    fresh stream, so one instance can convert sentence after sentence.
    """

    def __init__(self, from_rate: int, to_rate: int, *, quality: str = "HQ") -> None:
        """Convert from ``from_rate`` to ``to_rate`` hertz (both > 0)."""
        if from_rate <= 0 or to_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {from_rate} -> {to_rate}")
        self.from_rate = from_rate
        self.to_rate = to_rate
        self._quality = quality
        self._stream: Any = self._new_stream()

    def _new_stream(self) -> Any:
        if self.from_rate == self.to_rate:
            return None
        import soxr

        return soxr.ResampleStream(self.from_rate, self.to_rate, 1, dtype="int16", quality=self._quality)

    def process(self, pcm: bytes) -> bytes:
        """Convert a block of int16 PCM; may return less than a full block (filter delay)."""
        if len(pcm) % SAMPLE_WIDTH:
            raise ValueError(f"int16 PCM must have an even byte count, got {len(pcm)}")
        if self._stream is None:
            return bytes(pcm)
        out: np.ndarray = self._stream.resample_chunk(np.frombuffer(pcm, dtype="<i2"), last=False)
        return out.astype("<i2").tobytes()

    def flush(self) -> bytes:
        """Return the tail still inside the filter and start a new stream."""
        if self._stream is None:
            return b""
        tail: np.ndarray = self._stream.resample_chunk(np.zeros(0, dtype="<i2"), last=True)
        self._stream = self._new_stream()
        return tail.astype("<i2").tobytes()


class FloatResampler:
    """Streaming converter for float32 mono samples; the file reader's resampler."""

    def __init__(self, from_rate: int, to_rate: int) -> None:
        """Convert from ``from_rate`` to ``to_rate`` hertz."""
        self._stream: Any = None
        if from_rate != to_rate:
            import soxr

            self._stream = soxr.ResampleStream(from_rate, to_rate, 1, dtype="float32", quality="HQ")

    def process(self, samples: np.ndarray, *, last: bool = False) -> np.ndarray:
        """Convert a block; ``last=True`` also drains the filter."""
        if self._stream is None:
            return samples
        out: np.ndarray = self._stream.resample_chunk(np.ascontiguousarray(samples, dtype=np.float32), last=last)
        return out


class FrameChunker:
    """Cut a byte stream of any block sizes into fixed-size frames."""

    def __init__(self, frame_bytes: int = FRAME_BYTES) -> None:
        """Emit frames of ``frame_bytes``."""
        self.frame_bytes = frame_bytes
        self._pending = bytearray()

    def push(self, data: bytes) -> Iterator[bytes]:
        """Add ``data`` and yield every complete frame now available."""
        self._pending += data
        whole = len(self._pending) - len(self._pending) % self.frame_bytes
        for start in range(0, whole, self.frame_bytes):
            yield bytes(self._pending[start : start + self.frame_bytes])
        del self._pending[:whole]

    def finish(self) -> Iterator[bytes]:
        """Yield the remainder zero-padded to a full frame, if there is one."""
        if self._pending:
            tail = bytes(self._pending).ljust(self.frame_bytes, b"\0")
            self._pending.clear()
            yield tail


class Pacer:
    """Hold a producer to real time against a monotonic clock.

    Deadlines advance by each block's duration from one start instant, so
    scheduler jitter and the cost of the work between calls do not accumulate
    the way ``sleep(0.02)`` per frame would.

    ``catch_up`` chooses what happens when the caller falls behind:
    True (a microphone): the lost time is made up by returning at once until the
    schedule is met again, as a device delivers frames it buffered meanwhile.
    False (a loudspeaker): the schedule restarts from now, as a device that ran
    dry starts playing the next block as soon as it arrives.
    """

    def __init__(
        self,
        *,
        catch_up: bool,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """Pace with ``clock``/``sleep`` (injectable for tests)."""
        self._catch_up = catch_up
        self._clock = clock
        self._sleep = sleep
        self._deadline: float | None = None

    def wait(self, duration_s: float) -> None:
        """Block until the current block of ``duration_s`` seconds has elapsed."""
        now = self._clock()
        if self._deadline is None or (not self._catch_up and self._deadline < now):
            self._deadline = now
        self._deadline += duration_s
        delay = self._deadline - now
        if delay > 0:
            self._sleep(delay)

    def reset(self) -> None:
        """Forget the schedule; the next block starts a new one."""
        self._deadline = None


_C = TypeVar("_C", bound="Closing")


class Closing:
    """Context-manager support for anything with ``close()``."""

    def close(self) -> None:  # pragma: no cover - every subclass overrides
        """Release the resource; safe to call twice."""

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
