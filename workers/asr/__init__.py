"""Speech recognition backends behind one small interface (see base.py).

``MEASURED`` is what ``scripts/eval_asr.py`` measured for each backend on voices
nobody tuned on; ``voicebus doctor`` and the README quote it. Re-measure before
changing a line here.
"""

MEASURED = {
    "whisper": "the default: whisper base int8, decoded speculatively at every pause. PENDING",
    "pocketsphinx": "fast and streaming, but it mishears voices it was not tuned on. PENDING",
    "azure": "Azure Speech: accuracy and latency are the service's (network round trips included)",
}
CHOOSE = "pick one with --asr NAME or [asr] backend = NAME (whisper | pocketsphinx | azure)"
