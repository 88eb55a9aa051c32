"""A returning user's first answer: `voicebus up --continue` on a state folder with a history, the model's context
kept or not.

    python scripts/bench_returning_user.py [--turns 0,40,150] [--runs 3]

The history stays in the state folder across runs; a run that continues the
conversation (``--continue``) has the local chat model read it before its first
answer: seconds on 2 cores. The thinker writes the
model's context down (``voicebus.workers.llm.prompt_cache``), and the next run
starts from it. For each history length this script seeds a state folder,
runs `voicebus up --input examples/question.wav` once on it (which leaves the
cache, as any run does), then runs it again on copies of that folder with the
cache kept and with it removed, alternating, and reads speech end → first
audio from the console's latency line. Both arms have the same history and
the same sampling seed.

Prints a table, then one JSON line with every figure. Progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUESTION = ROOT / "examples" / "question.wav"
HISTORY = [
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What color is the sky on a clear day?", "The sky is blue on a clear day."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What is two plus two?", "Two plus two is four."),
    ("Name a large animal that lives in the sea.", "The blue whale is a large animal that lives in the sea."),
    ("What do bees make?", "Bees make honey and wax."),
]
LATENCY = re.compile(r"speech end → first audio (\d+) ms")


def seed(folder: Path, turns: int) -> None:
    from voicebus.workers.config import Settings
    from voicebus.workers.memory import Conversation

    folder.mkdir(parents=True)
    with Conversation(folder / "conversation.sqlite", Settings().state.session, Settings().llm.system_prompt) as talk:
        for turn in range(1, turns + 1):
            question, answer = HISTORY[turn % len(HISTORY)]
            talk.add_user(turn, question)
            talk.add_assistant(turn, answer)


def run_up(state: Path, output: Path) -> tuple[int | None, float]:
    """speech end → first audio in ms (None if no answer was timed), and the run's wall time."""
    env = {**os.environ, "VOICEBUS_STATE_DIR": str(state), "VOICEBUS_LLM_SEED": "1", "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    done = subprocess.run(["voicebus", "up", "--continue", "--input", str(QUESTION), "--output", str(output)], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    wall = time.perf_counter() - started
    found = LATENCY.search(done.stdout + done.stderr)
    if found is None:
        print(f"  no latency line (exit {done.returncode}): {(done.stdout + done.stderr)[-400:]}", file=sys.stderr)
    return (int(found.group(1)) if found else None), wall


def measure(turns: int, runs: int, workdir: Path) -> dict:
    template = workdir / f"history-{turns}"
    seed(template, turns)
    run_up(template, workdir / "answer.wav")  # the run before: it leaves the cache, as any run does
    arms: dict[str, list[int]] = {"kept": [], "removed": []}
    walls: dict[str, list[float]] = {"kept": [], "removed": []}
    for run in range(runs):
        for arm in ("removed", "kept") if run % 2 else ("kept", "removed"):
            state = workdir / f"run-{turns}-{run}-{arm}"
            shutil.copytree(template, state)
            if arm == "removed":
                shutil.rmtree(state / "llm", ignore_errors=True)
            ms, wall = run_up(state, workdir / "answer.wav")
            print(f"  {turns} turns, run {run + 1}/{runs}, cache {arm}: {ms} ms, {wall:.1f} s in all", file=sys.stderr,
                  flush=True)
            if ms is not None:
                arms[arm].append(ms)
            walls[arm].append(wall)
            shutil.rmtree(state)
    return {arm: {"first_audio_ms": values, "median_ms": statistics.median(values) if values else None,
                  "wall_s_median": round(statistics.median(walls[arm]), 1)} for arm, values in arms.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", default="0,40,150", help="history lengths, comma-separated")
    parser.add_argument("--runs", type=int, default=3, help="runs of each arm per history length")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="vb-returning-"))
    results = {}
    try:
        for turns in (int(t) for t in args.turns.split(",")):
            print(f"history of {turns} turns…", file=sys.stderr, flush=True)
            results[turns] = measure(turns, args.runs, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"{'history':>8} | {'context kept: first audio':>30} | {'context removed: first audio':>30}")
    for turns, row in results.items():
        cells = [f"{row[arm]['median_ms']} ms (runs: {', '.join(map(str, row[arm]['first_audio_ms']))})"
                 for arm in ("kept", "removed")]
        print(f"{turns:>8} | {cells[0]:>30} | {cells[1]:>30}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
