"""The thinker on a real bus with the real local model (and a real unreachable endpoint)."""

from __future__ import annotations

import time

import pytest

from voicebus.engine.client import BusClient
from voicebus.engine.messages import Interrupt, new_turn_id
from voicebus.workers.kinds import Ask, AsrFinal, PlayStopped
from voicebus.workers.memory import Conversation
from voicebus.workers.stop_phrases import StopPhrases, normalize
from voicebus.workers import thinker as thinker_module
from voicebus.workers.thinker import APOLOGY, Thinker, spoken_part

from conftest import wait_for


def test_normalize_and_spoken_part():
    assert normalize("  Good-bye! ") == "good bye" and normalize("STOP.") == "stop"
    stops = StopPhrases(["stop", "goodbye", "bye"])
    for said in ("Stop.", "stop", "STOP!", "Stop, stop.", "Okay, stop please.", "Good bye.", "Goodbye!", "good-bye",
                 "Bye.", "Bye bye!"):
        assert stops.matches(said), said
    for said in ("How do I stop a nosebleed?", "Stop the music.", "Say goodbye to my sister.", "", "Please."):
        assert not stops.matches(said), said
    # what a turn that rejoins the one before asks, when it ends on a stop phrase of its own
    assert stops.closing("What is the capital of France? Stop.") == "Stop."
    assert stops.closing("Tell me the weather. Okay, goodbye!") == "Okay, goodbye!"
    assert stops.closing("Goodbye!") == "Goodbye!"
    assert stops.closing("Tell me a joke. Stop. Thank you.") == "Stop. Thank you."
    for said in ("What is the capital? Stop the music.", "Stop. What is the capital?", "How do I stop?", ""):
        assert stops.closing(said) is None, said
    # ... and decided on its own audio, heard alone ("Where is the bus … stop?" joined: "…bus? Stop.")
    assert stops.asked("Where's the nearest bus? Stop.", "Start.") == "Where's the nearest bus? Stop."
    assert stops.asked("What is the capital of France? Stop.", "Stop.") == "Stop."
    assert stops.asked("What is the capital of France?", None) == "What is the capital of France?"
    sentences = ["One two three four.", "Five six seven eight."]
    assert spoken_part(sentences, 1, 500, 1000) == "One two three four. Five six…"
    assert spoken_part(sentences, 0, 0, 1000) == ""
    assert spoken_part(sentences, 2, 0, 0) == "One two three four. Five six seven eight."


@pytest.fixture
def run_thinker(run_actor):
    return lambda **llm: run_actor(Thinker, **{f"llm.{key}": value for key, value in llm.items()})


def ready(client: BusClient) -> None:
    wait_for(client, lambda e: e.kind == "sys.ready" and e.body.name == "thinker", timeout=60)


def answer(client: BusClient, turn: int) -> list:
    seen = []
    wait_for(client, lambda e: (e.turn == turn and seen.append(e)) or (e.kind == "llm.done" and e.turn == turn), timeout=60)
    return seen


@pytest.mark.slow
def test_answers_streams_sentences_and_remembers(run_thinker, make_client, tmp_path):
    client = make_client("test", subscribe=("llm.", "sys.ready"))
    run_thinker(max_tokens=60)
    ready(client)
    turn = new_turn_id()
    client.publish(Ask(text="What is the capital of France?"), turn=turn)
    client.publish(Ask(text="What is the capital of France?"), turn=turn)  # a redelivery
    seen = answer(client, turn)
    kinds = [e.kind for e in seen]
    assert kinds[0] == "llm.accepted" and "llm.token" in kinds and "llm.sentence" in kinds
    done = seen[-1].body
    assert done.finish_reason in ("stop", "length") and done.sentences == kinds.count("llm.sentence")
    assert done.timings["ttft_s"] > 0 and done.timings["first_sentence"] >= done.timings["first_token"]
    sentences = [e.body.text for e in seen if e.kind == "llm.sentence"]
    assert [e.body.index for e in seen if e.kind == "llm.sentence"] == list(range(len(sentences)))
    # one answer only, despite the repeat: nothing but a renewed acceptance follows
    later = [e for e in iter(lambda: client.recv(timeout=1.0), None) if e.turn == turn]
    assert {e.kind for e in later} <= {"llm.accepted"}
    memory = Conversation(tmp_path / "conversation.sqlite")
    history = memory.history()
    assert history[0] == (turn, "user", "What is the capital of France?")
    assert history[1][:2] == (turn, "assistant") and history[1][2] == " ".join(sentences)
    assert [h for h in history if h[1] == "user"] == [history[0]]


@pytest.mark.slow
def test_interrupt_stops_generation_and_history_keeps_the_spoken_part(run_thinker, make_client, tmp_path):
    client = make_client("test", subscribe=("llm.", "sys.ready"))
    run_thinker(max_tokens=200)
    ready(client)
    turn = new_turn_id()
    # A spoken question: a barge-in ends a voice turn (a typed question's answer still goes to its asker whole).
    client.publish(AsrFinal(text="Tell me a long story about a dragon and a knight."), turn=turn)
    first = wait_for(client, lambda e: e.kind == "llm.sentence" and e.turn == turn, timeout=60)
    client.publish(PlayStopped(index=0, reason="interrupted", spoken_ms=500, total_ms=1000), turn=turn)
    client.publish(Interrupt(reason="barge-in"), turn=turn)
    rest = answer(client, turn)
    assert rest[-1].body.finish_reason == "cancelled"
    assert sum(e.kind == "llm.token" for e in rest) < 60, "generation went on after the interrupt"
    words = first.body.text.split()
    expected = " ".join(words[: len(words) // 2]) + "…" if len(words) >= 2 else ""
    history = Conversation(tmp_path / "conversation.sqlite").history()
    assert history[-1] == (turn, "assistant", expected)


@pytest.mark.slow
def test_stop_phrase_ends_the_conversation(run_thinker, make_client):
    client = make_client("test", subscribe=("llm.", "ctl.shutdown", "sys."))
    run_thinker()
    ready(client)
    turn = new_turn_id()
    client.publish(Ask(text="Goodbye!"), turn=turn)
    shutdown = wait_for(client, lambda e: e.kind == "ctl.shutdown", timeout=10)
    assert "goodbye" in shutdown.body.reason.lower()
    wait_for(client, lambda e: e.kind == "sys.bye" and e.body.name == "thinker", timeout=10)


def test_unreachable_endpoint_is_an_audible_error_not_a_crash(run_thinker, make_client):
    from voicebus.engine.bus import free_port_pair

    client = make_client("test", subscribe=("llm.", "sys."))
    closed = free_port_pair()
    run_thinker(backend="openai", base_url=f"http://127.0.0.1:{closed}/v1", model="m", timeout_s=2.0)
    ready(client)
    for question in ("Hello?", "Anyone there?"):
        turn = new_turn_id()
        client.publish(Ask(text=question), turn=turn)
        seen = answer(client, turn)
        error = next(e for e in seen if e.kind == "llm.error")
        assert error.body.code == "connection" and error.body.transient
        assert [e.body.text for e in seen if e.kind == "llm.sentence"] == [APOLOGY]
        assert seen[-1].body.finish_reason == "error"


@pytest.mark.parametrize("scenario, code, spoken_before", [
    ("filtered", "content_filter", True),   # the answer stops with finish_reason content_filter
    ("reject", "content_filter", False),    # the prompt itself is refused (HTTP 400)
    ("auth", "auth", False),                # a bad key (HTTP 401)
])
def test_service_refusals_are_errors_with_an_apology(run_thinker, make_client, scripted, scenario, code, spoken_before):
    url, _ = scripted
    client = make_client("test", subscribe=("llm.", "sys.ready"))
    run_thinker(backend="openai", base_url=f"{url}/v1", api_key="k", model=f"{scenario}-thinker", timeout_s=5.0)
    ready(client)
    turn = new_turn_id()
    client.publish(Ask(text="Say hello."), turn=turn)
    seen = answer(client, turn)
    assert next(e for e in seen if e.kind == "llm.error").body.code == code
    sentences = [e.body.text for e in seen if e.kind == "llm.sentence"]
    assert sentences[-1] == APOLOGY and (len(sentences) > 1) == spoken_before
    assert seen[-1].body.finish_reason == "error"


@pytest.mark.slow
def test_the_model_s_context_is_kept_for_the_next_thinker(run_thinker, make_client, tmp_path, monkeypatch):
    """A returning user's first answer waited seconds while the model read the history again. The thinker
    keeps the model's context in the state folder when it stops and, during a run, once enough is new (so
    a SIGKILL loses little); the next thinker starts from it. Keeping it must never cost an answer."""
    client = make_client("test", subscribe=("llm.", "sys."))

    def ask(question: str) -> None:
        turn = new_turn_id()
        client.publish(Ask(text=question), turn=turn)
        assert answer(client, turn)[-1].body.finish_reason in ("stop", "length")

    first = run_thinker(max_tokens=30)
    ready(client)
    ask("What is the capital of France?")
    kept = tmp_path / "llm"
    assert not list(kept.glob("*.llama-state")), "kept after one short turn (KEEP_EVERY_TOKENS is 256)"
    first.stop("test: next run")
    wait_for(client, lambda e: e.kind == "sys.bye" and e.body.name == "thinker", timeout=30)
    [cache] = kept.glob("*.llama-state")  # kept when it stopped

    monkeypatch.setattr(thinker_module, "KEEP_EVERY_TOKENS", 1)  # after every turn, to see it without a long chat
    second = run_thinker(max_tokens=30)
    ready(client)
    assert second.chat.restored_tokens > 50  # the system prompt, the question and its answer
    written = cache.stat().st_mtime_ns
    ask("What is two plus two?")
    deadline = time.monotonic() + 10
    while cache.stat().st_mtime_ns == written and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cache.stat().st_mtime_ns != written, "not kept during the run"

    def fails(**_options):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(second.chat, "keep_what_was_read", fails)
    ask("What is the capital of Italy?")
    error = wait_for(client, lambda e: e.kind == "sys.error" and e.body.where == "thinker.keep_context", timeout=10)
    assert "No space left" in error.body.message
    ask("What is three plus three?")  # the thread that answers outlived the failure
