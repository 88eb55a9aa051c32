"""The embedded piper voice as the tests use it to speak questions."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from voicebus.workers.tts.piper import PiperSynthesizer


def steady_piper() -> PiperSynthesizer:
    """Piper without its noise draw: it samples noise on every call, so the same text sounded different
    each run and what whisper heard depended on the draw (CI once heard "France" as "friends")."""
    from piper import SynthesisConfig

    from voicebus.workers.tts.piper import PiperSynthesizer

    voice = PiperSynthesizer()
    voice._syn_config = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)
    return voice
