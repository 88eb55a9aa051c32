"""Pick a text-to-speech backend by name.

Each backend's module is imported only when it is opened, so a deployment that
uses one backend never needs the others' packages.
"""

from __future__ import annotations

from collections.abc import Callable

from voicebus.engine.errors import ConfigError
from voicebus.workers.tts.base import Synthesizer


def _open_piper(voice: str | None) -> Synthesizer:
    from voicebus.workers.tts.piper import PiperSynthesizer

    return PiperSynthesizer(voice)


_BACKENDS: dict[str, Callable[[str | None], Synthesizer]] = {
    "piper": _open_piper,
}


def known_synthesizers() -> list[str]:
    """Names ``open_synthesizer`` accepts."""
    return sorted(_BACKENDS)


def open_synthesizer(name: str, *, voice: str | None = None) -> Synthesizer:
    """Open the TTS backend ``name`` with ``voice`` (None: the backend's default).

    Raises ConfigError listing the known names when ``name`` is unknown.
    """
    try:
        factory = _BACKENDS[name]
    except KeyError:
        raise ConfigError(
            f"unknown TTS backend {name!r}; known: {', '.join(known_synthesizers())}"
        ) from None
    return factory(voice)
