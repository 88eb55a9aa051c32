"""Speech recognition backends behind one small interface (see base.py).

``MEASURED`` is what ``scripts/eval_asr.py`` measured for each backend on voices
nobody tuned on; ``voicebus doctor`` and the README quote it. Re-measure before
changing a line here.
"""

MEASURED = {
    "whisper": (
        "the default: whisper base int8, decoded at every pause; on ten voices nobody tuned on, word accuracy "
        "0.84 clean, 0.74 / 0.59 / 0.62 with noise at 20 / 15 / 10 dB; its final is ready when the turn ends, "
        "380 ms (p90 550 ms) after the end of speech on 2 cores of an Intel Xeon, 630–660 ms on 2 of an AMD EPYC "
        "(scripts/bench_turn.py)"
    ),
    "pocketsphinx": "fast and streaming, but 0.09 word accuracy on voices it was not tuned on (0.46 on piper's joe)",
    "azure": "Azure Speech: accuracy and latency are the service's (network round trips included)",
}
CHOOSE = "pick one with --asr NAME or [asr] backend = NAME (whisper | pocketsphinx | azure)"
