"""The speaker on a real bus with the real piper voice, writing a real WAV file."""

from __future__ import annotations

import time

import pytest

from voicebus.engine.client import BusClient
from voicebus.engine.messages import Interrupt, new_turn_id
from voicebus.workers.audio import read_wav
from voicebus.workers.kinds import AsrFinal, LlmDone, LlmSentence, LlmToken, Say, VadEnd
from voicebus.workers.speaker import Speaker, latencies

from conftest import wait_for

pytestmark = pytest.mark.slow

LONG = "This sentence is long enough that it takes several seconds to say, so it can be cut in the middle."


@pytest.fixture
def speaker(run_actor, tmp_path):
    wav = tmp_path / "out.wav"
    return run_actor(Speaker, **{"audio.output": str(wav)}), wav


def ready(client: BusClient) -> None:
    wait_for(client, lambda e: e.kind == "sys.ready" and e.body.name == "speaker", timeout=60)


def test_sentences_play_in_order_with_metrics(speaker, make_client):
    _, wav = speaker
    client = make_client("test", subscribe=("play.", "metrics.", "sys.ready"))
    ready(client)
    turn = new_turn_id()
    now = time.time()
    client.publish(VadEnd(offset_ms=1000, speech_ms=800, speech_end_ts=now - 0.5), turn=turn)
    client.publish(AsrFinal(text="hi"), turn=turn)
    client.publish(LlmToken(text="Hello", index=0), turn=turn)
    for index, text in enumerate(["Hello there.", "How are you today?", "Fine, thanks."]):
        client.publish(LlmSentence(text=text, index=index), turn=turn)
    client.publish(LlmDone(finish_reason="stop", sentences=3), turn=turn)
    seen = []
    metrics = wait_for(client, lambda e: seen.append(e) or e.kind == "metrics.turn", timeout=60)
    starts = [e.body.index for e in seen if e.kind == "play.start"]
    dones = [e.body.index for e in seen if e.kind == "play.done"]
    assert starts == dones == [0, 1, 2]
    assert [e.body.text for e in seen if e.kind == "play.start"][1] == "How are you today?"
    timings = metrics.body.timings
    assert metrics.body.outcome == "done" and metrics.turn == turn
    for key in ("speech_end", "vad_end", "asr_final", "first_token", "first_sentence", "first_audio",
                "asr_s", "first_audio_s", "total_s", "silence_s"):
        assert key in timings, key
    assert 0 < timings["first_audio_s"] < 10
    spoken_ms = sum(e.body.spoken_ms for e in seen if e.kind == "play.done")
    pcm, _ = read_wav(wav)
    assert abs(len(pcm) / 32 - spoken_ms) < 100  # the WAV holds exactly what was played


def test_interrupt_cuts_the_sentence_and_drops_the_turn(speaker, make_client):
    _, wav = speaker
    client = make_client("test", subscribe=("play.", "metrics.", "sys.ready"))
    ready(client)
    turn = new_turn_id()
    client.publish(LlmSentence(text=LONG, index=0), turn=turn)
    client.publish(LlmSentence(text="This one must never be heard.", index=1), turn=turn)
    client.publish(LlmDone(finish_reason="stop", sentences=2), turn=turn)
    wait_for(client, lambda e: e.kind == "play.start" and e.turn == turn, timeout=30)
    time.sleep(0.5)  # let half a second of the sentence play: this is what gets cut
    sent = time.monotonic()
    client.publish(Interrupt(reason="barge-in"), turn=turn)
    seen = []
    stopped = wait_for(client, lambda e: seen.append(e) or e.kind == "play.stopped", timeout=10)
    print(f"interrupt → play.stopped through the bus: {(time.monotonic() - sent) * 1000:.0f} ms")
    body = stopped.body
    assert body.index == 0 and 0 < body.spoken_ms < body.total_ms
    metrics = wait_for(client, lambda e: e.kind == "metrics.turn", timeout=10)
    assert metrics.body.outcome == "interrupted"
    seen += [e for e in iter(lambda: client.recv(timeout=1.0), None)]
    assert not any(e.kind == "play.start" and e.body.index == 1 for e in seen)
    pcm, _ = read_wav(wav)
    assert abs(len(pcm) / 32 - body.spoken_ms) < 100 and len(pcm) / 32 < body.total_ms


def test_a_newer_turn_supersedes_and_say_speaks(speaker, make_client):
    client = make_client("test", subscribe=("play.", "metrics.", "sys.ready"))
    ready(client)
    old, new = new_turn_id(), new_turn_id() + 1
    client.publish(LlmSentence(text=LONG, index=0), turn=old)
    wait_for(client, lambda e: e.kind == "play.start" and e.turn == old, timeout=30)
    client.publish(Say(text="Something else."), turn=new)
    seen = []
    wait_for(client, lambda e: seen.append(e) or (e.kind == "metrics.turn" and e.turn == new), timeout=30)
    assert any(e.kind == "play.stopped" and e.turn == old and e.body.reason == "superseded" for e in seen)
    assert any(e.kind == "play.done" and e.turn == new for e in seen)


def test_latencies_derive_the_spans():
    t = {"speech_end": 10.0, "vad_end": 10.5, "asr_final": 10.6, "first_token": 10.7,
         "first_sentence": 10.9, "first_audio": 11.1}
    out = latencies(t)
    assert out["silence_s"] == 0.5 and out["asr_s"] == pytest.approx(0.1) and out["total_s"] == pytest.approx(0.6)
    assert out["first_sentence_s"] == pytest.approx(0.3) and out["first_audio_s"] == pytest.approx(0.2)
    ask = latencies({"request": 5.0, "first_sentence": 5.5, "first_audio": 5.7})
    assert ask["first_sentence_s"] == pytest.approx(0.5) and ask["request_to_audio_s"] == pytest.approx(0.7)
