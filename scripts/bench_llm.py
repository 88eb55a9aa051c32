"""Does llama.cpp's weight repacking pay on this machine? Prompt and generation speed, repack on vs off.

    python scripts/bench_llm.py [--rounds 7] [--prompt-tokens 200] [--gen-tokens 64] [--threads N]
                                [--model PATH] [--q4_0]

Each round loads the model twice through voicebus's own ``LocalChat``, once
with ``llm.repack = on`` and once with ``off`` (the ``use_extra_bufts`` model
parameter), runs each once to warm up, then once measured: the same prompt of
``--prompt-tokens`` tokens from an empty context (prompt tokens/s), then
``--gen-tokens`` tokens generated greedily (generation tokens/s, first token
excluded), timed by the wall clock and by this process's CPU time. The order
alternates from round to round, so that a noisy neighbour on a shared machine
hits both alike. "repacked" is the buffer llama.cpp reports for repacked
weights (CPU_REPACK, AMX) while loading.

``--q4_0`` also measures a Q4_0 copy of the model, requantized into a temporary
folder with llama.cpp's own quantizer: the default SmolLM2 file is Q4_1, which
llama.cpp does not repack for AVX2, while Q4_0 is the format it does repack
there — so the two together show what turning repacking off costs.

Prints a table of medians and the off/on ratio, then one JSON object with every
figure on the last line of stdout. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from voicebus.workers.cores import half_the_cores
from voicebus.workers.llm.cpu import cpu_report
from voicebus.workers.llm.local import LocalChat
from voicebus.workers.llm.models import find_smollm2_gguf

TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps as his father "
    "had taught him. Below, the harbour emptied of fishing boats one by one, their lanterns swaying like "
    "fireflies over the dark water. He trimmed the wick, polished the great lens and wrote the weather in a "
    "leather book that had belonged to three keepers before him. "
)
REPACK_BUFFER = re.compile(r"(CPU_REPACK|AMX)\s+model buffer size\s*=\s*([\d.]+) MiB")


class RepackLog(logging.Handler):
    """Collects what llama.cpp says about repacked-weight buffers while a model loads."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.buffers: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = REPACK_BUFFER.search(record.getMessage())
        if match:
            self.buffers.append(f"{match.group(1)} {match.group(2)} MiB")


def load(path: Path, repack: str, threads: int) -> tuple[LocalChat, str]:
    """The model loaded with ``repack``, and the repacked buffers llama.cpp reported ("none" if none)."""
    logger = logging.getLogger("voicebus.workers.llm.llama_cpp")
    handler = RepackLog()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        chat = LocalChat(path, context_tokens=1024, threads=threads, seed=1, repack=repack)
    finally:
        logger.removeHandler(handler)
    return chat, ", ".join(handler.buffers) or "none"


def prompt_tokens(chat: LocalChat, count: int) -> list[int]:
    """``count`` tokens of plain prose (TEXT is well over 20 tokens, so the repeats are enough)."""
    return chat._model().tokenize((TEXT * (count // 20 + 1)).encode(), add_bos=True)[:count]


FIGURES = ("prompt_tps", "gen_tps", "prompt_cpu_tps", "gen_cpu_tps")
"""Tokens per wall-clock second and per CPU second of this process, prompt and generation."""


def one_run(chat: LocalChat, prompt: list[int], gen_tokens: int) -> dict[str, float]:
    """The FIGURES of one prompt evaluation from an empty context and a greedy generation after it.

    CPU seconds are what a neighbour on a shared machine cannot steal: with one
    llama.cpp thread they are the computation's own time. Wall time is what a user waits.
    """
    llm = chat._model()
    llm.reset()  # no cached prefix: the whole prompt is evaluated, in one multi-token batch
    wall, cpu = [time.perf_counter()], [time.process_time()]
    for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=False):
        wall.append(time.perf_counter())
        cpu.append(time.process_time())
        if len(wall) > gen_tokens:
            break
    # Until the first token: the prompt's evaluation (plus one sample); after it, single-token decodes.
    generated = len(wall) - 2
    return {
        "prompt_tps": len(prompt) / (wall[1] - wall[0]),
        "gen_tps": generated / (wall[-1] - wall[1]),
        "prompt_cpu_tps": len(prompt) / (cpu[1] - cpu[0]),
        "gen_cpu_tps": generated / (cpu[-1] - cpu[1]),
    }


def bench(path: Path, args: argparse.Namespace) -> dict:
    runs: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    repacked: dict[str, str] = {}
    prompt: list[int] = []
    for round_no in range(args.rounds):
        order = ("on", "off") if round_no % 2 == 0 else ("off", "on")
        # Fresh loads every round: where a load happens to land in memory moved one
        # configuration by ±5% for as long as it stayed loaded (seen with two identical loads).
        models = {}
        for mode in order:
            models[mode], repacked[mode] = load(path, mode, args.threads)
        prompt = prompt or prompt_tokens(models["on"], args.prompt_tokens)
        for mode in order:
            one_run(models[mode], prompt, args.gen_tokens)  # warm-up (page faults, caches), not counted
        for mode in order:
            runs[mode].append(one_run(models[mode], prompt, args.gen_tokens))
        for chat in models.values():
            chat.close()
        print(f"{path.name} round {round_no + 1}/{args.rounds}: "
              + ", ".join(f"{m} {runs[m][-1]['prompt_tps']:.0f}/{runs[m][-1]['gen_tps']:.1f}" for m in ("on", "off"))
              + " tok/s (prompt/gen, wall)", file=sys.stderr, flush=True)
    result: dict = {"model": path.name, "prompt_tokens": len(prompt), "gen_tokens": args.gen_tokens, "modes": {}}
    for mode in ("on", "off"):
        result["modes"][mode] = {
            **{figure: statistics.median(run[figure] for run in runs[mode]) for figure in FIGURES},
            "repacked": repacked[mode],
            "runs": [{figure: round(run[figure], 1) for figure in FIGURES} for run in runs[mode]],
        }
    # The ratio within each round, so the machine's slow and fast moments cancel out; then the median.
    result["off_over_on"] = {
        figure: statistics.median(off[figure] / on[figure] for on, off in zip(runs["on"], runs["off"]))
        for figure in FIGURES
    }
    return result


def requantize_q4_0(source: Path, folder: Path) -> Path:
    """A Q4_0 copy of ``source`` made by llama.cpp's quantizer (requantizing a Q4_1 file is allowed)."""
    import llama_cpp

    target = folder / (source.stem.split(".")[0] + ".Q4_0.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.allow_requantize = True
    params.nthread = 1
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
        sys.exit(f"bench_llm: could not requantize {source} to Q4_0")
    return target


def table(results: list[dict]) -> str:
    rows = [("model", "repack", "prompt tok/s", "gen tok/s", "prompt tok/CPU-s", "gen tok/CPU-s", "repacked weights")]
    for result in results:
        for mode in ("on", "off"):
            m = result["modes"][mode]
            rows.append((result["model"] if mode == "on" else "", mode, f"{m['prompt_tps']:.0f}", f"{m['gen_tps']:.1f}",
                         f"{m['prompt_cpu_tps']:.0f}", f"{m['gen_cpu_tps']:.1f}", m["repacked"]))
        ratio = result["off_over_on"]
        rows.append(("", "off/on", *(f"{ratio[figure]:.2f}" for figure in FIGURES), "(median of per-round ratios)"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=half_the_cores(),
                        help="llama.cpp threads (default: the local backend's own default)")
    parser.add_argument("--model", type=Path, help="a GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--q4_0", action="store_true", help="also measure a Q4_0 requantization of the model")
    args = parser.parse_args()

    cpu = cpu_report()
    print(f"CPU: {cpu.features()}; llama.cpp: {cpu.build()}; threads {args.threads}", file=sys.stderr)
    model = args.model or find_smollm2_gguf()
    results = [bench(model, args)]
    if args.q4_0:
        with tempfile.TemporaryDirectory(prefix="bench-llm-") as folder:
            results.append(bench(requantize_q4_0(model, Path(folder)), args))
    print(f"CPU: {cpu.features()}; threads {args.threads}; {args.rounds} rounds, medians")
    print(table(results))
    print(json.dumps({"cpu": cpu.features(), "llama_cpp": cpu.build(), "threads": args.threads, "results": results}))


if __name__ == "__main__":
    main()
