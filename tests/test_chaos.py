"""The chaos campaign, short: every process of a real ``voicebus up`` killed twice under voice and text load.

``scripts/chaos.py`` with two SIGKILLs each of the listener, thinker, speaker and bus, at chosen moments,
one flood (of the workers' kinds and the supervisor's own) and one round of malformed frames, on the
scripted chat model. Nothing may be lost, answered twice or misremembered, and the flood may cost no
restart. The full campaign (50 kills each, the local model) is the script's default; see its docstring.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "chaos.py"


def test_two_kills_of_each_process_lose_nothing_and_duplicate_nothing(tmp_path):
    # --settle: the flood waits this long after the last kill. A worker restarted just before grows on its own
    # (its first decodes and sentences allocate buffers): with 5 s, a listener 4 s old grew 45 MB, over the bound.
    args = [
        "--llm", "scripted", "--kills", "2", "--max-minutes", "3", "--seed", "7",
        "--floods", "1", "--flood-seconds", "4", "--settle", "15", "--fuzz", "1", "--fuzz-frames", "500",
        "--spacing", "0", "--between", "0.3,1", "--moment-wait", "8", "--drain", "60",
        "--workdir", str(tmp_path / "run"), "--cache", str(tmp_path / "voice"), "--models", str(tmp_path / "none"),
    ]
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)
    lines = done.stdout.strip().splitlines()
    assert lines, done.stderr[-3000:]
    result = json.loads(lines[-1])
    report = done.stderr[-4000:]
    assert "aborted" not in result, report
    assert result["kills"] == 8, report
    assert result["failures"] == {"lost": 0, "duplicated": 0, "memory": 0, "flood harm": 0}, report
    assert result["ok"] and done.returncode == 0, report
    assert result["text"]["answered"] > 0 and result["voice"]["asked"] > 0, report
    assert all(f["restarts"] == [] and f["same_pids"] for f in result["floods"]), report
