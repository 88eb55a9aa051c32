"""The listener on a real bus: WAV in, VAD and pocketsphinx, turns, barge-in, redelivery."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from voicebus.engine.client import BusClient
from voicebus.workers.audio import write_wav
from voicebus.workers.kinds import LlmAccepted, PlayStart, TurnMetrics
from voicebus.workers.listener import Listener

from conftest import wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_questions(tmp_path_factory) -> Path:
    from voicebus.workers.tts.piper import PiperSynthesizer

    voice = PiperSynthesizer()
    rate = voice.sample_rate
    pcm = bytes(rate)  # 0.5 s
    for text in ("What is the capital of France?", "Tell me a joke."):
        pcm += b"".join(voice.synthesize(text)) + bytes(rate * 2 * 2)
    voice.close()
    path = tmp_path_factory.mktemp("audio") / "two.wav"
    write_wav(path, pcm, rate)
    return path


@pytest.fixture
def run_listener(run_actor):
    def start(wav, *, fast: bool = True, **overrides):
        return run_actor(Listener, **{"audio.input": str(wav), "audio.fast": fast, **overrides})

    return start


def collect_until(client: BusClient, predicate, timeout: float = 60) -> list:
    seen = []
    wait_for(client, lambda e: seen.append(e) or predicate(e), timeout=timeout)
    return seen


def test_turns_from_a_file_then_shutdown_when_answered(run_listener, make_client, two_questions):
    client = make_client("test", subscribe=("vad.", "asr.", "audio.end", "ctl."))
    run_listener(two_questions)
    seen = collect_until(client, lambda e: e.kind == "audio.end")
    turns = [e.turn for e in seen if e.kind == "vad.start"]
    assert len(turns) == 2 and turns[0] < turns[1]
    for turn in turns:
        kinds = [e.kind for e in seen if e.turn == turn and e.kind.startswith(("vad.", "asr.f", "asr.n"))]
        assert kinds == ["vad.start", "vad.end", "asr.final"], kinds
    # The first turn was still open (unanswered) when the second began: barge-in.
    assert [e.turn for e in seen if e.kind == "ctl.interrupt"] == [turns[0]]
    finals = [e.body for e in seen if e.kind == "asr.final"]
    assert "capital" in finals[0].text and "france" in finals[0].text
    assert finals[0].timings["asr_s"] >= 0 and finals[0].timings["final"] >= finals[0].timings["vad_end"]
    assert any(e.kind == "asr.partial" for e in seen), "pocketsphinx should stream partial results"
    assert seen[-1].body.last_turn == turns[1]
    # Unanswered, the utterances are sent again; once accepted and finished, the listener ends the run.
    repeats = collect_until(client, lambda e: e.kind == "asr.final" and e.turn == turns[0], timeout=5)
    assert repeats[-1].body.text == finals[0].text
    for turn in turns:
        client.publish(LlmAccepted(), turn=turn)
        client.publish(TurnMetrics(timings={}), turn=turn)
    shutdown = wait_for(client, lambda e: e.kind == "ctl.shutdown", timeout=10)
    assert shutdown.body.reason == "input ended"


def test_barge_in_interrupts_the_speaking_turn(run_listener, make_client, two_questions):
    client = make_client("test", subscribe=("vad.start", "ctl.interrupt", "sys.ready"))
    run_listener(two_questions, fast=False)
    wait_for(client, lambda e: e.kind == "sys.ready", timeout=30)  # the file has 0.5 s of silence first
    client.publish(PlayStart(index=0, text="I was saying"), turn=42)
    seen = collect_until(client, lambda e: e.kind == "vad.start")
    assert any(e.kind == "ctl.interrupt" and e.turn == 42 for e in seen)


def test_without_barge_in_speech_during_playback_is_ignored(run_listener, make_client, two_questions):
    client = make_client("test", subscribe=("vad.", "ctl.interrupt", "audio.end", "sys.ready"))
    run_listener(two_questions, fast=False, **{"vad.barge_in": False})
    wait_for(client, lambda e: e.kind == "sys.ready", timeout=30)
    client.publish(PlayStart(index=0, text="I am talking"), turn=42)
    seen = collect_until(client, lambda e: e.kind == "audio.end")
    assert not [e for e in seen if e.kind in ("vad.start", "ctl.interrupt")], [(e.kind, e.turn) for e in seen]


def test_text_only_input_needs_no_model(run_listener, make_client):
    client = make_client("test", subscribe=("sys.ready",))
    start = time.monotonic()
    run_listener("none")
    ready = wait_for(client, lambda e: e.kind == "sys.ready", timeout=10)
    assert ready.body.load_s < 1 and time.monotonic() - start < 10
