"""Speak texts with the embedded piper voice into one WAV file: test inputs and demos.

    python scripts/synthesize.py out.wav "What is the capital of France?" [--gap 2.0] ["Second question"]

Each text becomes one utterance; ``--gap`` seconds of silence separate them
(and lead in and trail off), so the listener sees separate turns.
"""

from __future__ import annotations

import argparse
import sys

from voicebus.workers.audio import write_wav
from voicebus.workers.tts.piper import PiperSynthesizer


def synthesize(texts: list[str], *, gap_s: float = 1.5, lead_s: float = 0.5) -> tuple[bytes, int]:
    voice = PiperSynthesizer()
    rate = voice.sample_rate
    silence = lambda seconds: bytes(int(rate * seconds) * 2)  # noqa: E731
    parts = [silence(lead_s)]
    for text in texts:
        parts.extend(voice.synthesize(text))
        parts.append(silence(gap_s))
    voice.close()
    return b"".join(parts), rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output")
    parser.add_argument("texts", nargs="+")
    parser.add_argument("--gap", type=float, default=1.5, help="seconds of silence after each text")
    args = parser.parse_args()
    pcm, rate = synthesize(args.texts, gap_s=args.gap)
    write_wav(args.output, pcm, rate)
    print(f"wrote {args.output}: {len(pcm) / 2 / rate:.1f} s at {rate} Hz", file=sys.stderr)


if __name__ == "__main__":
    main()
