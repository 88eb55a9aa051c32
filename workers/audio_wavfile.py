"""Reading and writing WAV files without extra dependencies.

The stdlib ``wave`` module of Python 3.11 reads only plain integer PCM and
rejects both IEEE float and WAVE_FORMAT_EXTENSIBLE headers, which most tools
write for 24-bit or multichannel audio. Parsing RIFF here is short and lets one
reader take 8/16/24/32-bit integer and 32/64-bit float WAVs of any rate and
channel count, read block by block so a long file is never loaded at once.

Every problem is an AudioError whose one-line message starts with the path.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from voicebus.engine.errors import AudioError

from .audio_pcm import SAMPLE_WIDTH, Closing

_PCM = 0x0001
_FLOAT = 0x0003
_EXTENSIBLE = 0xFFFE
# The GUID tail shared by every KSDATAFORMAT_SUBTYPE_* (the first 2 bytes are the format tag).
_SUBTYPE_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
_KNOWN_TAGS = {0x0002: "MS ADPCM", 0x0006: "A-law", 0x0007: "mu-law", 0x0011: "IMA ADPCM", 0x0055: "MP3"}
# Writers that stream to a pipe or were killed before finishing leave these data sizes.
_UNKNOWN_SIZES = (0, 0xFFFFFFFF)


@dataclass(frozen=True)
class WavFormat:
    """The audio layout a WAV header declares."""

    rate: int
    """Sample rate in hertz."""
    channels: int
    """Interleaved channel count."""
    sample_bytes: int
    """Bytes per sample container (1, 2, 3, 4 or 8)."""
    is_float: bool
    """IEEE float samples rather than integer PCM."""

    @property
    def block_align(self) -> int:
        """Bytes per sample frame (one sample of every channel)."""
        return self.sample_bytes * self.channels


class WavReader(Closing):
    """Open a WAV file and read it as float32 mono blocks."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Open ``path`` and parse its header; AudioError if that fails."""
        self.path = Path(path)
        try:
            self._file: BinaryIO = open(self.path, "rb")  # noqa: SIM115 - closed by close()
        except FileNotFoundError:
            raise AudioError(f"{self.path}: file not found") from None
        except IsADirectoryError:
            raise AudioError(f"{self.path}: is a directory, not a WAV file") from None
        except OSError as exc:
            raise AudioError(f"{self.path}: cannot open ({exc.strerror or exc})") from None
        try:
            self.format, self._remaining = self._parse_header()
        except BaseException:
            self._file.close()
            raise
        self.frames = self._remaining
        """Sample frames of audio in the file."""

    @property
    def duration_s(self) -> float:
        """Length of the audio in seconds."""
        return self.frames / self.format.rate

    def _fail(self, problem: str) -> AudioError:
        return AudioError(f"{self.path}: {problem}")

    def _parse_header(self) -> tuple[WavFormat, int]:
        head = self._file.read(12)
        if not head:
            raise self._fail("empty file, not a WAV")
        if head[:4] == b"RF64":
            raise self._fail("RF64 (over 4 GiB) WAV files are not supported")
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            raise self._fail("not a WAV file (no RIFF/WAVE header)")
        fmt: WavFormat | None = None
        while True:
            chunk = self._file.read(8)
            if len(chunk) < 8:
                missing = "'fmt '" if fmt is None else "'data'"
                raise self._fail(f"truncated or broken WAV: no {missing} chunk")
            chunk_id, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if chunk_id == b"fmt ":
                body = self._file.read(size)
                if len(body) < size:
                    raise self._fail("truncated WAV header")
                fmt = self._parse_fmt(body)
                if size & 1:  # RIFF chunks are word aligned
                    self._file.seek(1, os.SEEK_CUR)
            elif chunk_id == b"data":
                if fmt is None:
                    raise self._fail("broken WAV: 'data' chunk before 'fmt ' chunk")
                return fmt, self._data_frames(fmt, size)
            else:
                self._file.seek(size + (size & 1), os.SEEK_CUR)

    def _parse_fmt(self, body: bytes) -> WavFormat:
        if len(body) < 16:
            raise self._fail("broken WAV: 'fmt ' chunk too short")
        tag, channels, rate, _byte_rate, block_align, bits = struct.unpack("<HHIIHH", body[:16])
        if tag == _EXTENSIBLE:
            if len(body) < 40 or body[26:40] != _SUBTYPE_TAIL:
                raise self._fail("unsupported WAV: unknown WAVE_FORMAT_EXTENSIBLE subformat")
            tag = struct.unpack("<H", body[24:26])[0]
        if channels < 1 or rate < 1 or block_align < channels or block_align % channels:
            raise self._fail(f"broken WAV header ({channels} channels, {rate} Hz, block {block_align} bytes)")
        # The container size decides the decoding; 'bits' may be fewer valid bits (e.g. 20 in 24).
        sample_bytes = block_align // channels
        if tag == _PCM and sample_bytes in (1, 2, 3, 4):
            return WavFormat(rate, channels, sample_bytes, is_float=False)
        if tag == _FLOAT and sample_bytes in (4, 8):
            return WavFormat(rate, channels, sample_bytes, is_float=True)
        name = _KNOWN_TAGS.get(tag, f"format tag 0x{tag:04x}")
        if tag in (_PCM, _FLOAT):
            name = f"{'float' if tag == _FLOAT else 'integer'} PCM in {sample_bytes * 8}-bit containers"
        raise self._fail(
            f"unsupported WAV encoding: {name} ({bits} bits); use 8/16/24/32-bit integer or 32/64-bit float PCM"
        )

    def _data_frames(self, fmt: WavFormat, declared: int) -> int:
        start = self._file.tell()
        available = os.fstat(self._file.fileno()).st_size - start
        if declared in _UNKNOWN_SIZES and available > 0:
            declared = available
        elif declared > available:
            raise self._fail(
                f"truncated WAV: header declares {declared} bytes of audio, the file holds {max(available, 0)}"
            )
        # A trailing partial sample frame cannot be decoded; it is dropped.
        return declared // fmt.block_align

    def read(self, max_frames: int) -> np.ndarray:
        """Return up to ``max_frames`` sample frames, downmixed to mono float32 in [-1, 1).

        An empty array means the end of the audio.
        """
        count = min(max_frames, self._remaining)
        if count <= 0 or self._file.closed:  # closed by another thread: the audio simply ends
            return np.zeros(0, dtype=np.float32)
        want = count * self.format.block_align
        try:
            raw = self._file.read(want)
        except OSError as exc:
            raise self._fail(f"read error ({exc.strerror or exc})") from None
        except ValueError:  # closed between the check above and the read
            return np.zeros(0, dtype=np.float32)
        if len(raw) < want:
            raise self._fail("truncated WAV: the file ended early (changed while reading?)")
        self._remaining -= count
        samples = _decode(raw, self.format)
        if self.format.channels > 1:
            samples = samples.reshape(-1, self.format.channels).mean(axis=1, dtype=np.float32)
        return samples

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def _decode(raw: bytes, fmt: WavFormat) -> np.ndarray:
    """Interleaved samples of any supported encoding as float32 in [-1, 1)."""
    width = fmt.sample_bytes
    if fmt.is_float:
        values = np.frombuffer(raw, dtype="<f4" if width == 4 else "<f8").astype(np.float32)
        # A float file may hold NaN/inf; they would turn into garbage int16 later.
        return np.nan_to_num(values, nan=0.0, posinf=1.0, neginf=-1.0)
    if width == 1:  # 8-bit WAV is unsigned with 128 as silence
        return (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    if width == 2:
        return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    if width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        packed = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        signed = (packed << 8) >> 8  # sign-extend 24 to 32 bits
        return signed.astype(np.float32) / float(1 << 23)
    return (np.frombuffer(raw, dtype="<i4").astype(np.float64) / float(1 << 31)).astype(np.float32)


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
