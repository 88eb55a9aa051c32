"""Checks ``voicebus up`` makes before starting anything: one clear line instead of a crash loop.

A missing input file, an absent microphone, or a cloud backend without its
keys would otherwise surface as a worker failing five times in a row.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from pathlib import Path

from voicebus.engine.errors import AudioError, ConfigError
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


def preflight(settings: Settings, workers: Iterable[str]) -> None:
    workers = tuple(workers)
    check_backend_names(settings)
    missing = missing_settings(settings, workers)
    if missing:
        raise ConfigError(f"missing setting(s) for the chosen backends: {', '.join(missing)}")
    check_audio(settings, workers)
