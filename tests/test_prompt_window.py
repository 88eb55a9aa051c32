"""The thinker's history window moves in steps, so that a model server's prefix cache keeps working.

Found by scripts/chaos.py with the local model: once a conversation outgrew the prompt budget, the window
slid by one turn per answer, every prompt began differently, and llama.cpp evaluated the whole history
again for each answer (18 s instead of 1 s here): askers timed out behind a thinker that could not keep up.
"""

from __future__ import annotations

from pathlib import Path

from voicebus.workers.memory import Conversation


def words(text: str) -> int:
    return len(text.split())


def test_a_stable_window_keeps_its_beginning_for_several_turns(tmp_path: Path) -> None:
    budget = 200  # about 24 turns of 8 words fit: the step is 8 turns
    starts, kept = [], []
    with Conversation(tmp_path / "c.sqlite", system_prompt="Be brief.") as conv:
        for turn in range(1, 120):
            conv.add_user(turn, f"question {turn} about things")  # 4 words
            prompt = conv.messages(budget, words, stable=True)
            conv.add_assistant(turn, f"answer {turn} is short")  # 4 words
            assert sum(words(m["content"]) for m in prompt) <= budget
            assert prompt[-1]["content"] == f"question {turn} about things"  # the latest is always there
            starts.append(int(prompt[1]["content"].split()[1]))
            kept.append(len(prompt))
    changes = [i for i in range(1, len(starts)) if starts[i] != starts[i - 1]]
    assert len(changes) > 5, "the history outgrew the budget: the window must move"
    assert all(b - a >= 8 for a, b in zip(changes, changes[1:])), changes  # a prefix cache hits 7 times in 8
    assert min(kept[30:]) >= max(kept) // 2  # and it keeps at least half of what fits


def test_the_default_window_still_keeps_all_that_fits(tmp_path: Path) -> None:
    with Conversation(tmp_path / "c.sqlite", system_prompt="Be brief.") as conv:
        for turn in range(1, 20):
            conv.add_user(turn, f"question {turn} about things")
            conv.add_assistant(turn, f"answer {turn} is short")
        sliding, stable = conv.messages(60, words), conv.messages(60, words, stable=True)
    assert sliding[-1] == stable[-1] and len(stable) <= len(sliding)
    assert sum(words(m["content"]) for m in sliding) > 60 - 8  # sliding fills the budget to the last turn


def test_with_room_kept_for_the_question_its_window_is_the_one_read_before_it_came(tmp_path: Path) -> None:
    """The thinker reads a moved window ahead, before the next question; that only helps if the question's
    prompt begins the same way. Without a reserve, the question itself moved the window; with one, a
    question that fits in it never does, and a longer one still gets its answer."""
    budget, reserve = 200, 12
    with Conversation(tmp_path / "c.sqlite", system_prompt="Be brief.") as conv:
        surprises = {0: 0, reserve: 0}  # questions whose window began otherwise than the one before them
        for turn in range(1, 120):
            before = {r: conv.messages(budget, words, stable=True, reserve=r) for r in surprises}
            question = f"question {turn} about many different things today"  # 7 words
            conv.add_user(turn, question)
            for r in surprises:
                asked = conv.messages(budget, words, stable=True, reserve=r)
                assert asked[-1]["content"] == question and sum(words(m["content"]) for m in asked) <= budget
                surprises[r] += len(before[r]) > 1 and asked[:2] != before[r][:2]
            conv.add_assistant(turn, f"ok {turn}")
        long_question = "tell me " + "a lot more " * 10  # 32 words: more than the reserve
        conv.add_user(120, long_question)
        asked = conv.messages(budget, words, stable=True, reserve=reserve)
        assert asked[-1]["content"] == long_question and sum(words(m["content"]) for m in asked) <= budget
    assert surprises[0] > 5 and surprises[reserve] == 0, surprises


def test_turns_before_since_are_left_out_but_the_one_being_answered_is_not(tmp_path: Path) -> None:
    """A new run is a new conversation for the model (state.continue_conversation off): earlier runs' turns
    stay on disk and out of the prompt, except a turn of theirs that this run answers (a resumed one)."""
    with Conversation(tmp_path / "c.sqlite", system_prompt="Be brief.") as conv:
        for turn in (10, 20, 30):
            conv.add_user(turn, f"question {turn}")
            conv.add_assistant(turn, f"answer {turn}")
        conv.add_user(25, "question 25")  # an earlier run's turn left unanswered, resumed now
        conv.add_user(40, "question 40")
        contents = [m["content"] for m in conv.messages(500, words, since_turn=30)]
        assert contents == ["Be brief.", "question 30", "answer 30", "question 40"]
        assert [m["content"] for m in conv.messages(500, words, since_turn=30, until_turn=25)] == [
            "Be brief.", "question 25"]
        assert len(conv.messages(500, words)) == 1 + 8  # and all of it without since_turn
