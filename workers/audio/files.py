"""Audio files: reading any common format through libsndfile, writing mono int16 WAV.

Reading goes through ``soundfile``, whose wheels bundle libsndfile (1.2 here): WAV
(integer, float, A-law/mu-law, ADPCM, WAVE_FORMAT_EXTENSIBLE), FLAC, OGG
Vorbis and Opus, MP3, AIFF and more, of any rate and channel count, decoded a
block at a time so a long file is never loaded at once. libsndfile is quiet
about some damage, so opening also checks that the audio is all there:

* a WAV/AIFF whose header declares more audio than the file holds (libsndfile
  would silently play the part that is there) is refused, as is a WAV whose
  data size is 0 with audio after it (a writer killed before finishing; libsndfile
  would read nothing);
* a FLAC or OGG is probed at its last frame, so a file cut short fails now, with
  its name, rather than halfway through the conversation.

MP3 has no reliable length (a cut MP3 is a shorter MP3, and its frame count may
be an estimate), so it plays what is there, as every player does.

Writing stays hand-written: ``WavSink`` rewrites the 44-byte header after each
block so that a killed run leaves a valid file, and libsndfile offers that only
through a command soundfile does not expose (SFC_SET_UPDATE_HEADER_AUTO).

Every problem is an AudioError whose one-line message starts with the path.
"""

from __future__ import annotations

import os
import re
import struct
import threading
from pathlib import Path
from typing import Any

import numpy as np

from voicebus.engine.errors import AudioError

from .pcm import SAMPLE_WIDTH, Closing

READABLE = "WAV, FLAC, OGG (Vorbis, Opus), MP3, AIFF, AU, CAF, W64"
"""What the reader takes, for messages (libsndfile reads a few rarer formats too)."""
FILE_SUFFIXES = frozenset(
    ".wav .wave .flac .ogg .oga .opus .mp3 .aif .aiff .aifc .au .snd .caf .w64 .rf64".split()
)
"""File name endings taken as audio files on the command line."""

_PCM = 0x0001
# libsndfile's log states a chunk's declared size and, when it disagrees, the real one.
_DECLARED = re.compile(r"^(?:data|SSND)\s*:\s*(\d+)(?:\s*\(should be (\d+)\))?", re.MULTILINE)
_STREAMED = 0xFFFFFFFF
"""The data size a WAV writer on a pipe leaves: 'until the end of the file'."""
_NO_LENGTH = frozenset({"MP3"})
_EMPTY_WITH_METADATA = 4096
"""Bytes an audio-less WAV may hold in headers and metadata chunks."""


def _soundfile() -> Any:
    try:
        import soundfile
    except (ImportError, OSError) as exc:  # OSError: the package is there, its libsndfile is not
        raise AudioError(f"cannot read audio files: soundfile/libsndfile unavailable ({exc}); "
                         "pip install --force-reinstall soundfile") from None
    return soundfile


class AudioFileReader(Closing):
    """Open an audio file and read it as float32 mono blocks at its own rate."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Open ``path`` and check it; AudioError naming the file if that fails."""
        self.path = Path(path)
        self._check_path()
        sf = _soundfile()
        try:
            self._file: Any = sf.SoundFile(str(self.path))
        except sf.LibsndfileError as exc:
            raise self._open_error(exc.error_string) from None
        except (OSError, RuntimeError) as exc:
            raise self._fail(f"cannot open ({exc})") from None
        self._lock = threading.Lock()
        """libsndfile must not close a file another thread is reading (see ``close``)."""
        self._position = 0
        try:
            self.rate: int = self._file.samplerate
            """Sample rate in hertz."""
            self.channels: int = self._file.channels
            """Interleaved channel count (downmixed to mono by ``read``)."""
            self.format: str = f"{self._file.format}/{self._file.subtype}"
            """libsndfile's format and encoding names, e.g. ``OGG/OPUS``."""
            self.frames: int = self._file.frames
            """Sample frames of audio in the file (an estimate for some MP3s)."""
            self._check_complete()
            if self._file.format in _NO_LENGTH:
                # soundfile seeks to where it thinks it is after every read. In some MPEG-2 MP3s
                # (16-24 kHz; all that libsndfile's own encoder writes) that seek derails libmpg123
                # ("part2_3_length too large") and all that follows decodes as silence (libsndfile
                # 1.2.2; cf. python-soundfile issue 402). Told the file cannot seek, soundfile reads
                # straight through, which decodes right; nothing here needs to seek an MP3.
                self._file.seekable = lambda: False
        except BaseException:
            self._file.close()
            raise

    @property
    def duration_s(self) -> float:
        """Length of the audio in seconds."""
        return self.frames / self.rate

    def _fail(self, problem: str) -> AudioError:
        return AudioError(f"{self.path}: {problem}")

    def _check_path(self) -> None:
        # libsndfile says "System error" for most of these; say what it is instead.
        try:
            with open(self.path, "rb") as probe:
                empty = not probe.read(1)
        except FileNotFoundError:
            raise self._fail("file not found") from None
        except IsADirectoryError:
            raise self._fail("is a directory, not an audio file") from None
        except OSError as exc:
            raise self._fail(f"cannot open ({exc.strerror or exc})") from None
        if empty:
            raise self._fail("empty file, not audio")

    def _open_error(self, reason: str) -> AudioError:
        reason = reason.strip().rstrip(".")
        if reason.startswith(("Format not recognised", "File does not exist")):
            # The second is what libsndfile says when it picked a decoder by the file's name and the
            # content is something else entirely: the file exists (checked above).
            return self._fail(f"not an audio file voicebus can read (it reads {READABLE})")
        return self._fail(f"broken or unsupported audio file (libsndfile: {reason})")

    def _check_complete(self) -> None:
        major = self._file.format
        for match in _DECLARED.finditer(self._file.extra_info):
            declared, actual = int(match.group(1)), match.group(2)
            held = os.path.getsize(self.path)
            # More than a few KiB behind a header that declares no audio is audio, not metadata.
            if declared == 0 and self.frames == 0 and held > _EMPTY_WITH_METADATA:
                raise self._fail(f"its {major} header declares no audio, but the file has {held} bytes "
                                 "(a recording cut short?); repair it with: sox --ignore-length IN OUT.wav")
            if actual is not None and declared != _STREAMED and declared > int(actual):
                raise self._fail(f"truncated {major}: its header declares {declared} bytes of audio, "
                                 f"the file holds {actual}")
        if major in _NO_LENGTH or self.frames <= 0 or not self._file.seekable():
            return
        sf = _soundfile()
        try:
            self._file.seek(self.frames - 1)
            last = self._file.read(1, dtype="float32")
            self._file.seek(0)
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise self._fail(f"truncated or damaged {major}: cannot reach its end ({_reason(exc)})") from None
        if len(last) == 0:
            raise self._fail(f"truncated {major}: the audio ends before the {self.duration_s:.2f} s it declares")

    def read(self, max_frames: int) -> np.ndarray:
        """Return up to ``max_frames`` sample frames, downmixed to mono float32 in [-1, 1].

        An empty array means the end of the audio (or that another thread closed the file).
        """
        sf = _soundfile()
        with self._lock:
            if self._file.closed:
                return np.zeros(0, dtype=np.float32)
            try:
                block = self._file.read(max_frames, dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError) as exc:
                at = self._position / self.rate
                raise self._fail(f"damaged audio at {at:.2f} s ({_reason(exc)})") from None
            self._position += len(block)
        samples = block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0]
        # A float file may hold NaN/inf; they would turn into garbage int16 later.
        return np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0)

    def close(self) -> None:
        """Close the file; waits for a read in progress on another thread (at most one block)."""
        with self._lock:
            self._file.close()


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "error_string", None) or exc).strip().rstrip(".")


def wav_header(rate: int, data_bytes: int, *, channels: int = 1, sample_bytes: int = SAMPLE_WIDTH) -> bytes:
    """A 44-byte canonical PCM WAV header for ``data_bytes`` of audio."""
    block_align = channels * sample_bytes
    return b"".join(
        (
            b"RIFF",
            struct.pack("<I", 36 + data_bytes),
            b"WAVEfmt ",
            struct.pack("<IHHIIHH", 16, _PCM, channels, rate, rate * block_align, block_align, sample_bytes * 8),
            b"data",
            struct.pack("<I", data_bytes),
        )
    )


def write_wav(path: str | os.PathLike[str], pcm: bytes, rate: int) -> None:
    """Write mono int16 ``pcm`` at ``rate`` hertz to a WAV file; AudioError if unwritable."""
    if len(pcm) % SAMPLE_WIDTH:
        raise ValueError(f"int16 PCM must have an even byte count, got {len(pcm)}")
    try:
        with open(path, "wb") as out:
            out.write(wav_header(rate, len(pcm)))
            out.write(pcm)
    except OSError as exc:
        raise AudioError(f"{path}: cannot write WAV ({exc.strerror or exc})") from None
