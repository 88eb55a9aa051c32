"""The listener's front end: audio frames → utterances and their transcripts, as events.

One ``Hearing`` takes the input's 20 ms frames in order (``feed``, on the audio
thread) and reports what it hears through a callback, from the audio thread or
its decode thread:

    SpeechStarted   an utterance began (voice activity)
    Partial         a streaming recognizer's hypothesis changed
    Guess           a tentative transcript of the utterance so far, made at a pause
    Revoked         the speaker went on after a pause: that guess is void
    Ended           the utterance ended (its silence window passed)
    Final / NoMatch its transcript, or why there is none

Two kinds of recognizer are driven. A *streaming* one (pocketsphinx, Azure)
is fed every frame as it comes; its hypothesis at a pause is the guess and its
result at the end the final. A *batch* one (whisper) reads a whole utterance
at once, which costs a few hundred milliseconds — so it never runs on the audio
thread. At every pause its decode thread transcribes the utterance so far; if
the silence lasts, that result *is* the final, ready the moment the window
closes; if speech resumes, the result is thrown away (the audio thread never
waits). Only when no guess is ready at the end is the final awaited.

The silence window that ends an utterance adapts to what was said (see
``turn_end``): short after a complete question, long after "set a timer for".
While the decode of a pause is running, the window is the undecided one: the
turn ends when the words say it may, never on a race between the recognizer
and a timer.

With ``hold_ms``, a guess that will be answered holds the turn open until its
answer is ready to play (``answer_ready``), up to ``hold_ms`` of silence; the
words' window stays the least. Ending the turn sooner would make nothing play
sooner, since the answer is not there yet; waiting lets a person who only paused
go on speaking, which revokes the guess instead of getting an answer to half a
question.

With ``rejoin_ms``, a person who goes on speaking soon after their turn ended
(within ``rejoin_ms`` of where its speech stopped, while that turn is still open:
``rejoinable``) is taken to go on with the same request: the new utterance is
transcribed with the ended one's audio in front of it (batch recognizers). The
turn that ended too soon is still over (its answer is barged in on), but the new
one hears the whole request — "What is the capital of" + "Peru?" — rather than
a last half that makes no sense alone. Some words must come from the new audio
alone: a rejoined final whose words ``read_alone`` picks (the listener's: words
that end on a stop phrase, for only the new audio may say stop, as before
rejoining) is also transcribed without the words before it (``Final.alone``).
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from voicebus.engine.errors import BackendError, ConfigError, VoicebusError
from voicebus.workers.asr.base import Transcript
from voicebus.workers.turn_end import EndOfTurn
from voicebus.workers.vad import MAX_SILENCE_MS, Endpointer, SpeechEnd, SpeechPause, SpeechResume, SpeechStart


MAX_REJOINED_BYTES = 10 * 32000
"""The most audio (10 s) an utterance passes on to one that rejoins it (a request cut short is a few seconds)."""
MAX_DECODE_BYTES = 28 * 32000
"""Whisper reads 30 s at most (less its padding): a rejoining utterance longer than that gives up the front of
what it took over, never its own audio."""


# --- events -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpeechStarted:
    utterance: int
    offset_ms: int
    rejoins: int = 0
    """the utterance this one goes on from (its audio comes first in every decode); 0: none"""


@dataclass(frozen=True)
class Partial:
    utterance: int
    text: str


@dataclass(frozen=True)
class Guess:
    utterance: int
    rev: int
    """1, 2, … within the utterance: a new pause, a new guess"""
    text: str
    offset_ms: int
    """where the pause began"""


@dataclass(frozen=True)
class Revoked:
    utterance: int
    rev: int


@dataclass(frozen=True)
class Ended:
    utterance: int
    offset_ms: int
    """where the speech ended (the silence began)"""
    speech_ms: int
    silence_ms: int
    """the silence window that ended it"""
    held_in_vain: bool = False
    """the window was held open for the answer to a guess, and no answer was ready by its end"""


@dataclass(frozen=True)
class Final:
    utterance: int
    text: str
    confidence: float | None
    guess: int
    """the guess this final confirms (0: none; then any published guess is void)"""
    decode_s: float
    """recognizer time spent on the decode that gave this result"""
    alone: str | None = None
    """(an utterance that rejoins another, when ``read_alone`` picked its words) the transcript of its own audio,
    without the words before it"""


@dataclass(frozen=True)
class NoMatch:
    utterance: int
    reason: str
    guess: int = 0
    error: VoicebusError | None = None
    """the recognizer's failure, when that is why nothing was recognized (the listener reports it)"""


Event = SpeechStarted | Partial | Guess | Revoked | Ended | Final | NoMatch


# --- recognizers ------------------------------------------------------------------------------


class StreamingRecognizer(Protocol):
    """Decodes while audio arrives (see ``asr.base.Recognizer``)."""

    def begin(self) -> None: ...
    def feed(self, pcm: bytes) -> str | None: ...
    def hypothesis(self) -> str: ...
    def end(self) -> Transcript: ...


class BatchRecognizer(Protocol):
    """Transcribes a whole utterance at once; called from one thread at a time."""

    def transcribe(self, pcm: bytes) -> Transcript: ...


# --- the front end ----------------------------------------------------------------------------


@dataclass
class _Utterance:
    number: int
    start_ms: int
    audio: bytearray = field(default_factory=bytearray)
    rev: int = 0
    """the current guess revision (bumped at each pause)"""
    guesses: dict[int, Transcript] = field(default_factory=dict)
    """rev → its result, once decoded"""
    paused_rev: int = 0
    """the rev whose pause is still going on (0: speaking)"""
    pause_offsets: dict[int, int] = field(default_factory=dict)
    """rev → where its pause began (stream ms)"""
    ended: Ended | None = None
    finalized: bool = False
    holding: int = 0
    """the rev whose answer the turn is held open for (0: none)"""
    words_window: int = 0
    """(holding) the window the words ask for: what is left once the answer is ready"""
    ready_rev: int = 0
    """a rev whose answer was ready before its window was chosen (nothing to hold for)"""
    failed_rev: int = 0
    """a rev whose pause's decode failed: the end decodes the whole utterance again"""
    end_rev: int = 0
    """the rev of the decode the end queued itself (when that fails, nothing is left to try)"""
    own_from: int = 0
    """where its own audio begins in ``audio`` (after the audio of the utterance it rejoins)"""

    def decode_audio(self) -> bytes:
        """What a decode reads: all of it, but no more than whisper can, giving up the front of what it took over."""
        excess = max(0, len(self.audio) - MAX_DECODE_BYTES)
        return bytes(self.audio[min(excess, self.own_from) :])

    def own_audio(self) -> bytes:
        """Its own audio, without what it took over from the utterance it rejoins."""
        return bytes(self.audio[self.own_from :])


@dataclass(frozen=True)
class _Ending:
    """An ended utterance, kept for the one after it to rejoin (``rejoin_ms``)."""

    number: int
    end_ms: int
    """where its speech stopped"""
    audio: bytes


class Hearing:
    """Voice activity + recognition for one input stream; see the module docstring.

    ``emit`` is called from the audio thread or the decode thread, sometimes with
    this object's lock held (so that a Guess and its Revoked keep their order): it
    must be quick and must not call back into this object.
    """

    def __init__(
        self,
        recognizer: StreamingRecognizer | BatchRecognizer,
        endpointer: Endpointer,
        emit: Callable[[Event], None],
        *,
        end_of_turn: EndOfTurn | None = None,
        min_audio_ms: int = 100,
        hold_ms: int = 0,
        answered: Callable[[str], bool] | None = None,
        message_end: Callable[[str], float] | None = None,
        rejoin_ms: int = 0,
        rejoinable: Callable[[int], bool] | None = None,
        read_alone: Callable[[str], bool] | None = None,
    ) -> None:
        """``hold_ms``: the longest silence that waits for a guess's answer (0: none; see the module doc);
        ``answered``: whether an answer to these guessed words will be prepared and announced;
        ``message_end``: the log-probability that a message ends with these words (``workers/llm/message_end``),
        asked on the decode thread at each pause whose words read complete (batch recognizers only);
        ``rejoin_ms``: speech starting this soon after an utterance's speech stopped goes on with it (see the
        module doc; 0: never), if ``rejoinable(that utterance)`` (its turn is still open); ``read_alone``:
        whether a rejoining utterance's final words need its own audio transcribed alone too (``Final.alone``).
        Both are called without this object's lock, ``rejoinable`` on the audio thread, ``read_alone`` on
        either."""
        if not 0 <= hold_ms <= MAX_SILENCE_MS:
            raise ConfigError(f"vad.hold_ms must be between 0 and {MAX_SILENCE_MS}, got {hold_ms}")
        if not 0 <= rejoin_ms <= MAX_SILENCE_MS:
            raise ConfigError(f"vad.rejoin_ms must be between 0 and {MAX_SILENCE_MS}, got {rejoin_ms}")
        self.recognizer = recognizer
        self.batch = hasattr(recognizer, "transcribe")
        self.vad = endpointer
        self.emit = emit
        self.end_of_turn = end_of_turn or EndOfTurn(endpointer.silence_ms)
        self._min_audio = min_audio_ms * 32
        self.hold_ms = hold_ms
        self._answered = answered or (lambda text: True)
        self._message_end = message_end if self.batch else None  # (a streaming guess is on the audio thread)
        self._message_end_failed = False
        self.rejoin_ms = rejoin_ms if self.batch else 0  # (a streaming recognizer has heard it already)
        self._rejoinable = rejoinable or (lambda number: True)
        self._read_alone = read_alone
        self._last_ended: _Ending | None = None
        self._after: list[Callable[[], None]] = []
        """work for the decode thread other than a decode of a pause (a rejoined final read alone)"""
        self._lock = threading.Lock()
        self._current: _Utterance | None = None
        self._count = 0
        self._ignoring = False
        self._jobs: list[tuple[_Utterance, int, bytes]] = []
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._busy = False
        self._window_wanted: int | None = None
        """a silence window chosen off the audio thread, applied at the next frame"""
        self._thread: threading.Thread | None = None
        if self.batch:
            self._thread = threading.Thread(target=self._decode_loop, name="hearing-decode", daemon=True)
            self._thread.start()

    @property
    def in_speech(self) -> bool:
        return self.vad.in_speech

    def ignore_current(self) -> None:
        """Drop the utterance in progress (e.g. heard while the assistant talks, half duplex)."""
        with self._lock:
            self._ignoring = True

    # --- audio thread -------------------------------------------------------------------------

    def feed(self, frame: bytes) -> None:
        with self._lock:
            window, self._window_wanted = self._window_wanted, None
        if window is not None:
            self.vad.silence_ms = window  # set here: the endpointer belongs to this thread
        started = False
        for event in self.vad.feed(frame):
            if isinstance(event, SpeechStart):
                self._started(event)  # its preroll holds this frame already
                started = True
            elif isinstance(event, SpeechPause):
                self._paused(event)
            elif isinstance(event, SpeechResume):
                self._resumed()
            elif isinstance(event, SpeechEnd):
                self._ended(event)
                return
        utterance = self._current
        if utterance is not None and self.vad.in_speech and not self._ignoring and not started:
            self._take(utterance, frame)

    def _take(self, utterance: _Utterance, frame: bytes) -> None:
        utterance.audio += frame
        if not self.batch:
            partial = self.recognizer.feed(frame)  # type: ignore[union-attr]
            if partial:
                self.emit(Partial(utterance.number, partial))

    def _started(self, event: SpeechStart) -> None:
        with self._lock:
            before, self._last_ended = self._last_ended, None
            self._ignoring = False
            self._count += 1
            utterance = self._current = _Utterance(self._count, event.offset_ms)
        rejoined = (before is not None and event.offset_ms - before.end_ms <= self.rejoin_ms
                    and self._rejoinable(before.number))
        if rejoined:
            utterance.audio += before.audio  # (this thread alone adds audio; decodes start at its pauses)
            utterance.own_from = len(before.audio)
        self.vad.silence_ms = self.end_of_turn.window_ms(None)
        self.emit(SpeechStarted(utterance.number, event.offset_ms, before.number if rejoined else 0))
        if not self.batch:
            self.recognizer.begin()  # type: ignore[union-attr]
        for frame in event.preroll:
            self._take(utterance, frame)

    def _paused(self, event: SpeechPause) -> None:
        utterance = self._current
        if utterance is None or self._ignoring:
            return
        with self._lock:
            utterance.rev += 1
            utterance.paused_rev = utterance.rev
            rev = utterance.rev
            if self.batch:
                # Latest wins: a queued decode of an older pause is no longer wanted.
                self._jobs = [j for j in self._jobs if j[0] is not utterance]
                self._jobs.append((utterance, rev, utterance.decode_audio()))
                self._wake.notify_all()
            utterance.pause_offsets[rev] = event.offset_ms
        if self.batch:
            self.vad.silence_ms = self.end_of_turn.waiting_ms()  # until the guess says how long to wait
        else:
            text = self.recognizer.hypothesis()  # type: ignore[union-attr]
            self._guessed(utterance, rev, Transcript(text))

    def _resumed(self) -> None:
        utterance = self._current
        if utterance is None:
            return
        self.vad.silence_ms = self.end_of_turn.window_ms(None)
        with self._lock:  # under the lock, so a Guess and its Revoked cannot cross between threads
            rev, utterance.paused_rev = utterance.paused_rev, 0
            utterance.holding = 0
            if rev in utterance.guesses and utterance.guesses[rev].text.strip():
                self.emit(Revoked(utterance.number, rev))

    def _ended(self, event: SpeechEnd) -> None:
        utterance = self._current
        with self._lock:
            self._current = None
            ignoring, self._ignoring = self._ignoring, False
        if utterance is None or ignoring:
            return
        with self._lock:
            in_vain = utterance.holding != 0  # (a resumption clears it: still set, it was this pause's)
        ended = Ended(utterance.number, event.offset_ms, event.speech_ms, self.vad.silence_ms, in_vain)
        if self.rejoin_ms and len(utterance.audio) <= MAX_REJOINED_BYTES:
            with self._lock:
                self._last_ended = _Ending(utterance.number, event.offset_ms, bytes(utterance.audio))
        self.emit(ended)
        if not self.batch:
            self._finalize_streaming(utterance)
            return
        with self._lock:
            utterance.ended = ended
            rev = utterance.paused_rev
            ready = utterance.guesses.get(rev) if rev else None
            queued_or_running = rev and ready is None and rev != utterance.failed_rev
            if ready is None and not queued_or_running:
                # No pause was decoded for this ending (no pause seen, or speech resumed): decode it all now.
                self._decode_all(utterance)
        if ready is not None:
            self._finalize(utterance, rev, ready, 0.0)

    def _finalize_streaming(self, utterance: _Utterance) -> None:
        started = time.perf_counter()
        try:
            result = self.recognizer.end()  # type: ignore[union-attr]
        except VoicebusError as exc:
            self.emit(NoMatch(utterance.number, f"error: {exc.code}: {exc}", error=exc))
            return
        self._finalize(utterance, 0, result, time.perf_counter() - started)

    def _finalize(self, utterance: _Utterance, rev: int, result: Transcript, decode_s: float) -> None:
        text = result.text.strip()
        with self._lock:
            if utterance.finalized:
                return
            utterance.finalized = True
            if not text:
                self._forget(utterance)
        alone = bool(text) and utterance.own_from > 0 and self._read_alone is not None and self._read_alone(text)
        if alone:
            with self._lock:  # (read on the decode thread: this may be the audio thread)
                self._after.append(lambda: self._final_read_alone(utterance, rev, text, result.confidence, decode_s))
                self._wake.notify_all()
        if not text:
            self.emit(NoMatch(utterance.number, "no speech recognized", guess=rev))
        elif not alone:
            self.emit(Final(utterance.number, text, result.confidence, rev, decode_s))

    def _final_read_alone(self, utterance: _Utterance, rev: int, text: str, confidence: float | None,
                          decode_s: float) -> None:
        """(decode thread) The final of a rejoining utterance, with its own audio's words (see ``read_alone``)."""
        started = time.perf_counter()
        try:
            alone = self._transcribe(utterance.own_audio()).text.strip()
        except Exception:  # noqa: BLE001  (whatever failed, the joined words stand: not read alone is not a stop)
            alone = ""
        decode_s += time.perf_counter() - started
        self.emit(Final(utterance.number, text, confidence, rev, decode_s, alone=alone))

    def _forget(self, utterance: _Utterance) -> None:
        """(with the lock held) Nothing was heard in this utterance (a cough, a door): nothing to go on from."""
        if self._last_ended is not None and self._last_ended.number == utterance.number:
            self._last_ended = None

    def _guessed(self, utterance: _Utterance, rev: int, result: Transcript, decode_s: float = 0.0) -> None:
        """A guess is ready: publish it if its pause still lasts and let it set the silence window,
        or make it the final if the utterance ended meanwhile."""
        text = result.text.strip()
        with self._lock:
            utterance.guesses[rev] = result
            current = utterance.paused_rev == rev
            ended = current and utterance.ended is not None
            if current and not ended and text:
                # Out first: the thinker and speaker prepare the answer while the window is chosen.
                offset = utterance.pause_offsets.get(rev, utterance.start_ms)
                self.emit(Guess(utterance.number, rev, text, offset))
        if ended:
            self._finalize(utterance, rev, result, decode_s)
            return
        if not current:
            return
        # Asked outside the lock (~30 ms): the pause's "waiting for the words" window holds meanwhile.
        asked = self._message_end is not None and self.end_of_turn.asks_the_model(text)
        end_logprob = self._weigh(text) if asked else None
        with self._lock:
            if utterance.paused_rev != rev or utterance.ended is not None:
                return  # speech resumed, or the turn ended (its final is on its way), meanwhile
            window = self.end_of_turn.window_ms(text, result.confidence, end_logprob)
            if self.hold_ms and text and self._answered(text) and utterance.ready_rev != rev:
                utterance.holding, utterance.words_window = rev, window
                window = max(window, self.hold_ms)
            self._window_wanted = window

    def _weigh(self, text: str) -> float | None:
        """The chat model's view of these words; None if it fails (said once): that costs the check, not the
        turn, and an exception here would end the decode thread, and with it every transcript after."""
        assert self._message_end is not None
        try:
            return self._message_end(text)
        except Exception as exc:  # whatever the model raises
            if not self._message_end_failed:
                self._message_end_failed = True
                print(f"end of turn: the chat model failed, the words alone decide ({type(exc).__name__}: {exc})",
                      file=sys.stderr, flush=True)
            return None

    def answer_ready(self, number: int, rev: int) -> None:
        """The answer to guess ``rev`` of utterance ``number`` is ready to play: the turn may end as soon
        as the words' own window has passed (any thread)."""
        with self._lock:
            utterance = self._current
            if utterance is None or utterance.number != number:
                return  # ended meanwhile
            if utterance.holding != rev:
                if utterance.paused_rev == rev:
                    utterance.ready_rev = rev  # sooner than its window was chosen: not to be held for
                return  # else revoked meanwhile, or not held for
            utterance.holding = 0
            self._window_wanted = utterance.words_window

    # --- decode thread ------------------------------------------------------------------------

    def _decode_loop(self) -> None:
        while True:
            with self._lock:
                while not self._jobs and not self._after and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                if self._after:
                    work = self._after.pop(0)
                else:
                    utterance, rev, pcm = self._jobs.pop(0)
                    if not (utterance.paused_rev == rev and not utterance.finalized):
                        continue  # speech resumed before this decode started
                    work = functools.partial(self._decode_job, utterance, rev, pcm)
                self._busy = True
            try:
                work()
            finally:
                with self._lock:
                    self._busy = False
                    self._wake.notify_all()

    def _decode_job(self, utterance: _Utterance, rev: int, pcm: bytes) -> None:
        started = time.perf_counter()
        try:
            result = self._transcribe(pcm)
        except Exception as exc:  # one failed decode must not end the thread that decodes every utterance
            error = exc if isinstance(exc, VoicebusError) else BackendError(
                f"speech recognition failed: {type(exc).__name__}: {exc}")
            with self._lock:
                current = utterance.paused_rev == rev and not utterance.finalized
                ended = current and utterance.ended is not None
                if current and not ended:
                    utterance.failed_rev = rev  # the pause's decode: the turn's end tries the whole again
                retry = ended and rev != utterance.end_rev
                if retry:  # the pause's decode, which the end waited for: one more try, on the whole
                    self._decode_all(utterance)
                final = ended and not retry
                utterance.finalized |= final
                if final:
                    self._forget(utterance)
            if final:
                self.emit(NoMatch(utterance.number, f"error: {error.code}: {error}", error=error))
            return
        self._guessed(utterance, rev, result, time.perf_counter() - started)

    def _decode_all(self, utterance: _Utterance) -> None:
        """(with the lock held) Queue the whole of an ended utterance for its final decode, ahead of any later
        utterance's (a retry comes after the next one has begun: its final must not come first)."""
        utterance.rev += 1
        utterance.paused_rev = utterance.end_rev = utterance.rev
        at = next((i for i, job in enumerate(self._jobs) if job[0].number > utterance.number), len(self._jobs))
        self._jobs.insert(at, (utterance, utterance.rev, utterance.decode_audio()))
        self._wake.notify_all()

    def _transcribe(self, pcm: bytes) -> Transcript:
        if len(pcm) < self._min_audio:
            return Transcript("")
        return self.recognizer.transcribe(pcm)  # type: ignore[union-attr]

    @property
    def decoding(self) -> bool:
        """A decode is queued or running."""
        with self._lock:
            return bool(self._jobs or self._after) or self._busy

    def drain(self, timeout: float = 30.0) -> None:
        """Wait until every ended utterance has its final (the end of an input)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._jobs or self._after or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._wake.wait(min(remaining, 0.05))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
