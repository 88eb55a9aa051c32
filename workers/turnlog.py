"""The thinker's durable record of every turn it accepted: what makes delivery exactly-once.

The thinker writes here *before* it tells anyone: a turn is recorded before
``llm.accepted`` goes out, and each sentence before its ``llm.sentence``. So
whatever process dies, the record knows every turn that was acknowledged and
every sentence that may have been heard, and a new thinker can

* resume a turn that was accepted but not finished (its stored sentences are
  sent again, then generation continues after them);
* answer a repeated utterance of a finished turn by sending the stored answer
  again, instead of generating a second one;
* tell a restarted speaker which sentences were already played.

It lives in the conversation's SQLite file, so accepting a turn and storing
the user's words, or finishing it and storing the answer, are one transaction.

    turns      (session, turn) → channel voice|text, status accepted|done, finish, reason
    sentences  (session, turn, idx) → speakable text, raw model text, played
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field

from voicebus.workers.memory import UPSERT_MESSAGE, Conversation

VOICE = "voice"
"""Delivered as audio: the history keeps what was heard (cut at a barge-in)."""
TEXT = "text"
"""Delivered as text to the asker: the history keeps the whole answer."""
BARGE_IN = "barge-in"
"""The reason of an interrupt sent because the user spoke over the assistant. It ends voice turns; a text
turn's answer belongs to its asker, so a barge-in stops only its audio (the speaker's business)."""


@dataclass(frozen=True)
class Sentence:
    index: int
    text: str
    """what the voice reads (speakable)"""
    raw: str
    """what the model wrote (for continuing the answer after a restart)"""
    played: bool


@dataclass(frozen=True)
class TurnRecord:
    turn: int
    channel: str
    status: str
    """accepted (being or to be answered) | done"""
    finish: str
    reason: str
    accepted: float
    sentences: list[Sentence] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.status == "done"


class TurnLog:
    """Turn states and sentences of one session, in the conversation's database."""

    def __init__(self, conversation: Conversation) -> None:
        self.memory = conversation
        self.session = conversation.session

    def accept(self, turn: int, channel: str, text: str) -> None:
        """Record a new turn and the user's words together."""
        now = time.time()

        def change(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT OR IGNORE INTO turns (session, turn, channel, status, accepted) VALUES (?, ?, ?, 'accepted', ?)",
                (self.session, turn, channel, now),
            )
            db.execute(UPSERT_MESSAGE, (self.session, turn, "user", text, now))

        self.memory.write(change)

    def add_sentence(self, turn: int, index: int, text: str, raw: str) -> None:
        self.memory.write(lambda db: db.execute(
            "INSERT OR REPLACE INTO sentences (session, turn, idx, text, raw, played) VALUES (?, ?, ?, ?, ?, 0)",
            (self.session, turn, index, text, raw),
        ))

    def mark_played(self, turn: int, index: int) -> None:
        self.memory.write(lambda db: db.execute(
            "UPDATE sentences SET played = 1 WHERE session = ? AND turn = ? AND idx = ?",
            (self.session, turn, index),
        ))

    def finish(self, turn: int, finish: str, reason: str, answer: str) -> None:
        """Close the turn and store its answer (as delivered so far) in the history."""
        now = time.time()

        def change(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE turns SET status = 'done', finish = ?, reason = ? WHERE session = ? AND turn = ?",
                (finish, reason, self.session, turn),
            )
            db.execute(UPSERT_MESSAGE, (self.session, turn, "assistant", answer, now))

        self.memory.write(change)

    def get(self, turn: int) -> TurnRecord | None:
        with self.memory.reading() as db:
            row = db.execute(
                "SELECT channel, status, finish, reason, accepted FROM turns WHERE session = ? AND turn = ?",
                (self.session, turn),
            ).fetchone()
            if row is None:
                return None
            sentences = db.execute(
                "SELECT idx, text, raw, played FROM sentences WHERE session = ? AND turn = ? ORDER BY idx",
                (self.session, turn),
            ).fetchall()
        return TurnRecord(
            turn, *row, sentences=[Sentence(i, t, r, bool(p)) for i, t, r, p in sentences]
        )

    def unfinished(self) -> list[TurnRecord]:
        """Turns accepted and not yet done, oldest first."""
        with self.memory.reading() as db:
            turns = [t for (t,) in db.execute(
                "SELECT turn FROM turns WHERE session = ? AND status = 'accepted' ORDER BY turn", (self.session,)
            )]
        return [record for turn in turns if (record := self.get(turn)) is not None]
