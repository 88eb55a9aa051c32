"""faster-whisper "base" speech recognition (optional extra ``whisper``).

Whisper reads a whole utterance at once, so ``feed`` only buffers and ``end``
does all the work: its cost lands after the user stops speaking. Measured on
2 busy cores with int8: about 0.7 s for a 2 s question and 1.0 s for 6 s of
speech with beam 5; greedy decoding (beam 1) saved only 0.05–0.3 s and got one
of 20 TTS test questions worse ("Add no-can-eggs" for "Add milk and eggs"), so
beam 5 is the default.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from voicebus.engine.errors import BackendError, ConfigError, ModelError, require_module
from voicebus.workers.asr.base import SAMPLE_RATE, Transcript
from voicebus.workers.asr.whisper_model import ensure_whisper_model

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

_MIN_SAMPLES = SAMPLE_RATE // 10
"""Less than 0.1 s of audio holds no word; skip the model's fixed cost."""


def whisper_language(language: str) -> str:
    """Whisper's code for a BCP-47 tag: ``en-US`` → ``en``."""
    return language.replace("_", "-").split("-", 1)[0].strip().lower()


class WhisperRecognizer:
    """Buffer an utterance, then transcribe it with faster-whisper base on the CPU."""

    name = "whisper"

    def __init__(
        self,
        language: str = "en-US",
        *,
        cache_dir: Path,
        compute_type: str = "int8",
        threads: int = 0,
        progress: Callable[[str], None] | None = None,
        beam_size: int = 5,
    ) -> None:
        """Assemble the model into ``cache_dir`` if needed (once) and load it.

        ``threads`` 0 lets CTranslate2 choose. Raises MissingExtraError when the
        ``whisper`` extra is not installed, ModelError when the model cannot be
        assembled or loaded, ConfigError for a language whisper does not know.
        """
        faster_whisper = require_module(
            "faster_whisper", package="faster-whisper", extra="whisper", purpose="the whisper recognizer"
        )
        if beam_size < 1:
            raise ConfigError(f"whisper beam size must be at least 1, got {beam_size}")
        model_dir = ensure_whisper_model(cache_dir, progress)
        try:
            model: WhisperModel = faster_whisper.WhisperModel(
                str(model_dir),
                device="cpu",
                compute_type=compute_type,
                cpu_threads=threads,
                local_files_only=True,
            )
        except (RuntimeError, ValueError, OSError) as exc:
            raise ModelError(f"cannot load the whisper model from {model_dir}: {exc}") from exc
        code = whisper_language(language)
        if code not in model.supported_languages:
            raise ConfigError(
                f"whisper does not know language {language!r}; use a tag such as en-US, de-DE or "
                f"fr-FR ({len(model.supported_languages)} languages: "
                f"{', '.join(sorted(model.supported_languages))})"
            )
        self._model: WhisperModel | None = model
        self.language = language
        self.beam_size = beam_size
        self._whisper_language = code
        self._audio = bytearray()

    def begin(self) -> None:
        """Start a new utterance."""
        self._audio.clear()

    def feed(self, pcm: bytes) -> str | None:
        """Buffer audio; whisper has no partial results, so always None."""
        self._audio += pcm
        return None

    def end(self) -> Transcript:
        """Transcribe the buffered utterance (blocks for the model's run)."""
        import numpy as np

        if self._model is None:
            raise BackendError("whisper recognizer is closed")
        usable = len(self._audio) - len(self._audio) % 2
        samples = np.frombuffer(bytes(self._audio[:usable]), dtype="<i2").astype(np.float32) / 32768.0
        self._audio.clear()
        if samples.size < _MIN_SAMPLES:
            return Transcript("")
        try:
            segments, _info = self._model.transcribe(
                samples,
                language=self._whisper_language,
                beam_size=self.beam_size,
                vad_filter=False,
                # One utterance: no earlier text to condition on, no timestamps to predict.
                condition_on_previous_text=False,
                without_timestamps=True,
            )
            segments = list(segments)  # the generator does the decoding
        except (RuntimeError, ValueError) as exc:
            raise BackendError(f"whisper failed to transcribe: {exc}") from exc
        text = " ".join(s.text.strip() for s in segments if s.text.strip())
        if not text:
            return Transcript("")
        # avg_logprob is the mean token log-probability; weight segments by length.
        weights = [max(s.end - s.start, 1e-3) for s in segments]
        mean_logprob = sum(w * s.avg_logprob for w, s in zip(weights, segments)) / sum(weights)
        return Transcript(text, min(1.0, math.exp(mean_logprob)))

    def close(self) -> None:
        """Drop the model; CTranslate2 frees it with the last reference."""
        self._model = None
        self._audio.clear()
