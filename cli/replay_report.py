"""How a replay compares with its recording: turns paired, latencies and texts judged, the report."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from voicebus.cli.show import TurnStory

# --- comparing --------------------------------------------------------------------------------


TEXT_MATCH = ("exact", "words", "loose", "ignore")
STAGES = (
    ("asr", "asr_s"),
    ("first token", "first_token_s"),
    ("first sentence", "first_sentence_s"),
    ("first audio", "first_audio_s"),
    ("speech end → audio", "speech_end_to_audio_s"),
    ("request → audio", "request_to_audio_s"),
)
"""Latencies compared (the speaker's metrics names)."""
SHOWN = (("silence window", "silence_s"), ("speculation saved", "speculation_saved_s"))
"""Shown, never judged: a setting, and a saving."""


@dataclass(frozen=True)
class Tolerances:
    max_latency_ratio: float = 2.0
    """a stage may take up to this many times as long as it did then…"""
    latency_slack_s: float = 0.5
    """…or this much longer, whichever allows more (small stages jitter by more than their size)"""
    text_match: str = "words"
    answer_match: str = "words"
    timing: bool = True
    """judge latencies and turn-taking (not with --fast: the user's side did not keep its timing)"""


def words(text: str) -> list[str]:
    return re.findall(r"[\w']+", text.lower())


def same_text(a: str, b: str, how: str) -> bool:
    if how == "ignore":
        return True
    if how == "exact":
        return a.strip() == b.strip()
    if how == "words":
        return words(a) == words(b)
    return difflib.SequenceMatcher(a=words(a), b=words(b)).ratio() >= 0.8


def parting(a: str, b: str, context: int = 2, shown: int = 8) -> str:
    """Where two texts part, word by word: the table's cells, cut to a column, often show the same start."""
    wa, wb = a.split(), b.split()
    same = next((i for i, (x, y) in enumerate(zip(wa, wb)) if words(x) != words(y)), min(len(wa), len(wb)))
    how = ""
    if same == len(wa) == len(wb):  # the same words: they part in punctuation or case, or only in spaces
        same = next((i for i, (x, y) in enumerate(zip(wa, wb)) if x != y), same)
        how = "in punctuation or case " if same < len(wa) else "in spacing only "
    start = max(0, same - context)

    def part(ws: list[str]) -> str:
        text = " ".join(ws[start : start + shown]) or "(nothing more)"
        return ("…" if start else "") + text + ("…" if len(ws) > start + shown else "")

    where = f"from word {same + 1}: " if same < max(len(wa), len(wb)) and same else ""
    return f"{how}{where}{part(wa)!r} then, {part(wb)!r} now"


@dataclass
class Comparison:
    """One turn, then and now."""

    source: str
    then: TurnStory | None
    now: TurnStory | None
    as_text: bool = False
    """a voice turn replayed as its recorded words (the recording has no audio)"""
    latencies: list[dict[str, Any]] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source, "replayed_as_text": self.as_text,
            "then": self.then.summary() if self.then else None, "now": self.now.summary() if self.now else None,
            "latencies": self.latencies, "differences": self.differences, "notes": self.notes,
        }


def pair_turns(then: list[TurnStory], now: list[TurnStory], asked: dict[int, int], has_audio: bool
               ) -> list[Comparison]:
    """Then and now turns side by side: questions by the ids replay gave them, voice turns in order."""
    by_turn = {s.turn: s for s in now}
    used: set[int] = set()
    out = []
    now_voice = iter([s for s in now if s.source == "voice"])
    for story in then:
        if story.source == "voice" and has_audio:
            match = next(now_voice, None)
            as_text = False
        elif story.source in ("voice", "text", "say"):
            match = by_turn.get(asked.get(story.turn, -1))
            as_text = story.source == "voice"
        else:
            continue
        if match is not None:
            used.add(match.turn)
        out.append(Comparison(story.source, story, match, as_text))
    for story in now:
        if story.source and story.turn not in used:
            out.append(Comparison(story.source, None, story))
    return out


def compare(c: Comparison, tol: Tolerances) -> Comparison:
    then, now = c.then, c.now
    if then is None:
        assert now is not None
        c.differences.append(f"an extra turn now: heard {now.heard or now.nomatch!r}")
        return c
    if now is None:
        c.differences.append(f"no turn now for {then.heard or then.nomatch!r}")
        return c
    if not c.as_text and not same_text(then.heard, now.heard, tol.text_match):
        c.differences.append(f"heard differs: {then.heard!r} then, {now.heard!r} now")
    # Without the recorded timing (--fast), how turns ended and overlapped is reported, not judged.
    timing = c.differences if tol.timing else c.notes
    if not then.finish:
        # A recording that stopped mid-turn (a recorder killed): what it does not show is not judged.
        c.notes.append("the recording ends before this turn did: only what it shows is compared")
    elif not same_text(then.answer, now.answer, tol.answer_match):
        (c.differences if tol.timing or then.finish == now.finish else c.notes).append(
            f"answer differs: {parting(then.answer, now.answer)}")
    if now.errors and not then.errors:  # a failure is a difference however the turns were timed
        c.differences.append(f"failed now: {now.errors[0]}")
    if then.finish and (then.finish, then.outcome or now.outcome) != (now.finish, now.outcome):
        timing.append(f"ended differently: {then.finish or '–'}/{then.outcome or '–'} then, "
                      f"{now.finish or '–'}/{now.outcome or '–'} now")
    if then.barge_ins != now.barge_ins:
        timing.append(f"barge-ins: {then.barge_ins} then, {now.barge_ins} now")
    if (len(then.guesses), len(then.revoked)) != (len(now.guesses), len(now.revoked)):
        c.notes.append(f"guesses (revoked): {len(then.guesses)} ({len(then.revoked)}) then, "
                       f"{len(now.guesses)} ({len(now.revoked)}) now")
    before, after = then.latencies(), now.latencies()
    for label, key in STAGES + SHOWN:
        if key not in before and key not in after:
            continue
        a, b = before.get(key), after.get(key)
        row: dict[str, Any] = {"stage": label, "key": key, "then": a, "now": b, "ratio": None, "over": False}
        if a is not None and b is not None:
            row["ratio"] = round(b / a, 3) if a > 0 and b >= 0 else None  # negative: it did not wait at all
            judged = (label, key) in STAGES and tol.timing
            allowed = max(a * tol.max_latency_ratio, a + tol.latency_slack_s)
            row["over"] = judged and b > allowed
            if row["over"]:
                c.differences.append(f"{label} took {b * 1000:.0f} ms, {a * 1000:.0f} ms then "
                                     f"(over ×{tol.max_latency_ratio:g} or +{tol.latency_slack_s * 1000:.0f} ms)")
        c.latencies.append(row)
    return c


# --- the report -------------------------------------------------------------------------------


COL = 34


def _cell(text: str, width: int = COL) -> str:
    """``text`` on one line, cut to leave a space before the next column."""
    text = " ".join(str(text).split())
    return (text if len(text) < width else text[: width - 2] + "…").ljust(width)


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value * 1000:.0f} ms"


def report_lines(comparisons: list[Comparison]) -> list[str]:
    lines = []
    for number, c in enumerate(comparisons, 1):
        title = f"turn {number} · {c.source}{' (replayed as text)' if c.as_text else ''}"
        lines.append("")
        lines.append(f"{title:<24}{_cell('then')}{_cell('now')}")
        then, now = c.then, c.now

        def row(label: str, get: Callable[[TurnStory], str], extra: str = "") -> None:
            a = get(then) if then else "—"
            b = get(now) if now else "—"
            lines.append(f"  {label:<22}{_cell(a)}{_cell(b)}{extra}".rstrip())

        row("heard", lambda s: s.heard or f"({s.nomatch or 'nothing'})")
        row("answer", lambda s: s.answer or "(none)")
        row("ended", lambda s: f"{s.finish or '–'}, {s.outcome or '–'}")
        row("guesses (revoked)", lambda s: f"{len(s.guesses)} ({len(s.revoked)})")
        row("barge-ins", lambda s: str(s.barge_ins))
        for lat in c.latencies:
            ratio = f"×{lat['ratio']:.2f}" if lat["ratio"] is not None else ""
            flag = "  ✗" if lat["over"] else ""
            lines.append(f"  {lat['stage']:<22}{_cell(_ms(lat['then']))}{_cell(_ms(lat['now']), 12)}{ratio}{flag}"
                         .rstrip())
        for diff in c.differences:
            lines.append(f"  ✗ {diff}")
        for note in c.notes:
            lines.append(f"  · {note}")
    return lines


def describe_backends(backends: dict[str, str]) -> str:
    return " ".join(f"{k}={backends[k]}" for k in ("asr", "llm", "tts") if k in backends) or "backends unknown"
