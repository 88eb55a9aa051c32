"""Does an utterance ask to end the conversation?

Only an utterance that is *nothing but* a stop phrase counts: "Stop." or
"Goodbye!" ends the conversation, "How do I stop a nosebleed?" does not.
Recognizers and people add a little around the phrase, so before comparing we
drop politeness and filler words ("okay, stop please", "stop, thank you"),
repetitions ("stop stop") and the spaces inside a phrase ("good bye" is
"goodbye", "bye bye" is "byebye").
"""

from __future__ import annotations

import re
from collections.abc import Iterable

FILLER = frozenset(
    "please ok okay now just um uh oh hey well so right alright thanks thank you voicebus assistant".split()
)
"""Words that may stand around a stop phrase without changing what it asks."""


_SENTENCES = re.compile(r"(?<=[.!?])\s+")
"""Where one sentence of a transcript ends and the next begins."""


def normalize(text: str) -> str:
    """Lower case, punctuation dropped, spaces folded."""
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def _core(text: str) -> str:
    """The utterance without filler words and repeats, with no spaces."""
    words = [w for w in normalize(text).split() if w not in FILLER]
    deduped = [w for i, w in enumerate(words) if i == 0 or w != words[i - 1]]
    return "".join(deduped)


class StopPhrases:
    """The configured phrases, compared the forgiving way described above."""

    def __init__(self, phrases: Iterable[str]) -> None:
        self.phrases = {_core(p) for p in phrases if _core(p)}

    def matches(self, text: str) -> bool:
        core = _core(text)
        return bool(core) and core in self.phrases

    def asked(self, words: str, alone: str | None) -> str:
        """What an utterance asks: its ``words``, or the stop phrase its own audio says ``alone`` — heard without
        the words of the utterance it goes on from (``Final.alone``, ``workers/hearing.py``)."""
        return alone if alone is not None and self.matches(alone) else words

    def closing(self, text: str) -> str | None:
        """The stop phrase ``text`` ends with, in sentences of its own ("What is it? Stop.", "… Stop. Thank
        you."), or all of ``text`` if it is one; None if neither."""
        sentences = _SENTENCES.split(text.strip())
        for first in range(len(sentences)):
            tail = " ".join(sentences[first:])
            if self.matches(tail):
                return tail
        return None
