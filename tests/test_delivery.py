"""The thinker's delivery guarantees, on a real bus, against a scripted OpenAI-compatible server.

Every accepted turn is answered exactly once and ends with exactly one llm.done;
repeats get the stored answer; a restarted thinker resumes what its predecessor
accepted; the history keeps what the user received (text: all; voice: what was heard).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from voicebus.engine.client import BusClient
from voicebus.engine.messages import Interrupt, first_turn_id_at, new_turn_id
from voicebus.workers.kinds import Ask, AsrFinal, LlmResend, PlayDone, PlayStopped
from voicebus.workers.memory import Conversation
from voicebus.workers.thinker import Thinker
from voicebus.workers.turnlog import TEXT, TurnLog

from conftest import wait_for
from support.procs import poll


@pytest.fixture
def thinker(run_actor, scripted, tmp_path):
    """Start a thinker on the scripted server; ``model`` picks its behaviour (see support/openai_server)."""
    url, _ = scripted

    def start(model: str, **overrides):
        settings = {"llm.backend": "openai", "llm.base_url": f"{url}/v1", "llm.api_key": "k", "llm.model": model,
                    "llm.timeout_s": 5.0, **overrides}
        return run_actor(Thinker, **settings)

    return start


def ready(client: BusClient) -> None:
    wait_for(client, lambda e: e.kind == "sys.ready" and e.body.name == "thinker", timeout=30)


def until_done(client: BusClient, turn: int, timeout: float = 30) -> list:
    seen: list = []
    wait_for(client, lambda e: (e.turn == turn and not seen.append(e)) and e.kind == "llm.done", timeout=timeout)
    return seen


def history(tmp_path: Path) -> list[tuple[int, str, str]]:
    with Conversation(tmp_path / "conversation.sqlite") as memory:
        return memory.history()


def test_concurrent_askers_are_each_answered_once_in_order(thinker, make_client, tmp_path):
    watcher = make_client("watch", subscribe=("llm.", "sys.ready"))
    thinker("echo-concurrent")
    ready(watcher)
    askers = [make_client(f"asker{i}") for i in range(5)]
    turns = {}
    base = new_turn_id() * 100
    for round_ in range(3):
        for i, asker in enumerate(askers):
            turn = base + round_ * 10 + i  # distinct even when asked within one millisecond
            turns[turn] = f"question {round_} from asker {i}"
            asker.publish(Ask(text=turns[turn]), turn=turn)
    done: dict[int, object] = {}
    sentences: dict[int, list[str]] = {}
    deadline = time.monotonic() + 60
    while len(done) < len(turns) and time.monotonic() < deadline:
        env = watcher.recv(timeout=1.0)
        if env is None or env.turn not in turns:
            continue
        if env.kind == "llm.sentence":
            sentences.setdefault(env.turn, []).append(env.body.text)
        elif env.kind == "llm.done":
            assert env.turn not in done, "a second llm.done for one turn"
            done[env.turn] = env.body
    assert set(done) == set(turns), f"{len(turns) - len(done)} turn(s) got no llm.done"
    for turn, question in turns.items():
        assert done[turn].finish_reason == "stop", (question, done[turn])
        assert sentences[turn] == [f"You said: {question}."]
    answers = {t: text for t, role, text in history(tmp_path) if role == "assistant"}
    assert {t: answers[t] for t in turns} == {t: f"You said: {q}." for t, q in turns.items()}


def test_a_repeat_of_a_finished_turn_gets_the_stored_answer_not_a_new_one(thinker, make_client, scripted):
    _, script = scripted
    client = make_client("test", subscribe=("llm.", "sys.ready"))
    thinker("count-repeat-3")
    ready(client)
    turn = new_turn_id()
    client.publish(Ask(text="Count to three."), turn=turn)
    first = [e.body.text for e in until_done(client, turn) if e.kind == "llm.sentence"]
    assert first == ["One.", "Two.", "Three."]
    client.publish(Ask(text="Count to three."), turn=turn)  # the asker missed the end (a bus died)
    again = until_done(client, turn)
    assert [(e.body.text, e.body.replay) for e in again if e.kind == "llm.sentence"] == [
        ("One.", True), ("Two.", True), ("Three.", True)]
    assert again[-1].body.replay and again[-1].body.finish_reason == "stop"
    client.publish(LlmResend(from_index=2), turn=turn)  # a receiver found a gap
    resent = until_done(client, turn)
    assert [e.body.index for e in resent if e.kind == "llm.sentence"] == [2]
    asked = [r for r in script.seen("count-repeat-3") if r.body["messages"][-1]["role"] == "user"]
    assert len(asked) == 1, "the answer was generated twice"  # (the other request is the warm-up)


def test_a_text_turn_keeps_its_whole_answer_a_voice_turn_what_was_heard(thinker, make_client, tmp_path):
    client = make_client("test", subscribe=("llm.", "sys.ready"))
    thinker("count-channels-4")
    ready(client)
    text_turn, voice_turn = new_turn_id(), new_turn_id() + 1
    client.publish(Ask(text="Count."), turn=text_turn)
    until_done(client, text_turn)
    # Its playback was cut (e.g. the speaker plays into 'none' and the next answer came):
    # the asker already has the whole text, so the history must too.
    client.publish(PlayStopped(index=1, reason="interrupted", spoken_ms=500, total_ms=1000), turn=text_turn)
    wait_for(client, lambda e: e.kind == "llm.heard" and e.turn == text_turn, timeout=5)
    client.publish(AsrFinal(text="Count."), turn=voice_turn)
    until_done(client, voice_turn)
    client.publish(PlayDone(index=0, spoken_ms=800), turn=voice_turn)
    client.publish(PlayStopped(index=1, reason="barge-in", spoken_ms=0, total_ms=900), turn=voice_turn)
    # Both stops are acknowledged (the speaker says a stop again until then), the voice one once recorded.
    heard = wait_for(client, lambda e: e.kind == "llm.heard" and e.turn == voice_turn, timeout=5)
    assert (heard.body.index, heard.body.spoken_ms) == (1, 0)
    answers = {t: text for t, role, text in history(tmp_path) if role == "assistant"}
    assert answers == {text_turn: "One. Two. Three. Four.", voice_turn: "One."}


def _queued_behind_a_count(thinker, make_client, model: str, question) -> tuple[BusClient, int, int]:
    """A thinker counting to twelve for one asker, and ``question`` accepted behind it: (client, running, queued)."""
    client = make_client("test", subscribe=("llm.", "sys.ready"))
    thinker(model)
    ready(client)
    running, queued = new_turn_id(), new_turn_id() + 1
    client.publish(Ask(text="Count to twelve."), turn=running)
    client.publish(question, turn=queued)
    accepted = wait_for(client, lambda e: e.kind == "llm.accepted" and e.turn == queued, timeout=10)
    assert accepted.body.queued == 1
    return client, running, queued


def test_interrupting_a_queued_turn_ends_it_at_once_and_the_asker_hears_why(thinker, make_client):
    client, running, queued = _queued_behind_a_count(thinker, make_client, "count-queue-12", Ask(text="And again."))
    client.publish(Interrupt(reason="the user changed their mind"), turn=queued)
    done = wait_for(client, lambda e: e.kind == "llm.done" and e.turn == queued, timeout=5)
    assert done.body.finish_reason == "cancelled" and done.body.reason == "the user changed their mind"
    assert done.body.sentences == 0
    rest = until_done(client, running)
    assert rest[-1].body.finish_reason == "stop"  # the first asker was not cancelled by the second


def test_a_voice_turn_spoken_over_before_its_answer_began_is_not_answered(thinker, make_client, tmp_path, scripted):
    """A stop can reach the thinker while the turn waits in its queue (a restarted thinker resumes turns its
    predecessor left): the turn ends with what was heard, and the model is never asked to answer it."""
    _, script = scripted
    client, running, spoken_over = _queued_behind_a_count(thinker, make_client, "count-spokenover-12",
                                                          AsrFinal(text="And what else?"))
    client.publish(PlayStopped(index=0, reason="barge-in", spoken_ms=0, total_ms=0), turn=spoken_over)
    seen = until_done(client, spoken_over, timeout=5)
    assert seen[-1].body.finish_reason == "cancelled" and seen[-1].body.sentences == 0
    assert not any(e.kind == "llm.sentence" for e in seen)
    wait_for(client, lambda e: e.kind == "llm.heard" and e.turn == spoken_over, timeout=5)
    assert until_done(client, running)[-1].body.finish_reason == "stop"
    assert all(request.body["messages"][-1]["content"] != "And what else?" for request in script.seen("count-spokenover-12"))
    assert (spoken_over, "assistant", "") in history(tmp_path)


@pytest.mark.parametrize("continued", [False, True])
def test_a_new_run_is_a_new_conversation_unless_continued(thinker, make_client, tmp_path, scripted, continued):
    """Found trying voicebus as a new user: after the README's example had run five times, the embedded model
    answered "The capital of France is Paris." to every question, copying the history of earlier runs."""
    _, script = scripted
    earlier = first_turn_id_at(time.time() - 3600)  # an hour ago
    with Conversation(tmp_path / "conversation.sqlite") as memory:
        memory.add_user(earlier, "What is the capital of France?")
        memory.add_assistant(earlier, "The capital of France is Paris.")
    model = f"echo-run-{continued}"
    client = make_client("test", subscribe=("llm.", "sys.ready"))
    thinker(model, **{"state.continue_conversation": continued, "state.run_started": time.time()})
    ready(client)
    turn = new_turn_id()
    client.publish(Ask(text="What is two plus two?"), turn=turn)
    until_done(client, turn)
    sent = [m["content"] for m in script.seen(model)[-1].body["messages"] if m["role"] != "system"]
    before = ["What is the capital of France?", "The capital of France is Paris."] if continued else []
    assert sent == [*before, "What is two plus two?"]
    assert [h[0] for h in history(tmp_path)] == [earlier, earlier, turn, turn]  # kept on disk either way


def test_a_new_thinker_resumes_what_its_predecessor_accepted(thinker, make_client, tmp_path, scripted):
    """The state a thinker killed mid-answer leaves behind: the turn accepted, two sentences sent."""
    _, script = scripted
    turn = new_turn_id()
    with Conversation(tmp_path / "conversation.sqlite") as memory:
        log = TurnLog(memory)
        log.accept(turn, TEXT, "Count to five.")
        log.add_sentence(turn, 0, "One.", "One.")
        log.add_sentence(turn, 1, "Two.", "Two.")
        log.mark_played(turn, 0)
    client = make_client("test", subscribe=("llm.", "sys.ready"))
    thinker("count-resume-5")
    seen = until_done(client, turn)
    sentences = [(e.body.index, e.body.text, e.body.replay, e.body.played) for e in seen if e.kind == "llm.sentence"]
    assert sentences == [(0, "One.", True, True), (1, "Two.", True, False),
                         (2, "Three.", False, False), (3, "Four.", False, False), (4, "Five.", False, False)]
    assert seen[-1].body.finish_reason == "stop" and seen[-1].body.sentences == 5
    request = script.seen("count-resume-5")[-1].body
    assert request["messages"][-1] == {"role": "assistant", "content": "One. Two."}  # continued, not restarted
    assert history(tmp_path)[-1] == (turn, "assistant", "One. Two. Three. Four. Five.")


def test_the_model_reads_a_moved_history_window_while_nothing_waits(thinker, make_client, scripted):
    """The history window moves every few turns (every few dozen with the default context), and a prompt that
    begins differently is read whole again: 6.5 s before the first token with the local model here, once
    per move. After an answer, when the window has moved, the thinker has the model read the new one (a
    warm-up, max_tokens 1), so the next question's prompt begins with what the model just read. Only then:
    a warm-up per answer would cost a server a request per turn."""
    _, script = scripted
    model = "echo-readahead"
    thinker(model, **{"llm.context_tokens": 400, "llm.max_tokens": 60})
    client = make_client("test", subscribe=("llm.", "sys.ready"))
    ready(client)
    turns = 30
    for n in range(turns):
        turn = new_turn_id()
        client.publish(Ask(text=f"Question number {n}: what will the weather be like today?"), turn=turn)
        until_done(client, turn)
    requests = script.seen(model)
    answers = [r for r in requests if r.body["max_tokens"] != 1]
    read_ahead = [i for i, r in enumerate(requests) if r.body["max_tokens"] == 1][1:]  # (the first: at start)
    assert len(answers) == turns
    assert 2 <= len(read_ahead) <= turns // 2, "read ahead when the window moved, not after every answer"
    for i in read_ahead[:-1]:
        read, asked = requests[i].body["messages"], requests[i + 1].body["messages"]
        assert asked[:len(read)] == read, "the next question's prompt begins with what was read"


def test_empty_and_oversized_questions(thinker, make_client, tmp_path):
    client = make_client("test", subscribe=("llm.", "sys.ready"))
    thinker("echo-sizes", **{"llm.context_tokens": 512, "llm.max_tokens": 64})
    ready(client)
    empty = new_turn_id()
    client.publish(Ask(text="   "), turn=empty)
    seen = until_done(client, empty)
    assert [e.kind for e in seen] == ["llm.error", "llm.done"] and seen[0].body.code == "empty"
    big = new_turn_id() + 1
    client.publish(Ask(text="word " * 20_000), turn=big)
    accepted = wait_for(client, lambda e: e.kind == "llm.accepted" and e.turn == big, timeout=10)
    assert "cut" in accepted.body.note
    until_done(client, big)
    stored = next(text for t, role, text in history(tmp_path) if t == big and role == "user")
    assert len(stored) < 4 * 512


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_full_disk_is_reported_and_the_conversation_goes_on(run_actor, scripted, make_client, tmp_path):
    state = tmp_path / "small"
    if os.geteuid() != 0 or not _mount_tmpfs(state, "1m"):
        pytest.skip("needs root to mount a small tmpfs (a real full disk)")
    try:
        url, _ = scripted
        client = make_client("test", subscribe=("llm.", "sys."))
        run_actor(Thinker, **{"state.dir": state, "llm.backend": "openai", "llm.base_url": f"{url}/v1",
                              "llm.api_key": "k", "llm.model": "echo-full", "llm.timeout_s": 5.0})
        ready(client)
        with open(state / "filler", "wb", buffering=0) as filler:  # fill the disk
            try:
                while True:
                    filler.write(b"\0" * 4096)
            except OSError:
                pass
        turns = [new_turn_id(), new_turn_id() + 1]
        everything: list = []
        for i, turn in enumerate(turns):
            client.publish(Ask(text=f"Question {i}."), turn=turn)
            wait_for(client, lambda e: not everything.append(e) and e.kind == "llm.done" and e.turn == turn)
            said = [e.body.text for e in everything if e.kind == "llm.sentence" and e.turn == turn]
            assert said == [f"You said: Question {i}."]
        errors = [e.body for e in everything if e.kind == "sys.error" and e.body.code == "memory"]
        assert len(errors) == 1 and "kept in memory only" in errors[0].message  # said once, not per write
        notes = [e.body.note for e in everything if e.kind == "llm.accepted"]
        assert "kept in memory only" in notes[-1]  # and each asker is told
    finally:
        subprocess.run(["umount", "-l", str(state)], capture_output=True)


def test_every_turn_ends_even_when_answering_fails_unexpectedly(thinker, make_client, monkeypatch):
    client = make_client("test", subscribe=("llm.", "sys.ready"))
    actor = thinker("echo-broken")
    ready(client)
    broken = threading.Event()

    def explode(*_args, **_kwargs):
        broken.set()
        raise RuntimeError("a bug in the prompt builder")

    monkeypatch.setattr(actor, "_prompt", explode)
    turn = new_turn_id()
    client.publish(Ask(text="Hello?"), turn=turn)
    done = wait_for(client, lambda e: e.kind == "llm.done" and e.turn == turn, timeout=10)
    assert broken.is_set() and done.body.finish_reason == "error" and "a bug" in done.body.reason


# --- speculation ---------------------------------------------------------------------------------

from voicebus.workers.kinds import AsrGuess, AsrRevoke  # noqa: E402


def test_a_confirmed_guess_becomes_the_answer_without_starting_over(thinker, make_client, tmp_path, scripted):
    _, script = scripted
    client = make_client("test", subscribe=("llm.", "sys.ready"))
    thinker("count-commit-6")
    ready(client)
    turn = new_turn_id()
    client.publish(AsrGuess(text="Count to six.", rev=1, offset_ms=1200), turn=turn)
    early = wait_for(client, lambda e: e.kind == "llm.sentence" and e.turn == turn, timeout=10)
    assert early.body.guess == 1 and early.body.text == "One."
    assert history(tmp_path) == [], "a guess reached the history before it was confirmed"
    client.publish(AsrFinal(text="Count to six.", guess=1), turn=turn)
    seen = until_done(client, turn)
    confirmed = sorted({e.body.index: e.body.text for e in seen if e.kind == "llm.sentence" and not e.body.guess}.items())
    assert [text for _, text in confirmed] == ["One.", "Two.", "Three.", "Four.", "Five.", "Six."]
    assert seen[-1].body.finish_reason == "stop" and seen[-1].body.sentences == 6
    asked = [r for r in script.seen("count-commit-6") if r.body["messages"][-1]["role"] == "user"]
    assert len(asked) == 1, "the answer was started again after the confirmation"
    assert history(tmp_path) == [(turn, "user", "Count to six."),
                                 (turn, "assistant", "One. Two. Three. Four. Five. Six.")]


def test_an_answer_finished_before_its_confirmation_ends_when_confirmed(thinker, make_client, tmp_path):
    client = make_client("test", subscribe=("llm.", "sys.ready"))
    thinker("echo-early")
    ready(client)
    turn = new_turn_id()
    client.publish(AsrGuess(text="Hello there.", rev=2, offset_ms=900), turn=turn)
    wait_for(client, lambda e: e.kind == "llm.sentence" and e.turn == turn and e.body.guess == 2, timeout=10)
    time.sleep(0.5)  # the short answer is complete now, waiting
    client.publish(AsrFinal(text="Hello there.", guess=2), turn=turn)
    done = wait_for(client, lambda e: e.kind == "llm.done" and e.turn == turn, timeout=10)
    assert done.body.finish_reason == "stop" and done.body.sentences == 1
    assert history(tmp_path)[-1] == (turn, "assistant", "You said: Hello there.")


@pytest.mark.parametrize("how", ["revoke", "different final"])
def test_a_void_guess_is_cancelled_and_never_remembered(thinker, make_client, tmp_path, how):
    client = make_client("test", subscribe=("llm.", "sys.ready"))
    thinker(f"count-void{how[0]}-12")
    ready(client)
    turn = new_turn_id()
    client.publish(AsrGuess(text="What is the capital of", rev=1, offset_ms=1500), turn=turn)
    wait_for(client, lambda e: e.kind == "llm.sentence" and e.turn == turn and e.body.guess == 1, timeout=10)
    if how == "revoke":
        client.publish(AsrRevoke(rev=1), turn=turn)
    else:
        client.publish(AsrFinal(text="What is the capital of Peru?"), turn=turn)
    revoked = wait_for(client, lambda e: e.kind == "llm.done" and e.turn == turn, timeout=10)
    assert revoked.body.finish_reason == "revoked" and revoked.body.guess == 1
    assert revoked.body.timings["tokens"] > 0  # what the guess cost
    if how == "revoke":
        assert history(tmp_path) == []
        return
    seen = until_done(client, turn)
    assert seen[-1].body.finish_reason == "stop" and not any(e.body.guess for e in seen if e.kind == "llm.sentence")
    assert [text for t, role, text in history(tmp_path) if role == "user"] == ["What is the capital of Peru?"]



def test_a_thinker_restarted_between_guess_and_commit_answers_the_final_once(thinker, make_client, tmp_path):
    """The guess dies with the thinker that prepared it (guesses are never written down); the new thinker
    answers the confirmed final from scratch, and only that answer is sent, played and remembered."""
    client = make_client("test", subscribe=("llm.", "sys.ready", "sys.bye"))
    first = thinker("count-guessdeath-3")
    ready(client)
    turn = new_turn_id()
    client.publish(AsrGuess(text="Count to three.", rev=1, offset_ms=900), turn=turn)
    wait_for(client, lambda e: e.kind == "llm.sentence" and e.turn == turn and e.body.guess == 1, timeout=10)
    first.stop("gone between guess and commit")
    wait_for(client, lambda e: e.kind == "sys.bye", timeout=10)
    thinker("count-guessdeath-3")
    ready(client)
    client.publish(AsrFinal(text="Count to three.", guess=1), turn=turn)
    seen = until_done(client, turn)
    assert seen[-1].body.finish_reason == "stop" and seen[-1].body.sentences == 3 and not seen[-1].body.guess
    said = [(e.body.index, e.body.text) for e in seen if e.kind == "llm.sentence"]
    assert said == [(0, "One."), (1, "Two."), (2, "Three.")] and not any(e.body.guess for e in seen
                                                                         if e.kind == "llm.sentence")
    assert history(tmp_path) == [(turn, "user", "Count to three."), (turn, "assistant", "One. Two. Three.")]

# --- found by scripts/chaos.py ---------------------------------------------------------------------


def test_a_repeat_that_crosses_an_interrupt_does_not_answer_the_turn_again(thinker, make_client):
    """The asker's repeat arrives while the interrupted answer is still stopping: one end, cancelled."""
    client = make_client("test", subscribe=("llm.", "sys.ready"))
    thinker("count-crossing-12")
    ready(client)
    turn = new_turn_id()
    client.publish(Ask(text="Count to twelve."), turn=turn)
    wait_for(client, lambda e: e.kind == "llm.sentence" and e.turn == turn, timeout=10)
    client.publish(Interrupt(reason="the user spoke"), turn=turn)
    client.publish(Ask(text="Count to twelve."), turn=turn)
    seen = until_done(client, turn)
    assert seen[-1].body.finish_reason == "cancelled"
    late = [e for e in iter(lambda: client.recv(timeout=1.5), None) if e.turn == turn]
    assert not [e for e in late if e.kind == "llm.done" and not e.body.replay], "answered a second time"
    assert not [e for e in late if e.kind == "llm.sentence" and not e.body.replay]


def test_a_restarted_speakers_stop_keeps_what_its_predecessor_played(thinker, make_client, tmp_path):
    """A speaker that never heard of the turn reports it stopped at sentence 0; the sentences the
    speaker before it played (play.done) were heard all the same and stay in the history."""
    client = make_client("test", subscribe=("llm.", "sys.ready"))
    thinker("count-floor-3")
    ready(client)
    turn = new_turn_id()
    client.publish(AsrFinal(text="Count to three."), turn=turn)
    until_done(client, turn)
    client.publish(PlayDone(index=0, spoken_ms=500), turn=turn)
    client.publish(PlayDone(index=1, spoken_ms=500), turn=turn)
    client.publish(PlayStopped(index=0, reason="barge-in", spoken_ms=0, total_ms=0), turn=turn)

    def answer():
        return next((text for t, role, text in history(tmp_path) if t == turn and role == "assistant"), None)

    deadline = time.monotonic() + 5
    while answer() != "One. Two." and time.monotonic() < deadline:
        time.sleep(0.05)
    assert answer() == "One. Two."


def _spoken_over_while_the_thinker_is_down(client: BusClient, thinker: Thinker) -> int:
    """A voice turn answered whole, the thinker stopped, then the user speaks over the answer: the turn."""
    turn = new_turn_id()
    client.publish(AsrFinal(text="Count to eight."), turn=turn)
    until_done(client, turn)  # recorded whole; the speaker plays it in real time, half a second a sentence
    wait_for(client, lambda e: e.kind == "play.done" and e.turn == turn, timeout=30)
    thinker.stop("down for the test")
    wait_for(client, lambda e: e.kind == "sys.bye" and e.body.name == "thinker", timeout=10)
    client.publish(Interrupt(reason="barge-in"), turn=turn)
    return turn


def _the_history_keeps_what_was_heard(client: BusClient, tmp_path: Path, turn: int, stop: PlayStopped) -> None:
    """A thinker acknowledges the stop, and the history keeps the answer up to it."""
    heard = wait_for(client, lambda e: e.kind == "llm.heard" and e.turn == turn, timeout=30).body
    assert (heard.index, heard.spoken_ms) == (stop.index, stop.spoken_ms)
    answer = next(text for t, role, text in history(tmp_path) if t == turn and role == "assistant")
    words = ["One.", "Two.", "Three.", "Four.", "Five.", "Six.", "Seven.", "Eight."]
    assert answer.startswith(" ".join(words[:stop.index])) and len(answer) < len(" ".join(words))


@pytest.mark.slow
def test_a_stop_the_thinker_was_down_for_reaches_the_history(thinker, run_actor, make_client, tmp_path):
    """Found by scripts/chaos.py (seed 6): under a flood the thinker's queue dropped the speaker's stop,
    and the history kept a whole answer the user had spoken over. Here the thinker is down when the stop
    is made, so it cannot hear it, and the turn is over: no llm.done comes to bring the stop again. The
    speaker says it again until a thinker acknowledges it (llm.heard)."""
    from voicebus.workers.speaker import Speaker

    client = make_client("test", subscribe=("llm.", "play.", "sys."))
    first = thinker("count-stoplost-8")
    run_actor(Speaker, **{"audio.output": str(tmp_path / "out.wav")})
    waiting = {"thinker", "speaker"}
    wait_for(client, lambda e: e.kind == "sys.ready" and not waiting.discard(e.body.name) and not waiting, timeout=60)
    turn = _spoken_over_while_the_thinker_is_down(client, first)
    stop = wait_for(client, lambda e: e.kind == "play.stopped" and e.turn == turn, timeout=10).body
    assert 1 <= stop.index < 8
    thinker("count-stoplost-8")
    _the_history_keeps_what_was_heard(client, tmp_path, turn, stop)
    # Acknowledged: the speaker stops saying it.
    quiet_until = time.monotonic() + 3 * 2.0  # three times the speaker's RESEND_EVERY_S
    while (env := client.recv(timeout=max(0.0, quiet_until - time.monotonic()))) is not None:
        assert not (env.kind == "play.stopped" and env.turn == turn), "said again after llm.heard"


@pytest.mark.slow
def test_a_stop_outlives_the_speaker_that_made_it(thinker, bus, launcher, make_client, tmp_path):
    """A speaker killed before any thinker acknowledged its stop: its successor says the stop again, as
    the first one measured it, so the history still keeps only what was heard. (The stop is made while
    the thinker is down, as when a flood drops it on its way; the listener, which heard it, asks no more.)"""
    client = make_client("test", subscribe=("llm.", "play.", "sys."))
    first = thinker("count-stopkept-8")
    up = launcher.up("--only", "speaker", "--join-bus", "--bus", bus.endpoints.url, "--insecure",
                     "--input", "none", "--output", str(tmp_path / "out.wav"), label="speaker")
    waiting = {"thinker", "speaker"}
    wait_for(client, lambda e: e.kind == "sys.ready" and not waiting.discard(e.body.name) and not waiting, timeout=90)
    turn = _spoken_over_while_the_thinker_is_down(client, first)
    made = wait_for(client, lambda e: e.kind == "play.stopped" and e.turn == turn, timeout=10)
    stop = made.body
    assert 1 <= stop.index < 8 and 0 < stop.spoken_ms < stop.total_ms
    old = int(made.src.rsplit(":", 1)[1])
    os.kill(old, signal.SIGKILL)
    again = wait_for(client, lambda e: e.kind == "play.stopped" and e.turn == turn
                     and int(e.src.rsplit(":", 1)[1]) not in (old, up.pid), timeout=90)
    assert again.body == stop, "the new speaker says the stop as its predecessor measured it"
    kept = tmp_path / "state-speaker" / "runs"
    assert list(kept.glob("speaker-*.json")), "kept on disk until a thinker acknowledges it"
    poll(lambda: f"saying again the stop of turn {turn}" in up.stderr(), 5, "the new speaker says why")
    thinker("count-stopkept-8")
    _the_history_keeps_what_was_heard(client, tmp_path, turn, stop)
    poll(lambda: not list(kept.glob("speaker-*.json")), 5, "acknowledged, the stop no longer kept")


def test_a_barge_in_stops_a_text_answers_audio_not_the_answer(thinker, make_client, tmp_path):
    """Found by scripts/chaos.py: the voice user spoke while a text asker's answer was being played; the
    listener interrupts what plays, and the thinker cancelled the other asker's answer ('ask' exited 1).
    A barge-in is about audio: a voice turn ends, a text turn's answer still goes to its asker whole."""
    client = make_client("test", subscribe=("llm.", "sys.ready"))
    thinker("count-bargetext-8")
    ready(client)
    text_turn, voice_turn = new_turn_id(), new_turn_id() + 1
    client.publish(Ask(text="Count to eight."), turn=text_turn)
    wait_for(client, lambda e: e.kind == "llm.sentence" and e.turn == text_turn, timeout=10)
    client.publish(Interrupt(reason="barge-in"), turn=text_turn)
    seen = until_done(client, text_turn)
    assert seen[-1].body.finish_reason == "stop" and seen[-1].body.sentences == 8
    client.publish(AsrFinal(text="Count to eight."), turn=voice_turn)
    wait_for(client, lambda e: e.kind == "llm.sentence" and e.turn == voice_turn, timeout=10)
    client.publish(Interrupt(reason="barge-in"), turn=voice_turn)
    assert until_done(client, voice_turn)[-1].body.finish_reason == "cancelled"
    assert [text for t, role, text in history(tmp_path) if t == text_turn and role == "assistant"] == [
        "One. Two. Three. Four. Five. Six. Seven. Eight."]
