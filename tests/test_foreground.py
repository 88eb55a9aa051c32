"""The foreground gate's rule on frames of known level (pure logic; real speech is in test_vad)."""

from __future__ import annotations

import numpy as np

from voicebus.workers.foreground import HOLD_S, MIN_FRAMES, ForegroundGate, frame_power, to_db


def tone(db: float) -> bytes:
    """A 20 ms frame whose mean power is ``db`` dBFS."""
    amplitude = np.sqrt(2 * 10 ** (db / 10)) * 32768
    return (amplitude * np.sin(np.arange(320) * 0.3)).astype("<i2").tobytes()


def feed(gate: ForegroundGate, frames, start_s: float, *, in_speech: bool) -> list[bool]:
    """Frames a classifier called voiced: which of them are the person's?"""
    return [gate.voiced(frame, start_s + i * 0.02, heard=True, in_speech=in_speech) for i, frame in enumerate(frames)]


def test_frame_levels():
    assert abs(to_db(frame_power(tone(-20))) + 20) < 0.2
    assert to_db(frame_power(bytes(640))) == -100


def test_a_quiet_stretch_is_background_a_quiet_frame_is_not():
    gate = ForegroundGate(10)
    assert all(feed(gate, [tone(-20)] * 30, 0.0, in_speech=True))
    assert abs(gate.reference_db(0.6) + 20) < 0.2
    # one soft frame among loud ones (a consonant) is the person; 200 ms of talk 15 dB down is not
    assert all(feed(gate, [tone(-35), tone(-20), tone(-20)], 0.6, in_speech=True))
    quiet = feed(gate, [tone(-35)] * 15, 0.66, in_speech=True)
    assert quiet[:3] == [True] * 3 and not any(quiet[-5:])
    assert sum(quiet) < 10
    assert abs(gate.reference_db(1.0) + 20) < 1.5  # rejected frames do not pull the level down


def test_the_last_level_gates_starts_for_the_hold_then_anyone_is_heard():
    gate = ForegroundGate(10)
    feed(gate, [tone(-20)] * MIN_FRAMES * 2, 0.0, in_speech=True)
    gate.ended(0.4)
    assert not any(feed(gate, [tone(-35)] * 20, 1.0, in_speech=False)[-5:])
    assert all(feed(gate, [tone(-24)] * 20, 2.0, in_speech=False)[-5:])
    assert gate.reference_db(0.4 + HOLD_S + 0.1) is None
    assert all(feed(gate, [tone(-35)] * 20, 0.4 + HOLD_S + 0.1, in_speech=False))


def test_background_counts_as_silence_only_after_the_classifiers_own_hangover():
    """The endpointer discounts the classifier's hangover from every silence; the gate keeps it."""
    plain, held = ForegroundGate(10), ForegroundGate(10, hangover_frames=4)
    for gate in (plain, held):
        feed(gate, [tone(-20)] * 20, 0.0, in_speech=True)
    quiet = [tone(-40)] * 20
    assert feed(held, quiet, 0.4, in_speech=True).count(True) == feed(plain, quiet, 0.4, in_speech=True).count(True) + 4
    assert not held.voiced(tone(-20), 0.8, heard=False, in_speech=True)  # what the classifier calls silence is


def test_gap_zero_admits_everything():
    gate = ForegroundGate(0)
    feed(gate, [tone(-10)] * 20, 0.0, in_speech=True)
    assert all(feed(gate, [tone(-60)] * 20, 0.4, in_speech=True))
