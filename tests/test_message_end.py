"""The chat model's view of whether a message ends with the words heard so far (workers/llm/message_end.py),
on the real packaged model."""

from __future__ import annotations

from pathlib import Path

import pytest

from voicebus.engine.settings import load
from voicebus.workers import backends
from voicebus.workers.config import Settings
from voicebus.workers.llm.message_end import MessageEnd, as_spoken
from voicebus.workers.listener import Listener
from voicebus.workers.llm import local


@pytest.fixture(scope="module")
def model():
    loaded = MessageEnd()
    yield loaded
    loaded.close()


def test_the_words_alone_as_said():
    assert as_spoken("What is the capital?") == "what is the capital"
    assert as_spoken("  Tell me, please… what's 40%?") == "tell me please what's 40"


@pytest.mark.parametrize("whole, fragment", [
    ("What is the capital of France?", "What is the capital?"),
    ("Set a timer for ten minutes.", "Set a timer for."),
    ("How far is it from London to Paris?", "How far is it from one and two?"),
    ("Tell me the weather in Paris.", "Tell me the weather end."),
])
def test_a_whole_request_ends_a_message_a_fragment_seldom_does(model, whole, fragment):
    # (natural logs; the setting's threshold, -20, was chosen on the recognizer's tuning split)
    assert model.logprob(whole) > -10 > model.logprob(fragment)


def test_each_call_reads_only_the_words_and_gives_the_same_answer_again(model):
    first = model.logprob("Turn off the lights.")
    model.logprob("What is the capital of")  # another utterance in between
    assert model.logprob("Turn off the lights.") == pytest.approx(first, abs=1e-3)
    llm = model._chat.llama
    assert llm.n_tokens == len(model._prefix) + len(llm.tokenize(b"turn off the lights", add_bos=False))
    assert model.logprob("") == 0.0
    long = " ".join(["and then"] * 200)  # longer than its context: the words' end is what counts
    assert model.logprob(long) < 0


def test_the_listener_asks_it_only_where_it_applies(monkeypatch, capfd):
    def uses(**values) -> bool:
        return backends.uses_message_end(load(Settings, overrides=values))

    assert uses()
    assert not uses(**{"asr.backend": "pocketsphinx"})  # its guesses come on the audio thread
    assert not uses(**{"asr.language": "de-DE"})
    assert not uses(**{"vad.message_end": False})
    assert not uses(**{"vad.adaptive": False})
    assert Listener(None, load(Settings)).backends()["end_of_turn"] == "local chat model"  # named if it crashes
    assert "end_of_turn" not in Listener(None, load(Settings, overrides={"audio.input": "none"})).backends()
    # A model that cannot load costs the check, not the listener: one line, and the words alone decide.
    monkeypatch.setattr(local, "find_smollm2_gguf", lambda: Path("/nonexistent/model.gguf"))
    assert backends.open_message_end(load(Settings)) is None
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "the words alone decide" in err and "/nonexistent/model.gguf" in err
