"""Audio sinks: where the speaker's mono int16 PCM goes.

Every sink has a ``rate`` (hertz of the PCM it takes), ``write(pcm)`` for
blocks of at most ~20 ms, ``close()``, and works as a context manager. A
paced sink's ``write`` returns once the block would have finished playing, so
the speaker's timing (``play.done``, barge-in checks between blocks) is the
same against a file as against a loudspeaker.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, BinaryIO

import soundfile

from voicebus.engine.errors import AudioError

from .device import DeviceChoice, choose_device, import_sounddevice, open_failed
from .files import wav_header
from .pcm import SAMPLE_WIDTH, Closing, Pacer, Resampler

_HEADER_BYTES = 44


def _check_block(pcm: bytes) -> None:
    if len(pcm) % SAMPLE_WIDTH:
        raise ValueError(f"int16 PCM must have an even byte count, got {len(pcm)}")


class NullSink(Closing):
    """Discards audio; with ``realtime=True`` it still takes as long as playing would."""

    def __init__(self, rate: int, *, realtime: bool = False) -> None:
        """Take PCM at ``rate`` hertz."""
        self.rate = rate
        self._pacer = Pacer(catch_up=False) if realtime else None

    def write(self, pcm: bytes) -> None:
        """Drop ``pcm`` (after its playing time when paced)."""
        _check_block(pcm)
        if self._pacer is not None and pcm:
            self._pacer.wait(len(pcm) / SAMPLE_WIDTH / self.rate)

    def close(self) -> None:
        """Nothing to release."""


class WavSink(Closing):
    """Appends everything written, in order, to one mono int16 WAV file.

    The header's sizes are rewritten after every write and the file flushed,
    so the file is a valid WAV up to the last block even if the process is
    killed mid-run (a block is ~640 bytes, so the two extra small writes cost
    little). ``realtime=True`` paces writes like a device that plays them.
    """

    def __init__(self, path: str | os.PathLike[str], rate: int, *, realtime: bool = True,
                 append: bool = False) -> None:
        """Create (or truncate) ``path``; AudioError if it cannot be written. ``append``: go on after the
        audio a WAV file already at ``path`` holds, if it is one this sink could have written (a
        speaker restarted mid-run keeps the answers its predecessor wrote)."""
        self.path = Path(path)
        self.rate = rate
        self._pacer = Pacer(catch_up=False) if realtime else None
        self._data_bytes = self._written_before() if append else 0
        try:
            self._file: BinaryIO | None = open(self.path, "r+b" if self._data_bytes else "wb")  # noqa: SIM115
            self._file.write(wav_header(rate, self._data_bytes))
            self._file.flush()
        except OSError as exc:
            raise AudioError(f"{self.path}: cannot write WAV ({exc.strerror or exc})") from None

    def _written_before(self) -> int:
        """Bytes of audio in the mono int16 WAV at ``path`` at this rate; 0 if there is none such."""
        try:
            info = soundfile.info(str(self.path))
        except (OSError, RuntimeError, soundfile.LibsndfileError):
            return 0
        if (info.format, info.subtype, info.channels, info.samplerate) != ("WAV", "PCM_16", 1, self.rate):
            return 0
        return info.frames * SAMPLE_WIDTH

    @property
    def duration_s(self) -> float:
        """Seconds of audio written so far."""
        return self._data_bytes / SAMPLE_WIDTH / self.rate

    def write(self, pcm: bytes) -> None:
        """Append ``pcm`` and keep the header valid; paced when realtime."""
        _check_block(pcm)
        if self._file is None:
            raise AudioError(f"{self.path}: write after close")
        if not pcm:
            return
        try:
            self._file.seek(_HEADER_BYTES + self._data_bytes)
            self._file.write(pcm)
            self._data_bytes += len(pcm)
            self._file.seek(0)
            self._file.write(wav_header(self.rate, self._data_bytes))
            self._file.flush()
        except OSError as exc:
            raise AudioError(f"{self.path}: cannot write WAV ({exc.strerror or exc})") from None
        if self._pacer is not None:
            self._pacer.wait(len(pcm) / SAMPLE_WIDTH / self.rate)

    def close(self) -> None:
        """Close the file (its header is already up to date)."""
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError:
                pass  # what a failed write left in the buffer (that write raised already, and said why)


class DeviceSink(Closing):
    """Plays PCM on a sound device through sounddevice (PortAudio).

    Opens the device at ``rate`` if it supports it, else at its default rate
    with a streaming resampler in between. ``write`` blocks while the device's
    buffer is full, i.e. as the device consumes audio.
    """

    def __init__(self, rate: int, device: str | int | None = None) -> None:
        """Open ``device`` (index, name or None for the default); AudioError if impossible."""
        sd = import_sounddevice()
        self._sd = sd
        self.rate = rate
        self.choice: DeviceChoice = choose_device(sd, "output", device, rate)
        self._resampler = Resampler(rate, self.choice.rate) if self.choice.rate != rate else None
        self._stream: Any = None
        try:
            self._stream = sd.RawOutputStream(
                samplerate=self.choice.rate, device=self.choice.index, channels=1, dtype="int16"
            )
            self._stream.start()
        except (ValueError, sd.PortAudioError) as exc:
            raise open_failed("output", self.choice, exc) from None

    def write(self, pcm: bytes) -> None:
        """Queue ``pcm`` for playing; blocks until the device has room for it."""
        _check_block(pcm)
        if self._stream is None:
            raise AudioError(f"output device {self.choice.name!r}: write after close")
        self._play(self._resampler.process(pcm) if self._resampler is not None else pcm)

    def _play(self, pcm: bytes) -> None:
        if not pcm:
            return
        try:
            self._stream.write(pcm)
        except self._sd.PortAudioError as exc:
            raise open_failed("output", self.choice, exc) from None

    def close(self) -> None:
        """Play out what is buffered, then close the device."""
        if self._stream is None:
            return
        try:
            if self._resampler is not None:
                self._play(self._resampler.flush())
            self._stream.stop()  # stop() (unlike abort()) lets buffered audio finish
        except (AudioError, self._sd.PortAudioError):
            pass  # a device gone (unplugged): its write failed first and said why; nothing left to play
        finally:
            try:
                self._stream.close()
            except self._sd.PortAudioError:
                pass
            self._stream = None
