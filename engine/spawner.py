"""Child processes: start one, read its stderr, stop it for sure.

Children die with the supervisor: on Linux through the parent-death signal
(``PR_SET_PDEATHSIG``), and everywhere through the actor's own watch on its
parent pid — so SIGKILLing the supervisor leaves no orphan behind.

The death signal is SIGKILL, not SIGTERM: it is sent only when the supervisor is
already gone without its orderly shutdown (that one sends ``ctl.shutdown``, then
SIGTERM, and waits), so nobody is left to hear a goodbye; and a SIGTERM stays
pending on a SIGSTOPped child forever, which would then outlive us. A normal
stop never triggers it: the supervisor outlives its children. Linux sends it
when the *thread* that forked the child ends, so children are spawned from the
supervisor's main loop only.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

PR_SET_PDEATHSIG = 1
STDERR_LINES_KEPT = 20


def _die_with(parent: int) -> Callable[[], None]:
    """The child's half (between fork and exec): die by SIGKILL when ``parent`` dies."""

    def arrange() -> None:
        if sys.platform.startswith("linux"):
            try:
                ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            except OSError:
                pass  # the actor's parent-pid watch still covers us
        if os.getppid() != parent:  # the parent died before the signal was armed
            os.kill(os.getpid(), signal.SIGKILL)

    return arrange


@dataclass(frozen=True)
class WorkerSpec:
    """How to start one supervised child."""

    name: str
    argv: Sequence[str]
    env: dict[str, str] = field(default_factory=dict)
    heartbeats: bool = True
    """False for children that send none (the bus itself)."""


class Child:
    """One running incarnation of a WorkerSpec."""

    def __init__(self, spec: WorkerSpec, on_line: Callable[[str, str], None]) -> None:
        self.spec = spec
        self.started = time.monotonic()
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_LINES_KEPT)
        env = {**os.environ, **spec.env, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            list(spec.argv),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with(os.getpid()),
        )
        self._reader = threading.Thread(
            target=self._read_stderr, args=(on_line,), name=f"{spec.name}-stderr", daemon=True
        )
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def uptime(self) -> float:
        return time.monotonic() - self.started

    def _read_stderr(self, on_line: Callable[[str, str], None]) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self.stderr_tail.append(line)
                on_line(self.spec.name, line)

    def poll(self) -> int | None:
        return self.proc.poll()

    def signal(self, sig: int) -> None:
        try:
            self.proc.send_signal(sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def wait_output(self, timeout: float = 1.0) -> None:
        """Let the stderr reader drain what the child wrote before it died."""
        self._reader.join(timeout)

    def last_error(self) -> str:
        return "\n".join(self.stderr_tail) or "(no output)"


def describe_exit(returncode: int | None) -> tuple[int | None, str]:
    """(exit code, signal name) for a Popen return code."""
    if returncode is not None and returncode < 0:
        try:
            return returncode, signal.Signals(-returncode).name
        except ValueError:
            return returncode, f"signal {-returncode}"
    return returncode, ""
