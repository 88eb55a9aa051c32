"""A long conversation with the embedded chat model: time to the first token of every answer.

    python scripts/bench_long_conversation.py [--turns 150] [--max-tokens 60]

The thinker keeps a window over the history (``Conversation.messages``, stable:
its start moves in steps) and llama.cpp reuses the prompt's cached beginning,
so most answers only read the new question. When the window's start moves,
the whole window is read again: seconds on a CPU. The thinker reads a moved
window ahead, while nothing waits (``Thinker._read_ahead``). This script asks
the same questions in two fresh conversations, without and with that read-ahead,
building prompts exactly as the thinker does (same budget, template cost and
question reserve), and times the first token of each answer. The read-ahead's
own time is reported apart: it is spent while the answer plays, not while
someone waits.

Prints a table, then one JSON line with every figure. Progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

QUESTIONS = [
    "What is the capital of France?", "How many legs does a spider have?", "What color is the sky on a clear day?",
    "Who wrote Romeo and Juliet?", "What is two plus two?", "Name a large animal that lives in the sea.",
    "How many days are in a week?", "What do bees make?", "Which planet is closest to the sun?",
]


def converse(turns: int, max_tokens: int, read_ahead: bool) -> dict:
    from voicebus.engine.settings import load
    from voicebus.workers import backends
    from voicebus.workers.config import Settings
    from voicebus.workers.memory import Conversation
    from voicebus.workers.thinker import QUESTION_TOKENS, window_start

    folder = Path(tempfile.mkdtemp(prefix="vb-longconv-"))
    settings = load(Settings, env={}, overrides={"state.dir": folder, "llm.seed": 1})
    chat = backends.open_chat(settings)
    memory = Conversation(folder / "conversation.sqlite", "bench", settings.llm.system_prompt)
    budget = max(256, chat.context_tokens - settings.llm.max_tokens)

    def prompt(turn: int | None) -> list[dict[str, str]]:
        return memory.messages(budget, chat.count_tokens, per_message=chat.message_tokens, until_turn=turn,
                               stable=True, reserve=QUESTION_TOKENS)

    firsts, ahead_s, moves, window = [], [], 0, ()  # moves: answers whose prompt began unlike the last one read
    try:
        for turn in range(1, turns + 1):
            memory.add_user(turn, QUESTIONS[turn % len(QUESTIONS)])
            messages = prompt(turn)
            moves += window_start(messages) != window and turn > 1
            window = window_start(messages)
            started, first, pieces = time.perf_counter(), None, []
            for piece in chat.stream(messages, max_tokens=max_tokens, cancel=threading.Event()):
                first = first if first is not None else time.perf_counter() - started
                pieces.append(piece)
            firsts.append(first if first is not None else time.perf_counter() - started)
            memory.add_assistant(turn, "".join(pieces).strip())
            if read_ahead and window_start(next_prompt := prompt(None)) != window:
                started = time.perf_counter()
                chat.warm_up(next_prompt)
                ahead_s.append(time.perf_counter() - started)
                window = window_start(next_prompt)
            if turn % 25 == 0:
                print(f"  {'read-ahead' if read_ahead else 'plain'}: {turn} turns", file=sys.stderr, flush=True)
    finally:
        chat.close()
        memory.close()
    ordered = sorted(firsts)
    return {
        "turns": turns, "windows_read_again": moves,
        "first_token_p50_s": round(statistics.median(ordered), 3),
        "first_token_p90_s": round(ordered[int(0.9 * (len(ordered) - 1))], 3),
        "first_token_max_s": round(ordered[-1], 3),
        "answers_over_1s": sum(f > 1.0 for f in firsts),
        "read_aheads": len(ahead_s), "read_ahead_s": round(sum(ahead_s), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=150)
    parser.add_argument("--max-tokens", type=int, default=60, help="answer length cap (the model stops sooner)")
    args = parser.parse_args()
    results = {}
    for name, ahead in (("plain", False), ("read-ahead", True)):
        print(f"{name}: {args.turns} turns…", file=sys.stderr, flush=True)
        results[name] = converse(args.turns, args.max_tokens, ahead)
    columns = ["windows_read_again", "first_token_p50_s", "first_token_p90_s", "first_token_max_s", "answers_over_1s",
               "read_aheads", "read_ahead_s"]
    print(f"{'':12}" + "".join(f"{c:>19}" for c in columns))
    for name, row in results.items():
        print(f"{name:12}" + "".join(f"{row[c]:>19}" for c in columns))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
