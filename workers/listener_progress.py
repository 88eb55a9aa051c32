"""What a listener must not forget when it is restarted in the middle of a run.

* The utterances it sent and whose turns are not finished: a new listener goes
  on offering them, so none is lost between the old listener's death and the
  thinker's acknowledgement; and which of them the user spoke over (barge-in).
* For a file input, how far into the file every utterance was handled: a new
  listener resumes reading there instead of asking the file's questions again.
  Audio of an utterance that was still being spoken is read again, so it is
  heard whole, once.

The record belongs to one run: it is keyed by the input and by the process
that supervises the listener (its pid and start time, which survive a
listener restart but not a new ``voicebus up``). It is written atomically
(temporary file, then rename) and removed when the run ends cleanly.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil


@dataclass
class Progress:
    resume_ms: int = 0
    """input time up to which every utterance was handled (files)"""
    last_turn: int = 0
    heard_any: bool = False
    """whether any utterance was recognized in this run (a silent input is reported at its end)"""
    utterances: int = 0
    """utterances the voice activity detector found"""
    pending: dict[str, dict] = field(default_factory=dict)
    """turn id (as text) → the asr.final body sent for it"""
    barged: list[int] = field(default_factory=list)
    """pending turns the user spoke over (they end with both the thinker's and the speaker's word)"""


def run_key(input_spec: str) -> str:
    """Identifies this run of this input: survives a listener restart, not a new supervisor."""
    parent = os.getppid()
    try:
        started = psutil.Process(parent).create_time()
    except psutil.Error:
        started = 0.0
    spec = str(Path(input_spec).resolve()) if input_spec not in ("mic", "none") else input_spec
    return hashlib.sha256(f"{spec}\0{parent}\0{started}".encode()).hexdigest()[:16]


class ProgressFile:
    """One run's progress record under ``folder``."""

    def __init__(self, folder: Path, key: str) -> None:
        self.path = folder / f"listener-{key}.json"

    def load(self) -> Progress:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return Progress(**{k: v for k, v in data.items() if k in Progress.__dataclass_fields__})
        except (OSError, ValueError, TypeError):
            return Progress()

    def save(self, progress: Progress) -> None:
        """Best effort: an unwritable state folder costs the resume, not the run."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".listener-", dir=self.path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(asdict(progress), out)
            os.replace(tmp, self.path)
        except OSError:
            pass

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
