"""Does the local chat model survive a short generation on this machine? Asked in a child process.

A native crash in llama.cpp (SIGSEGV in ggml's AMX matrix multiply, SIGILL for
an instruction the CPU lacks) kills the whole process it happens in, before
any Python handler runs. In a child it is only an exit status, which
``voicebus doctor`` and the tests turn into one line naming the signal, the
CPU features that matter and the llama.cpp build.

The child is this module run as a script; it loads the model with the same
``LocalChat`` the thinker uses and prints one JSON line:

    python -m voicebus.workers.llm.probe MODEL.gguf [--repack auto] [--threads 1]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from voicebus.workers.llm.cpu import CpuReport, cpu_report

PROMPT = [{"role": "user", "content": "Name three colours of the rainbow."}]
"""A chat-templated prompt of a few dozen tokens: evaluated as one multi-token batch, the path that crashed."""
MAX_TOKENS = 8
CONTEXT_TOKENS = 512
TIMEOUT_S = 120.0
DEFAULT_COMMAND = (sys.executable, "-m", "voicebus.workers.llm.probe")


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    detail: str
    """One line: what was generated, or why it failed."""
    signal: str = ""
    """The signal that killed the child ("SIGSEGV"), if one did."""


class GenerationProbe:
    """Runs a short generation of a GGUF model in a child process and judges how it ended.

    ``command`` starts the child (default: this module in a fresh interpreter);
    the model path and options are appended to it. Tests pass a child that
    crashes, to check that a crash becomes one clear line.
    """

    def __init__(self, command: Sequence[str] = DEFAULT_COMMAND, *, timeout_s: float = TIMEOUT_S,
                 cpu: CpuReport | None = None) -> None:
        self.command = tuple(command)
        self.timeout_s = timeout_s
        self._cpu = cpu

    def run(self, model_path: Path | str, *, repack: str = "auto", threads: int = 1) -> ProbeResult:
        model = Path(model_path)
        argv = [*self.command, str(model), "--repack", repack, "--threads", str(threads)]
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=self.timeout_s)
        except subprocess.TimeoutExpired:  # run() has killed the child
            return ProbeResult(False, f"a test generation of {MAX_TOKENS} tokens with {model.name} in a child "
                                      f"process gave no answer within {self.timeout_s:.0f} s")
        except OSError as exc:
            return ProbeResult(False, f"cannot start the probe process {argv[0]}: {exc.strerror or exc}")
        if done.returncode < 0:
            return self._crashed(model, repack, _signal_name(-done.returncode))
        report = _last_json_line(done.stdout)
        if done.returncode == 0 and report.get("ok"):
            return ProbeResult(True, f"{report['tokens']} tokens in {report['seconds']:.2f} s in a child process; "
                                     f"{report['repack']}")
        why = report.get("error") or _last_line(done.stderr) or f"exit code {done.returncode}"
        return ProbeResult(False, f"a test generation of {model.name} failed: {why}")

    def _crashed(self, model: Path, repack: str, sig: str) -> ProbeResult:
        cpu = self._cpu or cpu_report()
        if repack == "off":
            hint = ("rebuild llama-cpp-python for a generic CPU: CMAKE_ARGS='-DGGML_NATIVE=OFF' "
                    "pip install --force-reinstall --no-cache-dir llama-cpp-python")
        else:
            hint = "try llm.repack = off (VOICEBUS_LLM_REPACK=off)"
        return ProbeResult(
            False,
            f"llama.cpp crashed ({sig}) in a test generation of {MAX_TOKENS} tokens with {model.name} "
            f"(llm.repack = {repack}) · CPU: {cpu.features()} · {_library()} build: {cpu.build()} · {hint}",
            signal=sig,
        )


def _library() -> str:
    try:
        return f"llama-cpp-python {importlib.metadata.version('llama-cpp-python')}"
    except importlib.metadata.PackageNotFoundError:
        return "llama-cpp-python"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _last_json_line(text: str) -> dict:
    for line in reversed(text.splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return {}


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# --- the child ---------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    from voicebus.engine.errors import VoicebusError
    from voicebus.workers.llm.local import LocalChat

    parser = argparse.ArgumentParser(prog="python -m voicebus.workers.llm.probe", description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--repack", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        chat = LocalChat(args.model, context_tokens=CONTEXT_TOKENS, threads=args.threads, seed=0, repack=args.repack)
        started = time.perf_counter()
        pieces = list(chat.stream(PROMPT, max_tokens=MAX_TOKENS, cancel=threading.Event()))  # type: ignore[arg-type]
        seconds = time.perf_counter() - started
        tokens = chat.count_tokens("".join(pieces))
        chat.close()
    except VoicebusError as exc:
        print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    print(json.dumps({"ok": True, "tokens": tokens, "seconds": seconds, "repack": chat.repack.describe()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
