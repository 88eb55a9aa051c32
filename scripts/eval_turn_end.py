"""How the listener's end-of-turn rules treat whole sentences and sentences cut short at a pause,
from the words alone and with the chat model's check (``workers/llm/message_end.py``).

    python scripts/eval_turn_end.py [--split judge|tune] [--limit-voices N] [--limit-sentences N]
        [--threads N] [--json PATH]

    python scripts/eval_turn_end.py --limit-voices 2 --limit-sentences 4     # a quick look (~20 s)
    python scripts/eval_turn_end.py                                          # the judge split (~15 min, 2 cores)

Why it exists: at a pause the listener decodes what it has heard so far and picks the silence window
from those words (``workers/turn_end.py``). A whole sentence should get the short window (the answer
comes sooner); a sentence the person has not finished should get the long one (no answer cut in
before they are done). Whisper often reads such a fragment as a whole sentence ("What is the
capital of" → "What is the capital?"), which is what the chat model's check is for. This measures
both errors on the sentences (3 words or more) and espeak-ng voices of a split
(``scripts/eval_data``, see ``eval_asr.py``; piper's ``joe`` is left out).

Clips for each voice and sentence: the ``espeak-ng`` command's speech, resampled to 16 kHz by sox
(with repeatable dither: whisper's confidence moves with the dither alone), trimmed to its sound
(espeak ends a sentence with a pause of its own, a cut clip has none) and given 300 ms of silence
before and after:

    whole          the sentence
    alone1/alone2  the sentence without its last 1/2 words, spoken on its own
    cut1/cut2      the whole sentence's audio cut where its first dropped word starts (10 ms fade-out):
                   a person stopping mid-sentence, without the falling tone of alone1/alone2. The word
                   starts come from libespeak-ng's word events (through ctypes: the command gives none);
                   where espeak runs a word into the one before it there is no event and the clip is
                   skipped (counted in the output).

Each clip goes through the project's recognizer as a pause's guess does: ``transcribe()`` on the
whole clip. Its text and confidence, and the model's log-probability that a message ends with the
words (asked only where the listener asks it: words that read complete), give the window
``EndOfTurn.window_ms`` picks without and with the model. The table gives, per kind of clip, the
share that reads complete and the shares given a window longer than the base one (``long``) and
shorter (``short``). Below it: the area under the ROC curve of the model's log-probability between
whole sentences and fragments among the clips that read complete (where the model decides
anything), and the median time of a transcription and of a model call.

The last columns (``heard perfectly``) put every clip's own words where the transcript was, at full
confidence, a fragment punctuated as if it were the whole sentence ("What is the capital of?"), as
whisper often punctuates one. The same rules and model then show what a recognizer that heard
every word would leave to them: the share of the gap that is the recognizer's.

Settings come from the usual sources (config file, VOICEBUS_* environment); ``--threads`` sets
``asr.threads`` (default 1, as the figures in ``workers/turn_end.py`` were measured), and the
model's check is on whatever ``vad.message_end`` says, at ``vad.message_end_below``. Needs a
recognizer that transcribes whole clips (whisper). Progress on stderr; the table (markdown) on
stdout, then one JSON line of every figure; ``--json`` also writes every clip's transcript.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import multiprocessing
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import eval_asr  # noqa: E402  (splits, voices, sox resampling, progress lines)
from eval_asr import RATE, EvalError, Voice  # noqa: E402

PAD_S = 0.3
"""Silence before and after each clip's sound: little after it, as at a pause that has only just begun."""
FADE = RATE // 100
"""10 ms fade-out at a cut, so the cut itself makes no click for the recognizer to read."""
DROPPED = (1, 2)
"""How many words a fragment lacks."""
KINDS = ("whole", *(f"alone{k}" for k in DROPPED), *(f"cut{k}" for k in DROPPED))
MIN_WORDS = 3


# --- espeak-ng with word times -------------------------------------------------------------------


class _Event(ctypes.Structure):
    """libespeak-ng's espeak_EVENT (speak_lib.h)."""

    class _Id(ctypes.Union):
        _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]

    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", _Id)]


class _VoiceSelect(ctypes.Structure):
    """libespeak-ng's espeak_VOICE (speak_lib.h)."""

    _fields_ = [("name", ctypes.c_char_p), ("languages", ctypes.c_char_p), ("identifier", ctypes.c_char_p),
                ("gender", ctypes.c_ubyte), ("age", ctypes.c_ubyte), ("variant", ctypes.c_ubyte),
                ("xx1", ctypes.c_ubyte), ("score", ctypes.c_int), ("spare", ctypes.c_void_p)]


_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))
_SYNCHRONOUS = 2  # AUDIO_OUTPUT_SYNCHRONOUS: espeak_Synth returns when the audio is all out
_EVENT_END, _EVENT_WORD = 0, 1
_RATE_PARAMETER = 1  # espeakRATE: words a minute
_CHARS_AUTO, _END_PAUSE = 0, 0x1000  # the command's flags: without the end pause the last sound is cut short


@dataclass
class Speech:
    samples: np.ndarray
    """16 kHz mono int16"""
    word_starts: dict[int, int]
    """a word's 1-based character position in the text → the sample (16 kHz) where it starts"""


class LibEspeak:
    """libespeak-ng through ctypes, for the word events the ``espeak-ng`` command does not give."""

    def __init__(self) -> None:
        try:
            self._lib = ctypes.CDLL(ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1")
        except OSError:
            raise EvalError("libespeak-ng not found; install it (Debian: apt-get install espeak-ng)") from None
        self.rate = self._lib.espeak_Initialize(_SYNCHRONOUS, 0, None, 0)
        if self.rate <= 0:
            raise EvalError("libespeak-ng did not start (espeak_Initialize failed)")
        self._lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                           ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        self._length = 0
        self._words: dict[int, int] = {}
        self._callback = _SYNTH_CALLBACK(self._heard)  # kept referenced: the library calls it until exit
        self._lib.espeak_SetSynthCallback(self._callback)

    def _heard(self, wav, count: int, events) -> int:
        self._length += max(count, 0)
        i = 0
        while events[i].type != _EVENT_END:
            if events[i].type == _EVENT_WORD:
                self._words.setdefault(events[i].text_position, events[i].sample)
            i += 1
        return 0  # go on

    def _set_voice(self, voice: Voice) -> None:
        """As ``espeak-ng -v`` does: by name, else by language (either with a +variant)."""
        name, speed = voice.espeak
        if self._lib.espeak_ng_SetVoiceByName(name.encode()) != 0:
            select = _VoiceSelect(None, name.encode(), None, 0, 0, 0, 0, 0, None)
            if self._lib.espeak_ng_SetVoiceByProperties(ctypes.byref(select)) != 0:
                raise EvalError(f"libespeak-ng has no voice {name!r}")
        self._lib.espeak_SetParameter(_RATE_PARAMETER, speed, 0)

    def word_times(self, voice: Voice, text: str) -> tuple[int, dict[int, int]]:
        """The length of the speech and where each word starts, in samples at ``self.rate``."""
        self._length, self._words = 0, {}
        self._set_voice(voice)
        data = text.encode() + b"\0"
        if self._lib.espeak_Synth(data, len(data), 0, 0, 0, _CHARS_AUTO | _END_PAUSE, None, None) != 0:
            raise EvalError(f"libespeak-ng could not say {text!r}")
        self._lib.espeak_Synchronize()
        return self._length, dict(self._words)


def _word_times_afresh(voice: str, text: str) -> tuple[int, int, dict[int, int]]:
    """(rate, length, word starts) from a library that has said nothing before (see ``Espeak``)."""
    lib = LibEspeak()
    return (lib.rate, *lib.word_times(Voice(voice), text))


class Espeak:
    """Speech from the ``espeak-ng`` command and where its words start.

    The word starts come from libespeak-ng, each time in a new process: the library keeps state from one
    synthesis to the next (the same text comes out a few milliseconds longer or shorter in places, and
    sounds different), so only its first synthesis matches the command's audio, sample for sample. A
    pool of one process per task has the next one started while the recognizer works.
    """

    def __init__(self) -> None:
        self._fresh = multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1)

    def speak(self, voice: Voice, text: str, *, word_times: bool = False) -> Speech:
        samples = eval_asr.espeak_speech(voice, text)
        if not word_times:
            return Speech(samples, {})
        rate, length, starts = self._fresh.apply(_word_times_afresh, (voice.spec, text))
        scale = RATE / rate
        if abs(length * scale - len(samples)) > 2:  # sox's resampling keeps the length (± rounding)
            raise EvalError(f"libespeak-ng and espeak-ng disagree on the length of {text!r} ({voice.spec}): "
                            f"{length / rate:.3f} s against {len(samples) / RATE:.3f} s")
        return Speech(samples, {position: round(sample * scale) for position, sample in starts.items()})

    def close(self) -> None:
        self._fresh.terminate()


# --- clips ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clip:
    voice: str
    sentence: str
    kind: str
    words: str
    """what the clip says"""
    samples: np.ndarray

    def pcm(self) -> bytes:
        pad = np.zeros(int(PAD_S * RATE), np.int16)
        return np.concatenate([pad, audible(self.samples), pad]).astype("<i2").tobytes()


def audible(samples: np.ndarray) -> np.ndarray:
    """The samples from the first to the last within 60 dB of the loudest: espeak-ng ends a sentence with a
    pause of its own (200-500 ms), which a cut clip lacks, so without this the kinds would differ in it."""
    level = np.abs(samples.astype(np.int32))
    loud = np.flatnonzero(level > level.max(initial=0) / 1000)
    return samples[loud[0] : loud[-1] + 1] if len(loud) else samples


def word_positions(sentence: str) -> list[int]:
    """Each word's 1-based character position, as espeak's word events give it."""
    positions, at = [], 0
    for word in sentence.split():
        at = sentence.index(word, at)
        positions.append(at + 1)
        at += len(word)
    return positions


def clips_of(espeak: Espeak, voice: Voice, sentence: str) -> tuple[list[Clip], int]:
    """The clips of one sentence in one voice, and how many cut clips had no word boundary to cut at."""
    words = sentence.split()
    whole = espeak.speak(voice, sentence, word_times=True)
    clips = [Clip(voice.spec, sentence, "whole", sentence, whole.samples)]
    skipped = 0
    for k in DROPPED:
        fragment = " ".join(words[:-k]).rstrip(",")
        clips.append(Clip(voice.spec, sentence, f"alone{k}", fragment, espeak.speak(voice, fragment).samples))
        cut = whole.word_starts.get(word_positions(sentence)[len(words) - k])
        if cut is None or cut <= FADE:  # no event: espeak ran the word into the one before it
            skipped += 1
            continue
        piece = whole.samples[:cut].astype(np.float32)
        piece[-FADE:] *= np.linspace(1, 0, FADE, dtype=np.float32)
        clips.append(Clip(voice.spec, sentence, f"cut{k}", fragment, piece.astype(np.int16)))
    return clips, skipped


# --- hearing -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Heard:
    """One clip as the listener reads it at a pause."""

    voice: str
    sentence: str
    kind: str
    words: str
    text: str
    verdict: str
    confidence: float | None
    end_logprob: float | None
    """None where the listener does not ask the model (the words do not read complete)"""
    window_words_ms: int
    window_model_ms: int
    window_perfect_ms: int
    """the window the clip's own words would get (see ``perfect_words``): what is left with no misreading"""
    transcribe_ms: float
    model_ms: float | None


class Listener:
    """The recognizer, end-of-turn rules and chat model the listener builds from the settings."""

    def __init__(self, settings) -> None:
        from voicebus.workers import backends
        from voicebus.workers.turn_end import EndOfTurn

        self.end_of_turn = EndOfTurn.from_settings(settings.vad)
        if not self.end_of_turn.adaptive:
            raise EvalError("vad.adaptive is off: every pause gets the same window, there is nothing to measure")
        self.recognizer = backends.open_recognizer(settings)
        if not hasattr(self.recognizer, "transcribe"):
            raise EvalError(f"asr.backend {settings.asr.backend!r} does not transcribe whole clips; use whisper")
        self.message_end = backends.open_message_end(settings)  # None where the listener would not ask it
        self._perfect: dict[str, int] = {}
        """words → their window (the same for every voice)"""

    def hear(self, clip: Clip) -> Heard:
        from voicebus.workers.turn_end import completeness

        started = time.perf_counter()
        transcript = self.recognizer.transcribe(clip.pcm())
        transcribe_ms = (time.perf_counter() - started) * 1000
        text = transcript.text.strip()  # as the listener's pause does
        end_logprob, model_ms = self.weigh(text)
        return Heard(clip.voice, clip.sentence, clip.kind, clip.words, text, completeness(text),
                     transcript.confidence, end_logprob,
                     self.end_of_turn.window_ms(text, transcript.confidence),
                     self.end_of_turn.window_ms(text, transcript.confidence, end_logprob),
                     self.perfect_window(perfect_words(clip)), transcribe_ms, model_ms)

    def weigh(self, words: str) -> tuple[float | None, float | None]:
        """(the model's log-probability that a message ends with ``words``, ms it took), asked only where the
        listener asks it (words that read complete); (None, None) elsewhere."""
        if self.message_end is None or not self.end_of_turn.asks_the_model(words):
            return None, None
        started = time.perf_counter()
        end_logprob = self.message_end.logprob(words)
        return end_logprob, (time.perf_counter() - started) * 1000

    def perfect_window(self, words: str) -> int:
        """The window for ``words`` heard with full confidence, the model asked as the listener asks it."""
        if words not in self._perfect:
            self._perfect[words] = self.end_of_turn.window_ms(words, 1.0, self.weigh(words)[0])
        return self._perfect[words]

    def close(self) -> None:
        self.recognizer.close()
        if self.message_end is not None:
            self.message_end.close()


def perfect_words(clip: Clip) -> str:
    """What the clip says; a fragment gets its sentence's final mark, as if it were the whole (the harder case
    for the rules: unpunctuated words never read complete)."""
    if clip.kind == "whole":
        return clip.words
    mark = clip.sentence.rstrip()[-1]
    return clip.words + (mark if mark in ".?!" else ".")


# --- figures -------------------------------------------------------------------------------------


def share(rows: Sequence[Heard], keep) -> float | None:
    return sum(map(keep, rows)) / len(rows) if rows else None


def group_figures(rows: Sequence[Heard], base_ms: int) -> dict[str, object]:
    return {
        "clips": len(rows),
        "reads_complete": share(rows, lambda r: r.verdict == "complete"),
        "long_words": share(rows, lambda r: r.window_words_ms > base_ms),
        "long_model": share(rows, lambda r: r.window_model_ms > base_ms),
        "short_words": share(rows, lambda r: r.window_words_ms < base_ms),
        "short_model": share(rows, lambda r: r.window_model_ms < base_ms),
        "long_perfect": share(rows, lambda r: r.window_perfect_ms > base_ms),
        "short_perfect": share(rows, lambda r: r.window_perfect_ms < base_ms),
    }


def auc(higher: Sequence[float], lower: Sequence[float]) -> float | None:
    """Area under the ROC curve: the chance that a value of ``higher`` beats one of ``lower`` (ties: half)."""
    if not higher or not lower:
        return None
    a, b = np.asarray(higher)[:, None], np.asarray(lower)[None, :]
    return float((a > b).mean() + 0.5 * (a == b).mean())


def figures(rows: Sequence[Heard], base_ms: int) -> dict[str, object]:
    whole = [r for r in rows if r.kind == "whole"]
    fragments = [r for r in rows if r.kind != "whole"]
    groups = {"whole sentences": whole, "fragments": fragments}
    groups.update({f"  {kind}": [r for r in rows if r.kind == kind] for kind in KINDS[1:]})
    asked = [r for r in rows if r.end_logprob is not None]  # the clips that read complete
    model_ms = [r.model_ms for r in asked if r.model_ms is not None]
    return {
        "groups": {name.strip(): group_figures(g, base_ms) for name, g in groups.items()},
        "auc_complete": auc([r.end_logprob for r in asked if r.kind == "whole"],
                            [r.end_logprob for r in asked if r.kind != "whole"]),
        "auc_whole_n": sum(r.kind == "whole" for r in asked),
        "auc_fragment_n": sum(r.kind != "whole" for r in asked),
        "transcribe_ms_median": statistics.median(r.transcribe_ms for r in rows) if rows else None,
        "model_ms_median": statistics.median(model_ms) if model_ms else None,
        "model_calls": len(model_ms),
    }


COLUMNS = (("clips", "clips"), ("reads complete", "reads_complete"),
           ("long window, words only", "long_words"), ("long window, with the model", "long_model"),
           ("short window, words only", "short_words"), ("short window, with the model", "short_model"),
           ("long window, heard perfectly", "long_perfect"), ("short window, heard perfectly", "short_perfect"))


def print_table(report: dict[str, object]) -> None:
    def cell(value: object) -> str:
        if value is None:
            return "—"
        return str(value) if isinstance(value, int) else f"{value:.1%}"

    f = report["figures"]
    print(f"| {report['split']} split | " + " | ".join(title for title, _ in COLUMNS) + " |")
    print("|---|" + "---:|" * len(COLUMNS))
    for name, group in f["groups"].items():
        label = name if name in ("whole sentences", "fragments") else f"– {name}"
        print(f"| {label} | " + " | ".join(cell(group[key]) for _, key in COLUMNS) + " |")
    vad = report["settings"]["vad"]
    below = report["settings"]["message_end_below"]
    print()
    print(f"Windows: short {min(vad['complete_ms'], vad['silence_ms'])} ms, base {vad['silence_ms']} ms, "
          f"long {max(vad['incomplete_ms'], vad['silence_ms'])} ms; the model's check "
          + ("off (vad.message_end)" if below is None else f"at a log-probability below {below:g}") + ".")
    if f["auc_complete"] is not None:
        print(f"AUC of the model's log-probability, whole vs fragment, among clips that read complete: "
              f"{f['auc_complete']:.3f} ({f['auc_whole_n']} whole, {f['auc_fragment_n']} fragments).")
    model = "—" if f["model_ms_median"] is None else f"{f['model_ms_median']:.0f} ms"
    print(f"Median time: transcription {f['transcribe_ms_median']:.0f} ms, model call {model} "
          f"({f['model_calls']} calls). {report['voices_n']} voices x {report['sentences_n']} sentences; "
          f"cut clips skipped (no word boundary): {report['cuts_skipped']}.")


# --- command line --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="See the module docstring.")
    parser.add_argument("--split", choices=sorted(eval_asr.SPLITS), default="judge",
                        help="judge: sentences and voices nobody tunes on (default); tune: the tuning set")
    parser.add_argument("--limit-voices", type=int, help="only the split's first N voices")
    parser.add_argument("--limit-sentences", type=int, help="only the first N sentences (of 3 words or more)")
    parser.add_argument("--threads", type=int, default=1, help="asr.threads for the recognizer (default 1)")
    parser.add_argument("--json", type=Path, help="also write every figure and every clip's transcript here")
    args = parser.parse_args(argv)
    if any(n is not None and n < 1 for n in (args.limit_voices, args.limit_sentences, args.threads)):
        parser.error("--limit-voices, --limit-sentences and --threads take a positive number")
    return args


def run(args: argparse.Namespace) -> dict[str, object]:
    from voicebus.engine.settings import load
    from voicebus.workers.config import Settings

    sentence_file, split_voices = eval_asr.SPLITS[args.split]
    voices = [Voice(v) for v in split_voices if v != eval_asr.JOE][: args.limit_voices]
    sentences = [s for s in eval_asr.read_sentences(sentence_file) if len(s.split()) >= MIN_WORDS]
    sentences = sentences[: args.limit_sentences]
    eval_asr.check_voices(voices)  # also: one line if espeak-ng is missing
    settings = load(Settings, overrides={"asr.threads": args.threads})
    total = len(voices) * len(sentences) * len(KINDS)
    print(f"{len(voices)} voices x {len(sentences)} sentences, up to {total} clips; loading…",
          file=sys.stderr, flush=True)
    started = time.monotonic()
    espeak = Espeak()
    listener = None
    rows: list[Heard] = []
    skipped = 0
    try:
        listener = Listener(settings)
        progress = eval_asr.Progress("clips", total)
        for voice in voices:
            for sentence in sentences:
                clips, missing = clips_of(espeak, voice, sentence)
                skipped += missing
                for clip in clips:
                    rows.append(listener.hear(clip))
                    progress.step()
                for _ in range(missing):  # the count stays true for the ETA
                    progress.step()
    finally:
        espeak.close()
        if listener is not None:
            listener.close()
    elapsed = time.monotonic() - started
    print(f"done in {eval_asr._mmss(elapsed)}", file=sys.stderr, flush=True)
    return {
        "split": args.split, "voices": [v.spec for v in voices], "voices_n": len(voices),
        "sentences_n": len(sentences), "cuts_skipped": skipped, "elapsed_s": round(elapsed, 1),
        "settings": {"vad": asdict(settings.vad), "asr": {k: getattr(settings.asr, k) for k in
                                                          ("backend", "language", "beam_size", "threads", "prompt")},
                     "message_end_below": listener.end_of_turn.message_end_below
                     if listener.message_end is not None else None},
        "figures": figures(rows, listener.end_of_turn.base_ms),
        "clips": [asdict(r) for r in rows],
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def work() -> int:
        report = run(args)
        print_table(report)
        print(json.dumps({key: value for key, value in report.items() if key != "clips"}))  # (--json has them)
        if args.json is not None:
            args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        return 0

    return eval_asr.said_in_one_line("eval_turn_end", work)


if __name__ == "__main__":
    sys.exit(main())
