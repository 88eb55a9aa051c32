"""Piper TTS with the packaged joe voice: real model, real audio."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
import time
from pathlib import Path

import numpy as np
import pytest

from voicebus.engine.errors import BackendError, ModelError
from voicebus.workers.tts.piper import PiperSynthesizer, find_default_voice

TEN_WORDS = "The quick brown fox jumps over the lazy sleeping dog."


@pytest.fixture(scope="session")
def piper() -> Iterator[PiperSynthesizer]:
    synth = PiperSynthesizer()
    yield synth
    synth.close()


def pcm_of(synth: PiperSynthesizer, text: str) -> np.ndarray:
    chunks = list(synth.synthesize(text))
    assert all(len(c) % 2 == 0 for c in chunks), "int16 chunks must have whole samples"
    return np.frombuffer(b"".join(chunks), dtype="<i2")


def test_default_voice_is_found_with_its_config() -> None:
    onnx = find_default_voice()
    assert onnx.suffix == ".onnx" and onnx.is_file()
    assert onnx.with_name(onnx.name + ".json").is_file()


def test_sample_rate_comes_from_the_voice_config(piper: PiperSynthesizer) -> None:
    assert piper.name == "piper"
    assert piper.sample_rate in (16000, 22050, 24000, 44100, 48000)


def test_sentence_gives_audible_speech_of_plausible_length(piper: PiperSynthesizer) -> None:
    samples = pcm_of(piper, TEN_WORDS)
    seconds = len(samples) / piper.sample_rate
    # Conversational English runs ~0.25-0.4 s per word; allow for pauses and padding.
    assert 1.5 <= seconds <= 6.0, seconds
    rms = float(np.sqrt(np.mean(samples.astype(np.float64) ** 2)))
    assert rms > 500, f"speech too quiet to be speech: rms={rms:.0f}"


def test_first_chunk_arrives_before_later_sentences_are_made(piper: PiperSynthesizer) -> None:
    text = "Hello there. " + TEN_WORDS + " It is a fine day for a walk in the park."
    started = time.perf_counter()
    chunks = piper.synthesize(text)
    first = next(chunks)
    first_latency = time.perf_counter() - started
    rest = list(chunks)
    total = time.perf_counter() - started
    print(f"\npiper first chunk {first_latency * 1000:.0f} ms, all three sentences {total * 1000:.0f} ms")
    assert len(rest) >= 2, "piper should yield one chunk per sentence"
    # The first chunk is the short "Hello there." — it must not wait for the long ones.
    assert len(first) < min(len(c) for c in rest)
    assert first_latency < total / 2


@pytest.mark.parametrize("text", ["", "   ", "\n\t "])
def test_blank_text_yields_nothing(piper: PiperSynthesizer, text: str) -> None:
    assert list(piper.synthesize(text)) == []


def test_length_scale_slows_speech(piper: PiperSynthesizer) -> None:
    slow = PiperSynthesizer(length_scale=1.5)
    try:
        normal = len(pcm_of(piper, TEN_WORDS))
        slower = len(pcm_of(slow, TEN_WORDS))
    finally:
        slow.close()
    assert slower > normal * 1.25


def test_missing_voice_is_a_model_error_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nobody.onnx"
    with pytest.raises(ModelError, match="nobody.onnx"):
        PiperSynthesizer(missing)


def test_voice_without_config_is_a_model_error(tmp_path: Path) -> None:
    onnx = tmp_path / "lonely.onnx"
    shutil.copyfile(find_default_voice(), onnx)
    with pytest.raises(ModelError, match=r"lonely\.onnx\.json"):
        PiperSynthesizer(onnx)


def test_corrupt_voice_is_a_model_error_naming_the_file(tmp_path: Path) -> None:
    real = find_default_voice()
    onnx = tmp_path / "broken.onnx"
    onnx.write_bytes(b"this is not an onnx model" * 100)
    shutil.copyfile(real.with_name(real.name + ".json"), tmp_path / "broken.onnx.json")
    with pytest.raises(ModelError, match="broken.onnx"):
        PiperSynthesizer(onnx)


def test_corrupt_voice_config_is_a_model_error_naming_the_file(tmp_path: Path) -> None:
    onnx = tmp_path / "confused.onnx"
    shutil.copyfile(find_default_voice(), onnx)
    (tmp_path / "confused.onnx.json").write_text("{ not json")
    with pytest.raises(ModelError, match="confused.onnx"):
        PiperSynthesizer(onnx)


def test_non_onnx_path_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"\.onnx"):
        PiperSynthesizer(tmp_path / "voice.bin")


def test_closed_synthesizer_refuses_work() -> None:
    synth = PiperSynthesizer()
    synth.close()
    with pytest.raises(BackendError, match="closed"):
        list(synth.synthesize("Hello."))
