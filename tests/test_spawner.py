"""Children die with their supervisor, even a SIGSTOPped one (real processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from support.procs import gone, poll

# A stand-in worker: like every actor it handles SIGTERM, so a stopped one keeps that signal pending
# instead of dying of it. It says "ready" once the handler is in place.
WORKER = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("ready", file=sys.stderr, flush=True)
time.sleep(120)
"""
# A stand-in supervisor: it starts the worker through the spawner, prints its pid once ready, and waits.
PARENT = f"""
import sys, time
from voicebus.engine.spawner import Child, WorkerSpec
def on_line(name, line):
    while "child" not in globals():  # the reader thread may beat the assignment below
        time.sleep(0.01)
    if line == "ready":
        print(child.pid, flush=True)
child = Child(WorkerSpec("worker", [sys.executable, "-c", {WORKER!r}]), on_line)
time.sleep(120)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_stopped_child_dies_with_a_killed_supervisor():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    child = None
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        os.kill(child, signal.SIGSTOP)  # a stopped process keeps a SIGTERM pending forever
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        poll(lambda: gone(child), 5, "the stopped child gone after its supervisor's SIGKILL")
    finally:
        for pid in (parent.pid, child):
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        parent.wait(10)
