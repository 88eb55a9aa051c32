"""Speech recognition on voices nobody tuned on: word accuracy, stop phrases, latency, real-time factor.

    python scripts/eval_asr.py [--backends pocketsphinx,whisper] [--split judge|tune]
        [--snr clean,20,15,10] [--noise pink,white,brown,babble] [--voices V,...]
        [--per-voice N] [--limit N] [--realtime | --latency-clips N] [--cache DIR] [--details FILE] [--perfect-cut]

Why it exists: the old default recognizer was tuned and tested on one voice (piper's ``joe``, which
also speaks ``examples/question.wav``) and failed on every other one. So the sentences and voices
that judge a recognizer are kept apart from those anyone tunes on, as two named splits:

    judge   eval_data/judge.txt spoken by JUDGE_VOICES (the default)
    tune    eval_data/tune.txt  spoken by TUNE_VOICES  (what the recognizer work is tuned on)

and piper's ``joe`` (the embedded voice) is reported in its own row, never in the average.

Each clip: espeak-ng (or piper) speech, resampled to 16 kHz by sox and cached under ``--cache``;
0.5 s of silence before and 1.5 s after (so end-of-speech detection is exercised); at a noisy SNR,
a noise bed (sox white/pink/brown noise, or a babble of espeak voices) covering the whole clip,
scaled against the power of the active speech. The clip is then fed the way the listener feeds
audio (20 ms frames through its VAD into its recognizer): ``Ear`` below is that one adapter, the
only place to change when the listener's front-end changes.

Word accuracy is 1 - WER over the group's words (substitutions, deletions and insertions count;
clipped at 0) after whisper's English text normaliser on both sides (case, punctuation, numbers:
"ten" = "10"). A clip's hypothesis is everything the listener would have sent for it, so an
utterance the VAD split in two still counts its words (the split is counted apart). Stop phrases
are judged by the thinker's own rule: a lone stop phrase must end the conversation, a sentence that
only contains the words must not.

With ``--perfect-cut`` each clip is also heard by the recognizer alone, on the clip cut where its
speech is (0.2 s either side, no VAD): the "cut acc" column. The gap between it and "word acc" is what
the listener's front end (VAD, pauses, end of turn) loses; the rest is the recognizer's. On the tuning
split (720 clips, 8 voices, the same clips in both): clean 0.83 vs 0.81, 15 dB 0.67 vs 0.72, 10 dB 0.59
vs 0.62, nearly all of the front end's part in babble, which the VAD takes for speech.

Latency (final transcript after vad.end) is only honest when frames arrive at real time, since a
recognizer may decode while the audio comes in; so it comes from clips fed at real time: a subset
of the clean clips spread over the voices (``--latency-clips``, default 20 per backend), or every
clip with ``--realtime``. A p50/p90 of fewer than 5 utterances is left out of the table. Everything
else runs as fast as the recognizer goes. Settings (VAD, language) come from the usual sources
(config file, VOICEBUS_* environment), ``--backends`` overrides only ``asr.backend``.

Prints progress on stderr, then a table (backend x voice, the non-joe average, per-SNR and
per-noise rows) and, last on stdout, one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

RATE = 16000
FRAME = RATE // 50
"""Samples per 20 ms frame: the listener's frame."""
DATA = Path(__file__).resolve().parent / "eval_data"
LEAD_S = 0.5
TRAIL_S = 1.5
CUT_MARGIN_S = 0.2
"""(--perfect-cut) audio kept either side of the speech: a VAD's preroll and hangover, roughly."""
JOE = "joe"
"""piper's embedded voice: the one the old recognizer was tuned on; reported apart."""

# Accents x male/female variants x speeds (words a minute); none of these voice+speed pairs is tuned on.
JUDGE_VOICES = (
    "en-us+m1@150",
    "en-us+f3@165",
    "en-us+m7@190",
    "en-us-nyc+m2@160",
    "en-gb-x-rp+f4@135",
    "en-gb-x-rp+m5@170",
    "en-gb-x-gbclan+m4@155",
    "en-gb-x-gbcwmd+f1@175",
    "en-gb+m6@130",
    "en-029+f5@160",
)
TUNE_VOICES = tuple(f"{v}@{s}" for s in (140, 180) for v in ("en-us+m3", "en-gb+f2", "en-gb-scotland", "en-029+m1"))
SPLITS = {"judge": ("judge.txt", JUDGE_VOICES), "tune": ("tune.txt", TUNE_VOICES)}
BABBLE_VOICES = ("en-us+m8@150", "en-gb+f5@165", "en-us+f2@145", "en-gb-x-rp+m2@175", "en-029+m4@155", "en-us-nyc+f1@160")
NOISES = ("pink", "white", "brown", "babble")
NOISE_BED_S = 60.0

COST_S = {"pocketsphinx": 1.0, "whisper": 2.5}
"""Rough seconds per clip at full speed on 2 busy cores, for the up-front estimate only."""


class EvalError(Exception):
    """A problem the user can fix; printed as one line."""


# --- corpus --------------------------------------------------------------------------------------


def read_sentences(name: str) -> list[str]:
    """The non-empty, non-comment lines of ``eval_data/<name>``."""
    path = DATA / name
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise EvalError(f"{path}: {exc.strerror or exc}") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


class StopRule:
    """The thinker's stop-phrase rule (``voicebus.workers.stop_phrases``), imported, not re-implemented."""

    def __init__(self, phrases: Iterable[str]) -> None:
        from voicebus.workers.stop_phrases import StopPhrases, normalize

        self._rule = StopPhrases(phrases)
        self._normalize = normalize
        self._words = [normalize(p) for p in phrases if normalize(p)]

    def ends_conversation(self, text: str) -> bool:
        """Whether the thinker would end the conversation on this utterance."""
        return self._rule.matches(text)

    def kind(self, sentence: str) -> str:
        """'stop' (a lone stop phrase), 'mid' (has a phrase's words among others) or 'ask'."""
        if self.ends_conversation(sentence):
            return "stop"
        padded = f" {self._normalize(sentence)} "
        return "mid" if any(f" {p} " in padded for p in self._words) else "ask"


# --- voices and speech ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Voice:
    """``joe`` (piper) or an espeak-ng voice with a speed: ``en-gb-x-rp+f4@135``."""

    spec: str

    @property
    def is_joe(self) -> bool:
        return self.spec == JOE

    @property
    def espeak(self) -> tuple[str, int]:
        name, _, speed = self.spec.partition("@")
        return name, int(speed or 160)


def check_voices(voices: Sequence[Voice]) -> None:
    """Fail early, naming the voice: espeak-ng quietly falls back to a default for an unknown one."""
    listing = _run(["espeak-ng", "--voices"]).decode()
    languages = {line.split()[1] for line in listing.splitlines()[1:] if len(line.split()) > 1}
    variants = {line.split()[4].removeprefix("!v/") for line in
                _run(["espeak-ng", "--voices=variant"]).decode().splitlines()[1:] if len(line.split()) > 4}
    for voice in voices:
        if voice.is_joe:
            continue
        name, _, speed = voice.spec.partition("@")
        language, _, variant = name.partition("+")
        if language not in languages or (variant and variant not in variants):
            raise EvalError(f"unknown espeak-ng voice {voice.spec!r} (see espeak-ng --voices and --voices=variant)")
        if speed and not (speed.isdigit() and 80 <= int(speed) <= 450):
            raise EvalError(f"voice {voice.spec!r}: speed must be 80..450 words a minute")


def _run(cmd: list[str], stdin: bytes | None = None) -> bytes:
    try:
        done = subprocess.run(cmd, input=stdin, capture_output=True, check=False, timeout=120)
    except FileNotFoundError:
        raise EvalError(f"{cmd[0]} not found; install it (Debian: apt-get install espeak-ng sox)") from None
    except subprocess.TimeoutExpired:
        raise EvalError(f"{cmd[0]} took over 120 s") from None
    if done.returncode != 0:
        raise EvalError(f"{' '.join(cmd[:3])}… failed: {done.stderr.decode(errors='replace').strip()[:200]}")
    return done.stdout


def _sox_to_16k(audio: bytes, input_args: list[str]) -> np.ndarray:
    """Resample with sox to the listener's format: 16 kHz mono int16. With a repeatable dither (-R): sox's
    default draws it anew each run, and whisper's confidence moved by ~0.03 with the dither alone."""
    raw = _run(["sox", "-R", "-V1", *input_args, "-", "-t", "raw", "-r", str(RATE), "-e", "signed", "-b", "16",
                "-c", "1", "-"], audio)
    return np.frombuffer(raw, dtype="<i2").copy()


class SpeechCache:
    """Speech for (voice, text) at 16 kHz, synthesized once and kept as FLAC under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._piper = None
        self._espeak_version = _run(["espeak-ng", "--version"]).decode().split()[3]

    def path(self, voice: Voice, text: str) -> Path:
        engine = "piper-joe" if voice.is_joe else f"espeak-{self._espeak_version}"
        digest = hashlib.sha1(text.encode()).hexdigest()[:16]
        return self.root / "speech" / engine / voice.spec.replace("+", "_") / f"{digest}.flac"

    def has(self, voice: Voice, text: str) -> bool:
        return self.path(voice, text).exists()

    def speech(self, voice: Voice, text: str) -> np.ndarray:
        import soundfile

        path = self.path(voice, text)
        if path.exists():
            return soundfile.read(path, dtype="int16")[0]
        samples = self._piper_speech(text) if voice.is_joe else espeak_speech(voice, text)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".part")
        soundfile.write(partial, samples, RATE, format="FLAC", subtype="PCM_16")
        partial.replace(path)  # a killed run leaves no half-written clip behind
        return samples

    def _piper_speech(self, text: str) -> np.ndarray:
        if self._piper is None:
            from voicebus.workers.tts.piper import PiperSynthesizer

            self._piper = PiperSynthesizer()
        pcm = b"".join(self._piper.synthesize(text))
        rate = self._piper.sample_rate
        return _sox_to_16k(pcm, ["-t", "raw", "-r", str(rate), "-e", "signed", "-b", "16", "-c", "1"])


def espeak_speech(voice: Voice, text: str) -> np.ndarray:
    """``text`` spoken by an espeak-ng voice, 16 kHz int16 (sox resamples espeak's 22.05 kHz)."""
    name, speed = voice.espeak
    wav = _run(["espeak-ng", "-v", name, "-s", str(speed), "--stdout", text])
    return _sox_to_16k(wav, ["-t", "wav"])


# --- noise and clips -----------------------------------------------------------------------------


def noise_bed(kind: str, cache: Path) -> np.ndarray:
    """A minute of noise at 16 kHz as float32, made once and cached."""
    import soundfile

    path = cache / "noise" / f"{kind}.flac"
    if path.exists():
        return soundfile.read(path, dtype="float32")[0]
    if kind in ("white", "pink", "brown"):
        # -R: sox's repeatable random numbers, so every cache holds the same noise.
        raw = _run(["sox", "-R", "-n", "-t", "raw", "-r", str(RATE), "-e", "signed", "-b", "16", "-c", "1", "-",
                    "synth", str(NOISE_BED_S), f"{kind}noise", "vol", "0.5"])
        bed = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768
    elif kind == "babble":
        bed = _babble()
    else:
        raise EvalError(f"unknown noise {kind!r}; choose from {', '.join(NOISES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".part")
    soundfile.write(partial, bed, RATE, format="FLAC", subtype="PCM_16")
    partial.replace(path)
    return bed


def _babble() -> np.ndarray:
    """Several espeak voices reading one text at once, each starting elsewhere in it: a crowd."""
    text = " ".join(read_sentences("babble.txt"))
    length = int(NOISE_BED_S * RATE)
    bed = np.zeros(length, dtype=np.float32)
    for i, spec in enumerate(BABBLE_VOICES):
        talk = espeak_speech(Voice(spec), text).astype(np.float32) / 32768
        talk = np.resize(talk, length)  # repeats the talk to fill the bed
        bed += np.roll(talk, i * length // len(BABBLE_VOICES))
    return 0.5 * bed / np.max(np.abs(bed))


def active_power(speech: np.ndarray) -> float:
    """Mean power over the 20 ms frames within 40 dB of the loudest: pauses do not dilute it."""
    x = speech.astype(np.float64) / 32768
    frames = x[: len(x) // FRAME * FRAME].reshape(-1, FRAME)
    if not len(frames):
        return float(np.mean(x**2)) if len(x) else 0.0
    power = np.mean(frames**2, axis=1)
    return float(np.mean(power[power >= power.max() * 1e-4]))


def make_clip(speech: np.ndarray, *, snr_db: float | None = None, noise: np.ndarray | None = None,
              seed: int = 0, lead_s: float = LEAD_S, trail_s: float = TRAIL_S) -> bytes:
    """Pad ``speech`` with silence and, at ``snr_db``, add noise over the whole clip; int16 PCM bytes.

    The noise is scaled so that active speech power / noise power = ``snr_db``; it covers the
    silences too, as a room does. ``seed`` picks where in the noise bed the clip's noise starts.
    """
    lead, trail = int(lead_s * RATE), int(trail_s * RATE)
    clip = np.concatenate([np.zeros(lead), speech.astype(np.float64) / 32768, np.zeros(trail)])
    if snr_db is not None:
        if noise is None:
            raise ValueError("an SNR needs a noise bed")
        start = seed % max(1, len(noise) - len(clip))
        part = np.resize(noise[start:], len(clip)).astype(np.float64)
        gain = math.sqrt(active_power(speech) / (np.mean(part**2) * 10 ** (snr_db / 10)))
        clip = clip + gain * part
        peak = np.max(np.abs(clip))
        if peak >= 1.0:  # scale the whole mix down rather than clip it: the SNR stays as asked
            clip = clip * (0.99 / peak)
    return (np.clip(np.rint(clip * 32768), -32768, 32767).astype("<i2")).tobytes()


# --- the listener's front-end: the one adapter ---------------------------------------------------


@dataclass(frozen=True)
class Heard:
    """One utterance as the listener would have sent it."""

    text: str
    start_ms: int
    end_ms: int
    vad_end_t: float
    """time.monotonic() when the VAD declared the end (vad.end)."""
    final_t: float
    """time.monotonic() when the final transcript was ready (asr.final)."""
    forced_end: bool = False
    """True when the VAD never found the end and the input's end closed it (as the listener does at EOF)."""
    rejoined: bool = False
    """the next utterance rejoined this one (vad.rejoin_ms): its transcript holds these words, which the
    listener's next turn asks again"""

    @property
    def latency_s(self) -> float:
        return self.final_t - self.vad_end_t


@dataclass
class ClipHeard:
    """Everything one clip produced."""

    heard: list[Heard] = field(default_factory=list)
    decode_s: float = 0.0
    """Wall time spent in the recognizer."""
    decode_cpu_s: float = 0.0
    """Process CPU time spent in the recognizer (every thread it uses)."""
    fed_s: float = 0.0
    """Seconds of audio the recognizer was given."""


class Ear:
    """The listener's front end (``voicebus.workers.hearing.Hearing``), driven as ``workers/listener.py`` drives it.

    The same frame classifier, endpointer, end-of-turn policy and recognizer the
    listener builds from the settings; speculative decoding at pauses on the front
    end's own thread; 20 ms frames, then silence after the end of the input until
    an utterance in progress ends (the listener's end of input). ``hear`` returns
    per utterance its text and the monotonic times of vad.end and of the final, and
    the recognizer's wall and CPU time and how much audio it was given.
    """

    def __init__(self, settings) -> None:
        from voicebus.workers import backends

        self.settings = settings
        self.backend = settings.asr.backend
        self.recognizer = backends.open_recognizer(settings)
        self.message_end = backends.open_message_end(settings)
        from voicebus.workers.stop_phrases import StopPhrases

        self.stops = StopPhrases(settings.llm.stop_phrases)
        """(the listener's: a stop phrase after the words an utterance rejoined is decided on its own audio)"""

    def hear(self, pcm: bytes, *, realtime: bool) -> ClipHeard:
        """Feed one clip of 16 kHz mono int16 ``pcm``; ``realtime`` delivers a frame every 20 ms."""
        from voicebus.workers.hearing import Ended, Final, Hearing, NoMatch, SpeechStarted
        from voicebus.workers.turn_end import EndOfTurn
        from voicebus.workers.vad import endpointer_for

        vad = self.settings.vad
        out = ClipHeard()
        starts: dict[int, int] = {}
        ends: dict[int, tuple[int, float]] = {}
        rejoined: dict[int, int] = {}
        """utterance → the one it rejoins (vad.rejoin_ms): whose words its own transcript holds"""
        at: dict[int, int] = {}
        """utterance → where its Heard is in ``out.heard``"""
        input_over = False

        def heard(event: object) -> None:
            now = time.monotonic()
            if isinstance(event, SpeechStarted):
                starts[event.utterance] = event.offset_ms
                if event.rejoins:
                    rejoined[event.utterance] = event.rejoins
            elif isinstance(event, Ended):
                ends[event.utterance] = (event.offset_ms, now)
            elif isinstance(event, (Final, NoMatch)):
                end_ms, vad_end_t = ends.get(event.utterance, (0, now))
                text = self.stops.asked(event.text, event.alone).strip() if isinstance(event, Final) else ""
                result = Heard(text,
                               starts.get(event.utterance, 0), end_ms, vad_end_t, now, forced_end=input_over)
                at[event.utterance] = len(out.heard)
                out.heard.append(result)
                before = at.get(rejoined.get(event.utterance, 0))
                if isinstance(event, Final) and before is not None:
                    out.heard[before] = replace(out.heard[before], rejoined=True)

        hearing = Hearing(_Timed(self.recognizer, out), endpointer_for(vad), heard,
                          end_of_turn=EndOfTurn.from_settings(vad), rejoin_ms=vad.rejoin_ms,
                          read_alone=lambda text: self.stops.closing(text) is not None,
                          message_end=self.message_end.logprob if self.message_end is not None else None)
        frame_bytes = FRAME * 2
        padded = pcm + bytes(-len(pcm) % frame_bytes)
        t0 = time.monotonic()
        try:
            for index in range(len(padded) // frame_bytes):
                if realtime:  # frame i is complete at t0 + (i + 1) * 20 ms, as from a microphone
                    delay = t0 + (index + 1) * 0.02 - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                hearing.feed(padded[index * frame_bytes : (index + 1) * frame_bytes])
                if not realtime and hearing.decoding:
                    # At full speed the stream would race ahead of the decode: let it finish at this
                    # point of the stream, as an infinitely fast recognizer would (latency: --realtime).
                    hearing.drain()
            input_over = True
            for _ in range(30 * 50):  # the listener's end of input: silence until the utterance ends
                if not hearing.in_speech:
                    break
                hearing.feed(bytes(frame_bytes))
            hearing.drain()
        finally:
            hearing.close()
        out.heard.sort(key=lambda h: h.start_ms)
        return out

    def cut(self, pcm: bytes, speech_samples: int) -> str | None:
        """The recognizer alone on the part of a ``make_clip`` clip where its speech is (CUT_MARGIN_S either
        side), no VAD: what a perfect front end would hand it. None for a recognizer that only streams."""
        if not hasattr(self.recognizer, "transcribe"):
            return None
        from voicebus.engine.errors import VoicebusError

        first = max(0, int((LEAD_S - CUT_MARGIN_S) * RATE))
        last = int(LEAD_S * RATE) + speech_samples + int(CUT_MARGIN_S * RATE)
        try:
            return self.recognizer.transcribe(pcm[2 * first : 2 * last]).text.strip()
        except VoicebusError:  # as the listener's path has it: a failed decode hears nothing
            return ""

    def close(self) -> None:
        self.recognizer.close()
        if self.message_end is not None:
            self.message_end.close()


class _Timed:
    """The recognizer, with the time spent in it (on whichever thread) added to a ClipHeard."""

    def __init__(self, recognizer, out: ClipHeard) -> None:
        self._recognizer = recognizer
        self._out = out
        if hasattr(recognizer, "transcribe"):  # a batch recognizer: Hearing tells the kinds apart by this
            self.transcribe = self._timed("transcribe", counts_audio=True)
        else:
            self.begin = self._timed("begin")
            self.feed = self._timed("feed", counts_audio=True)
            self.hypothesis = self._timed("hypothesis")
            self.end = self._timed("end")

    def _timed(self, name: str, *, counts_audio: bool = False) -> Callable[..., object]:
        method = getattr(self._recognizer, name)

        def call(*args: object) -> object:
            wall, cpu = time.monotonic(), time.process_time()  # the recognizer's own threads count too
            try:
                return method(*args)
            finally:
                self._out.decode_s += time.monotonic() - wall
                self._out.decode_cpu_s += time.process_time() - cpu
                if counts_audio and args:
                    self._out.fed_s += len(args[0]) / 2 / RATE

        return call


# --- scoring -------------------------------------------------------------------------------------

_SYMBOLS = (("°C", " degrees celsius"), ("°F", " degrees fahrenheit"), ("°", " degrees"), ("+", " plus "),
            ("×", " times "), ("%", " percent"))
"""Symbols a recognizer writes for spoken words, which whisper's normaliser drops instead."""
_VARIANTS = ((r"\bgood bye\b", "goodbye"), (r"\bnose bleed\b", "nosebleed"), (r"\be mail\b", "email"),
             (r"\bok\b", "okay"))
"""Spellings of one word that whisper's normaliser leaves apart (after it ran: lower case, no punctuation)."""
_normaliser: Callable[[str], str] | None = None


def normalise(text: str) -> str:
    """Case, punctuation, spelling and numbers folded (whisper's English normaliser): ref and hyp alike."""
    global _normaliser
    if _normaliser is None:
        try:
            from whisper_normalizer.english import EnglishTextNormalizer
        except ImportError:
            raise EvalError("the 'whisper-normalizer' package is missing; pip install -e '.[dev]'") from None
        _normaliser = EnglishTextNormalizer()
    for symbol, words in _SYMBOLS:
        text = text.replace(symbol, words)
    text = " ".join(_normaliser(text).split())
    for pattern, spelling in _VARIANTS:
        text = re.sub(pattern, spelling, text)
    return text


@dataclass(frozen=True)
class Errors:
    """Word errors of one hypothesis against one reference."""

    words: int
    substitutions: int
    deletions: int
    insertions: int

    @property
    def total(self) -> int:
        return self.substitutions + self.deletions + self.insertions


def word_errors(reference: str, hypothesis: str) -> Errors:
    """Substitutions, deletions and insertions after normalising both sides."""
    import jiwer

    ref, hyp = normalise(reference), normalise(hypothesis)
    if not ref:
        return Errors(0, 0, 0, len(hyp.split()))
    out = jiwer.process_words(ref, hyp)
    return Errors(len(ref.split()), out.substitutions, out.deletions, out.insertions)


def word_accuracy(errors: Iterable[Errors]) -> float | None:
    """1 - WER over all the words of ``errors`` (insertions count), clipped at 0; None if no words."""
    errors = list(errors)
    words = sum(e.words for e in errors)
    if not words:
        return None
    return max(0.0, 1.0 - sum(e.total for e in errors) / words)


# --- the plan ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clip:
    """One thing to hear: a sentence, a voice, a condition."""

    voice: str
    text: str
    kind: str
    """'ask', 'stop' (a lone stop phrase) or 'mid' (a stop phrase's words inside a sentence)."""
    snr_db: float | None = None
    noise: str | None = None
    paced: bool = False

    @property
    def condition(self) -> str:
        return "clean" if self.snr_db is None else f"{self.snr_db:g} dB"

    @property
    def seed(self) -> int:
        return zlib.crc32(f"{self.voice}|{self.text}|{self.condition}|{self.noise}".encode())


def make_plan(sentences: Sequence[tuple[str, str]], voices: Sequence[str], snrs: Sequence[float | None],
              noises: Sequence[str], per_voice: int | None) -> list[Clip]:
    """Which voice says what, in which condition: balanced and deterministic.

    Each voice says ``per_voice`` of the ordinary sentences and a third as many of the lone stop
    phrases and of the mid-sentence ones (all of each if None), each voice starting at another
    place in each list, so every sentence is heard from several voices. The condition rotates with
    sentence and voice, so each voice meets each SNR equally often and each sentence several; the
    noise kind rotates over the noisy clips.
    """
    by_kind = {kind: [i for i, (_, k) in enumerate(sentences) if k == kind] for kind in ("ask", "stop", "mid")}
    quota = {"ask": per_voice, "stop": None if per_voice is None else math.ceil(per_voice / 3)}
    quota["mid"] = quota["stop"]
    plan, noisy = [], 0
    for j, voice in enumerate(voices):
        chosen: list[int] = []
        for kind, indices in by_kind.items():
            count = len(indices) if quota[kind] is None else min(quota[kind], len(indices))
            first = j * len(indices) // max(1, len(voices))
            chosen += [indices[(first + t) % len(indices)] for t in range(count)]
        for i in sorted(chosen):
            text, kind = sentences[i]
            snr = snrs[(i + j) % len(snrs)]
            noise = None
            if snr is not None:
                noise, noisy = noises[noisy % len(noises)], noisy + 1
            plan.append(Clip(voice, text, kind, snr, noise))
    return plan


def limit_plan(plan: list[Clip], limit: int | None) -> list[Clip]:
    """At most ``limit`` clips, spread evenly over the plan (so over voices and conditions)."""
    if limit is None or limit >= len(plan):
        return plan
    return [plan[i * len(plan) // limit] for i in range(limit)]


def mark_paced(plan: list[Clip], count: int | None) -> list[Clip]:
    """Feed ``count`` clips (all if None) at real time, spread over the non-joe voices.

    They are clean clips where there are any: the latency goal is for a quiet room, and in babble
    the VAD may never end an utterance (no latency at all). ``--realtime`` times every condition.
    """
    if count is None:
        return [replace(c, paced=True) for c in plan]
    others = [i for i, c in enumerate(plan) if c.voice != JOE and c.snr_db is None]
    others = others or [i for i, c in enumerate(plan) if c.voice != JOE]
    picked = {others[k * len(others) // count] for k in range(min(count, len(others)))} if count else set()
    return [replace(c, paced=True) if i in picked else c for i, c in enumerate(plan)]


# --- running -------------------------------------------------------------------------------------


@dataclass
class Result:
    """One clip heard by one backend."""

    clip: Clip
    hypothesis: str
    errors: Errors
    utterances: int
    stopped: bool
    """Any of its utterances would have ended the conversation."""
    latencies_s: list[float]
    forced_ends: int
    decode_s: float
    decode_cpu_s: float
    fed_s: float
    audio_s: float
    cut_errors: Errors | None = None
    """(--perfect-cut) the recognizer's errors on the speech alone, cut where it is (``Ear.cut``)."""


class Progress:
    """Lines on stderr: what is done, how long it took, how long the rest should take."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done = label, total, 0
        self.start = self._last = time.monotonic()

    def step(self, note: str = "") -> None:
        self.done += 1
        now = time.monotonic()
        if now - self._last < 10 and self.done < self.total:
            return
        self._last = now
        spent = now - self.start
        left = spent / self.done * (self.total - self.done)
        print(f"  {self.label}: {self.done}/{self.total} in {_mmss(spent)}, ~{_mmss(left)} left {note}",
              file=sys.stderr, flush=True)


def _mmss(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def synthesize_all(plan: Sequence[Clip], speech: SpeechCache, noises: Iterable[str], cache: Path) -> None:
    """Make every clip's speech and every noise bed now, so the hearing runs time only hearing."""
    missing = list(dict.fromkeys((c.voice, c.text) for c in plan if not speech.has(Voice(c.voice), c.text)))
    beds = [n for n in noises if not (cache / "noise" / f"{n}.flac").exists()]
    if beds:
        print(f"making noise: {', '.join(beds)}", file=sys.stderr, flush=True)
        for kind in beds:
            noise_bed(kind, cache)
    if missing:
        progress = Progress("synthesizing", len(missing))
        for voice, text in missing:
            speech.speech(Voice(voice), text)
            progress.step()


def hear_all(ear: Ear, plan: Sequence[Clip], speech: SpeechCache, beds: dict[str, np.ndarray],
             stop: StopRule, *, perfect_cut: bool = False) -> list[Result]:
    """Every clip of ``plan`` through ``ear``, paced where the clip says so; with ``perfect_cut``, also
    through the recognizer alone, on the speech cut where it is."""
    results = []
    progress = Progress(ear.backend, len(plan))
    for clip in plan:
        samples = speech.speech(Voice(clip.voice), clip.text)
        pcm = make_clip(samples, snr_db=clip.snr_db, noise=beds.get(clip.noise or ""), seed=clip.seed)
        hearing = ear.hear(pcm, realtime=clip.paced)
        hypothesis = " ".join(h.text for h in hearing.heard if h.text and not h.rejoined)
        cut = ear.cut(pcm, len(samples)) if perfect_cut else None
        results.append(Result(
            clip=clip,
            hypothesis=hypothesis,
            errors=word_errors(clip.text, hypothesis),
            utterances=len(hearing.heard),
            stopped=any(stop.ends_conversation(h.text) for h in hearing.heard),
            latencies_s=[h.latency_s for h in hearing.heard if clip.paced and not h.forced_end],
            forced_ends=sum(h.forced_end for h in hearing.heard),
            decode_s=hearing.decode_s,
            decode_cpu_s=hearing.decode_cpu_s,
            fed_s=hearing.fed_s,
            audio_s=len(pcm) / 2 / RATE,
            cut_errors=None if cut is None else word_errors(clip.text, cut),
        ))
        progress.step()
    return results


def estimate_s(plan: Sequence[Clip], backends: Sequence[str], unsynthesized: int, has_joe: bool) -> float:
    """A rough duration for the whole run (the machine's load decides the truth)."""
    seconds = unsynthesized * (0.05 if not has_joe else 0.15) + 10  # synthesis, noise beds
    for backend in backends:
        cost = COST_S.get(backend, 2.5)
        seconds += 5  # model load
        for clip in plan:
            length = LEAD_S + TRAIL_S + 0.25 + len(clip.text) / 14  # ~14 characters a second of speech
            seconds += length if clip.paced else cost
    return seconds


# --- report --------------------------------------------------------------------------------------


def _percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(results: Sequence[Result]) -> dict[str, object]:
    """Every figure of a group of results."""
    latencies = [x for r in results for x in r.latencies_s]
    fed = sum(r.fed_s for r in results)
    stops = [r for r in results if r.clip.kind == "stop"]
    mids = [r for r in results if r.clip.kind == "mid"]
    return {
        "clips": len(results),
        "words": sum(r.errors.words for r in results),
        "word_accuracy": word_accuracy(r.errors for r in results),
        "cut_word_accuracy": word_accuracy(r.cut_errors for r in results if r.cut_errors is not None),
        "substitutions": sum(r.errors.substitutions for r in results),
        "deletions": sum(r.errors.deletions for r in results),
        "insertions": sum(r.errors.insertions for r in results),
        "latency_p50_s": _percentile(latencies, 50),
        "latency_p90_s": _percentile(latencies, 90),
        "latency_n": len(latencies),
        "rtf": sum(r.decode_s for r in results) / fed if fed else None,
        "rtf_cpu": sum(r.decode_cpu_s for r in results) / fed if fed else None,
        "split": sum(r.utterances > 1 for r in results),
        "missed": sum(r.utterances == 0 for r in results),
        "forced_end": sum(r.forced_ends > 0 for r in results),
        "stop_ok": sum(r.stopped for r in stops),
        "stop_tries": len(stops),
        "false_stops": sum(r.stopped for r in results if r.clip.kind != "stop"),
        "false_stop_tries": len(results) - len(stops),
        "mid_false_stops": sum(r.stopped for r in mids),
        "mid_tries": len(mids),
    }


def group_figures(results: Sequence[Result], voices: Sequence[str], snrs: Sequence[float | None],
                  noises: Sequence[str]) -> dict[str, object]:
    """Per voice, the average over non-joe voices, per condition and per noise (non-joe only)."""
    others = [r for r in results if r.clip.voice != JOE]
    per_voice = {v: summarize([r for r in results if r.clip.voice == v]) for v in voices}
    average = summarize(others)
    # The average weighs every voice alike (the pooled figure is in "pooled_word_accuracy").
    for key in ("word_accuracy", "cut_word_accuracy"):
        accuracies = [f[key] for v, f in per_voice.items() if v != JOE and f[key] is not None]
        average[f"pooled_{key}"] = average[key]
        average[key] = sum(accuracies) / len(accuracies) if accuracies else None
    conditions = {("clean" if s is None else f"{s:g} dB"): summarize([r for r in others if r.clip.snr_db == s])
                  for s in snrs}
    by_noise = {n: summarize([r for r in others if r.clip.noise == n]) for n in noises if any(s is not None for s in snrs)}
    return {"voices": per_voice, "average": average, "snr": conditions, "noise": by_noise}


COLUMNS = ("clips", "word acc", "cut acc", "lat n", "lat p50", "lat p90", "RTF", "split", "missed", "no end", "stop ok",
           "false stop")
MIN_LATENCIES = 5
"""A p50/p90 of fewer utterances says little: the table leaves it to the JSON."""


def table_row(label: str, f: dict[str, object]) -> list[str]:
    def num(key: str, fmt: str) -> str:
        value = f.get(key)
        return "—" if value is None else format(value, fmt)

    def ms(key: str) -> str:
        value = f.get(key)
        return "—" if value is None or f["latency_n"] < MIN_LATENCIES else f"{value * 1000:.0f} ms"

    return [label, str(f["clips"]), num("word_accuracy", ".3f"), num("cut_word_accuracy", ".3f"), str(f["latency_n"]), ms("latency_p50_s"),
            ms("latency_p90_s"), num("rtf", ".2f"), str(f["split"]), str(f["missed"]), str(f["forced_end"]),
            f"{f['stop_ok']}/{f['stop_tries']}", f"{f['false_stops']}/{f['false_stop_tries']}"]


def print_table(figures: dict[str, dict[str, object]]) -> None:
    rows = []
    for backend, groups in figures.items():
        rows.append([f"{backend}", *[""] * len(COLUMNS)])
        for voice, f in groups["voices"].items():
            if voice != JOE:
                rows.append(table_row(f"  {voice}", f))
        rows.append(table_row("  AVERAGE over non-joe voices", groups["average"]))
        for name, f in groups["snr"].items():
            rows.append(table_row(f"  non-joe, {name}", f))
        for name, f in groups["noise"].items():
            rows.append(table_row(f"  non-joe, noisy, {name} noise", f))
        if JOE in groups["voices"]:
            rows.append(table_row("  joe (piper; tuned on; not in the average)", groups["voices"][JOE]))
    header = ["backend / voice", *COLUMNS]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))


# --- command line --------------------------------------------------------------------------------


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_snrs(text: str) -> list[float | None]:
    snrs: list[float | None] = []
    for part in _csv(text):
        if part.lower() == "clean":
            snrs.append(None)
            continue
        try:
            snrs.append(float(part.lower().removesuffix("db")))
        except ValueError:
            raise argparse.ArgumentTypeError(f"SNR {part!r}: use 'clean' or decibels such as 15") from None
    if not snrs:
        raise argparse.ArgumentTypeError("no SNR given")
    return snrs


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="See the module docstring.")
    parser.add_argument("--backends", type=_csv, default=["pocketsphinx", "whisper"],
                        help="ASR backends, comma-separated (default: pocketsphinx,whisper)")
    parser.add_argument("--split", choices=sorted(SPLITS), default="judge",
                        help="judge: sentences and voices nobody tunes on (default); tune: the tuning set")
    parser.add_argument("--snr", type=parse_snrs, default=parse_snrs("clean,20,15,10"),
                        help="conditions, comma-separated: clean and/or dB (default: clean,20,15,10)")
    parser.add_argument("--noise", type=_csv, default=list(NOISES), help=f"noise kinds (default: {','.join(NOISES)})")
    parser.add_argument("--voices", type=_csv, help="voices instead of the split's (espeak 'en-gb-x-rp+f4@135', 'joe')")
    parser.add_argument("--no-joe", action="store_true", help="leave out piper's joe row")
    parser.add_argument("--per-voice", type=int, default=12,
                        help="ordinary sentences per voice, and a third as many lone and mid-sentence stop "
                             "phrases; 0 = every sentence (default 12)")
    parser.add_argument("--limit", type=int, help="at most N clips per backend, spread over voices and conditions")
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--realtime", action="store_true", help="feed every clip at real time (slow; all latencies)")
    pace.add_argument("--latency-clips", type=int, default=20,
                      help="clips per backend fed at real time for the latency columns (default 20; 0 = none)")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
                        / "voicebus" / "eval_asr", help="where synthesized clips and noise are kept")
    parser.add_argument("--details", type=Path, help="also write every clip's result here (JSON lines)")
    parser.add_argument("--perfect-cut", action="store_true",
                        help="also hear each clip with the recognizer alone, on its speech cut where it is (no "
                             "VAD): the 'cut acc' column, what a perfect front end would give (whisper only)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.noise if n not in NOISES]
    if unknown:
        parser.error(f"unknown noise {', '.join(unknown)}; choose from {', '.join(NOISES)}")
    if args.per_voice < 0 or (args.limit is not None and args.limit < 1) or args.latency_clips < 0:
        parser.error("--per-voice, --limit and --latency-clips take a positive number")
    return args


def run(args: argparse.Namespace) -> dict[str, object]:
    from voicebus.engine.settings import load
    from voicebus.workers.config import Settings

    from voicebus.workers.preflight import BACKENDS

    unknown = [b for b in args.backends if b not in BACKENDS["asr"]]
    if unknown:
        raise EvalError(f"unknown ASR backend {', '.join(unknown)}; choose from {', '.join(BACKENDS['asr'])}")
    base = load(Settings)
    stop = StopRule(base.llm.stop_phrases)
    sentence_file, split_voices = SPLITS[args.split]
    sentences = [(s, stop.kind(s)) for s in read_sentences(sentence_file)]
    voices = list(args.voices or split_voices)
    if not args.no_joe and JOE not in voices:
        voices.append(JOE)
    check_voices([Voice(v) for v in voices])
    if any(v == JOE for v in voices):
        voices = [v for v in voices if v != JOE] + [JOE]  # joe's row last, after the average
    plan = make_plan(sentences, voices, args.snr, args.noise, args.per_voice or None)
    plan = mark_paced(limit_plan(plan, args.limit), None if args.realtime else args.latency_clips)

    args.cache.mkdir(parents=True, exist_ok=True)
    speech = SpeechCache(args.cache)
    noises = sorted({c.noise for c in plan if c.noise})
    unsynthesized = len({(c.voice, c.text) for c in plan if not speech.has(Voice(c.voice), c.text)})
    paced = sum(c.paced for c in plan)
    print(f"{len(plan)} clips x {len(args.backends)} backend(s), {paced} of them at real time, "
          f"{unsynthesized} to synthesize; estimate ~{_mmss(estimate_s(plan, args.backends, unsynthesized, JOE in voices))} "
          f"(2 cores; more when the machine is busy)", file=sys.stderr, flush=True)
    started = time.monotonic()
    synthesize_all(plan, speech, noises, args.cache)
    beds = {n: noise_bed(n, args.cache) for n in noises}

    figures: dict[str, dict[str, object]] = {}
    details = args.details.open("w", encoding="utf-8") if args.details else None
    try:
        for backend in args.backends:
            print(f"{backend}: loading…", file=sys.stderr, flush=True)
            ear = Ear(load(Settings, overrides={"asr.backend": backend}))
            try:
                results = hear_all(ear, plan, speech, beds, stop, perfect_cut=args.perfect_cut)
            finally:
                ear.close()
            figures[backend] = group_figures(results, voices, args.snr, noises)
            if details is not None:
                for r in results:
                    row = {"backend": backend, **asdict(r.clip), "hypothesis": r.hypothesis,
                           "normalised_ref": normalise(r.clip.text), "normalised_hyp": normalise(r.hypothesis),
                           "errors": asdict(r.errors), "cut_errors": r.cut_errors and asdict(r.cut_errors),
                           "utterances": r.utterances, "stopped": r.stopped,
                           "latencies_s": r.latencies_s, "forced_ends": r.forced_ends}
                    details.write(json.dumps(row) + "\n")
    finally:
        if details is not None:
            details.close()
    elapsed = time.monotonic() - started
    print(f"done in {_mmss(elapsed)}", file=sys.stderr, flush=True)
    return {"split": args.split, "voices": voices, "snr": ["clean" if s is None else s for s in args.snr],
            "noise": noises, "clips": len(plan), "paced_clips": paced, "elapsed_s": round(elapsed, 1),
            "settings": {"vad": asdict(base.vad), "stop_phrases": list(base.llm.stop_phrases)},
            "backends": figures}


T = TypeVar("T")


def said_in_one_line(name: str, work: Callable[[], T]) -> T | int:
    """``work()``, or the exit code after one line on stderr for what a user can meet: Ctrl-C (130), and
    (1) a missing tool or voice, a file that cannot be written, a voicebus error (it says what to do)."""
    from voicebus.engine.errors import VoicebusError

    try:
        return work()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except EvalError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
    except OSError as exc:  # a cache or output path cannot be written
        print(f"{name}: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
    except VoicebusError as exc:
        print(f"{name}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = said_in_one_line("eval_asr", lambda: run(args))
    if isinstance(report, int):
        return report
    print_table(report["backends"])  # type: ignore[arg-type]
    print(json.dumps(report, default=lambda x: None if isinstance(x, float) and math.isnan(x) else str(x)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
