"""Conversation memory: persistence, trimming, interruption, corruption, sessions."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from voicebus.engine.errors import ConfigError
from voicebus.workers.memory import DEFAULT_SYSTEM_PROMPT, Conversation


def words(text: str) -> int:
    return len(text.split())


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "history.db"


def test_creates_folder_and_wal_database(db_path: Path) -> None:
    with Conversation(db_path) as conv:
        conv.add_user(1, "hello")
    assert db_path.is_file()
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_history_survives_a_restart(db_path: Path) -> None:
    with Conversation(db_path) as first:
        assert first.last_turn() == 0
        first.add_user(1, "What time is it?")
        first.add_assistant(1, "It is noon.")
        first.add_user(2, "Thanks!")
    with Conversation(db_path) as second:
        assert second.history() == [
            (1, "user", "What time is it?"),
            (1, "assistant", "It is noon."),
            (2, "user", "Thanks!"),
        ]
        assert second.last_turn() == 2
        assert second.has_answer(1)
        assert not second.has_answer(2)


def test_two_open_objects_see_each_other(db_path: Path) -> None:
    old = Conversation(db_path)
    new = Conversation(db_path)  # a restarting worker opening while the old one lives
    try:
        old.add_user(1, "one")
        new.add_assistant(1, "two")
        assert old.history() == new.history() == [(1, "user", "one"), (1, "assistant", "two")]
    finally:
        old.close()
        new.close()


def test_another_process_writes_and_we_read(db_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from voicebus.workers.memory import Conversation
        with Conversation(Path({str(db_path)!r}), "kitchen") as conv:
            conv.add_user(7, "Set a timer.")
            conv.add_assistant(7, "Timer set.")
        """
    )
    with Conversation(db_path, "kitchen") as conv:
        conv.add_user(6, "Hi.")
        subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
        assert conv.last_turn() == 7
        assert conv.history()[-2:] == [(7, "user", "Set a timer."), (7, "assistant", "Timer set.")]


def test_replayed_user_message_is_not_duplicated(db_path: Path) -> None:
    with Conversation(db_path) as conv:
        conv.add_user(3, "hello")
        conv.add_assistant(3, "hi there")
        conv.add_user(3, "hello")
        assert conv.history() == [(3, "user", "hello"), (3, "assistant", "hi there")]
        assert conv.has_answer(3)


def fill(conv: Conversation, turns: int) -> None:
    for turn in range(1, turns + 1):
        conv.add_user(turn, f"question number {turn}")  # 3 words
        conv.add_assistant(turn, f"this is answer {turn}")  # 4 words


def test_messages_fit_everything_in_a_big_budget(db_path: Path) -> None:
    with Conversation(db_path, system_prompt="Be brief.") as conv:
        fill(conv, 3)
        msgs = conv.messages(1000, words)
    assert msgs[0] == {"role": "system", "content": "Be brief."}
    assert [m["role"] for m in msgs[1:]] == ["user", "assistant"] * 3
    assert msgs[1]["content"] == "question number 1"
    assert msgs[-1]["content"] == "this is answer 3"


def test_messages_drop_oldest_whole_turns(db_path: Path) -> None:
    with Conversation(db_path, system_prompt="Be brief.") as conv:
        fill(conv, 3)
        conv.add_user(4, "and now what")  # 3 words, no answer yet
        # system 2 + turn 4 (3) + turn 3 (7) = 12; turn 2 would need 19.
        msgs = conv.messages(18, words)
    assert [m["content"] for m in msgs] == [
        "Be brief.",
        "question number 3",
        "this is answer 3",
        "and now what",
    ]
    assert sum(words(m["content"]) for m in msgs) <= 18


def test_system_prompt_and_latest_turn_kept_over_budget(db_path: Path) -> None:
    with Conversation(db_path, system_prompt="Be brief.") as conv:
        fill(conv, 2)
        conv.add_user(3, "a very long question that is over any budget")
        msgs = conv.messages(1, words)
    assert msgs == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a very long question that is over any budget"},
    ]


def test_trimming_never_skips_a_turn_to_fit_an_older_one(db_path: Path) -> None:
    with Conversation(db_path, system_prompt="Hi.") as conv:
        conv.add_user(1, "short")
        conv.add_user(2, "long " * 50)
        conv.add_user(3, "short too")
        msgs = conv.messages(10, words)
    assert [m["content"] for m in msgs] == ["Hi.", "short too"]


def test_per_message_overhead_counts(db_path: Path) -> None:
    with Conversation(db_path, system_prompt="Be brief.") as conv:
        fill(conv, 2)
        # 2 + 7 + 7 = 16 fits without overhead; with 3 per message (5 messages) it is 31.
        assert len(conv.messages(16, words)) == 5
        assert len(conv.messages(16, words, per_message=3)) == 3


def test_interrupted_answer_keeps_only_what_was_spoken(db_path: Path) -> None:
    with Conversation(db_path) as conv:
        conv.add_user(1, "Tell me about Paris.")
        conv.add_assistant(1, "Paris is the capital of France. It has many museums.")
        conv.set_assistant(1, "Paris is the capital of France.")
    with Conversation(db_path) as conv:
        assert conv.history()[-1] == (1, "assistant", "Paris is the capital of France.")
        assert conv.messages(1000, words)[-1] == {
            "role": "assistant",
            "content": "Paris is the capital of France.",
        }


def test_interrupted_before_speaking_keeps_user_and_counts_as_handled(db_path: Path) -> None:
    with Conversation(db_path, system_prompt="S.") as conv:
        conv.add_user(1, "Tell me a story.")
        conv.add_assistant(1, "Once upon a time there was a fox.")
        conv.set_assistant(1, "")
        conv.add_user(2, "Never mind, what is the weather?")
        assert conv.has_answer(1)
        assert conv.history()[:2] == [(1, "user", "Tell me a story."), (1, "assistant", "")]
        assert conv.messages(1000, words) == [
            {"role": "system", "content": "S."},
            {"role": "user", "content": "Tell me a story."},
            {"role": "user", "content": "Never mind, what is the weather?"},
        ]


def test_clear_and_has_answer(db_path: Path) -> None:
    with Conversation(db_path) as conv:
        conv.add_user(5, "hi")
        conv.add_assistant(5, "hello")
        assert conv.has_answer(5)
        assert not conv.has_answer(6)
        conv.clear()
        assert conv.history() == []
        assert conv.last_turn() == 0
        assert not conv.has_answer(5)


def test_sessions_are_isolated(db_path: Path) -> None:
    with Conversation(db_path, "alice") as alice, Conversation(db_path, "bob") as bob:
        alice.add_user(1, "I am Alice.")
        alice.add_user(2, "Still Alice.")
        bob.add_user(1, "I am Bob.")
        bob.add_assistant(1, "Hi Bob.")
        assert alice.last_turn() == 2
        assert bob.last_turn() == 1
        assert not alice.has_answer(1)
        assert bob.has_answer(1)
        bob.clear()
        assert bob.history() == []
        assert [text for _, _, text in alice.history()] == ["I am Alice.", "Still Alice."]


def test_default_system_prompt_suits_speech(db_path: Path) -> None:
    with Conversation(db_path) as conv:
        conv.add_user(1, "hi")
        msgs = conv.messages(10_000, words)
    assert msgs[0] == {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}
    assert words(DEFAULT_SYSTEM_PROMPT) < 80
    for phrase in ("one to three", "markdown", "lists", "code"):
        assert phrase in DEFAULT_SYSTEM_PROMPT


def test_garbage_file_is_a_config_error_and_kept(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    garbage = b"this is not a database, just some notes\n" * 100
    db_path.write_bytes(garbage)
    with pytest.raises(ConfigError) as info:
        Conversation(db_path)
    assert str(db_path) in str(info.value)
    assert "not a readable SQLite database" in str(info.value)
    assert db_path.read_bytes() == garbage


def damaged_database(path: Path) -> bytes:
    """A real history whose inner pages were overwritten; returns its bytes."""
    with Conversation(path) as conv:
        for turn in range(1, 400):
            conv.add_user(turn, f"question {turn} " * 20)
    with sqlite3.connect(path) as raw:
        raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    assert len(data) > 8 * 4096
    data[4096 * 2:4096 * 6] = b"\xff" * (4096 * 4)
    path.write_bytes(bytes(data))
    return bytes(data)


def test_damaged_pages_are_a_config_error(db_path: Path) -> None:
    damaged = damaged_database(db_path)
    with pytest.raises(ConfigError, match=str(db_path)):
        Conversation(db_path)
    assert db_path.read_bytes() == damaged


def test_recover_moves_corrupt_file_aside_and_starts_fresh(db_path: Path) -> None:
    damaged = damaged_database(db_path)
    with Conversation(db_path, recover_corrupt=True) as conv:
        assert conv.moved_aside is not None
        assert conv.moved_aside.name.startswith("history.db.corrupt-")
        assert conv.moved_aside.read_bytes() == damaged
        assert conv.history() == []
        conv.add_user(1, "fresh start")
    with Conversation(db_path) as again:
        assert again.moved_aside is None
        assert again.history() == [(1, "user", "fresh start")]


def test_unopenable_path_is_a_config_error(tmp_path: Path) -> None:
    folder = tmp_path / "history.db"
    folder.mkdir()  # a directory where the file should be
    with pytest.raises(ConfigError, match="history.db"):
        Conversation(folder, recover_corrupt=True)
    assert folder.is_dir()  # never moved aside: it is not a corrupt database
