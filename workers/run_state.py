"""Small records a worker keeps on disk for one run, so that a worker restarted mid-run goes on from there.

A record belongs to one run: it is keyed by what the worker serves (its input
or output) and by the ``voicebus up`` that supervises it (its pid, start time
and the run's start, which survive a worker restart but not a new run). It is written
atomically (temporary file, then rename), and best effort: an unwritable
state folder costs the resume, not the run. A worker removes its record when
it has nothing left to resume; records of runs that ended otherwise are swept
once they are too old to matter (``sweep``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import psutil


def run_key(spec: str, run_started: float) -> str:
    """Identifies this run of the worker serving ``spec``: survives a worker restart, not a new supervisor.

    ``run_started`` is when ``voicebus up`` began (``state.run_started``, the same for every worker it
    restarts). A worker started by hand has none (0): nothing restarts it into the same run, and its
    parent (a shell, systemd) outlives every run, so its records are its own process's.
    """
    owner = os.getppid() if run_started else os.getpid()
    try:
        started = psutil.Process(owner).create_time()
    except psutil.Error:
        started = 0.0
    spec = str(Path(spec).resolve()) if spec not in ("mic", "none", "speaker") else spec
    return hashlib.sha256(f"{spec}\0{owner}\0{started}\0{run_started}".encode()).hexdigest()[:16]


class RunFile:
    """One JSON record: ``load`` gives ``{}`` for a missing or unreadable one."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def save(self, data: dict) -> bool:
        """Write ``data`` in place of the record; False if it could not be written."""
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}-", dir=self.path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(data, out)
            os.replace(tmp, self.path)
            return True
        except OSError:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            return False

    def remove(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass


def sweep(folder: Path, prefix: str, older_than_s: float) -> None:
    """Remove the records named ``prefix``… (and temporary files a kill mid-write left, ``RunFile.save``'s
    ``.prefix…``) that have not changed for ``older_than_s``: their runs ended long ago."""
    cutoff = time.time() - older_than_s
    for path in [*folder.glob(f"{prefix}*.json"), *folder.glob(f".{prefix}*")]:
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
        except OSError:
            pass


class LoadGuard:
    """Whether a worker of this run died while loading an optional part, so that the next one goes without it.

    A native library can kill its process while loading or first running a model (llama.cpp built for
    another CPU), and nothing in the process can report it. Around the risky step the worker leaves a
    record (``with guard:``), removed when the step returns or raises; a record found at the next start
    means the process died inside it. A part the worker can do without is then left out for the rest of
    the run, at the cost of one restart, instead of the crash repeating until the supervisor gives up.
    """

    def __init__(self, record: RunFile) -> None:
        self.record = record

    @property
    def died_here_before(self) -> bool:
        return bool(self.record.load())

    def __enter__(self) -> "LoadGuard":
        self.record.save({"pid": os.getpid(), "since": time.time()})
        return self

    def __exit__(self, *_exc: object) -> None:
        self.record.remove()
