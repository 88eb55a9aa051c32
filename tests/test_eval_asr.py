"""Speech recognition on voices nobody tuned on: a small fixed slice of ``scripts/eval_asr.py``.

Twelve short espeak-ng clips (``tests/data/asr``, voices outside the tuning set) go through the
script's own adapter (``Ear``: the listener's VAD and recognizer, fed 20 ms frames), so a drop in
accuracy fails here, not in a user's living room. Thresholds are loose on purpose: they catch a
regression, they do not grade the recognizer (the full script does that).
"""

from __future__ import annotations

import csv
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from voicebus.engine.settings import load
from voicebus.workers.audio import read_audio
from voicebus.workers.config import Settings

ROOT = Path(__file__).resolve().parent.parent
CLIPS = Path(__file__).resolve().parent / "data" / "asr"

FLOOR = {"whisper": 0.75, "pocketsphinx": 0.05}
"""Word accuracy below which a backend has regressed. Measured on these clips: whisper base as
committed before issue 8 (30 s window, beam 5) 0.83; pocketsphinx 0.11 — it is known to fail on
voices it was not tuned on (issue 8), so its floor only catches a collapse."""
HEARS_STOP_PHRASES = {"whisper"}
"""Backends expected to hear a lone "Stop." / "Goodbye." from these voices."""


def _load_script():
    spec = importlib.util.spec_from_file_location("eval_asr", ROOT / "scripts" / "eval_asr.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["eval_asr"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


eval_asr = _load_script()


def _clips() -> list[tuple[Path, str]]:
    with open(CLIPS / "clips.tsv", encoding="utf-8", newline="") as table:
        return [(CLIPS / row[0], row[3]) for row in csv.reader(table, delimiter="\t")]


def _backends() -> list[str]:
    default = Settings().asr.backend
    return list(dict.fromkeys([default, "whisper"]))


@pytest.fixture(scope="session", params=_backends())
def heard(request, tmp_path_factory) -> Iterator[tuple[str, list[tuple[str, object]]]]:
    """Every clip heard once by the backend (the default one, and whisper), and by its recognizer alone on the
    speech cut where it is: (backend, [(text, ClipHeard, cut's text or None)])."""
    backend = request.param
    settings = load(Settings, env={}, overrides={"asr.backend": backend,
                                                 "state.dir": tmp_path_factory.mktemp(f"state-{backend}")})
    ear = eval_asr.Ear(settings)
    try:
        results = []
        for path, text in _clips():
            pcm, _ = read_audio(path)
            speech = np.frombuffer(pcm, dtype="<i2")
            clip = eval_asr.make_clip(speech)
            results.append((text, ear.hear(clip, realtime=False), ear.cut(clip, len(speech))))
    finally:
        ear.close()
    yield backend, results


def test_the_committed_clips_are_what_the_readme_says():
    clips = _clips()
    assert len(clips) == 12
    stop = eval_asr.StopRule(Settings().llm.stop_phrases)
    kinds = [stop.kind(text) for _, text in clips]
    assert kinds.count("stop") == 2 and kinds.count("mid") == 2
    tuned = {v.split("@")[0] for v in eval_asr.TUNE_VOICES}
    with open(CLIPS / "clips.tsv", encoding="utf-8", newline="") as table:
        assert not {row[1] for row in csv.reader(table, delimiter="\t")} & tuned


def test_word_accuracy_on_voices_nobody_tuned_on(heard):
    backend, results = heard
    errors = [eval_asr.word_errors(text, " ".join(h.text for h in hearing.heard)) for text, hearing, _cut in results]
    accuracy = eval_asr.word_accuracy(errors)
    said = {text: " | ".join(h.text for h in hearing.heard) for text, hearing, _cut in results}
    assert accuracy is not None and accuracy >= FLOOR[backend], f"{backend} heard {said}"


def test_a_perfect_cut_hears_clean_speech_as_well_as_the_listener_does(heard):
    """``--perfect-cut``'s column: the recognizer alone on the speech, the front end's yardstick. On clean
    speech the front end loses nothing to speak of, so the two agree (loosely: a cut a few hundred ms
    longer or shorter moves whisper's words both ways)."""
    backend, results = heard
    cuts = [cut for _text, _hearing, cut in results]
    if backend != "whisper":
        assert cuts == [None] * len(results)  # a streaming recognizer has no batch call to make
        return
    listener = eval_asr.word_accuracy(eval_asr.word_errors(text, " ".join(h.text for h in hearing.heard))
                                      for text, hearing, _cut in results)
    alone = eval_asr.word_accuracy(eval_asr.word_errors(text, cut) for text, _hearing, cut in results)
    assert alone >= FLOOR[backend] and abs(alone - listener) <= 0.1, (alone, listener, cuts)


def test_the_vad_hears_each_clip_as_one_utterance(heard):
    _backend, results = heard
    counts = {text: len(hearing.heard) for text, hearing, _cut in results}
    assert all(count == 1 for count in counts.values()), counts


def test_lone_stop_phrases_end_the_conversation_and_mid_sentence_ones_do_not(heard):
    backend, results = heard
    stop = eval_asr.StopRule(Settings().llm.stop_phrases)
    outcome = {text: any(stop.ends_conversation(h.text) for h in hearing.heard) for text, hearing, _cut in results}
    false_stops = [text for text, stopped in outcome.items() if stopped and stop.kind(text) != "stop"]
    assert not false_stops
    missed = [text for text, stopped in outcome.items() if not stopped and stop.kind(text) == "stop"]
    if backend not in HEARS_STOP_PHRASES and missed:
        pytest.xfail(f"{backend} misses lone stop phrases on unseen voices (issue 8): {missed}")
    assert not missed
