"""scripts/eval_turn_end.py on a fixed small sample: whole sentences and sentences cut short, through
whisper and the end-of-turn rules, with and without the chat model's check."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("espeak-ng") is None or shutil.which("sox") is None,
                       reason="needs espeak-ng and sox (apt-get install espeak-ng sox)"),
]


def test_the_chat_model_gives_sentences_cut_short_the_long_window():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "eval_turn_end.py"), "--limit-voices", "1", "--limit-sentences", "3"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| whole sentences |" in result.stdout and "AUC" in result.stdout
    figures = json.loads(result.stdout.strip().splitlines()[-1])["figures"]
    whole, fragments = figures["groups"]["whole sentences"], figures["groups"]["fragments"]
    assert whole["clips"] == 3 and 6 <= fragments["clips"] <= 12
    assert figures["model_calls"] > 0
    # Loose: whole sentences mostly end at once, and the model's check lengthens the window of fragments.
    assert whole["short_model"] >= 0.5 and whole["long_model"] <= 0.5
    assert fragments["long_model"] > fragments["long_words"], fragments
    # Every word heard, the rules and model keep fragments waiting at least as often as through whisper,
    # and whole sentences still end at once.
    assert fragments["long_perfect"] >= fragments["long_model"] and whole["short_perfect"] >= 0.5, figures
