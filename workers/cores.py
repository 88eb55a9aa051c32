"""How many threads a worker gives its model runtime: half the usable cores, at least one.

The listener, thinker and speaker share one machine, and each runtime here
(CTranslate2 for whisper, llama.cpp, onnxruntime for piper) spins its threads
while they wait for each other. A runtime that takes every core then collapses
as soon as another worker runs, and on 2 cores even alone it is no faster: each
backend's module records what was measured.
"""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def half_the_cores() -> int:
    """Half the usable cores, at least one: a model runtime's default thread count."""
    return max(1, usable_cores() // 2)
