"""Audio sources, sinks, audio file I/O, resampling and device error paths.

Files are generated here: integer PCM WAVs through the stdlib ``wave`` writer,
float and WAVE_FORMAT_EXTENSIBLE WAVs with a hand-built header (``wave`` cannot
write those), FLAC, OGG (Vorbis, Opus) and MP3 through soundfile's encoders and,
where sox is installed, FLAC and OGG through sox: encoders other than the
decoder under test wherever one is at hand.
"""

from __future__ import annotations

import importlib.abc
import itertools
import math
import os
import shutil
import struct
import subprocess
import sys
import time
import types
import wave
from pathlib import Path

import numpy as np
import pytest

from voicebus.engine.errors import AudioError, ConfigError
from voicebus.workers.audio import (
    FRAME_BYTES,
    FRAME_MS,
    RATE,
    DeviceSink,
    FileSource,
    MicSource,
    NullSink,
    Resampler,
    WavSink,
    WavSource,
    open_sink,
    open_source,
    read_audio,
    read_wav,
    write_wav,
)
from voicebus.workers.audio.files import FILE_SUFFIXES
from voicebus.workers.audio.pcm import Pacer

# --- helpers ---------------------------------------------------------------------------------


def tone(freq: float, seconds: float, rate: int, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return amp * np.sin(2 * np.pi * freq * t)


def int_bytes(samples: np.ndarray, width: int) -> bytes:
    """Float samples in [-1, 1) as little-endian signed integers of ``width`` bytes."""
    scale = float(1 << (8 * width - 1))
    ints = np.clip(np.round(samples.reshape(-1) * scale), -scale, scale - 1).astype("<i4")
    if width == 3:  # the low three bytes of each little-endian int32
        return ints.view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    return ints.astype({1: "i1", 2: "<i2", 4: "<i4"}[width]).tobytes()


def write_int_wav(path: Path, samples: np.ndarray, rate: int, width: int) -> Path:
    """Write float samples (n, channels) in [-1, 1) as integer PCM with the stdlib."""
    samples = samples.reshape(len(samples), -1)
    raw = int_bytes(samples, width)
    if width == 1:  # 8-bit WAV is unsigned
        raw = (np.frombuffer(raw, dtype=np.int8).astype(np.int16) + 128).astype(np.uint8).tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(samples.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)
    return path


def write_raw_wav(
    path: Path, raw: bytes, *, rate: int, channels: int, width: int, tag: int, extensible: bool = False
) -> Path:
    """Write a WAV with a hand-built header (float or WAVE_FORMAT_EXTENSIBLE)."""
    block = channels * width
    common = struct.pack("<HIIHH", channels, rate, rate * block, block, width * 8)
    if extensible:
        guid = struct.pack("<H", tag) + b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
        fmt = struct.pack("<H", 0xFFFE) + common + struct.pack("<HHI", 22, width * 8, 3) + guid
    else:
        fmt = struct.pack("<H", tag) + common
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    # A LIST chunk before data, as many editors write, must be skipped.
    body += b"LIST" + struct.pack("<I", 5) + b"INFOx" + b"\0"
    body += b"data" + struct.pack("<I", len(raw)) + raw
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def frames_of(source) -> list[bytes]:
    with source:
        return list(source)


def as_int16(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float64) / 32768.0


def peaks(samples: np.ndarray, rate: int, count: int = 1) -> list[float]:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    freqs = np.fft.rfftfreq(len(samples), 1 / rate)
    return sorted(float(f) for f in freqs[np.argsort(spectrum)[-count:]])


def level(samples: np.ndarray, freq: float, rate: int) -> float:
    """Amplitude of the ``freq`` component (a tone of amplitude A gives ~A)."""
    t = np.arange(len(samples)) / rate
    return float(2 * abs(np.mean(samples * np.exp(-2j * np.pi * freq * t))))


# --- reading WAVs ----------------------------------------------------------------------------

FORMATS = [
    # (id, rate, channels, writer)
    ("44k1-stereo-24bit", 44100, 2, lambda p, s, r: write_int_wav(p, s, r, 3)),
    ("8k-mono-8bit", 8000, 1, lambda p, s, r: write_int_wav(p, s, r, 1)),
    ("22k05-stereo-16bit", 22050, 2, lambda p, s, r: write_int_wav(p, s, r, 2)),
    ("32k-3ch-32bit", 32000, 3, lambda p, s, r: write_int_wav(p, s, r, 4)),
    ("16k-mono-16bit", 16000, 1, lambda p, s, r: write_int_wav(p, s, r, 2)),
    (
        "48k-mono-float32",
        48000,
        1,
        lambda p, s, r: write_raw_wav(p, s.astype("<f4").tobytes(), rate=r, channels=1, width=4, tag=3),
    ),
    (
        "11k025-stereo-float64",
        11025,
        2,
        lambda p, s, r: write_raw_wav(p, s.astype("<f8").tobytes(), rate=r, channels=2, width=8, tag=3),
    ),
    (
        "48k-stereo-24bit-extensible",
        48000,
        2,
        lambda p, s, r: write_raw_wav(p, int_bytes(s, 3), rate=r, channels=2, width=3, tag=1, extensible=True),
    ),
]


@pytest.mark.parametrize("name,rate,channels,writer", FORMATS, ids=[f[0] for f in FORMATS])
def test_wav_source_converts_any_format_to_internal_frames(tmp_path, name, rate, channels, writer):
    seconds = 0.73  # not a whole number of frames, so the padded last frame is exercised
    freq = 1000.0
    mono = tone(freq, seconds, rate)
    # Channel 0 carries the tone, the others a different tone: the downmix must hold both at 1/channels.
    other = tone(2500.0 if rate > 8000 else 3000.0, seconds, rate)
    samples = np.stack([mono] + [other] * (channels - 1), axis=1)
    path = writer(tmp_path / f"{name}.wav", samples, rate)

    source = WavSource(path, realtime=False)
    assert source.duration_s == pytest.approx(seconds, abs=1 / rate)
    frames = frames_of(source)

    assert len(frames) == math.ceil(seconds * RATE / (RATE * FRAME_MS / 1000))
    assert {len(f) for f in frames} == {FRAME_BYTES}
    out = as_int16(b"".join(frames))[: int(seconds * RATE)]
    if channels == 1:
        assert abs(peaks(out, RATE)[0] - freq) < 5
    # The tone keeps its frequency and level through resampling (a shifted tone would measure ~0 here).
    assert level(out, freq, RATE) == pytest.approx(0.5 / channels, rel=0.05)
    if channels > 1:
        other_freq = 2500.0 if rate > 8000 else 3000.0
        assert level(out, other_freq, RATE) == pytest.approx(0.5 * (channels - 1) / channels, rel=0.05)


# --- reading other formats -------------------------------------------------------------------


def _sox() -> str:
    path = shutil.which("sox")
    if path is None:
        pytest.skip("sox is not installed (Debian: apt-get install sox)")
    return path


def with_soundfile(fmt: str, subtype: str):
    def write(path: Path, samples: np.ndarray, rate: int) -> Path:
        import soundfile

        soundfile.write(path, samples, rate, format=fmt, subtype=subtype)
        return path

    return write


def with_sox(path: Path, samples: np.ndarray, rate: int) -> Path:
    """Encode with sox (libFLAC, libvorbis, LAME): encoders independent of libsndfile's."""
    source = write_int_wav(path.with_suffix(".src.wav"), samples, rate, 2)
    done = subprocess.run([_sox(), str(source), str(path)], timeout=60, capture_output=True, text=True)
    if done.returncode and "no handler" in done.stderr:
        pytest.skip(f"this sox cannot write {path.suffix} ({done.stderr.strip()})")
    assert done.returncode == 0, done.stderr
    return path


COMPRESSED = [
    # (id, file name, rate, channels, writer, lossy)
    ("flac-44k1-stereo-16bit", "a.flac", 44100, 2, with_soundfile("FLAC", "PCM_16"), False),
    ("flac-96k-mono-24bit", "a.flac", 96000, 1, with_soundfile("FLAC", "PCM_24"), False),
    ("ogg-vorbis-22k05-stereo", "a.ogg", 22050, 2, with_soundfile("OGG", "VORBIS"), True),
    ("ogg-opus-48k-mono", "a.opus", 48000, 1, with_soundfile("OGG", "OPUS"), True),
    ("ogg-opus-16k-stereo-named-ogg", "a.ogg", 16000, 2, with_soundfile("OGG", "OPUS"), True),
    ("mp3-44k1-stereo", "a.mp3", 44100, 2, with_soundfile("MP3", "MPEG_LAYER_III"), True),
    ("mp3-16k-mono", "a.mp3", 16000, 1, with_soundfile("MP3", "MPEG_LAYER_III"), True),
    ("sox-flac-32k-mono", "a.flac", 32000, 1, with_sox, False),
    ("sox-vorbis-44k1-stereo", "a.ogg", 44100, 2, with_sox, True),
    ("sox-mp3-22k05-mono", "a.mp3", 22050, 1, with_sox, True),
    ("no-suffix-flac", "take1", 44100, 1, with_soundfile("FLAC", "PCM_16"), False),
]


@pytest.mark.parametrize("name,filename,rate,channels,writer,lossy", COMPRESSED, ids=[c[0] for c in COMPRESSED])
def test_file_source_reads_flac_ogg_opus_and_mp3(tmp_path, name, filename, rate, channels, writer, lossy):
    seconds = 1.5
    samples = np.stack([tone(1000.0, seconds, rate)] + [tone(2500.0, seconds, rate)] * (channels - 1), axis=1)
    path = writer(tmp_path / filename, samples, rate)

    source = open_source(str(path), realtime=False)
    assert isinstance(source, FileSource)
    # Lossy codecs pad the start and end (MP3's encoder delay, Opus's pre-skip): allow that much.
    assert source.duration_s == pytest.approx(seconds, abs=0.1 if lossy else 1 / rate)
    frames = frames_of(source)
    assert {len(f) for f in frames} == {FRAME_BYTES}
    out = as_int16(b"".join(frames))
    assert len(out) / RATE == pytest.approx(seconds, abs=0.1 if lossy else 0.02)
    # Each tone keeps its frequency and its share of the downmix through decoding and resampling.
    tolerance = 0.15 if lossy else 0.05
    assert level(out, 1000.0, RATE) == pytest.approx(0.5 / channels, rel=tolerance)
    if channels > 1:
        assert level(out, 2500.0, RATE) == pytest.approx(0.5 * (channels - 1) / channels, rel=tolerance)


def test_files_are_decoded_block_by_block(tmp_path, monkeypatch):
    from voicebus.workers.audio.files import AudioFileReader

    path = with_soundfile("FLAC", "PCM_16")(tmp_path / "long.flac", tone(440, 3.0, 44100), 44100)
    asked: list[int] = []
    read = AudioFileReader.read

    def spy(self, max_frames):
        asked.append(max_frames)
        return read(self, max_frames)

    monkeypatch.setattr(AudioFileReader, "read", spy)
    assert len(frames_of(FileSource(path, realtime=False))) == 150
    assert len(asked) >= 30 and max(asked) <= 4410  # 0.1 s at a time, never the whole file


@pytest.mark.parametrize("filename,fmt,subtype", [("cut.flac", "FLAC", "PCM_16"), ("cut.ogg", "OGG", "VORBIS"),
                                                  ("cut.opus", "OGG", "OPUS")])
def test_truncated_compressed_files_fail_at_open_naming_the_file(tmp_path, filename, fmt, subtype):
    whole = with_soundfile(fmt, subtype)(tmp_path / f"whole-{filename}", tone(440, 2.0, 48000), 48000)
    path = tmp_path / filename
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 3])
    with pytest.raises(AudioError) as info:
        FileSource(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert "truncated" in message or "broken" in message


def test_a_cut_mp3_plays_what_is_there(tmp_path):
    # MP3 has no reliable length: a cut MP3 is a shorter MP3, as for every player.
    whole = with_soundfile("MP3", "MPEG_LAYER_III")(tmp_path / "whole.mp3", tone(440, 2.0, 44100), 44100)
    path = tmp_path / "cut.mp3"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    pcm, _ = read_audio(path)
    assert 0.7 < len(pcm) / 2 / RATE < 1.3


def test_every_file_suffix_names_a_format_libsndfile_reads():
    import soundfile

    formats = set(soundfile.available_formats())
    aliases = {"WAVE": "WAV", "OGA": "OGG", "OPUS": "OGG", "AIF": "AIFF", "AIFC": "AIFF", "SND": "AU"}
    for suffix in FILE_SUFFIXES:
        name = suffix.lstrip(".").upper()
        assert aliases.get(name, name) in formats, suffix
    assert "OPUS" in soundfile.available_subtypes("OGG") and "MPEG_LAYER_III" in soundfile.available_subtypes("MP3")


def test_16k_mono_16bit_passes_through_bit_exact_and_pads_last_frame(tmp_path):
    pcm = (np.arange(1010, dtype=np.int64) * 37 % 20000 - 10000).astype("<i2").tobytes()
    write_wav(tmp_path / "exact.wav", pcm, RATE)
    frames = frames_of(WavSource(tmp_path / "exact.wav", realtime=False))
    assert len(frames) == 4  # 1010 samples = 3 frames of 320 + 50
    joined = b"".join(frames)
    assert joined[: len(pcm)] == pcm
    assert joined[len(pcm) :] == b"\0" * (4 * FRAME_BYTES - len(pcm))


def test_closing_a_source_mid_iteration_ends_it(tmp_path):
    path = write_int_wav(tmp_path / "long.wav", tone(440, 2.0, 16000), 16000, 2)
    source = WavSource(path, realtime=False)
    got = []
    for frame in source:
        got.append(frame)
        if len(got) == 3:
            source.close()
    assert len(got) == 3


def test_read_wav_returns_whole_file_unpadded_at_16k(tmp_path):
    path = write_int_wav(tmp_path / "a.wav", tone(440, 1.0, 44100), 44100, 2)
    pcm, rate = read_wav(path)
    assert rate == RATE
    assert abs(len(pcm) // 2 - RATE) <= 1
    assert abs(peaks(as_int16(pcm), RATE)[0] - 440) < 3


def test_write_wav_round_trips_through_stdlib_wave(tmp_path):
    pcm = (tone(300, 0.2, 22050) * 32767).astype("<i2").tobytes()
    write_wav(tmp_path / "w.wav", pcm, 22050)
    with wave.open(str(tmp_path / "w.wav")) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 22050)
        assert w.readframes(w.getnframes()) == pcm


def test_empty_but_valid_wav_yields_no_frames(tmp_path):
    write_wav(tmp_path / "empty.wav", b"", 8000)
    source = WavSource(tmp_path / "empty.wav", realtime=False)
    assert source.duration_s == 0
    assert frames_of(source) == []


# --- broken files ----------------------------------------------------------------------------


def _valid_wav_bytes(tmp_path: Path) -> bytes:
    return write_int_wav(tmp_path / "valid.wav", tone(440, 0.5, 16000), 16000, 2).read_bytes()


BROKEN = {
    "truncated-header": lambda valid: valid[:30],
    "truncated-data": lambda valid: valid[: len(valid) // 2],
    "random-bytes": lambda valid: np.random.default_rng(7).integers(0, 256, 4000, dtype=np.uint8).tobytes(),
    "empty-file": lambda valid: b"",
    "riff-but-not-wave": lambda valid: b"RIFF" + struct.pack("<I", 4) + b"AVI ",
    "no-data-chunk": lambda valid: valid[:36],
    "mp3-inside-wav": lambda valid: valid[:20] + struct.pack("<H", 0x55) + valid[22:],
    "header-says-no-audio": lambda valid: valid[:40] + struct.pack("<I", 0) + valid[44:] * 4,
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_wav_raises_audio_error_naming_the_file(tmp_path, kind):
    path = tmp_path / f"{kind}.wav"
    path.write_bytes(BROKEN[kind](_valid_wav_bytes(tmp_path)))
    with pytest.raises(AudioError) as info:
        WavSource(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    with pytest.raises(AudioError):
        read_wav(path)


@pytest.mark.parametrize(
    "name,content,needle",
    [
        ("missing.wav", None, "not found"),
        ("notes.txt", b"just some text\n" * 20, "not an audio file"),
        ("notes.mp3", b"just some text\n" * 20, "not an audio file"),
        ("adir", "dir", "directory"),
        ("empty.flac", b"", "empty file"),
    ],
)
def test_missing_text_and_directory_paths_raise_audio_error(tmp_path, name, content, needle):
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(AudioError, match=needle) as info:
        WavSource(path)
    assert str(path) in str(info.value)


def test_unsupported_format_message_says_what_is_supported(tmp_path):
    # The start of an MP4/AAC file (what phones record as .m4a): a format libsndfile does not read.
    path = tmp_path / "memo.m4a"
    path.write_bytes(struct.pack(">I", 24) + b"ftypM4A " + b"\0\0\0\0M4A isom" + b"\0" * 2000)
    with pytest.raises(AudioError, match=r"memo\.m4a: not an audio file voicebus can read .*WAV, FLAC, OGG.*MP3"):
        open_source(str(path), realtime=False)


def test_telephone_encodings_the_old_parser_refused_are_read(tmp_path):
    # mu-law at 8 kHz, 1 byte a sample: 0xFF is mu-law silence, so 0.25 s of it decodes to zeros.
    path = write_raw_wav(tmp_path / "ulaw.wav", b"\xff" * 2000, rate=8000, channels=1, width=1, tag=7)
    pcm, rate = read_audio(path)
    assert rate == RATE and abs(len(pcm) // 2 - RATE // 4) <= 2
    assert np.max(np.abs(as_int16(pcm))) < 0.01


def test_unknown_data_size_from_a_streaming_writer_reads_to_end(tmp_path):
    pcm = (tone(500, 0.3, RATE) * 30000).astype("<i2").tobytes()
    write_wav(tmp_path / "s.wav", pcm, RATE)
    raw = bytearray((tmp_path / "s.wav").read_bytes())
    raw[40:44] = struct.pack("<I", 0xFFFFFFFF)
    (tmp_path / "s.wav").write_bytes(bytes(raw))
    pcm_back, _ = read_wav(tmp_path / "s.wav")
    assert pcm_back == pcm


# --- pacing ----------------------------------------------------------------------------------


def test_realtime_source_takes_real_time_and_fast_mode_does_not(tmp_path):
    path = write_int_wav(tmp_path / "one.wav", tone(440, 1.0, 22050), 22050, 2)
    start = time.monotonic()
    paced = frames_of(WavSource(path, realtime=True))
    paced_s = time.monotonic() - start
    start = time.monotonic()
    fast = frames_of(WavSource(path, realtime=False))
    fast_s = time.monotonic() - start
    assert paced == fast and len(paced) == 50
    assert paced_s > 0.8
    assert fast_s < 0.3 * paced_s


class FakeClock:
    """A clock that advances only when slept on or told to (no real waiting)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_pacer_deadlines_do_not_drift_with_work_between_frames():
    clock = FakeClock()
    pacer = Pacer(catch_up=True, clock=clock, sleep=clock.sleep)
    for _ in range(50):
        clock.now += 0.007  # work done between frames must not add up
        pacer.wait(0.02)
    assert clock.now == pytest.approx(100.0 + 50 * 0.02 + 0.007)
    assert clock.sleeps[1] == pytest.approx(0.013)


def test_source_pacer_catches_up_and_sink_pacer_restarts_after_a_stall():
    for catch_up, expected_sleeps in ((True, 0), (False, 3)):
        clock = FakeClock()
        pacer = Pacer(catch_up=catch_up, clock=clock, sleep=clock.sleep)
        pacer.wait(0.02)
        clock.now += 0.5  # consumer stalls for 25 frames
        clock.sleeps.clear()
        for _ in range(3):
            pacer.wait(0.02)
        # A microphone hands over the buffered frames at once; a speaker plays each new block in full.
        assert sum(1 for s in clock.sleeps if s > 0) == expected_sleeps


def test_paced_sinks_take_playing_time_and_unpaced_do_not(tmp_path):
    block = b"\0" * (441 * 2)  # 20 ms at 22050 Hz
    for make in (lambda: NullSink(22050, realtime=True), lambda: WavSink(tmp_path / "p.wav", 22050, realtime=True)):
        with make() as sink:
            start = time.monotonic()
            for _ in range(25):
                sink.write(block)
            assert time.monotonic() - start > 0.4
    with NullSink(22050) as sink:
        start = time.monotonic()
        for _ in range(250):
            sink.write(block)
        assert time.monotonic() - start < 0.2


# --- sinks -----------------------------------------------------------------------------------


def test_wav_sink_appends_all_writes_in_order(tmp_path):
    path = tmp_path / "replies.wav"
    blocks = [(tone(200 + 50 * i, 0.02, 22050) * 20000).astype("<i2").tobytes() for i in range(30)]
    blocks.insert(5, b"")  # an empty write is harmless
    with WavSink(path, 22050, realtime=False) as sink:
        for b in blocks:
            sink.write(b)
        assert sink.duration_s == pytest.approx(30 * 0.02, abs=1e-3)
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 22050)
        assert w.readframes(w.getnframes()) == b"".join(blocks)


def test_wav_sink_header_is_valid_mid_run(tmp_path):
    path = tmp_path / "live.wav"
    sink = WavSink(path, 16000, realtime=False)
    sink.write(b"\x01\x00" * 320)
    sink.write(b"\x02\x00" * 160)
    with wave.open(str(path)) as w:  # read while the sink is still open
        assert w.readframes(w.getnframes()) == b"\x01\x00" * 320 + b"\x02\x00" * 160
    sink.close()
    sink.close()  # closing twice is harmless
    with pytest.raises(AudioError, match="after close"):
        sink.write(b"\0\0")


def test_wav_sink_file_survives_the_process_being_killed(tmp_path):
    path = tmp_path / "killed.wav"
    script = (
        "import os, signal\n"
        "from voicebus.workers.audio import WavSink\n"
        f"sink = WavSink({str(path)!r}, 16000, realtime=False)\n"
        "for i in range(10):\n"
        "    sink.write(bytes([i, 0]) * 320)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], timeout=60)
    assert proc.returncode == -9
    with wave.open(str(path)) as w:
        assert w.readframes(w.getnframes()) == b"".join(bytes([i, 0]) * 320 for i in range(10))


def test_wav_sink_appends_to_its_own_kind_of_file_and_starts_afresh_on_any_other(tmp_path):
    """A speaker restarted mid-run goes on after its predecessor's answers (append), not over them."""
    path = tmp_path / "run.wav"
    with WavSink(path, 16000, realtime=False) as sink:
        sink.write(b"\x01\x00" * 320)
    with WavSink(path, 16000, realtime=False, append=True) as sink:
        assert sink.duration_s == pytest.approx(0.02)
        sink.write(b"\x02\x00" * 160)
    with wave.open(str(path)) as w:
        assert w.readframes(w.getnframes()) == b"\x01\x00" * 320 + b"\x02\x00" * 160
    # Another rate, or something that is no WAV of ours: the file is started afresh.
    for other in (lambda: write_wav(path, b"\x05\x00" * 100, 22050), lambda: path.write_bytes(b"not a wav")):
        other()
        with WavSink(path, 16000, realtime=False, append=True) as sink:
            sink.write(b"\x03\x00" * 10)
        with wave.open(str(path)) as w:
            assert (w.getframerate(), w.readframes(w.getnframes())) == (16000, b"\x03\x00" * 10)
    with WavSink(tmp_path / "new.wav", 16000, realtime=False, append=True) as sink:  # nothing to append to
        assert sink.duration_s == 0


def test_unwritable_wav_sink_raises_audio_error(tmp_path):
    path = tmp_path / "no-such-dir" / "out.wav"
    with pytest.raises(AudioError) as info:
        WavSink(path, 16000)
    assert str(path) in str(info.value)
    with pytest.raises(AudioError):
        write_wav(path, b"", 16000)


def test_odd_byte_counts_are_rejected():
    with pytest.raises(ValueError, match="even"):
        NullSink(16000).write(b"\0\0\0")
    with pytest.raises(ValueError, match="even"):
        Resampler(22050, 16000).process(b"\0")


# --- resampler -------------------------------------------------------------------------------


def test_resampler_converts_rate_and_keeps_frequency():
    source = (tone(1200, 1.0, 22050) * 20000).astype("<i2").tobytes()
    resampler = Resampler(22050, 48000)
    # TTS delivers uneven chunks; the stream must join them seamlessly.
    chunks = [source[i : i + 1234] for i in range(0, len(source), 1234)]
    out = b"".join(resampler.process(c) for c in chunks) + resampler.flush()
    assert abs(len(out) // 2 - 48000) <= 2
    samples = as_int16(out)
    assert abs(peaks(samples, 48000)[0] - 1200) < 3
    assert level(samples, 1200, 48000) == pytest.approx(0.5 * 20000 / 32768, rel=0.02)
    # After flush a new stream starts; one big chunk gives the same audio as the uneven ones (no seams).
    again = as_int16(resampler.process(source) + resampler.flush())
    assert len(again) == len(samples)
    assert np.max(np.abs(again - samples)) <= 4 / 32768  # a few LSB of rounding, no clicks


def test_resampler_at_equal_rates_is_identity():
    pcm = os.urandom(640)
    resampler = Resampler(16000, 16000)
    assert resampler.process(pcm) == pcm
    assert resampler.flush() == b""


# --- factories -------------------------------------------------------------------------------


def test_open_source_and_sink_accept_the_documented_forms(tmp_path):
    path = write_int_wav(tmp_path / "in.wav", tone(440, 0.1, 16000), 16000, 2)
    assert open_source("none", realtime=True) is None
    with open_source(str(path), realtime=False) as source:
        assert isinstance(source, WavSource) and not source.realtime
        assert len(list(source)) == 5
    with open_sink("none", 22050, realtime=False) as sink:
        assert isinstance(sink, NullSink) and sink.rate == 22050
    with open_sink(str(tmp_path / "OUT.WAV"), 22050, realtime=False) as sink:
        assert isinstance(sink, WavSink)
    assert (tmp_path / "OUT.WAV").exists()


@pytest.mark.parametrize("spec", ["microphone", "talk.m4a", "", "file.txt"])
def test_unknown_specs_raise_config_error_listing_the_forms(spec):
    with pytest.raises(ConfigError, match="mic.*none.*wav"):
        open_source(spec, realtime=False)
    with pytest.raises(ConfigError, match="speaker.*none.*wav"):
        open_sink(spec.replace("microphone", "speakers"), 16000, realtime=False)


# --- devices ---------------------------------------------------------------------------------


def _real_device_exists(kind: str) -> bool:
    try:
        import sounddevice

        sounddevice.query_devices(kind=kind)
    except Exception:  # no PortAudio, no device: exactly the case under test
        return False
    return True


@pytest.mark.parametrize("kind", ["input", "output"])
def test_device_paths_without_a_device_fail_with_one_clear_line(kind):
    if _real_device_exists(kind):
        pytest.skip(f"this machine has an {kind} device")
    with pytest.raises(AudioError) as info:
        if kind == "input":
            open_source("mic", realtime=True)
        else:
            open_sink("speaker", 16000, realtime=True)
    message = str(info.value)
    assert "\n" not in message
    assert "libportaudio2" in message or f"no {kind} device found" in message


class _BlockSounddevice(importlib.abc.MetaPathFinder):
    """Make ``import sounddevice`` fail as it does when libportaudio is missing."""

    def find_spec(self, name, path=None, target=None):
        if name == "sounddevice":
            raise OSError("PortAudio library not found")
        return None


def test_missing_portaudio_names_the_debian_package(monkeypatch):
    monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_BlockSounddevice(), *sys.meta_path])
    for opener in (lambda: MicSource(), lambda: DeviceSink(22050)):
        with pytest.raises(AudioError, match=r"PortAudio library not found; install libportaudio2"):
            opener()


class FakePortAudioError(Exception):
    pass


class FakeStream:
    """Records what a sink writes; feeds a mic callback with a tone."""

    def __init__(self, samplerate, blocksize=None, device=None, channels=1, dtype="int16", callback=None):
        self.samplerate, self.blocksize, self.callback = samplerate, blocksize, callback
        self.written = bytearray()
        self.calls: list[str] = []

    def start(self):
        self.calls.append("start")
        if self.callback is not None:
            pcm = (tone(700, 1.0, self.samplerate) * 16000).astype("<i2").tobytes()
            step = self.blocksize * 2
            for i in range(0, len(pcm) - step + 1, step):
                self.callback(pcm[i : i + step], self.blocksize, None, 0)

        self.gone = False
        """the device went away (unplugged): PortAudio's calls on the stream fail"""

    def write(self, data):
        if self.gone:
            raise FakePortAudioError("Error writing stream: device unavailable [PaErrorCode -9985]")
        self.written += data
        return False

    def stop(self):
        self.calls.append("stop")
        if self.gone:
            raise FakePortAudioError("Error stopping stream: device unavailable [PaErrorCode -9985]")

    def close(self):
        self.calls.append("close")


def fake_sounddevice(*, devices: dict[str, int], only_rate: int | None = None):
    """A sounddevice stand-in with ``devices`` (name -> default rate) that accept only ``only_rate``."""
    sd = types.ModuleType("sounddevice")
    sd.PortAudioError = FakePortAudioError
    sd.streams = []
    names = list(devices)

    def query_devices(device=None, kind=None):
        if device is None:
            if not names:
                raise FakePortAudioError("Error querying device -1")
            device = 0
        if isinstance(device, str):
            matches = [i for i, n in enumerate(names) if device.lower() in n.lower()]
            if not matches:
                raise ValueError(f"No {kind} device matching {device!r}")
            device = matches[0]
        if not 0 <= device < len(names):
            raise FakePortAudioError(f"Error querying device {device}")
        return {"index": device, "name": names[device], "default_samplerate": float(devices[names[device]])}

    def check(device=None, channels=None, dtype=None, samplerate=None):
        if only_rate is not None and samplerate != only_rate:
            raise FakePortAudioError("Invalid sample rate")

    def stream(**kwargs):
        s = FakeStream(**kwargs)
        sd.streams.append(s)
        return s

    sd.query_devices = query_devices
    sd.check_input_settings = sd.check_output_settings = check
    sd.RawInputStream = sd.RawOutputStream = stream
    return sd


def test_no_default_device_suggests_a_file(monkeypatch):
    monkeypatch.setitem(sys.modules, "sounddevice", fake_sounddevice(devices={}))
    with pytest.raises(AudioError, match=r"^no input device found; use --input FILE\.wav$"):
        MicSource()
    with pytest.raises(AudioError, match=r"^no output device found; use --output FILE\.wav"):
        DeviceSink(22050)


def test_unknown_named_device_says_how_to_list_devices(monkeypatch):
    monkeypatch.setitem(sys.modules, "sounddevice", fake_sounddevice(devices={"USB Mic": 48000}))
    with pytest.raises(AudioError, match=r"input device 'Studio' not found .*python -m sounddevice.*--input FILE\.wav"):
        open_source("mic:Studio", realtime=True)
    with pytest.raises(AudioError, match="output device 7 not found"):
        open_sink("speaker:7", 16000, realtime=True)


def test_mic_without_16k_support_opens_at_device_rate_and_resamples(monkeypatch):
    sd = fake_sounddevice(devices={"USB Mic": 48000}, only_rate=48000)
    monkeypatch.setitem(sys.modules, "sounddevice", sd)
    with open_source("mic:usb", realtime=True) as mic:
        assert mic.choice.rate == 48000
        stream = sd.streams[0]
        assert (stream.samplerate, stream.blocksize) == (48000, 960)  # 20 ms blocks at the device rate
        frames = list(itertools.islice(mic, 40))
    assert stream.calls == ["start", "stop", "close"]
    assert {len(f) for f in frames} == {FRAME_BYTES}
    samples = as_int16(b"".join(frames))[1000:]  # skip the resampler's start-up
    assert abs(peaks(samples, RATE)[0] - 700) < 5


def test_device_sink_resamples_to_the_device_rate_and_drains_on_close(monkeypatch):
    sd = fake_sounddevice(devices={"HDMI": 48000}, only_rate=48000)
    monkeypatch.setitem(sys.modules, "sounddevice", sd)
    pcm = (tone(900, 0.5, 22050) * 16000).astype("<i2").tobytes()
    with open_sink("speaker", 22050, realtime=True) as sink:
        assert isinstance(sink, DeviceSink) and sink.rate == 22050
        for i in range(0, len(pcm), 882):
            sink.write(pcm[i : i + 882])
    stream = sd.streams[0]
    assert stream.samplerate == 48000
    assert stream.calls == ["start", "stop", "close"]  # stop (drain), not abort
    assert abs(len(stream.written) // 2 - 24000) <= 2
    assert abs(peaks(as_int16(bytes(stream.written)), 48000)[0] - 900) < 5


def test_a_device_that_goes_away_fails_its_write_once_and_closes_quietly(monkeypatch):
    """Found in review: the write's one-line error was followed by a traceback from close(), whose stop()
    failed too, and the speaker exited 1 instead of being restarted as a failed output (exit 2)."""
    sd = fake_sounddevice(devices={"USB headset": 22050})
    monkeypatch.setitem(sys.modules, "sounddevice", sd)
    sink = open_sink("speaker", 22050, realtime=True)
    sink.write(bytes(882))
    sd.streams[0].gone = True
    with pytest.raises(AudioError, match="device unavailable"):
        sink.write(bytes(882))
    sink.close()
    assert sd.streams[0].calls == ["start", "stop", "close"]
    sink.close()  # (twice, as the speaker's own close may)
