"""The speech recognition interface every ASR backend implements.

Audio in is always 16 kHz mono little-endian int16 PCM (the listener converts).
A streaming recognizer decodes while audio arrives, one utterance at a time:
``begin`` → ``feed``… → ``end``. A batch recognizer (whisper) has ``transcribe``
instead, which the listener calls on a thread of its own (see ``hearing``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

SAMPLE_RATE = 16000


@dataclass(frozen=True)
class Transcript:
    """The result of one utterance."""

    text: str
    """Recognized words; empty when nothing was recognized (a no-match)."""
    confidence: float | None = None
    """0..1 where the backend gives one, else None."""


class Recognizer(Protocol):
    name: str

    def begin(self) -> None:
        """Start a new utterance (drops anything left from the previous one)."""

    def feed(self, pcm: bytes) -> str | None:
        """Decode more audio; return the new partial hypothesis if it changed, else None."""

    def hypothesis(self) -> str:
        """The best text of the utterance so far (the listener's guess at a pause); "" if none."""

    def end(self) -> Transcript:
        """Finish the utterance and return its final result."""

    def close(self) -> None:
        """Release the model/connection."""
