"""The text-to-speech interface every TTS backend implements.

Output is mono little-endian int16 PCM at ``sample_rate``, yielded in chunks as
soon as they are synthesized so playback can start before the sentence is done.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol


class Synthesizer(Protocol):
    name: str
    sample_rate: int
    """Hertz of the PCM that ``synthesize`` yields."""

    def synthesize(self, text: str) -> Iterator[bytes]:
        """Yield int16 mono PCM chunks for ``text``."""

    def close(self) -> None:
        """Release the model/connection."""
