"""Voice activity detection and end of utterance on internal 20 ms frames.

A frame classifier (``vad_frames``: silero or webrtcvad) labels each frame
voiced or not; ``Endpointer`` turns those noisy
labels into turn boundaries with two sliding windows, in the manner of
py-webrtcvad's example (a ring buffer and a voiced ratio):

- start: ``START_RATIO`` (80 %) of a window must be voiced. Speech has brief
  unvoiced stretches (stop consonants, breaths) that webrtcvad marks silent, so
  demanding every frame would delay the start; 80 % tolerates about one such
  gap per 100 ms.
- end: ``END_RATIO`` (90 %) of a window must be unvoiced. A wrong end cuts the
  user off mid-sentence while a wrong start costs only an ASR no-match, so the
  end is held to a stricter ratio; 90 % still lets a stray click or breath sit
  in the silence without postponing the end.

A classifier keeps labelling frames voiced for a while after any sound stops
(its "hangover", measured per classifier in ``vad_frames``). Left alone that would let a 100 ms cough pass as
200 ms of speech and make every silence look 120 ms shorter than it is, so the
windows are sized to discount it: ``min_speech_ms`` and ``silence_ms`` mean
real sound and real silence, as a user would time them.

Voiced frames well below the person's own speech level are background talk, not
the person (``foreground``): with ``background_db`` set they count as unvoiced.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from voicebus.engine.errors import ConfigError

from .audio.pcm import FRAME_BYTES, FRAME_MS
from .foreground import ForegroundGate
from .vad_frames import FrameClassifier, WebrtcFrames, open_classifier

if TYPE_CHECKING:
    from .config import VadSettings

PAUSE_FRAMES = 3
"""Unvoiced frames in a row that make a pause: where a speculative decode can start."""
RESUME_FRAMES = (3, 4)
"""Voiced frames among the last few that end a pause (one breath or click does not)."""
MAX_SILENCE_MS = 5000
"""The longest silence window that can be asked for (the window's history is kept this long)."""
START_RATIO = 0.8
"""Share of the start window that must be voiced to confirm speech."""
END_RATIO = 0.9
"""Share of the end window that must be unvoiced to end speech."""


@dataclass(frozen=True)
class SpeechStart:
    """Speech confirmed; from now on every frame belongs to the utterance."""

    offset_ms: int
    """Stream time where the speech began (not when it was confirmed)."""
    preroll: list[bytes] = field(repr=False)
    """Frames from ``preroll_ms`` before ``offset_ms`` up to and including the confirming frame."""


@dataclass(frozen=True)
class SpeechPause:
    """The speaker went quiet inside an utterance; it may be its end (if the silence lasts)."""

    offset_ms: int
    """Stream time where the silence began (hangover discounted)."""


@dataclass(frozen=True)
class SpeechResume:
    """Speech came back after a SpeechPause: the utterance goes on."""

    offset_ms: int


@dataclass(frozen=True)
class SpeechEnd:
    """The utterance ended."""

    offset_ms: int
    """Stream time where the speech ended and silence began."""
    speech_ms: int
    """Length of the utterance, from its start to ``offset_ms``."""


VadEvent = SpeechStart | SpeechPause | SpeechResume | SpeechEnd


def _frames(ms: int) -> int:
    return math.ceil(ms / FRAME_MS)


class Endpointer:
    """Finds where utterances start and end in a stream of internal frames.

    Feed every frame in order; ``offset_ms`` values count stream time from the
    first frame fed (frame ``i`` covers ``[20 i, 20 i + 20)`` ms).
    """

    def __init__(
        self,
        *,
        aggressiveness: int = 2,
        preroll_ms: int = 300,
        silence_ms: int = 500,
        min_speech_ms: int = 200,
        classifier: FrameClassifier | None = None,
        background_db: float = 0.0,
    ) -> None:
        """Configure the detector.

        ``aggressiveness`` is webrtcvad's 0 (lenient) .. 3 (strict about what is
        speech); ``preroll_ms`` of audio before the start travel with SpeechStart
        so the first syllable reaches the recognizer; ``silence_ms`` of silence
        end an utterance; sounds shorter than ``min_speech_ms`` never start one;
        voiced frames more than ``background_db`` below the person's speech level
        are background talk (0: off; see ``foreground``).
        """
        for name, value in (("preroll_ms", preroll_ms), ("silence_ms", silence_ms), ("min_speech_ms", min_speech_ms),
                            ("background_db", background_db)):
            if value < 0:
                raise ConfigError(f"VAD {name} must not be negative, got {value}")
        self._classifier = classifier or WebrtcFrames(aggressiveness)
        self._foreground = ForegroundGate(background_db, self._classifier.hangover_frames)
        self._hangover = self._classifier.hangover_frames
        self._preroll = _frames(preroll_ms)
        # Sound must outlast the hangover by min_speech_ms before it counts as speech.
        self._start_needed = max(1, _frames(min_speech_ms)) + self._hangover
        self._start_window = math.ceil(self._start_needed / START_RATIO)
        self.silence_ms = silence_ms
        self._history: deque[bytes] = deque(maxlen=self._preroll + self._start_window)
        self._window: deque[bool] = deque()
        self._paused = False
        self._pause_index = 0
        self._frame_index = 0
        self._start_index = 0
        self.in_speech = False
        """True between a SpeechStart and its SpeechEnd."""

    @property
    def silence_ms(self) -> int:
        """Silence that ends the utterance; may be changed while one is in progress."""
        return self._silence_ms

    @silence_ms.setter
    def silence_ms(self, value: int) -> None:
        if not 0 <= value <= MAX_SILENCE_MS:
            raise ConfigError(f"VAD silence_ms must be between 0 and {MAX_SILENCE_MS}, got {value}")
        self._silence_ms = value
        # The hangover already ate part of the silence, so fewer unvoiced frames remain to be seen.
        self._end_window = max(2, _frames(value) - self._hangover)
        self._end_needed = math.ceil(self._end_window * END_RATIO)

    @property
    def offset_ms(self) -> int:
        """Stream time at the end of the last frame fed."""
        return self._frame_index * FRAME_MS

    def reset(self) -> None:
        """Forget any speech in progress and the preroll; the stream clock runs on."""
        self._history.clear()
        self._window.clear()
        if self.in_speech:
            self._foreground.ended(self.offset_ms / 1000)
        self.in_speech = False
        self._paused = False

    def feed(self, frame: bytes) -> list[VadEvent]:
        """Classify one 640-byte frame; return the events it completes (usually none)."""
        if len(frame) != FRAME_BYTES:
            raise ValueError(f"VAD frames are {FRAME_BYTES} bytes (20 ms at 16 kHz), got {len(frame)}")
        index = self._frame_index
        voiced = self._foreground.voiced(
            frame, index * FRAME_MS / 1000, heard=self._classifier.is_speech(frame), in_speech=self.in_speech
        )
        self._frame_index += 1
        self._history.append(frame)
        self._window.append(voiced)
        if not self.in_speech:
            return self._check_start(index)
        return self._check_end(index)

    def _check_start(self, index: int) -> list[VadEvent]:
        if len(self._window) > self._start_window:
            self._window.popleft()
        if sum(self._window) < self._start_needed:
            return []
        window_first = index - len(self._window) + 1
        self._start_index = window_first + list(self._window).index(True)
        history_first = index - len(self._history) + 1
        first = max(self._start_index - self._preroll, history_first)
        preroll = list(self._history)[first - history_first :]
        self.in_speech = True
        self._window.clear()
        return [SpeechStart(offset_ms=self._start_index * FRAME_MS, preroll=preroll)]

    def _check_end(self, index: int) -> list[VadEvent]:
        if len(self._window) > _frames(MAX_SILENCE_MS):
            self._window.popleft()
        window = list(self._window)[-self._end_window :]
        if len(window) >= self._end_window and window.count(False) >= self._end_needed:
            if self._paused:
                # The silence has lasted since the pause began (the window may have grown and
                # shrunk meanwhile, so it no longer reaches back that far).
                silence_index = self._pause_index
            else:
                # Silence began where the longest unvoiced run in the window began, less the
                # hangover that webrtcvad labelled voiced after the last sound.
                window_first = index - len(window) + 1
                silence_index = window_first + _longest_run_start(window, False) - self._hangover
            end_index = max(silence_index, self._start_index + 1)
            self.in_speech = False
            self._paused = False
            self._window.clear()
            self._foreground.ended(self.offset_ms / 1000)
            offset_ms = end_index * FRAME_MS
            return [SpeechEnd(offset_ms=offset_ms, speech_ms=offset_ms - self._start_index * FRAME_MS)]
        return self._check_pause(index)

    def _check_pause(self, index: int) -> list[VadEvent]:
        recent = list(self._window)[-max(PAUSE_FRAMES, RESUME_FRAMES[1]) :]
        if not self._paused and len(recent) >= PAUSE_FRAMES and not any(recent[-PAUSE_FRAMES:]):
            self._paused = True
            run = 0
            for voiced in reversed(self._window):
                if voiced:
                    break
                run += 1
            silence_index = max(index - run + 1 - self._hangover, self._start_index + 1)
            self._pause_index = silence_index
            return [SpeechPause(offset_ms=silence_index * FRAME_MS)]
        needed, among = RESUME_FRAMES
        if self._paused and sum(recent[-among:]) >= needed:
            self._paused = False
            return [SpeechResume(offset_ms=(index - needed + 1) * FRAME_MS)]
        return []


def endpointer_for(vad: VadSettings) -> Endpointer:
    """The endpointer the settings describe (the listener's, and scripts/eval_asr.py's copy of it)."""
    return Endpointer(
        preroll_ms=vad.preroll_ms, silence_ms=vad.silence_ms, min_speech_ms=vad.min_speech_ms,
        classifier=open_classifier(vad.engine, vad.aggressiveness), background_db=vad.background_db,
    )


def _longest_run_start(values: list[bool], wanted: bool) -> int:
    """Index where the longest run of ``wanted`` begins (the first such run on a tie)."""
    best_start, best_len, run_start, run_len = 0, 0, 0, 0
    for i, value in enumerate(values):
        if value == wanted:
            if run_len == 0:
                run_start = i
            run_len += 1
            if run_len > best_len:
                best_start, best_len = run_start, run_len
        else:
            run_len = 0
    return best_start
