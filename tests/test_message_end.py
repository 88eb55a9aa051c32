"""The chat model's view of whether a message ends with the words heard so far (workers/llm/message_end.py),
on the real packaged model."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from voicebus.engine.bus import free_port_pair
from voicebus.engine.errors import ModelError
from voicebus.engine.settings import load
from voicebus.workers import backends
from voicebus.workers.config import Settings
from voicebus.workers.llm.message_end import MessageEnd, as_spoken
from voicebus.workers.listener import Listener
from voicebus.workers.llm import local
from voicebus.workers.run_state import LoadGuard, RunFile

QUESTION = Path(__file__).resolve().parent.parent / "examples" / "question.wav"


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


def test_a_closed_model_answers_without_reading():
    """A decode that outlived the listener's shutdown may still ask: no use of a freed model, no error line."""
    model = MessageEnd()
    model.close()
    assert model.logprob("What is the capital of") == 0.0


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


# --- a model that kills the listener while loading -----------------------------------------------


CRASHING_END_OF_TURN = """\
import sys
# Python imports this module at start-up (site.py) when its folder is on PYTHONPATH: in the listener
# only, loading the end-of-turn model becomes a real segfault, as llama.cpp's is on a CPU it was not
# built for (the thinker's copy of the same model loads as usual).
if sys.orig_argv[-2:] == ["worker", "listener"]:
    import ctypes
    import voicebus.workers.llm.message_end as message_end

    def crash(self, *args, **kwargs):
        ctypes.string_at(0)

    message_end.MessageEnd.__init__ = crash
"""


def test_a_guard_is_left_only_by_a_process_that_died_inside_it(tmp_path: Path):
    record = RunFile(tmp_path / "runs" / "part.json")
    with LoadGuard(record):
        assert LoadGuard(record).died_here_before  # (what a process sees if this one dies here)
    assert not LoadGuard(record).died_here_before
    with pytest.raises(ModelError), LoadGuard(record):
        raise ModelError("a Python error is said by the worker itself")
    assert not LoadGuard(record).died_here_before
    child = subprocess.run([sys.executable, "-c", (
        "import ctypes, sys; from pathlib import Path; from voicebus.workers.run_state import LoadGuard, RunFile\n"
        "with LoadGuard(RunFile(Path(sys.argv[1]))): ctypes.string_at(0)"), str(record.path)])
    assert child.returncode == -signal.SIGSEGV
    assert LoadGuard(record).died_here_before


@pytest.mark.slow
def test_a_listener_killed_loading_the_model_is_restarted_without_it_and_the_question_answered(
        launcher, tmp_path: Path):
    """Without the guard the crash repeated at every restart until the supervisor gave up on the
    listener, though the model is only a help to turn-taking (with ``--llm openai`` it is the only
    llama.cpp in the run)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(CRASHING_END_OF_TURN)
    up = launcher.up("--input", str(QUESTION), "--output", "none", "--fast", "--start-bus",
                     "--bus", f"tcp://127.0.0.1:{free_port_pair()}", "--insecure", PYTHONPATH=str(site))
    assert up.wait(180) == 0, up.stderr()[-3000:]
    err, out = up.stderr(), up.stdout()
    assert err.count("listener killed by SIGSEGV while loading its backends") == 1, err[-3000:]
    assert "end_of_turn=local chat model); restarting in" in err
    assert ("end of turn: the chat model is not used, the words alone decide (a listener of this run died "
            "while loading it; vad.message_end = false stops trying)") in err
    assert "Traceback" not in err
    assert "Paris" in out, out  # heard and answered by the restarted listener
