"""Audio in and out: the internal PCM format, sources, sinks and their factories.

The internal format is 16 kHz, mono, little-endian int16 PCM in 20 ms frames
of 640 bytes (``RATE``, ``FRAME_MS``, ``FRAME_BYTES``). Sources yield those
frames; sinks take mono int16 at their own ``rate`` (a TTS voice's rate is
converted with ``Resampler`` when it differs).

This package is the one to import; the work is split by job:

    pcm       format constants, Resampler, frame chunking, real-time pacing
    files     reading audio files (libsndfile through soundfile), writing WAV
    device    finding a sounddevice/PortAudio device, with one-line errors
    sources   FileSource, MicSource, read_audio
    sinks     WavSink, DeviceSink, NullSink

``WavSource`` and ``read_wav`` are the older names of ``FileSource`` and
``read_audio`` (they read every format now).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Protocol

from voicebus.engine.errors import ConfigError

from .files import FILE_SUFFIXES, write_wav
from .pcm import FRAME_BYTES, FRAME_MS, FRAME_SAMPLES, RATE, SAMPLE_WIDTH, Resampler
from .sinks import DeviceSink, NullSink, WavSink
from .sources import FileSource, MicSource, WavSource, read_audio, read_wav

__all__ = [
    "FRAME_BYTES",
    "FRAME_MS",
    "FRAME_SAMPLES",
    "RATE",
    "SAMPLE_WIDTH",
    "AudioSink",
    "AudioSource",
    "DeviceSink",
    "FileSource",
    "MicSource",
    "NullSink",
    "Resampler",
    "WavSink",
    "WavSource",
    "is_bus_input",
    "open_sink",
    "open_source",
    "read_audio",
    "read_wav",
    "write_wav",
]


class AudioSource(Protocol):
    """Anything that yields internal-format frames and can be closed."""

    def __iter__(self) -> Iterator[bytes]: ...

    def close(self) -> None: ...

    def __enter__(self) -> AudioSource: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


class AudioSink(Protocol):
    """Anything that takes mono int16 PCM at ``rate`` and can be closed."""

    rate: int

    def write(self, pcm: bytes) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> AudioSink: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


SOURCE_FORMS = "'mic', 'mic:DEVICE', 'bus', 'none' or a path to an audio file (.wav, .flac, .ogg, .opus, .mp3, …)"
SINK_FORMS = "'speaker', 'speaker:DEVICE', 'none' or a path to a .wav file"


def _device_spec(spec: str, word: str) -> tuple[bool, str | None]:
    """Whether ``spec`` names a device ('word' or 'word:DEVICE'), and which."""
    head, sep, device = spec.partition(":")
    if head.lower() != word:
        return False, None
    return True, (device.strip() or None) if sep else None


def is_bus_input(spec: str) -> bool:
    """The input is audio.in from another process on the bus (a remote mic, voicebus replay)."""
    return spec.strip().lower() == "bus"


def open_source(spec: str, *, realtime: bool, start_ms: int = 0) -> AudioSource | None:
    """Open the audio input named by ``spec`` (see ``SOURCE_FORMS``); None for 'none'.

    A file is a path ending in an audio suffix (``FILE_SUFFIXES``) or any path
    that exists: libsndfile tells formats by their content, so a recording named
    ``take1`` plays, and one in a format it cannot read gets an AudioError saying
    so. ``realtime`` paces a file like a microphone; ``start_ms`` skips the start
    of a file (a microphone has no past to skip). Raises ConfigError for a
    spec of none of the accepted forms, AudioError for a file or device that fails.
    """
    spec = spec.strip()
    if spec.lower() == "none":
        return None
    if is_bus_input(spec):
        from .bus_source import BusSource

        return BusSource.from_environment()
    is_mic, device = _device_spec(spec, "mic")
    if is_mic:
        return MicSource(device)
    if spec and (Path(spec).suffix.lower() in FILE_SUFFIXES or Path(spec).expanduser().exists()):
        return FileSource(Path(spec).expanduser(), realtime=realtime, start_ms=start_ms)
    raise ConfigError(f"unknown audio input {spec!r}; use {SOURCE_FORMS}")


def open_sink(spec: str, rate: int, *, realtime: bool, append: bool = False) -> AudioSink:
    """Open the audio output named by ``spec`` (see ``SINK_FORMS``) for PCM at ``rate``.

    'none' discards (paced when ``realtime``); a .wav path collects every reply
    of the run in one file (``append``: after what the file holds, for a speaker
    restarted mid-run). Raises ConfigError for an unknown spec, AudioError
    for a file or device that fails.
    """
    spec = spec.strip()
    if spec.lower() == "none":
        return NullSink(rate, realtime=realtime)
    is_speaker, device = _device_spec(spec, "speaker")
    if is_speaker:
        return DeviceSink(rate, device)
    if spec.lower().endswith(".wav"):
        return WavSink(spec, rate, realtime=realtime, append=append)
    raise ConfigError(f"unknown audio output {spec!r}; use {SINK_FORMS}")
