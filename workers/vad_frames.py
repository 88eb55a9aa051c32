"""Is this 20 ms frame speech? Two answers for the endpointer (``vad``) to build turns on.

* ``webrtc`` — webrtcvad (a GMM on spectral features). Cheap and quick, but it
  calls any steady sound speech: in babble or 10–15 dB of noise it never hears a
  pause, and an utterance runs on until the input ends.
* ``silero`` (the default) — silero VAD v6, a small neural network, run with
  onnxruntime (which piper already brings) on the ONNX file faster-whisper ships
  in its package (``faster_whisper/assets``). It tells speech from noise, and its
  probability falls within a chunk or two after the voice stops. ~0.2 ms per
  32 ms chunk here. With whisper on unseen voices (scripts/eval_asr.py) it raised
  word accuracy at 15 dB SNR from 0.55 to 0.68 and halved the utterances split
  in two by noise.

Both report, besides the label, how many frames they may still call speech
after a sound ends (``hangover_frames``), which the endpointer discounts so that
its windows mean real sound and real silence.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

from voicebus.engine.errors import ConfigError, ModelError

from .audio.pcm import RATE

ENGINES = ("silero", "webrtc")
WEBRTC_HANGOVER_FRAMES = {0: 8, 1: 8, 2: 6, 3: 6}
"""Most 20 ms frames webrtcvad (webrtcvad-wheels 2.0.14) still calls voiced after a
sound ends, by aggressiveness: measured with noise bursts of 60-400 ms."""


class FrameClassifier(Protocol):
    hangover_frames: int

    def is_speech(self, frame: bytes) -> bool:
        """Whether this 640-byte frame (20 ms, 16 kHz int16 mono) is speech."""


class WebrtcFrames:
    def __init__(self, aggressiveness: int = 2) -> None:
        import webrtcvad

        if aggressiveness not in WEBRTC_HANGOVER_FRAMES:
            raise ConfigError(f"VAD aggressiveness must be 0, 1, 2 or 3, got {aggressiveness}")
        self._vad = webrtcvad.Vad(aggressiveness)
        self.hangover_frames = WEBRTC_HANGOVER_FRAMES[aggressiveness]

    def is_speech(self, frame: bytes) -> bool:
        return bool(self._vad.is_speech(frame, RATE))


class SileroFrames:
    """silero VAD on a stream of 20 ms frames (it reads 32 ms chunks with 4 ms of context).

    A frame's label is the probability of the newest chunk, with silero's usual
    hysteresis: speech from ``threshold`` up, silence only below ``threshold - 0.15``.
    """

    CHUNK = 512
    CONTEXT = 64
    SILERO_HANGOVER_FRAMES = 5
    """Most frames still labelled speech after the last sound (16 espeak-ng utterances, 4 voices: max 5,
    median 4; webrtcvad at aggressiveness 2: max 7, median 6)."""

    def __init__(self, threshold: float = 0.5) -> None:
        import onnxruntime

        path = silero_model_path()
        options = onnxruntime.SessionOptions()
        options.inter_op_num_threads = 1
        options.intra_op_num_threads = 1  # a 0.2 ms model: threads would only spin
        options.log_severity_level = 4
        try:
            self._session = onnxruntime.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for a bad file
            raise ModelError(f"cannot load the silero VAD model {path}: {exc}") from exc
        self.threshold = threshold
        self.hangover_frames = self.SILERO_HANGOVER_FRAMES
        self._state = np.zeros((2, 1, 1, 128), np.float32)
        self._context = np.zeros(self.CONTEXT, np.float32)
        self._pending = np.zeros(0, np.float32)
        self._speaking = False

    def is_speech(self, frame: bytes) -> bool:
        samples = np.frombuffer(frame, dtype="<i2").astype(np.float32) / 32768.0
        self._pending = np.concatenate([self._pending, samples])
        while self._pending.size >= self.CHUNK:
            chunk, self._pending = self._pending[: self.CHUNK], self._pending[self.CHUNK :]
            probability = self._run(chunk)
            if probability >= self.threshold:
                self._speaking = True
            elif probability < self.threshold - 0.15:
                self._speaking = False
        return self._speaking

    def _run(self, chunk: np.ndarray) -> float:
        model_input = np.concatenate([self._context, chunk])[None, :]
        output, h, c = self._session.run(None, {"input": model_input, "h": self._state[0], "c": self._state[1]})
        self._state = np.stack([h, c])
        self._context = chunk[-self.CONTEXT :]
        return float(output.reshape(-1)[0])


def silero_model_path() -> str:
    """The silero VAD ONNX file inside the installed faster-whisper package."""
    try:
        import faster_whisper
    except ImportError as exc:
        raise ModelError("the silero VAD model ships in the 'faster-whisper' package: pip install faster-whisper") from exc
    path = os.path.join(os.path.dirname(faster_whisper.__file__), "assets", "silero_vad_v6.onnx")
    if not os.path.isfile(path):
        raise ModelError(f"silero VAD model not found at {path} (faster-whisper changed?); use vad.engine = webrtc")
    return path


def open_classifier(engine: str, aggressiveness: int = 2) -> FrameClassifier:
    if engine == "silero":
        return SileroFrames()
    if engine == "webrtc":
        return WebrtcFrames(aggressiveness)
    raise ConfigError(f"unknown VAD engine {engine!r}; choose from {', '.join(ENGINES)}")

