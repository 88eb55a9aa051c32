"""What a listener must not forget when it is restarted in the middle of a run.

* The utterances it sent and whose turns are not finished: a new listener goes
  on offering them, so none is lost between the old listener's death and the
  thinker's acknowledgement; and which of them the user spoke over (barge-in).
* For a file input, how far into the file every utterance was handled: a new
  listener resumes reading there instead of asking the file's questions again.
  Audio of an utterance that was still being spoken is read again, so it is
  heard whole, once.

The record is a ``RunFile`` (see ``run_state``): it belongs to one run of one input.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from voicebus.workers.run_state import RunFile


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


class ProgressFile:
    """One run's progress record under ``folder``."""

    def __init__(self, folder: Path, key: str) -> None:
        self.path = folder / f"listener-{key}.json"
        self.file = RunFile(self.path)

    def load(self) -> Progress:
        data = self.file.load()
        try:
            return Progress(**{k: v for k, v in data.items() if k in Progress.__dataclass_fields__})
        except TypeError:
            return Progress()

    def save(self, progress: Progress) -> None:
        self.file.save(asdict(progress))

    def remove(self) -> None:
        self.file.remove()
