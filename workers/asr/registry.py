"""Pick a speech recognition backend by name.

Each backend's module is imported only when it is opened, so a deployment that
uses one backend never needs the others' packages. A new backend is one factory
function and one entry in ``_BACKENDS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from voicebus.engine.errors import ConfigError
from voicebus.workers.asr.base import Recognizer


@dataclass(frozen=True)
class RecognizerOptions:
    """What every backend factory is given; each uses what it needs."""

    language: str
    """BCP-47 tag, e.g. "en-US"."""
    cache_dir: Path
    """Where a backend may keep files it builds once (assembled models)."""
    progress: Callable[[str], None] | None = None
    """Receives one-line status messages during slow one-time work."""


def _open_pocketsphinx(options: RecognizerOptions) -> Recognizer:
    from voicebus.workers.asr.pocketsphinx import PocketsphinxRecognizer

    return PocketsphinxRecognizer(options.language)


def _open_whisper(options: RecognizerOptions) -> Recognizer:
    from voicebus.workers.asr.whisper import WhisperRecognizer

    return WhisperRecognizer(options.language, cache_dir=options.cache_dir, progress=options.progress)


_BACKENDS: dict[str, Callable[[RecognizerOptions], Recognizer]] = {
    "pocketsphinx": _open_pocketsphinx,
    "whisper": _open_whisper,
}


def known_recognizers() -> list[str]:
    """Names ``open_recognizer`` accepts."""
    return sorted(_BACKENDS)


def open_recognizer(
    name: str,
    *,
    language: str,
    cache_dir: Path,
    progress: Callable[[str], None] | None = None,
) -> Recognizer:
    """Open the ASR backend ``name`` for ``language``.

    Raises ConfigError listing the known names when ``name`` is unknown, and
    whatever the backend raises (MissingExtraError, ModelError, ConfigError)
    when it cannot be opened.
    """
    try:
        factory = _BACKENDS[name]
    except KeyError:
        raise ConfigError(
            f"unknown ASR backend {name!r}; known: {', '.join(known_recognizers())}"
        ) from None
    return factory(RecognizerOptions(language=language, cache_dir=Path(cache_dir), progress=progress))
