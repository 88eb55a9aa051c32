"""``scripts/bench_first_piece.py`` on a few questions: the real chat model and voice, one token stream cut two ways."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_first_piece.py"


def test_the_first_clause_is_never_later_than_the_first_sentence():
    done = subprocess.run([sys.executable, str(SCRIPT), "--limit", "4"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].endswith("whole sentence     clause of 4+ words") and "request → first audio" in done.stdout
    result = json.loads(lines[-1])
    assert result["answers"] == 4 and len(result["rows"]) == 4
    for row in result["rows"]:
        assert row["sentence"].startswith(row["clause"]), row  # the same tokens, cut sooner or not at all
        assert 0 < row["first_token_s"] <= row["clause_s"] <= row["sentence_s"], row
        assert row["clause_audio_s"] > 0 and row["sentence_audio_s"] > 0
    assert result["cut"] == sum(row["clause"] != row["sentence"] for row in result["rows"])
