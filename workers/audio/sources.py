"""Audio sources: iterables of internal-format frames (16 kHz mono int16, 20 ms).

Every source yields 640-byte frames, zero-pads the last one, has ``close()``
and works as a context manager.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

from voicebus.engine.errors import AudioError

from .device import DeviceChoice, choose_device, import_sounddevice, open_failed
from .files import AudioFileReader
from .pcm import FRAME_MS, RATE, Closing, FloatResampler, FrameChunker, Pacer, Resampler, float_to_int16

_READ_SECONDS = 0.1
"""How much of a file is decoded and resampled per step: small enough to stream, big enough to be cheap."""
_FRAME_S = FRAME_MS / 1000


def _file_pcm(reader: AudioFileReader) -> Iterator[bytes]:
    """Decode, downmix and resample ``reader`` into internal-format PCM blocks, streaming."""
    resampler = FloatResampler(reader.rate, RATE)
    step = max(1, int(reader.rate * _READ_SECONDS))
    while True:
        block = reader.read(step)
        last = block.size == 0
        converted = resampler.process(block, last=last)
        if converted.size:
            yield float_to_int16(converted)
        if last:
            return


def _file_frames(reader: AudioFileReader) -> Iterator[bytes]:
    """Internal frames of ``reader``, the last one zero-padded."""
    chunker = FrameChunker()
    for block in _file_pcm(reader):
        yield from chunker.push(block)
    yield from chunker.finish()


class FileSource(Closing):
    """Frames from an audio file of any format libsndfile reads (WAV, FLAC, OGG/Opus, MP3, …).

    ``realtime=True`` delivers each frame when a microphone would have (20 ms
    apart, against a monotonic deadline); False delivers them as fast as the
    consumer takes them. The file is read and converted a block at a time.
    ``start_ms`` skips the file's beginning (a restarted listener resuming a
    run): those frames are decoded and dropped at once, which is exact for every
    format, where seeking compressed audio is not.
    """

    def __init__(self, path: str | os.PathLike[str], *, realtime: bool = True, start_ms: int = 0) -> None:
        """Open ``path`` now, so a missing or broken file fails here with AudioError."""
        self._reader = AudioFileReader(path)
        self.path = self._reader.path
        self.realtime = realtime
        self.start_ms = max(0, start_ms)
        self.duration_s: float | None = self._reader.duration_s
        """Length of the file's audio in seconds."""
        self._started = False
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        if self._started:
            raise RuntimeError(f"FileSource({self.path}) can be iterated only once")
        self._started = True
        pacer = Pacer(catch_up=True) if self.realtime else None
        skip = self.start_ms // FRAME_MS
        try:
            for frame in _file_frames(self._reader):
                if skip:
                    skip -= 1
                    continue
                if pacer is not None:
                    pacer.wait(_FRAME_S)
                if self._closed:
                    return
                yield frame
        finally:
            self._reader.close()

    def close(self) -> None:
        """Close the file; an iteration running in another thread ends at its next frame."""
        self._closed = True
        self._reader.close()


def read_audio(path: str | os.PathLike[str]) -> tuple[bytes, int]:
    """Return the whole file as internal-format PCM and its rate (always ``RATE``).

    Unlike FileSource the end is not padded to a whole frame. AudioError if the
    file is missing, broken or of an unsupported format.
    """
    with AudioFileReader(path) as reader:
        return b"".join(_file_pcm(reader)), RATE


# The names from when only WAV was read; kept so that callers' imports do not change.
WavSource = FileSource
read_wav = read_audio


class MicSource(Closing):
    """Frames from a microphone through sounddevice (PortAudio).

    Opens at 16 kHz mono int16 with 20 ms blocks; when the device cannot run at
    16 kHz it opens at the device's default rate and resamples. PortAudio's
    callback only queues the bytes; the iterating thread converts them, so a
    slow consumer never stalls the audio thread (excess is counted in
    ``overflows`` and dropped once ``max_queued_s`` of audio is waiting).
    """

    STALL_S = 2.0
    """Seconds without audio from a running stream before it is reported as failed."""

    def __init__(self, device: str | int | None = None, *, max_queued_s: float = 10.0) -> None:
        """Open ``device`` (index, name or None for the default); AudioError if impossible."""
        sd = import_sounddevice()
        self.choice: DeviceChoice = choose_device(sd, "input", device, RATE)
        self._resampler = Resampler(self.choice.rate, RATE) if self.choice.rate != RATE else None
        blocks = max(1, int(max_queued_s / _FRAME_S))
        self._queue: queue.Queue[bytes] = queue.Queue(maxsize=blocks)
        self._closed = threading.Event()
        self.overflows = 0
        """Blocks lost because the device or the queue overran."""
        try:
            self._stream: Any = sd.RawInputStream(
                samplerate=self.choice.rate,
                blocksize=self.choice.rate * FRAME_MS // 1000,
                device=self.choice.index,
                channels=1,
                dtype="int16",
                callback=self._on_audio,
            )
            self._stream.start()
        except (ValueError, sd.PortAudioError) as exc:
            raise open_failed("input", self.choice, exc) from None

    def _on_audio(self, indata: Any, frames: int, time_info: Any, status: Any) -> None:
        # Runs on PortAudio's thread: copy out and return, nothing that can block.
        if status:
            self.overflows += 1
        try:
            self._queue.put_nowait(bytes(indata))
        except queue.Full:
            self.overflows += 1

    def __iter__(self) -> Iterator[bytes]:
        chunker = FrameChunker()
        last_audio = time.monotonic()
        while not self._closed.is_set():
            try:
                block = self._queue.get(timeout=0.1)
            except queue.Empty:
                if time.monotonic() - last_audio > self.STALL_S and not self._closed.is_set():
                    raise AudioError(
                        f"input device {self.choice.name!r} stopped delivering audio (unplugged?)"
                    ) from None
                continue
            last_audio = time.monotonic()
            if self._resampler is not None:
                block = self._resampler.process(block)
            yield from chunker.push(block)

    def close(self) -> None:
        """Stop and close the stream; a running iteration ends within ~0.1 s."""
        if self._closed.is_set():
            return
        self._closed.set()
        stream = getattr(self, "_stream", None)
        if stream is not None:
            stream.stop()
            stream.close()
