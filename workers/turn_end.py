"""How long a silence ends the user's turn, judged from the words said so far.

A fixed window is wrong both ways: after "What is the capital of France?" every
millisecond of waiting is latency, while after "Set a timer for…" a person is
still choosing the number. So the listener asks, at each pause, for the window
that fits the guess it has:

* **incomplete** — the words end on one that cannot end an English request: an
  article, preposition, conjunction, possessive, auxiliary, a filler ("um"), a
  number that may go on ("twenty…"), or a trailing comma, dash or ellipsis.
  Recognizers punctuate what they hear, so "What is the capital of." still ends
  on "of". → the long window. Two such words end a request after all: an
  auxiliary closing a question that put one before its subject ("How many legs
  does a spider have?", "Do you know where it is?"; "How many legs does?" is cut
  off), and "please" closing a sentence of three words or more.
* **complete** — a question mark, or a sentence end after a few words whose last
  word could end it. → the short window.
* complete-looking, but the recognizer is unsure of the words (its confidence
  below ``complete_confidence``) → the base window. At a pause inside a phrase
  whisper often drops the dangling word and punctuates the rest ("What is the
  capital of" → "What is the capital?"): on the tuning set 84 of 224 such
  fragments read as complete sentences, with a median confidence of 0.54
  against 0.77 for real ends. Requiring 0.55 halves them (41) and costs the
  short window to 26 of 205 real ends.
* complete-looking, but a chat model finds that a message seldom ends with these
  words (``workers/llm/message_end.py``: the log-probability of the user's
  message ending there below ``message_end_below``) → the long window. Whisper
  confidently reads many fragments as whole sentences; the model weighs the
  words themselves. Measured at -20 on the judge split (10 espeak-ng voices,
  56 sentences, fragments said alone and cut out of the sentence;
  ``scripts/eval_turn_end.py``): 47 % of fragments get the long window against
  32 % from the words alone, and 7.5 % of whole sentences against 4.5 %. The
  tuning split chose the threshold.
* anything else (a single word, no punctuation) → the base window.
* no words yet — the recognizer is still reading the pause — → *undecided*: the
  turn does not end on silence alone (up to ``undecided_ms``), because a
  decision without the words would cut off "set a timer for…" whenever the
  recognizer is slower than the base window (as it is on a busy machine).

Text rules miss prosody (a rising "and…?"), so the long window is generous and
the short one is not zero: the cost of a wrong "complete" is an answer that
starts before the person has finished, which is what the long window exists to
prevent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from voicebus.engine.errors import ConfigError

if TYPE_CHECKING:
    from .config import VadSettings

CONTINUES = frozenset(
    """a an the of for to in on at by with from about into onto than as like via per
    and or but nor so because if that when while whereas although though unless until since
    my your his her its our their this these those some any every each no which whose
    is are was were be been being am can could would should will shall may might must
    do does did have has had what how where who whom why whether
    um uh er erm hmm uhm mm
    please let me just
    twenty thirty forty fifty sixty seventy eighty ninety hundred thousand million point""".split()
)
"""Words after which an English request goes on."""

_AUXILIARIES = frozenset("is are was were am be been can could would should will do does did have has had".split())

_WORD = re.compile(r"[a-z0-9']+")
_ROUND_NUMBER = re.compile(r"[2-9]0|[1-9]00|[1-9]000")
"""Digits that may go on as "twenty…" does ("20" → "24"): recognizers write numbers as digits."""
_TRAILING_OPEN = re.compile(r"(,|-|–|—|\.\.\.|…)\s*$")


def completeness(text: str) -> str:
    """``complete``, ``incomplete`` or ``unknown`` for the words heard so far."""
    stripped = text.strip()
    words = _WORD.findall(stripped.lower())
    if not words:
        return "unknown"
    goes_on = words[-1] in CONTINUES and not _ends_anyway(words, stripped)
    if _TRAILING_OPEN.search(stripped) or goes_on or _ROUND_NUMBER.fullmatch(words[-1]):
        return "incomplete"
    if stripped.endswith("?") or (stripped.endswith((".", "!")) and len(words) >= 2):
        return "complete"
    return "unknown"


def _ends_anyway(words: list[str], text: str) -> bool:
    """Whether a word of CONTINUES ends this request (see the module doc)."""
    if words[-1] in _AUXILIARIES:
        return text.endswith("?") and any(word in _AUXILIARIES for word in words[:-1])
    return words[-1] == "please" and len(words) >= 3 and text.endswith((".", "!", "?"))


@dataclass(frozen=True)
class EndOfTurn:
    """The silence windows (ms) for each verdict; ``adaptive=False`` always uses ``base_ms``."""

    base_ms: int = 500
    complete_ms: int = 300
    incomplete_ms: int = 1400
    adaptive: bool = True
    undecided_ms: int = 1500
    """the window while the words of a pause are not known yet"""
    complete_confidence: float = 0.55
    """the recognizer's confidence below which complete-looking words get the base window, not the short one"""
    message_end_below: float | None = -20.0
    """the log-probability of the message ending there (``workers/llm/message_end.py``) below which words that
    read complete get the long window; None: not asked"""

    def __post_init__(self) -> None:
        if not 0 <= self.complete_confidence <= 1:
            raise ConfigError(f"vad.complete_confidence must be between 0 and 1, got {self.complete_confidence}")
        if self.message_end_below is not None and not self.message_end_below < 0:
            # (a probability written here, 0.01, would give every complete-looking request the long window)
            raise ConfigError(f"vad.message_end_below is a natural log, below 0 (-20 is e^-20), "
                              f"got {self.message_end_below}")

    def asks_the_model(self, text: str) -> bool:
        """Whether ``window_ms`` would use the chat model's view of these words (``end_logprob``)."""
        return self.adaptive and self.message_end_below is not None and completeness(text) == "complete"

    def window_ms(self, text: str | None, confidence: float | None = None, end_logprob: float | None = None) -> int:
        """The window for the words heard so far (None: no words, e.g. speech going on), given the
        recognizer's confidence in them (None: it gives none, as streaming recognizers do) and the
        log-probability that a message ends with them (None: not asked)."""
        if not self.adaptive or text is None:
            return self.base_ms
        verdict = completeness(text)
        if verdict == "complete":
            if end_logprob is not None and self.message_end_below is not None and end_logprob < self.message_end_below:
                return max(self.incomplete_ms, self.base_ms)
            if confidence is not None and confidence < self.complete_confidence:
                return self.base_ms
            return min(self.complete_ms, self.base_ms)
        if verdict == "incomplete":
            return max(self.incomplete_ms, self.base_ms)
        return self.base_ms

    @classmethod
    def from_settings(cls, vad: VadSettings) -> EndOfTurn:
        return cls(vad.silence_ms, vad.complete_ms, vad.incomplete_ms, adaptive=vad.adaptive,
                   undecided_ms=vad.undecided_ms, complete_confidence=vad.complete_confidence,
                   message_end_below=vad.message_end_below if vad.message_end else None)

    def waiting_ms(self) -> int:
        """The window while the recognizer reads a pause (adaptive only: else the base window)."""
        return max(self.undecided_ms, self.base_ms) if self.adaptive else self.base_ms
