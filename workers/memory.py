"""Conversation memory for the thinker, kept in SQLite so it survives restarts.

One database file can hold many sessions; each row is one message of one turn:
``(session, turn, role, text)`` with role ``user`` or ``assistant``. The database
runs in WAL mode with a busy timeout, so a restarting thinker that opens the file
while the old process is still closing it waits instead of failing.

Barge-in: the thinker records the full answer with ``add_assistant`` and, when
the user interrupts, replaces it with what was actually spoken through
``set_assistant``. A turn interrupted before anything was spoken keeps its user
message and an assistant row with empty text: ``has_answer`` is then true (the
turn was handled and must not be answered again after a restart), while
``messages`` leaves the empty answer out, since chat templates handle a missing
answer better than an empty one.

A file that is not a readable SQLite database raises ``ConfigError`` naming the
path; the history is never deleted. With ``recover_corrupt=True`` a corrupt file
is moved aside to ``<name>.corrupt-<YYYYmmdd-HHMMSS>`` (with its ``-wal`` and
``-shm`` companions) and a fresh database is started; ``moved_aside`` then names
where the old one went, so the caller can report it.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from voicebus.engine.errors import ConfigError

__all__ = ["DEFAULT_SYSTEM_PROMPT", "Conversation"]

T = TypeVar("T")

DEFAULT_SYSTEM_PROMPT = (
    "You are a friendly voice assistant. Everything you write is read aloud, so answer "
    "in one to three short, plain sentences, the way a person would say them. Do not use "
    "markdown, headings, lists, tables, code or emoji unless the user asks for them. "
    "Write numbers, units and symbols as spoken words, for example twenty percent, "
    "five dollars, three point five. If you are not sure, say so briefly."
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    session TEXT NOT NULL,
    turn    INTEGER NOT NULL,
    role    TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    text    TEXT NOT NULL,
    ts      REAL NOT NULL,
    PRIMARY KEY (session, turn, role)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS turns (
    session  TEXT NOT NULL,
    turn     INTEGER NOT NULL,
    channel  TEXT NOT NULL CHECK (channel IN ('voice', 'text')),
    status   TEXT NOT NULL CHECK (status IN ('accepted', 'done')),
    finish   TEXT NOT NULL DEFAULT '',
    reason   TEXT NOT NULL DEFAULT '',
    accepted REAL NOT NULL,
    PRIMARY KEY (session, turn)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sentences (
    session TEXT NOT NULL,
    turn    INTEGER NOT NULL,
    idx     INTEGER NOT NULL,
    text    TEXT NOT NULL,
    raw     TEXT NOT NULL,
    played  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (session, turn, idx)
) WITHOUT ROWID;
"""
UPSERT_MESSAGE = (
    "INSERT INTO messages (session, turn, role, text, ts) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (session, turn, role) DO UPDATE SET text = excluded.text, ts = excluded.ts"
)
_BUSY_TIMEOUT_S = 5.0


class Conversation:
    """The messages of one session in one SQLite file."""

    def __init__(
        self,
        path: Path,
        session: str = "default",
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        *,
        recover_corrupt: bool = False,
        on_degraded: Callable[[str], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.session = session
        self.system_prompt = system_prompt
        self.moved_aside: Path | None = None
        self.degraded = ""
        """Why the history is no longer written to disk ("" while it is)."""
        self.on_degraded = on_degraded
        # The thinker may touch memory from its bus thread and its generation
        # thread; one connection guarded by a lock keeps that simple.
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the folder for conversation history {self.path}: {exc}"
            ) from exc
        try:
            self._db = _open(self.path)
        except _Corrupt as exc:
            if not recover_corrupt:
                raise ConfigError(
                    f"conversation history {self.path} is not a readable SQLite database "
                    f"({exc}); move it away or delete it to start a new history"
                ) from exc
            self.moved_aside = _move_aside(self.path)
            self._db = _open(self.path)

    # -- writing -----------------------------------------------------------

    def add_user(self, turn: int, text: str) -> None:
        """Record what the user said in ``turn`` (again: replaces it)."""
        self._put(turn, "user", text)

    def add_assistant(self, turn: int, text: str) -> None:
        """Record the complete answer to ``turn``."""
        self._put(turn, "assistant", text)

    def set_assistant(self, turn: int, text: str) -> None:
        """Replace the answer to ``turn`` with what was actually spoken.

        ``""`` means the turn was interrupted before anything was heard.
        """
        self._put(turn, "assistant", text)

    def clear(self) -> None:
        """Forget this session's messages (other sessions are untouched)."""
        self.write(lambda db: db.execute("DELETE FROM messages WHERE session = ?", (self.session,)))

    # -- reading -----------------------------------------------------------

    def history(self) -> list[tuple[int, str, str]]:
        """Every message as ``(turn, role, text)``, oldest first, user before assistant."""
        with self.reading() as db:
            rows = db.execute(
                "SELECT turn, role, text FROM messages WHERE session = ? "
                "ORDER BY turn, role = 'assistant'",
                (self.session,),
            ).fetchall()
        return [(int(turn), str(role), str(text)) for turn, role, text in rows]

    def last_turn(self) -> int:
        """The highest turn id recorded in this session, 0 when there is none."""
        with self.reading() as db:
            (value,) = db.execute(
                "SELECT COALESCE(MAX(turn), 0) FROM messages WHERE session = ?", (self.session,)
            ).fetchone()
        return int(value)

    def has_answer(self, turn: int) -> bool:
        """Whether ``turn`` was answered (or handled and interrupted before speaking)."""
        with self.reading() as db:
            row = db.execute(
                "SELECT 1 FROM messages WHERE session = ? AND turn = ? AND role = 'assistant'",
                (self.session, turn),
            ).fetchone()
        return row is not None

    def messages(
        self,
        budget_tokens: int,
        count_tokens: Callable[[str], int],
        *,
        per_message: int = 0,
        until_turn: int | None = None,
        stable: bool = False,
        reserve: int = 0,
        since_turn: int | None = None,
    ) -> list[dict[str, str]]:
        """The system prompt and the most recent whole turns that fit ``budget_tokens``.

        Older turns are dropped first, a turn at a time, so an answer never
        appears without its question. The system prompt and the latest turn are
        always included, even over budget: without them there is nothing to
        answer. ``per_message`` adds each message's template overhead.
        ``until_turn`` leaves out later turns (questions queued behind the one
        being answered).

        ``stable``: the window's first turn moves in steps, so that consecutive
        prompts share their beginning for several turns. A model server caches the
        evaluated prefix (llama.cpp does); a window that slid by one turn per answer
        made every answer evaluate the whole history again (measured with the local
        model here: 18 s instead of 1 s per answer). The window starts at a position
        in the history that is a multiple of the step, a power of two at most half
        the turns that fit: it keeps at least half of what would fit, and its start
        stays put for a step's worth of turns while turns are of similar size.

        ``reserve``: tokens kept for the question being asked. A latest turn that is
        only a question (no answer yet) and fits in them does not decide where the
        window starts, so the window for a question is the one computed before it
        came (with the same ``reserve``), and a model can read it in advance.

        ``since_turn``: turns before it are left out (earlier runs' conversations), all but ``until_turn``.
        """
        turns: dict[int, list[dict[str, str]]] = {}
        for turn, role, text in self.history():
            if until_turn is not None and turn > until_turn:
                continue
            if since_turn is not None and turn < since_turn and turn != until_turn:
                continue
            if text:
                turns.setdefault(turn, []).append({"role": role, "content": text})
        ordered = sorted(turns)

        def cost(turn: int) -> int:
            return sum(count_tokens(m["content"]) + per_message for m in turns[turn])

        asked: list[int] = []  # the question being asked, when it fits in the reserve
        only_asked = bool(ordered) and [m["role"] for m in turns[ordered[-1]]] == ["user"]
        if reserve and only_asked and cost(ordered[-1]) <= reserve:
            asked = [ordered.pop()]
        used = count_tokens(self.system_prompt) + per_message + reserve
        first = len(ordered)
        for position in range(len(ordered) - 1, -1, -1):
            turn_cost = cost(ordered[position])
            if (first < len(ordered) or asked) and used + turn_cost > budget_tokens:
                break
            first = position
            used += turn_cost
        if stable and first > 0:  # the next step at or after the first turn that fits
            step = 1 << max(0, ((len(ordered) - first) // 2).bit_length() - 1)
            first = -(-first // step) * step
        system = {"role": "system", "content": self.system_prompt}
        return [system] + [message for turn in [*ordered[first:], *asked] for message in turns[turn]]

    # -- lifetime ----------------------------------------------------------

    def close(self) -> None:
        """Close the database (idempotent)."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Conversation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _put(self, turn: int, role: str, text: str) -> None:
        self.write(lambda db: db.execute(UPSERT_MESSAGE, (self.session, turn, role, text, time.time())))

    def write(self, change: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``change(db)`` in one transaction (all or nothing), under the lock; return its result.

        A write that fails because the file became unwritable (read-only file
        system, full disk, vanished folder) does not stop the conversation: the
        history moves to an in-memory copy, ``degraded`` says why, the
        ``on_degraded`` callback hears it once, and ``change`` runs again there.
        Other SQLite failures become ConfigError naming the file.
        """
        with self._lock:
            for attempt in (1, 2):
                try:
                    self._db.execute("BEGIN IMMEDIATE")
                    try:
                        result = change(self._db)
                    except BaseException:
                        self._db.execute("ROLLBACK")
                        raise
                    self._db.execute("COMMIT")
                    return result
                except sqlite3.OperationalError as exc:
                    if attempt == 2 or self.degraded or not _is_unwritable(exc):
                        raise ConfigError(f"conversation history {self.path}: {exc}") from exc
                    self._degrade(str(exc))
                except sqlite3.Error as exc:
                    raise ConfigError(f"conversation history {self.path}: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _degrade(self, reason: str) -> None:
        """Go on in memory with a copy of everything stored so far (called with the lock held)."""
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")
        memory = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        self._db.backup(memory)
        self._db.close()
        self._db = memory
        self.degraded = f"cannot write {self.path} ({reason}); this conversation is kept in memory only"
        if self.on_degraded is not None:
            self.on_degraded(self.degraded)

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """The connection for reading, under the lock; SQLite failures become ConfigError."""
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as exc:
                raise ConfigError(f"conversation history {self.path}: {exc}") from exc


def _is_unwritable(exc: sqlite3.OperationalError) -> bool:
    """Whether a failed write means the file can no longer be written (as opposed to a bad query)."""
    text = str(exc).lower()
    return any(words in text for words in ("readonly", "read-only", "disk i/o", "full", "unable to open"))


class _Corrupt(Exception):
    """The file exists but is not a sound SQLite database."""


def _open(path: Path) -> sqlite3.Connection:
    """Open or create the database; raise _Corrupt or ConfigError."""
    try:
        db = sqlite3.connect(
            path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise ConfigError(f"cannot open conversation history {path}: {exc}") from exc
    try:
        db.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode survives a process crash; only power loss can undo
        # the last commits, which is an acceptable price for a chat history.
        db.execute("PRAGMA synchronous = NORMAL")
        db.executescript(_SCHEMA)
        (check,) = db.execute("PRAGMA quick_check").fetchone()
        if check != "ok":
            raise _Corrupt(str(check))
    except _Corrupt:
        db.close()
        raise
    except sqlite3.OperationalError as exc:
        # Locked, read-only or vanished: the file may be fine, so never move it.
        db.close()
        raise ConfigError(f"cannot use conversation history {path}: {exc}") from exc
    except sqlite3.DatabaseError as exc:
        db.close()
        raise _Corrupt(str(exc)) from exc
    return db


def _move_aside(path: Path) -> Path:
    """Rename a corrupt database and its WAL files out of the way; return the new name."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    serial = 1
    while aside.exists():  # two recoveries within a second must not overwrite
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{serial}")
        serial += 1
    try:
        path.rename(aside)
        for suffix in ("-wal", "-shm"):
            companion = path.with_name(path.name + suffix)
            if companion.exists():
                companion.rename(aside.with_name(aside.name + suffix))
    except OSError as exc:
        raise ConfigError(f"cannot move corrupt conversation history {path} aside: {exc}") from exc
    return aside
