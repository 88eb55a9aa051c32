"""PocketSphinx 5 streaming speech recognition, the embedded default.

The US English acoustic model, language model and CMU dictionary ship inside
the ``pocketsphinx`` wheel, so this works offline with nothing else installed.
Audio is decoded as it is fed, so the final result is ready a few milliseconds
after the last frame.

Tuning, measured on 20 piper (joe voice) questions and commands, 16 kHz
(word accuracy = share of the reference's words recognized):

* ``fwdflat=False``: the default second "flat" pass runs inside ``end_utt`` over
  the whole utterance — 60–170 ms after the last frame — and did not change the
  word accuracy (0.89 either way). Without it the final takes ~5–20 ms.
* ``bestpath`` stays on: its lattice rescoring is cheap without fwdflat and
  gives the word posteriors used as confidence.
* 200 ms of silence is decoded at the start of each utterance: the model
  expects silence before the first word, and the VAD may start the utterance
  right at it. Without it first words were lost ("Tell me a joke" heard as
  "well made that joke"): over the 20 phrases fed in 4 orders, word accuracy
  was 0.75 with no lead-in and 0.81 with it. 100–300 ms, and faint hiss
  instead of digital zeros, were the same within the noise (0.80–0.84).
* The other defaults (language weight 6.5, beams) were best or equal among the
  variants tried (lw 4.5–10, wider beams, word insertion penalty).

Known weaknesses: results depend a little on earlier utterances (the cepstral
mean adapts as it goes); a lone short word is fragile — piper's "Stop." was
misheard in some renderings, while "Please stop." and "Stop the music." were
right. Whisper got all of them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from voicebus.engine.errors import BackendError, ConfigError, ModelError
from voicebus.workers.asr.base import SAMPLE_RATE, Transcript

if TYPE_CHECKING:
    from pocketsphinx import Decoder

SUPPORTED_LANGUAGE = "en-US"
_LEAD_IN = b"\0\0" * (SAMPLE_RATE // 5)
"""Decoded before the user's audio (see the module docstring)."""


def _is_english(language: str) -> bool:
    return language.replace("_", "-").split("-", 1)[0].strip().lower() == "en"


def _is_word(token: str) -> bool:
    """Whether a segment is a spoken word, not <s>, </s>, <sil> or a [NOISE] filler."""
    return not token.startswith(("<", "[", "+"))


class PocketsphinxRecognizer:
    """Decode 16 kHz int16 PCM while it arrives; partial results as they change."""

    name = "pocketsphinx"

    def __init__(self, language: str = SUPPORTED_LANGUAGE, *, partial_interval_ms: int = 200) -> None:
        """Load the packaged US English model (about 0.4 s).

        Any English tag is accepted (the model is US English); another language
        raises ConfigError. ``partial_interval_ms`` is how much audio passes
        between hypothesis checks: asking for one costs a backtrace, so not
        every 20 ms frame. Raises ModelError if the model cannot be loaded.
        """
        if not _is_english(language):
            raise ConfigError(
                f"pocketsphinx supports only {SUPPORTED_LANGUAGE} (its packaged model), "
                f"not {language!r}; pick another ASR backend (e.g. whisper) for it"
            )
        from pocketsphinx import Decoder, get_model_path

        model = os.path.join(get_model_path(), "en-us")
        files = {
            "hmm": os.path.join(model, "en-us"),
            "lm": os.path.join(model, "en-us.lm.bin"),
            "dict": os.path.join(model, "cmudict-en-us.dict"),
        }
        for path in files.values():
            if not os.path.exists(path):
                raise ModelError(
                    f"pocketsphinx model file missing: {path}; reinstall: pip install --force-reinstall pocketsphinx"
                )
        try:
            self._decoder: Decoder | None = Decoder(
                samprate=SAMPLE_RATE, loglevel="ERROR", fwdflat=False, bestpath=True, **files
            )
        except (RuntimeError, ValueError) as exc:
            raise ModelError(f"cannot load the pocketsphinx model from {model}: {exc}") from exc
        self.language = language
        self._check_every = max(2, SAMPLE_RATE * 2 * partial_interval_ms // 1000)
        self._in_utterance = False
        self._carry = b""
        self._unchecked = 0
        self._last_partial = ""

    def begin(self) -> None:
        """Start a new utterance, dropping any unfinished one."""
        decoder = self._live_decoder()
        try:
            if self._in_utterance:
                decoder.end_utt()
            self._in_utterance = False
            # Live cepstral mean normalisation carries over: it adapts to the channel.
            decoder.start_utt()
            decoder.process_raw(_LEAD_IN, False, False)
        except RuntimeError as exc:
            raise BackendError(f"pocketsphinx could not start an utterance: {exc}") from exc
        self._in_utterance = True
        self._carry = b""
        self._unchecked = 0
        self._last_partial = ""

    def feed(self, pcm: bytes) -> str | None:
        """Decode ``pcm``; return the hypothesis when it changed (checked every ~200 ms).

        Feeding without ``begin`` starts an utterance.
        """
        if not self._in_utterance:
            self.begin()
        decoder = self._live_decoder()
        data = self._carry + pcm
        # Keep an odd trailing byte for next time so samples stay aligned.
        cut = len(data) - len(data) % 2
        self._carry = data[cut:]
        if cut == 0:  # process_raw rejects an empty buffer
            return None
        try:
            decoder.process_raw(data[:cut], False, False)
        except RuntimeError as exc:
            raise BackendError(f"pocketsphinx failed to decode: {exc}") from exc
        self._unchecked += cut
        if self._unchecked < self._check_every:
            return None
        self._unchecked = 0
        hyp = decoder.hyp()
        text = hyp.hypstr.strip() if hyp is not None else ""
        if not text or text == self._last_partial:
            return None
        self._last_partial = text
        return text

    def hypothesis(self) -> str:
        """The best hypothesis of the utterance so far (a guess at a pause)."""
        if not self._in_utterance or self._decoder is None:
            return ""
        hyp = self._decoder.hyp()
        return hyp.hypstr.strip() if hyp is not None else ""

    def end(self) -> Transcript:
        """Finish the utterance; confidence is the mean posterior of its words.

        ``end`` without ``begin`` returns an empty transcript.
        """
        if not self._in_utterance:
            return Transcript("")
        decoder = self._live_decoder()
        self._in_utterance = False
        try:
            decoder.end_utt()
        except RuntimeError as exc:
            raise BackendError(f"pocketsphinx failed to finish the utterance: {exc}") from exc
        hyp = decoder.hyp()
        text = hyp.hypstr.strip() if hyp is not None else ""
        if not text:
            return Transcript("")
        # The sentence posterior (hyp.prob) shrinks with every word even when all
        # are right; the mean word posterior stays comparable across lengths.
        posteriors = [min(1.0, max(0.0, s.prob)) for s in decoder.seg() if _is_word(s.word)]
        confidence = sum(posteriors) / len(posteriors) if posteriors else None
        return Transcript(text, confidence)

    def close(self) -> None:
        """Free the decoder."""
        if self._decoder is not None and self._in_utterance:
            try:
                self._decoder.end_utt()
            except RuntimeError:
                pass  # closing anyway; nothing to report
        self._in_utterance = False
        self._decoder = None

    def _live_decoder(self) -> Decoder:
        if self._decoder is None:
            raise BackendError("pocketsphinx recognizer is closed")
        return self._decoder
