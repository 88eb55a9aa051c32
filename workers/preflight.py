"""Checks ``voicebus up`` makes before starting anything: one clear line instead of a crash loop.

A missing input file, an absent microphone, a mistyped model path, an unusable
state dir or bus folder, or a cloud backend without its keys would otherwise
surface as a worker failing five times in a row.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from voicebus.engine.bus import ensure_free
from voicebus.engine.endpoints import Endpoints
from voicebus.engine.errors import AudioError, ConfigError, ModelError
from voicebus.engine.security import Security
from voicebus.engine.settings import expand
from voicebus.workers.config import Settings

BACKENDS = {"asr": ("pocketsphinx", "whisper", "azure"), "llm": ("local", "openai", "azure"), "tts": ("piper", "azure")}


def missing_settings(settings: Settings, workers: Iterable[str]) -> list[str]:
    """The environment variable names of every setting a chosen backend needs and lacks."""
    workers = set(workers)
    missing: list[str] = []

    def need(value: str, name: str) -> None:
        if not value and name not in missing:
            missing.append(name)

    asr, llm, tts = settings.asr, settings.llm, settings.tts
    speech_users = [s for s, w in ((asr, "listener"), (tts, "speaker")) if s.backend == "azure" and w in workers]
    if speech_users:
        need(asr.speech_key, "SPEECH_KEY")
        if not asr.speech_region and not asr.speech_endpoint:
            missing.append("SPEECH_REGION")
    if "thinker" in workers and llm.backend == "openai":
        need(llm.model, "VOICEBUS_LLM_MODEL")
        if not llm.base_url:
            need(llm.api_key, "OPENAI_API_KEY")
    if "thinker" in workers and llm.backend == "azure":
        need(llm.azure_endpoint, "AZURE_OPENAI_ENDPOINT")
        need(llm.azure_deployment, "AZURE_OPENAI_CHAT_DEPLOYMENT")
        if not llm.azure_api_key and importlib.util.find_spec("azure.identity") is None:
            missing.append("AZURE_OPENAI_API_KEY")
    return missing


def check_backend_names(settings: Settings) -> None:
    for stage, known in BACKENDS.items():
        name = getattr(settings, stage).backend
        if name not in known:
            raise ConfigError(f"unknown {stage} backend {name!r}; choose from {', '.join(known)}")


def check_listener_settings(settings: Settings, workers: Iterable[str]) -> None:
    """Settings the listener would only find wrong once its models are loaded (and after every restart)."""
    if "listener" not in set(workers):
        return
    from voicebus.workers.turn_end import EndOfTurn
    from voicebus.workers.vad_frames import ENGINES

    if settings.vad.engine not in ENGINES:
        raise ConfigError(f"unknown VAD engine {settings.vad.engine!r}; choose from {', '.join(ENGINES)}")
    EndOfTurn.from_settings(settings.vad)  # its ConfigErrors
    if settings.asr.backend == "whisper":
        from voicebus.workers.asr.whisper import check_language

        check_language(settings.asr.language)


def check_audio(settings: Settings, workers: Iterable[str]) -> None:
    """Open the input (and check the output) once, so a bad file or missing device stops us early."""
    from voicebus.workers.audio import open_source

    workers = set(workers)
    if "listener" in workers:
        source = open_source(settings.audio.input, realtime=False)
        if source is not None:
            source.close()
    spec = settings.audio.output.strip()
    if "speaker" in workers and spec.lower().endswith(".wav"):
        folder = Path(spec).expanduser().resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise AudioError(f"cannot write {spec}: folder {folder} does not exist or is not writable")
    elif "speaker" in workers and spec.lower() != "none":
        from voicebus.workers.audio import open_sink

        open_sink(spec, 22050, realtime=False).close()


def check_bus(settings: Settings) -> None:
    """The bus address parses, its folder (ipc) is ours and private, and TCP has its keys or --insecure."""
    endpoints = Endpoints.parse(settings.bus.url)
    endpoints.prepare()
    Security.resolve(endpoints, keys_dir=expand(settings.bus.keys_dir), mode=settings.bus.security).check_client()


def check_model_paths(settings: Settings, workers: Iterable[str]) -> None:
    """A model or voice file named in the settings exists (the packaged defaults are the backends' to find)."""
    workers = set(workers)
    llm, tts = settings.llm, settings.tts
    if "thinker" in workers and llm.backend == "local" and llm.model_path:
        model = expand(Path(llm.model_path))
        if not model.is_file():
            raise ModelError(f"LLM model file not found: {model} (llm.model_path, VOICEBUS_LLM_MODEL_PATH)")
    if "speaker" in workers and tts.backend == "piper" and tts.voice:
        voice = expand(Path(tts.voice))
        if voice.suffix != ".onnx":
            raise ModelError(f"a piper voice is an .onnx file (with its .onnx.json beside it), got {voice} "
                             "(tts.voice, VOICEBUS_TTS_VOICE)")
        for needed in (voice, voice.with_name(voice.name + ".json")):
            if not needed.is_file():
                raise ModelError(f"piper voice file not found: {needed} (tts.voice, VOICEBUS_TTS_VOICE)")


def check_state_dir(settings: Settings, workers: Iterable[str]) -> None:
    """The state dir (history; whisper's model cache) is a folder we can write, created if missing."""
    workers = set(workers)
    if "thinker" not in workers and not ("listener" in workers and settings.asr.backend == "whisper"):
        return
    path = expand(settings.state.dir)
    hint = "set state.dir (VOICEBUS_STATE_DIR)"
    if path.exists() and not path.is_dir():
        raise ConfigError(f"state dir {path} is a file, not a folder: {hint}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass  # a real write: permissions and a read-only mount both show here
    except OSError as exc:
        raise ConfigError(f"state dir {path} is not writable ({exc.strerror or exc}): {hint}") from None


def preflight(settings: Settings, workers: Iterable[str], *, start_bus: bool = False) -> None:
    workers = tuple(workers)
    check_backend_names(settings)
    check_listener_settings(settings, workers)
    missing = missing_settings(settings, workers)
    if missing:
        raise ConfigError(f"missing setting(s) for the chosen backends: {', '.join(missing)}")
    check_bus(settings)
    if start_bus:
        ensure_free(Endpoints.parse(settings.bus.url))
    check_model_paths(settings, workers)
    check_state_dir(settings, workers)
    check_audio(settings, workers)
