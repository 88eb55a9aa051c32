"""What the CPU and the llama.cpp build offer, and whether llama.cpp may repack weights.

At load time llama.cpp can copy a model's weights into an "extra buffer type"
laid out for the CPU's widest matrix instructions: AMX tiles on Intel Xeons
from Sapphire Rapids on, interleaved blocks for AVX2/AVX-512/NEON elsewhere.
On AMX CPUs, a llama.cpp built natively puts the weights in its AMX buffer and
then every decode of more than one token segfaults in ``ggml_backend_amx_mul_mat``
(upstream llama.cpp issue 20824). Loading with the model parameter
``use_extra_bufts = false`` avoids it.

Setting ``llm.repack``: ``on`` and ``off`` are what they say; ``auto`` turns
repacking off where the CPU or the build reports AMX and leaves it on
elsewhere. Measured with ``scripts/bench_llm.py`` on an AVX2 machine (AMD EPYC,
one thread): the default SmolLM2 Q4_1 file has nothing llama.cpp repacks for
AVX2, so "off" costs nothing there (off/on 1.02 in CPU time, prompt and
generation alike); a Q4_0 file is repacked, and "off" cost it ~29% of its
prompt speed and ~10% of its generation speed. So ``auto`` keeps repacking
wherever it is safe.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

from voicebus.engine.errors import ConfigError

REPACK_CHOICES = ("auto", "on", "off")
CPUINFO = Path("/proc/cpuinfo")
UPSTREAM_ISSUE = "llama.cpp issue 20824"


@dataclass(frozen=True)
class CpuReport:
    """The CPU's feature flags and llama.cpp's build line, as read once per process."""

    flags: frozenset[str]
    """``/proc/cpuinfo`` flags ("avx2", "avx512f", "amx_int8" …); empty where it cannot be read."""
    system_info: str
    """``llama_print_system_info()``: the build's features, e.g. ``CPU : AVX2 = 1 | AMX_INT8 = 1 | …``."""

    @property
    def amx(self) -> bool:
        """The CPU has AMX tiles, or llama.cpp was built to use them (either way the AMX path may run)."""
        return any(flag.startswith("amx") for flag in self.flags) or _built_with(self.system_info, "AMX_INT8")

    def features(self) -> str:
        """The CPU features that matter here, e.g. ``AVX2 yes, AVX-512 no, AMX no``."""
        if not self.flags:
            return "CPU flags unknown (no /proc/cpuinfo)"
        has = {
            "AVX2": "avx2" in self.flags,
            "AVX-512": "avx512f" in self.flags,
            "AMX": any(flag.startswith("amx") for flag in self.flags),
        }
        return ", ".join(f"{name} {'yes' if present else 'no'}" for name, present in has.items())

    def build(self) -> str:
        """llama.cpp's build line without its padding, or a note that it could not be read."""
        line = " ".join(self.system_info.split()).strip(" |")
        return line or "build features unknown"


@dataclass(frozen=True)
class RepackChoice:
    """Whether llama.cpp may repack weights, and why, for logs and ``voicebus doctor``."""

    use_extra_bufts: bool
    why: str

    def describe(self) -> str:
        return f"weight repacking {'on' if self.use_extra_bufts else 'off'} ({self.why})"


def decide_repack(setting: str, cpu: CpuReport) -> RepackChoice:
    """The ``use_extra_bufts`` model parameter for ``llm.repack`` = ``setting`` on ``cpu``."""
    if setting == "on":
        return RepackChoice(True, "llm.repack = on")
    if setting == "off":
        return RepackChoice(False, "llm.repack = off")
    if setting == "auto":
        if cpu.amx:
            return RepackChoice(False, f"auto: AMX reported, {UPSTREAM_ISSUE}")
        return RepackChoice(True, "auto: no AMX")
    raise ConfigError(f"llm.repack must be one of {', '.join(REPACK_CHOICES)}, not {setting!r}")


def read_cpu_flags(path: Path = CPUINFO) -> frozenset[str]:
    """The feature flags of the first CPU in a ``/proc/cpuinfo``-style file (x86 "flags", ARM "Features")."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.lower().split())
    return frozenset()


def llama_system_info() -> str:
    """llama.cpp's build line; importing llama_cpp loads the library but runs no model code."""
    try:
        import llama_cpp

        return llama_cpp.llama_print_system_info().decode("utf-8", errors="replace")
    except (ImportError, OSError, AttributeError):
        return ""


@functools.cache
def cpu_report() -> CpuReport:
    """This machine's report (cached: neither the CPU nor the loaded library changes while we run)."""
    return CpuReport(flags=read_cpu_flags(), system_info=llama_system_info())


def _built_with(system_info: str, feature: str) -> bool:
    return re.search(rf"\b{re.escape(feature)} = 1\b", system_info) is not None
