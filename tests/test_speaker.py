"""The speaker on a real bus with the real piper voice, writing a real WAV file."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import soundfile

from voicebus.engine.client import BusClient
from voicebus.engine.messages import Interrupt, new_turn_id
from voicebus.workers.audio import read_wav
from voicebus.workers.kinds import (
    AsrFinal,
    AsrGuess,
    AsrRevoke,
    LlmDone,
    LlmHeard,
    LlmSentence,
    LlmToken,
    Say,
    VadEnd,
)
from voicebus.workers.speaker import Speaker, latencies

from conftest import wait_for
from support.procs import clean_env

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


def test_turns_play_in_order_and_say_waits_its_turn(speaker, make_client):
    client = make_client("test", subscribe=("play.", "metrics.", "sys.ready"))
    ready(client)
    old, new = new_turn_id(), new_turn_id() + 1
    client.publish(LlmSentence(text="This answer is being read out now.", index=0), turn=old)
    client.publish(LlmDone(finish_reason="stop", sentences=1), turn=old)
    wait_for(client, lambda e: e.kind == "play.start" and e.turn == old, timeout=30)
    client.publish(Say(text="Something else."), turn=new)
    seen = []
    wait_for(client, lambda e: seen.append(e) or (e.kind == "metrics.turn" and e.turn == new), timeout=30)
    assert not any(e.kind == "play.stopped" for e in seen), "a newer turn must not cut an older one"
    order = [(e.kind, e.turn) for e in seen if e.kind in ("play.done", "play.start")]
    assert order.index(("play.done", old)) < order.index(("play.start", new))


def test_each_sentence_plays_once_in_order_whatever_the_bus_does(speaker, make_client):
    client = make_client("test", subscribe=("play.", "metrics.", "llm.resend", "sys.ready"))
    ready(client)
    turn = new_turn_id()
    # Out of order, duplicated, and with a hole that only a resend fills.
    client.publish(LlmSentence(text="Second.", index=1), turn=turn)
    client.publish(LlmSentence(text="First.", index=0), turn=turn)
    client.publish(LlmSentence(text="First.", index=0, replay=True), turn=turn)
    client.publish(LlmSentence(text="Fourth.", index=3), turn=turn)
    client.publish(LlmDone(finish_reason="stop", sentences=4), turn=turn)
    seen = []
    resend = wait_for(client, lambda e: seen.append(e) or e.kind == "llm.resend", timeout=30)
    assert resend.turn == turn and resend.body.from_index == 2
    client.publish(LlmSentence(text="Third.", index=2, replay=True), turn=turn)
    client.publish(LlmSentence(text="Fourth.", index=3, replay=True), turn=turn)
    wait_for(client, lambda e: seen.append(e) or (e.kind == "metrics.turn" and e.turn == turn), timeout=30)
    assert [e.body.text for e in seen if e.kind == "play.start"] == ["First.", "Second.", "Third.", "Fourth."]


def test_a_restarted_speaker_skips_what_was_heard_and_plays_the_rest(speaker, make_client):
    """What a speaker started mid-turn sees: the thinker's replay marks the sentences already played."""
    client = make_client("test", subscribe=("play.", "metrics.", "llm.resend", "sys.ready"))
    ready(client)
    turn = new_turn_id()
    client.publish(LlmSentence(text="Three.", index=2), turn=turn)  # the first it hears of the turn
    resend = wait_for(client, lambda e: e.kind == "llm.resend", timeout=30)
    assert resend.body.from_index == 0
    for index, (text, played) in enumerate([("One.", True), ("Two.", True), ("Three.", False)]):
        client.publish(LlmSentence(text=text, index=index, replay=True, played=played), turn=turn)
    client.publish(LlmDone(finish_reason="stop", sentences=3, replay=True), turn=turn)
    seen = []
    metrics = wait_for(client, lambda e: seen.append(e) or e.kind == "metrics.turn", timeout=30)
    assert [e.body.text for e in seen if e.kind == "play.start"] == ["Three."]
    assert metrics.body.outcome == "done"


def _prepared(client: BusClient, turn: int, guess: int, texts: list[str]) -> None:
    """A guess and the thinker's answer to it, as they come before the turn is confirmed."""
    client.publish(AsrGuess(text="what is the capital of france", rev=guess, offset_ms=900), turn=turn)
    for index, text in enumerate(texts):
        client.publish(LlmSentence(text=text, index=index, guess=guess), turn=turn)


def _quiet(client: BusClient, seconds: float) -> list:
    """Everything that arrives within ``seconds``."""
    seen, deadline = [], time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        env = client.recv(timeout=left)
        if env is not None:
            seen.append(env)
    return seen


def test_held_audio_plays_on_confirmation_without_waiting_for_the_synthesis_under_way(speaker, make_client):
    client = make_client("test", subscribe=("play.", "metrics.", "sys.ready"))
    ready(client)
    turn = new_turn_id()
    # The first clause is held (and announced) long before the long rest of the sentence is synthesized.
    rest = ("and it is a very large city with many museums, parks, old bridges, busy cafes and long wide avenues "
            "that people from all over the world come to see in every season of the year")
    _prepared(client, turn, 1, [f"Paris is the capital of France, {rest}.", "It is a big city."])
    wait_for(client, lambda e: e.kind == "play.ready" and e.turn == turn, timeout=30)
    confirmed = time.monotonic()
    client.publish(AsrFinal(text="what is the capital of france", guess=1), turn=turn)
    start = wait_for(client, lambda e: e.kind == "play.start" and e.turn == turn, timeout=30)
    waited = time.monotonic() - confirmed
    print(f"confirmation → first audio while the rest is synthesized: {waited * 1000:.0f} ms")
    assert waited < 0.25 and start.body.index == 0
    client.publish(LlmDone(finish_reason="stop", sentences=2), turn=turn)
    seen = []
    wait_for(client, lambda e: seen.append(e) or e.kind == "metrics.turn", timeout=60)
    assert [e.body.index for e in seen if e.kind == "play.done"] == [0, 1]  # all of it, once, in order


def test_the_first_audio_of_a_guess_confirmed_before_it_was_made_is_announced_too(speaker, make_client):
    client = make_client("test", subscribe=("play.", "sys.ready"))
    ready(client)
    turn = new_turn_id()
    _prepared(client, turn, 1, ["Paris is the capital of France."])
    client.publish(AsrFinal(text="what is the capital of france", guess=1), turn=turn)
    # a listener whose earlier hold waited in vain learns from it that answers are prepared here
    seen = []
    wait_for(client, lambda e: seen.append(e) or e.kind == "play.start", timeout=30)
    assert [(e.turn, e.body.rev) for e in seen if e.kind == "play.ready"] == [(turn, 1)]


def test_a_guess_is_prepared_held_and_plays_at_once_when_confirmed(speaker, make_client):
    client = make_client("test", subscribe=("play.", "metrics.", "sys.ready"))
    ready(client)
    turn = new_turn_id()
    _prepared(client, turn, 1, ["Paris is the capital of France.", "It is a big city."])
    held = _quiet(client, 1.5)
    assert not [e for e in held if e.kind == "play.start"], "held audio was played"
    # announced once, when its first audio is held: the listener ends the turn no sooner than that
    assert [(e.turn, e.body.rev) for e in held if e.kind == "play.ready"] == [(turn, 1)]
    confirmed = time.monotonic()
    client.publish(AsrFinal(text="what is the capital of france", guess=1), turn=turn)
    start = wait_for(client, lambda e: e.kind == "play.start" and e.turn == turn, timeout=10)
    print(f"confirmation → first audio with the audio prepared: {(time.monotonic() - confirmed) * 1000:.0f} ms")
    assert time.monotonic() - confirmed < 0.5 and start.body.index == 0
    client.publish(LlmDone(finish_reason="stop", sentences=2), turn=turn)
    seen = []
    metrics = wait_for(client, lambda e: seen.append(e) or e.kind == "metrics.turn", timeout=30)
    assert [e.body.index for e in seen if e.kind == "play.done"] == [0, 1]
    assert metrics.body.outcome == "done" and metrics.body.timings["speculation_saved_s"] > 0


@pytest.mark.parametrize("void", ["revoke", "newer guess", "other final", "barge-in"])
def test_a_guess_that_is_not_confirmed_is_never_heard(speaker, make_client, void):
    client = make_client("test", subscribe=("play.", "metrics.", "sys.ready"))
    ready(client)
    turn = new_turn_id()
    _prepared(client, turn, 1, ["This guess is wrong and must never be heard."])
    time.sleep(0.5)  # let it be synthesized and held
    voided = time.time()
    if void == "revoke":
        client.publish(AsrRevoke(rev=1), turn=turn)
    elif void == "newer guess":
        _prepared(client, turn, 2, ["The right answer."])
        client.publish(AsrFinal(text="what is the capital of france", guess=2), turn=turn)
    elif void == "other final":
        client.publish(AsrFinal(text="what is the capital of peru", guess=0), turn=turn)
    else:
        client.publish(Interrupt(reason="barge-in"), turn=turn)
    if void in ("revoke", "other final"):
        client.publish(LlmSentence(text="The right answer.", index=0), turn=turn)
    if void != "barge-in":
        client.publish(LlmDone(finish_reason="stop", sentences=1), turn=turn)
        seen = []
        metrics = wait_for(client, lambda e: seen.append(e) or e.kind == "metrics.turn", timeout=30)
        assert [e.body.text for e in seen if e.kind == "play.start"] == ["The right answer."]
        # the turn's timings are the answer's that played, not the void guess's (bench_turn once showed a
        # 1.6 s "first audio" p90: measured from a revoked guess's sentence)
        timings = metrics.body.timings
        assert timings["first_sentence"] >= voided - 0.05 and timings.get("guess", voided) >= voided - 0.05
    else:
        client.publish(AsrFinal(text="what is the capital of france", guess=1), turn=turn)  # too late
        assert not [e for e in _quiet(client, 1.5) if e.kind == "play.start"]


def test_a_guess_dropped_while_its_audio_is_made_leaves_no_timing(speaker, make_client):
    """bench_turn showed "first sentence → answer ready" at -970 ms: a guess revoked while its sentence was
    being synthesized marked the turn's answer ready when that synthesis ended, after the drop."""
    client = make_client("test", subscribe=("play.", "metrics.", "sys.ready"))
    ready(client)
    turn = new_turn_id()
    long = ("This guess is wrong, and it is long enough to be still in the making when it is revoked, "
            "with many words after the comma that take the voice a while to say and to synthesize.")
    _prepared(client, turn, 1, [long])
    time.sleep(0.15)  # its synthesis is under way
    client.publish(AsrRevoke(rev=1), turn=turn)
    time.sleep(1.5)  # and over
    client.publish(LlmSentence(text="The right answer.", index=0), turn=turn)
    client.publish(LlmDone(finish_reason="stop", sentences=1), turn=turn)
    metrics = wait_for(client, lambda e: e.kind == "metrics.turn" and e.turn == turn, timeout=30)
    assert "guess_ready" not in metrics.body.timings, metrics.body.timings


def test_a_speaker_that_missed_the_confirmation_plays_when_the_thinker_resends(speaker, make_client):
    client = make_client("test", subscribe=("play.", "metrics.", "sys.ready"))
    ready(client)
    turn = new_turn_id()
    _prepared(client, turn, 1, ["Paris."])
    time.sleep(0.3)
    # No asr.final reached this speaker; the thinker's commit sends the sentence again, confirmed.
    client.publish(LlmSentence(text="Paris.", index=0, replay=True), turn=turn)
    client.publish(LlmDone(finish_reason="stop", sentences=1), turn=turn)
    seen = []
    wait_for(client, lambda e: seen.append(e) or e.kind == "metrics.turn", timeout=30)
    assert [e.body.text for e in seen if e.kind == "play.start"] == ["Paris."]


def test_latencies_derive_the_spans():
    t = {"speech_end": 10.0, "vad_end": 10.5, "asr_final": 10.6, "first_token": 10.7,
         "first_sentence": 10.9, "first_audio": 11.1}
    out = latencies(t)
    assert out["silence_s"] == 0.5 and out["asr_s"] == pytest.approx(0.1) and out["total_s"] == pytest.approx(0.6)
    assert out["first_sentence_s"] == pytest.approx(0.3) and out["first_audio_s"] == pytest.approx(0.2)
    ask = latencies({"request": 5.0, "first_sentence": 5.5, "first_audio": 5.7})
    assert ask["first_sentence_s"] == pytest.approx(0.5) and ask["request_to_audio_s"] == pytest.approx(0.7)


def test_a_held_answers_stages_add_up_to_the_wait():
    """The answer to a guess was ready before the final and held until the confirmation: the sentence cost
    no wait, and first audio counts from the confirmation (it once counted from the guess's sentence, and
    bench_turn reported a 1.45 s "first audio" p90 that nobody waited)."""
    t = {"speech_end": 10.0, "guess": 10.3, "first_sentence": 10.5, "vad_end": 11.0, "asr_final": 11.0,
         "confirmed": 11.01, "first_audio": 11.05}
    out = latencies(t)
    assert out["first_sentence_s"] == 0.0 and out["first_audio_s"] == pytest.approx(0.04)
    assert out["final_to_audio_s"] == pytest.approx(0.05)


def test_an_interrupt_stops_a_turn_not_heard_of_yet_and_is_answered_with_its_end(speaker, make_client):
    """Found by scripts/chaos.py: a speaker restarting while an answer went out never heard of the turn, the
    user spoke over it, and the history said the whole answer was heard. Now the interrupt stops the turn
    here whatever this speaker knows, its end is said again to whoever interrupts again (the listener, until
    it hears it) and with the turn's llm.done (a thinker that took the turn late), and nothing of it plays."""
    client = make_client("test", subscribe=("play.", "metrics.", "sys.ready"))
    ready(client)
    turn, finished = new_turn_id(), new_turn_id() + 1
    client.publish(Interrupt(reason="barge-in"), turn=turn)
    first = wait_for(client, lambda e: e.kind == "play.stopped" and e.turn == turn, timeout=10)
    assert (first.body.index, first.body.spoken_ms, first.body.reason) == (0, 0, "barge-in")
    client.publish(LlmSentence(text="It is noon.", index=0, replay=True), turn=turn)
    client.publish(LlmDone(finish_reason="stop", sentences=1, replay=True), turn=turn)
    seen = []
    again = wait_for(client, lambda e: seen.append(e) or (e.kind == "play.stopped" and e.turn == turn), timeout=10)
    assert again.body == first.body
    client.publish(Interrupt(reason="barge-in"), turn=turn)
    assert wait_for(client, lambda e: seen.append(e) or e.kind == "play.stopped", timeout=10).body == first.body
    # A turn played to the end and interrupted afterwards: its end is said again.
    client.publish(LlmSentence(text="Done.", index=0), turn=finished)
    client.publish(LlmDone(finish_reason="stop", sentences=1), turn=finished)
    wait_for(client, lambda e: seen.append(e) or (e.kind == "metrics.turn" and e.turn == finished), timeout=30)
    client.publish(Interrupt(reason="barge-in"), turn=finished)
    metrics = wait_for(client, lambda e: seen.append(e) or (e.kind.startswith(("metrics.", "play.stopped"))
                                                           and e.turn == finished), timeout=10)
    assert metrics.kind == "metrics.turn" and metrics.body.outcome == "done"
    assert not [e for e in seen if e.kind == "play.start" and e.turn == turn], "a stopped turn played"


def test_a_stop_is_said_again_until_a_thinker_acknowledges_it_or_time_runs_out(run_actor, make_client, tmp_path,
                                                                               monkeypatch, capfd):
    """A stop lost on its way to the thinker would leave the whole answer in the history (chaos seed 6: a
    flood filled the thinker's queue). The speaker says it again until llm.heard, for a while at most."""
    import voicebus.workers.speaker as speaker_module

    monkeypatch.setattr(speaker_module, "RESEND_EVERY_S", 0.3)
    monkeypatch.setattr(speaker_module, "STOP_OFFERED_S", 2.0)
    run_actor(Speaker, **{"audio.output": str(tmp_path / "out.wav")})
    client = make_client("test", subscribe=("play.stopped", "sys.ready"))
    ready(client)
    heard, ignored = new_turn_id(), new_turn_id() + 1
    for turn in (heard, ignored):
        client.publish(Interrupt(reason="barge-in"), turn=turn)
    stops: dict[int, list[float]] = {heard: [], ignored: []}
    until = time.monotonic() + 4.0
    while (env := client.recv(timeout=max(0.0, until - time.monotonic()))) is not None:
        if env.kind == "play.stopped":
            stops[env.turn].append(time.monotonic())
            if env.turn == heard and len(stops[heard]) == 2:
                client.publish(LlmHeard(index=env.body.index, spoken_ms=env.body.spoken_ms), turn=heard)
    assert len(stops[heard]) in (2, 3), "said again until acknowledged, then never"  # (3: one crossed it)
    offered = stops[ignored]
    assert len(offered) >= 4 and offered[-1] - offered[0] < 2.0 + 0.5, "said again for STOP_OFFERED_S, then not"
    assert f"no thinker acknowledged the stop of turn {ignored}" in capfd.readouterr().err


def test_a_new_speaker_says_again_the_recent_stops_its_predecessor_kept(run_actor, make_client, tmp_path):
    """Stops no thinker acknowledged are kept on disk for the speaker that replaces this one; only recent
    ones (STOP_OFFERED_S) are said again, and a record that is not a stop is ignored."""
    import json

    from voicebus.workers.run_state import run_key
    from voicebus.workers.speaker import STOP_OFFERED_S

    wav = tmp_path / "out.wav"
    recent, stale, garbled = new_turn_id(), new_turn_id() + 1, new_turn_id() + 2
    stop = {"index": 2, "reason": "barge-in", "spoken_ms": 640, "total_ms": 1800}
    kept = tmp_path / "runs" / f"speaker-{run_key(str(wav), 0.0)}.json"
    kept.parent.mkdir()
    kept.write_text(json.dumps({str(recent): {**stop, "since": time.time() - 5},
                                str(stale): {**stop, "since": time.time() - STOP_OFFERED_S - 5},
                                str(garbled): {"index": "two", "since": time.time()}}))
    ended_long_ago = [kept.parent / "speaker-0123456789abcdef.json", kept.parent / ".speaker-0123456789abcdef-x1"]
    for path in ended_long_ago:  # another run's record, and a temporary file a kill mid-write left
        path.write_text("{}")
        os.utime(path, (time.time() - 2 * STOP_OFFERED_S,) * 2)
    client = make_client("test", subscribe=("play.stopped", "sys.ready"))
    run_actor(Speaker, **{"audio.output": str(wav)})
    said = wait_for(client, lambda e: e.kind == "play.stopped", timeout=60)
    assert not any(path.exists() for path in ended_long_ago), "records of runs long over are swept"
    assert said.turn == recent and said.body.to_dict() == stop
    assert json.loads(kept.read_text()).keys() == {str(recent)}, "what is no stop to say again is forgotten"
    client.publish(LlmHeard(index=2, spoken_ms=640), turn=recent)
    deadline = time.monotonic() + 5
    while kept.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not kept.exists(), "acknowledged: nothing left to keep"
    assert not [e for e in _quiet(client, 2.5) if e.kind == "play.stopped"]


def test_a_speaker_without_a_usable_state_folder_still_speaks(run_actor, make_client, tmp_path, capfd):
    """The state folder only keeps unacknowledged stops for a successor: a speaker on a host where it cannot
    be made (read-only, a file in its place) speaks all the same, and says what it cannot keep."""
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    client = make_client("test", subscribe=("play.", "metrics.", "sys.ready"))
    run_actor(Speaker, **{"audio.output": str(tmp_path / "out.wav"), "state.dir": str(blocked)})
    ready(client)
    turn = new_turn_id()
    client.publish(Say(text="Still here."), turn=turn)
    assert wait_for(client, lambda e: e.kind == "metrics.turn" and e.turn == turn, timeout=30).body.outcome == "done"
    assert "a restart will forget unacknowledged stops" in capfd.readouterr().err


def test_with_publish_audio_the_played_voice_goes_on_the_bus_as_it_was_played(run_actor, make_client, tmp_path):
    """audio.out, for recorders (`up --record`, `show --export-audio`): the blocks the sink was given."""
    wav = tmp_path / "out.wav"
    run_actor(Speaker, **{"audio.output": str(wav), "audio.publish_audio": True})
    client = make_client("test", subscribe=("play.", "metrics.", "audio.out", "sys.ready"))
    ready(client)
    turn = new_turn_id()
    for index, text in enumerate(["Hello there.", "Goodbye."]):
        client.publish(LlmSentence(text=text, index=index), turn=turn)
    client.publish(LlmDone(finish_reason="stop", sentences=2), turn=turn)
    seen = []
    wait_for(client, lambda e: seen.append(e) or e.kind == "metrics.turn", timeout=60)
    blocks = [e for e in seen if e.kind == "audio.out"]
    assert {e.turn for e in blocks} == {turn} and [e.body.index for e in blocks] == sorted(e.body.index for e in blocks)
    assert {e.body.index for e in blocks} == {0, 1}
    pcm, rate = read_wav(wav)  # read_wav gives 16 kHz: compare durations
    played_s = sum(len(e.body.pcm) for e in blocks) / 2 / blocks[0].body.rate
    assert played_s > 0.5 and abs(played_s - len(pcm) / 2 / rate) < 0.05


def test_held_audio_keeps_its_order_when_playback_has_no_room_at_the_confirmation():
    from voicebus.workers.config import Settings
    from voicebus.workers.speaker import RELEASE, Chunk, Turn

    speaker = Speaker(None, Settings())  # no bus and no threads: the release's bookkeeping alone
    turn, guess = 7, 1
    for _ in range(speaker._chunks.maxsize - 1):  # playback far behind: room for one chunk
        speaker._chunks.put_nowait(Chunk(1, 0, "an older turn", b"o"))
    held = [Chunk(turn, 0, "Paris.", b"a"), Chunk(turn, 0, "Paris.", b"b"), Chunk(turn, 0, "Paris.", None)]
    assert all(speaker._hold(turn, guess, chunk) for chunk in held)
    state = Turn(turn)
    state.guess = guess
    speaker._confirm(state)
    # One chunk went at once; the synthesis thread releases the rest, and what it synthesizes meanwhile
    # is still held, so nothing overtakes what was held before.
    assert speaker._sentences.get_nowait() == (turn, RELEASE, "", guess)
    later = Chunk(turn, 1, "It is big.", b"c")
    assert speaker._hold(turn, guess, later)
    assert [speaker._chunks.get_nowait() for _ in range(speaker._chunks.maxsize)][-1] is held[0]
    speaker._chunks_of(turn, guess, play=True)
    assert [speaker._chunks.get_nowait() for _ in range(3)] == [held[1], held[2], later]
    assert not speaker._hold(turn, guess, Chunk(turn, 1, "It is big.", None))  # now: straight on


def _answer(client: BusClient, *sentences: str) -> int:
    turn = new_turn_id()
    for index, text in enumerate(sentences):
        client.publish(LlmSentence(text=text, index=index), turn=turn)
    client.publish(LlmDone(finish_reason="stop", sentences=len(sentences)), turn=turn)
    return turn


def test_an_output_that_fails_mid_answer_is_one_line_and_the_next_speaker_goes_on_after_it(
        bus, launcher, make_client, tmp_path):
    """A full disk mid-run: the playback thread died with a traceback, the worker kept its heartbeat and
    the run hung; and a restarted speaker truncated the file, losing the answers written before."""
    out = tmp_path / "out.wav"
    client = make_client("test", subscribe=("sys.", "metrics.turn"))
    up = launcher.up("--only", "speaker", "--join-bus", "--bus", bus.endpoints.url, "--insecure",
                     "--input", "none", "--output", str(out), "--fast", label="speaker")
    first = wait_for(client, lambda e: e.kind == "sys.ready" and e.body.name == "speaker", timeout=90).body.pid
    turn = _answer(client, "Here is the first answer.")
    wait_for(client, lambda e: e.kind == "metrics.turn" and e.turn == turn, timeout=30)
    kept = soundfile.info(str(out)).frames
    assert kept > 0
    # The file may grow by ~0.2 s more: the next answer's audio fills the disk, as it were, mid-sentence.
    psutil.Process(first).rlimit(psutil.RLIMIT_FSIZE, (out.stat().st_size + 10_000,) * 2)
    _answer(client, LONG, LONG)
    error = wait_for(client, lambda e: e.kind == "sys.error" and e.body.where == "speaker", timeout=30).body
    assert "cannot write WAV (File too large)" in error.message and str(out) in error.message
    second = wait_for(client, lambda e: e.kind == "sys.ready" and e.body.name == "speaker", timeout=90).body.pid
    assert second != first
    assert soundfile.info(str(out)).frames >= kept, "the restarted speaker kept what was written"
    before = soundfile.info(str(out)).frames
    turn = _answer(client, "And here is the next one.")
    wait_for(client, lambda e: e.kind == "metrics.turn" and e.turn == turn, timeout=30)
    after = soundfile.read(str(out), dtype="int16")[0]
    assert len(after) > before and np.abs(after[before:].astype(np.int32)).max() > 1000  # appended, audible
    err = up.stderr()
    assert "speaker: AudioError: " in err and "Traceback" not in err, err
    assert "speaker exit code 2; restarting" in err + up.stdout()


def test_a_speaker_run_by_hand_starts_its_output_afresh_each_time(bus, make_client, tmp_path):
    """Found in review: a speaker's "output opened" record was keyed by its parent process, which for a
    worker run by hand (a shell, systemd) outlives every run: each run appended to the last one's file."""
    out = tmp_path / "out.wav"
    client = make_client("test", subscribe=("sys.ready", "metrics.turn"))
    env = {**clean_env(tmp_path / "state"), "VOICEBUS_BUS_URL": bus.endpoints.url, "VOICEBUS_BUS_SECURITY": "insecure",
           "VOICEBUS_AUDIO_OUTPUT": str(out), "VOICEBUS_AUDIO_FAST": "1"}
    lengths = []
    for _ in range(2):
        worker = subprocess.Popen([sys.executable, "-m", "voicebus.cli.main", "worker", "speaker"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(client, lambda e: e.kind == "sys.ready" and e.body.pid == worker.pid, timeout=90)
            turn = _answer(client, "Here is the only answer of this run.")
            wait_for(client, lambda e: e.kind == "metrics.turn" and e.turn == turn, timeout=30)
        finally:
            worker.terminate()
            err = worker.communicate(timeout=30)[1]
        assert "Traceback" not in err, err
        lengths.append(soundfile.info(str(out)).frames)
    # (piper's voice varies from run to run by a few per cent: appended, the file would be twice as long)
    assert lengths[0] > 0 and lengths[1] < 1.5 * lengths[0], lengths
