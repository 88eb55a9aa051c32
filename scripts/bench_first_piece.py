"""How soon can the voice start? The first piece of an answer: whole sentence vs first clause, same tokens.

    python scripts/bench_first_piece.py [--clause-words 4] [--limit N]

The thinker sends an answer to the speaker piece by piece; by default the first
piece may end at a comma (``llm.first_clause_words``, workers/sentences.py).
This measures what that saves without the noise of a whole voice turn: every
question of scripts/eval_data (tune and judge, stop phrases left out) is
answered once by the embedded chat model (the engine's own ``LocalChat``, the
default system prompt, a fixed seed, a fresh conversation each), and the one
token stream is cut both ways, so the two columns differ only in where the
first piece ends. Then piper (the default voice) synthesizes each first piece,
timed to its first audio chunk.

Prints a table (median / p90 in ms, and how many answers had a clause to cut)
and one JSON object with every figure on the last line. The clause threshold
was not tuned on these questions: 4 words is ``split_clauses``'s own minimum.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from voicebus.workers.backends import open_chat, open_synthesizer
from voicebus.workers.config import Settings
from voicebus.workers.sentences import SentenceCutter, speakable
from voicebus.workers.stop_phrases import StopPhrases

DATA = Path(__file__).resolve().parent / "eval_data"


def questions(settings: Settings) -> list[str]:
    stops = StopPhrases(settings.llm.stop_phrases)
    lines = [line.strip() for name in ("tune.txt", "judge.txt") for line in (DATA / name).read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#") and not stops.matches(line)]


def first_piece(stream: list[tuple[float, str]], clause_words: int) -> tuple[float, str] | None:
    """When (s after the request) and what the cutter gives as the answer's first piece."""
    cutter = SentenceCutter(clause_words)
    for t, token in stream:
        pieces = [p for p in (speakable(raw) for raw in cutter.feed(token)) if p]
        if pieces:
            return t, pieces[0]
    rest = [p for p in (speakable(raw) for raw in cutter.flush()) if p]
    return (stream[-1][0], rest[0]) if rest else None


def first_audio_s(synth, text: str) -> float:
    start = time.perf_counter()
    for _chunk in synth.synthesize(text):
        return time.perf_counter() - start
    return time.perf_counter() - start


def stats(values: list[float]) -> str:
    if not values:
        return "–"
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return f"{statistics.median(ordered) * 1000:.0f} / {p90 * 1000:.0f}"


def main() -> int:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clause-words", type=int, default=defaults.llm.first_clause_words,
                        help="words a first clause needs (default: the setting's default)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N questions")
    args = parser.parse_args()
    if args.clause_words < 1:
        parser.error("--clause-words must be at least 1")
    settings = replace(defaults, llm=replace(defaults.llm, seed=7))  # the same answers run after run
    asked = questions(settings)[: args.limit or None]
    print(f"loading the chat model and the voice; {len(asked)} questions", file=sys.stderr)
    chat = open_chat(settings)
    synth = open_synthesizer(settings)
    rows = []
    try:
        first_audio_s(synth, "Warming up.")
        for n, question in enumerate(asked, 1):
            messages = [{"role": "system", "content": settings.llm.system_prompt}, {"role": "user", "content": question}]
            start = time.perf_counter()
            stream = [(time.perf_counter() - start, token) for token in
                      chat.stream(messages, max_tokens=settings.llm.max_tokens, cancel=threading.Event())]
            sentence, clause = first_piece(stream, 0), first_piece(stream, args.clause_words)
            if sentence is None or clause is None:
                continue
            row = {"question": question, "first_token_s": stream[0][0],
                   "sentence_s": sentence[0], "sentence": sentence[1], "clause_s": clause[0], "clause": clause[1]}
            row["sentence_audio_s"] = first_audio_s(synth, sentence[1])
            row["clause_audio_s"] = first_audio_s(synth, clause[1]) if clause[1] != sentence[1] else row["sentence_audio_s"]
            rows.append(row)
            print(f"[{n}/{len(asked)}] {question!r}: {sentence[0] * 1000:.0f} → {clause[0] * 1000:.0f} ms "
                  f"{clause[1]!r}", file=sys.stderr)
    finally:
        chat.close()
        synth.close()

    cut = [r for r in rows if r["clause"] != r["sentence"]]
    table = [
        ("request → first token", stats([r["first_token_s"] for r in rows]), ""),
        ("request → first piece", stats([r["sentence_s"] for r in rows]), stats([r["clause_s"] for r in rows])),
        ("first piece → first audio (piper)", stats([r["sentence_audio_s"] for r in rows]),
         stats([r["clause_audio_s"] for r in rows])),
        ("request → first audio", stats([r["sentence_s"] + r["sentence_audio_s"] for r in rows]),
         stats([r["clause_s"] + r["clause_audio_s"] for r in rows])),
        ("  the same, answers with a clause to cut", stats([r["sentence_s"] + r["sentence_audio_s"] for r in cut]),
         stats([r["clause_s"] + r["clause_audio_s"] for r in cut])),
    ]
    print(f"{'median / p90 (ms)':40} {'whole sentence':>16} {f'clause of {args.clause_words}+ words':>22}")
    for label, a, b in table:
        print(f"{label:40} {a:>16} {b:>22}")
    print(f"answers whose first piece became a clause: {len(cut)} of {len(rows)}")
    print(json.dumps({"clause_words": args.clause_words, "answers": len(rows), "cut": len(cut), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
