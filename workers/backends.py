"""Settings → backend objects: the one place that knows every backend's constructor.

Backends are imported only when chosen, so a deployment on Azure never loads
llama.cpp and an offline one never needs the cloud SDKs.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from voicebus.engine.errors import ConfigError, VoicebusError
from voicebus.engine.settings import expand
from voicebus.workers.asr.base import Recognizer
from voicebus.workers.config import Settings
from voicebus.workers.llm.base import ChatBackend
from voicebus.workers.tts.base import Synthesizer

if TYPE_CHECKING:
    from voicebus.workers.llm.message_end import MessageEnd
    from voicebus.workers.run_state import LoadGuard

Progress = Callable[[str], None]


def state_dir(settings: Settings) -> Path:
    """The state folder (history, assembled models), created if missing; ConfigError if unusable."""
    path = expand(settings.state.dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"state dir {path} is a file, not a folder: set state.dir (VOICEBUS_STATE_DIR)") from None
    except OSError as exc:
        raise ConfigError(f"cannot create state dir {path}: {exc.strerror or exc}") from None
    return path


def open_recognizer(settings: Settings, progress: Progress | None = None) -> Recognizer:
    asr = settings.asr
    if asr.backend == "pocketsphinx":
        from voicebus.workers.asr.pocketsphinx import PocketsphinxRecognizer

        return PocketsphinxRecognizer(language=asr.language)
    if asr.backend == "whisper":
        from voicebus.workers.asr.whisper import WhisperRecognizer

        return WhisperRecognizer(
            language=asr.language, cache_dir=state_dir(settings) / "models", progress=progress,
            beam_size=asr.beam_size, threads=asr.threads, prompt=asr.prompt,
        )
    if asr.backend == "azure":
        from voicebus.workers.asr.azure import AzureRecognizer

        return AzureRecognizer(
            key=asr.speech_key or None, region=asr.speech_region or None,
            endpoint=asr.speech_endpoint or None, language=asr.language,
        )
    raise ConfigError(f"unknown asr backend {asr.backend!r}; choose from pocketsphinx, whisper, azure")


def uses_message_end(settings: Settings) -> bool:
    """Whether the end of turn asks the chat model whether words end a message (``vad.message_end``): with
    whisper (it hands over whole transcripts at pauses, on its decode thread) in English (the model and the
    figures are), when the window adapts to the words at all."""
    vad = settings.vad
    return (vad.message_end and vad.adaptive and settings.asr.backend == "whisper"
            and settings.asr.language.lower().startswith("en"))


def open_message_end(settings: Settings, guard: LoadGuard | None = None) -> MessageEnd | None:
    """The chat model for ``uses_message_end``, loaded and run once, or None. One that cannot load, or that
    fails its first run, is said in one line on stderr, and the words alone decide: turn-taking is worse
    without it, not broken. With a ``guard``, a process of this run that died while loading or first
    running it (a native crash) means this one goes without it."""
    if not uses_message_end(settings):
        return None
    from voicebus.workers.llm.message_end import MessageEnd

    def without(reason: str) -> None:
        print(f"end of turn: the chat model is not used, the words alone decide ({reason})", file=sys.stderr, flush=True)

    if guard is not None and guard.died_here_before:
        without("a listener of this run died while loading it; vad.message_end = false stops trying")
        return None
    with guard or contextlib.nullcontext():
        try:
            model = MessageEnd(repack=settings.llm.repack)
        except VoicebusError as exc:
            without(str(exc))
            return None
        try:
            model.logprob("what time is it")  # the first run reads the system message: not at the first pause
        except Exception as exc:  # noqa: BLE001 (llama.cpp's errors have no common type)
            model.close()
            without(f"it failed its first run: {type(exc).__name__}: {exc}")
            return None
    return model


def open_chat(settings: Settings, *, keep_context: bool = False) -> ChatBackend:
    """The configured chat backend. With ``keep_context``, a local model starts from what it had read when
    the last run kept it, in the state folder (see ``voicebus.workers.llm.prompt_cache``)."""
    llm = settings.llm
    seed = llm.seed if llm.seed >= 0 else None
    if llm.backend == "local":
        from voicebus.workers.llm.local import LocalChat, Sampling

        return LocalChat(
            llm.model_path or None, context_tokens=llm.context_tokens, threads=llm.threads or None,
            sampling=Sampling(temperature=llm.temperature), repack=llm.repack, seed=seed,
            cache_folder=state_dir(settings) / "llm" if keep_context else None,
        )
    if llm.backend == "openai":
        from voicebus.workers.llm.openai_chat import OpenAIChat

        return OpenAIChat(
            base_url=llm.base_url or None, api_key=llm.api_key or None, model=llm.model,
            timeout_s=llm.timeout_s, context_tokens=llm.context_tokens, temperature=llm.temperature, seed=seed,
        )
    if llm.backend == "azure":
        from voicebus.workers.llm.openai_chat import AzureOpenAIChat

        return AzureOpenAIChat(
            endpoint=llm.azure_endpoint or None, deployment=llm.azure_deployment or None,
            api_version=llm.azure_api_version, api_key=llm.azure_api_key or None, timeout_s=llm.timeout_s,
            temperature=llm.temperature, seed=seed,
        )
    raise ConfigError(f"unknown llm backend {llm.backend!r}; choose from local, openai, azure")


def open_synthesizer(settings: Settings) -> Synthesizer:
    tts, asr = settings.tts, settings.asr
    if tts.backend == "piper":
        from voicebus.workers.tts.piper import PiperSynthesizer

        return PiperSynthesizer(tts.voice or None)
    if tts.backend == "azure":
        from voicebus.workers.tts.azure import AzureSynthesizer

        return AzureSynthesizer(
            key=asr.speech_key or None, region=asr.speech_region or None,
            endpoint=asr.speech_endpoint or None, voice=tts.voice or tts.azure_voice,
        )
    raise ConfigError(f"unknown tts backend {tts.backend!r}; choose from piper, azure")
