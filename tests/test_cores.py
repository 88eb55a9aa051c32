"""Model runtimes get half the usable cores by default (workers/cores.py)."""

from __future__ import annotations

import os

import pytest

from voicebus.workers import cores


@pytest.mark.parametrize(("usable", "threads"), [(1, 1), (2, 1), (3, 1), (8, 4)])
def test_half_the_usable_cores_at_least_one(monkeypatch: pytest.MonkeyPatch, usable: int, threads: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(usable)), raising=False)
    assert cores.usable_cores() == usable
    assert cores.half_the_cores() == threads


def test_without_affinity_the_cpu_count_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert cores.half_the_cores() == 3
