"""The listener: audio in → voice activity → speech recognition → the user's words on the bus.

Audio is read on a thread of its own and handed to the front end (``hearing``),
which detects utterances and transcribes them on its decode thread. This actor
turns what it hears into bus messages, assigns turn ids, interrupts the
assistant when the user starts talking over it (barge-in), and delivers every
utterance (see ``redelivery``): it offers it until the thinker accepts it and
keeps it until its answer was played, offering it again if the turn goes quiet.

What it must not forget across a restart — the utterances still pending, and
for a file how far it got — is kept on disk (``listener_progress``). When a
file input ends, the listener waits for the last answer and then asks everyone
to shut down, so ``voicebus up --input q.wav --output a.wav`` exits by itself;
if answers stop coming, or nothing was said in the file at all, it shuts down
with a reason and ``voicebus up`` exits non-zero.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TYPE_CHECKING

from voicebus.engine.actor import Actor, handles
from voicebus.engine.client import BusClient
from voicebus.engine.errors import VoicebusError
from voicebus.engine.messages import Envelope, Error, Interrupt, Shutdown, new_turn_id
from voicebus.workers import backends
from voicebus.workers.audio import FRAME_BYTES, RATE, is_bus_input, open_source
from voicebus.workers.config import Settings
from voicebus.workers.hearing import Ended, Event, Final, Guess, Hearing, NoMatch, Partial, Revoked, SpeechStarted
from voicebus.workers.kinds import (
    AsrFinal,
    AsrGuess,
    AsrNoMatch,
    AsrPartial,
    AsrRevoke,
    AudioEnd,
    AudioIn,
    LlmDone,
    VadEnd,
    VadStart,
)
from voicebus.workers.listener_progress import Progress, ProgressFile
from voicebus.workers.run_state import LoadGuard, RunFile, run_key, sweep
from voicebus.workers.redelivery import ANSWER_KINDS, Redelivery
from voicebus.workers.stop_phrases import StopPhrases
from voicebus.workers.turnlog import BARGE_IN
from voicebus.workers.turn_end import EndOfTurn
from voicebus.workers.vad import endpointer_for

if TYPE_CHECKING:
    from voicebus.workers.llm.message_end import MessageEnd

SILENCE = bytes(FRAME_BYTES)
NO_NEWS_S = 60.0
"""After the input ended, how long pending answers may go without any news before the run fails."""
GUARD_RECORD_S = 24 * 3600.0
"""How long the record of a listener that died loading the end-of-turn model is kept (its run is long over)."""


class Listener(Actor):
    name = "listener"

    def __init__(self, client: BusClient, settings: Settings) -> None:
        super().__init__(client)
        self.settings = settings
        self.source = None
        self.hearing: Hearing | None = None
        self.redelivery = Redelivery()
        self._lock = threading.Lock()
        self._turns: dict[int, int] = {}
        """utterance number → turn id"""
        self._last_utterance = (0, 0)
        """(utterance number, turn id) of the last utterance begun: the one a new one may rejoin"""
        self._cut_short: set[int] = set()
        """turns whose transcript was still being made when the user spoke again: interrupted on arrival"""
        self._guesses: dict[int, tuple[int, str]] = {}
        """utterance number → the last guess published (rev, text)"""
        self._ended: dict[int, tuple[Ended, float, float]] = {}
        """utterance number → its end, the wall-clock time it was reported, and when the speech stopped"""
        self._speaking: int | None = None
        self._barged: set[int] = set()
        """pending turns the user spoke over: they end with both the thinker's and the speaker's word (_turn_end)"""
        self._answered: set[int] = set()
        """pending turns whose llm.done came: the thinker has ended them"""
        self._stopped: set[int] = set()
        """pending turns the speaker has ended (metrics.turn, play.stopped)"""
        self._eof_at: float | None = None
        self._one_turn_at_a_time = False
        """a file read --fast: its next utterance waits until the last turn is over"""
        self._paused_at: float | None = None
        """--fast: when reading stopped to wait for the last turn's answer (``_wait_for_the_answer``)"""
        self._heard_at = 0.0
        """when the front end last said anything (a hung recognizer says nothing)"""
        self._last_turn = 0
        self._thread: threading.Thread | None = None
        self._progress_file: ProgressFile | None = None
        self._progress = Progress()
        self._base_ms = 0
        """input time where this listener started reading (a restarted one resumes mid-file)"""
        self.no_news_s = NO_NEWS_S
        self._stop_phrases = StopPhrases(settings.llm.stop_phrases)
        self._message_end: MessageEnd | None = None
        self._answers_announced = True
        """whether guesses get a play.ready here (no speaker, or one that prepares nothing: not worth waiting)"""

    def backends(self) -> dict[str, str]:
        # (the end-of-turn model is llama.cpp too: a native crash while loading it must name it)
        hears = self.settings.audio.input.strip().lower() != "none"
        turn = {"end_of_turn": "local chat model"} if hears and backends.uses_message_end(self.settings) else {}
        return {"asr": self.settings.asr.backend, "input": self.settings.audio.input, **turn}

    def load(self) -> None:
        audio, vad = self.settings.audio, self.settings.vad
        runs = backends.state_dir(self.settings) / "runs"
        key = run_key(audio.input, self.settings.state.run_started)
        self._progress_file = ProgressFile(runs, key)
        self._progress = self._progress_file.load()
        self._resume_pending()
        # A file has a past to skip on a restart; a microphone or the bus (a replay, a remote host) is live.
        spec = audio.input.strip().lower()
        is_file = spec not in ("mic", "none", "bus") and not spec.startswith("mic:")
        self._base_ms = self._progress.resume_ms if is_file else 0
        # A live source cannot wait for an answer: it would drop what it hears meanwhile.
        self._one_turn_at_a_time = audio.fast and is_file
        self.source = open_source(audio.input, realtime=not audio.fast, start_ms=self._base_ms)
        if self.source is None:
            return  # text only: utterances arrive as ctl.ask, straight to the thinker
        print(f"listener: loading {self.settings.asr.backend} speech recognition…", file=sys.stderr, flush=True)
        recognizer = backends.open_recognizer(self.settings, progress=self._progress_line)
        sweep(runs, "message-end-", GUARD_RECORD_S)
        guard = LoadGuard(RunFile(runs / f"message-end-{key}.json"))
        self._message_end = backends.open_message_end(self.settings, guard)
        self.hearing = Hearing(
            recognizer, endpointer_for(vad), self._heard, end_of_turn=EndOfTurn.from_settings(vad),
            # (audio.fast reads a file faster than real time: nobody waits, and the hold would be stream time)
            hold_ms=vad.hold_ms if vad.speculate and not audio.fast else 0, answered=self._answer_coming,
            message_end=self._message_end.logprob if self._message_end is not None else None,
            rejoin_ms=vad.rejoin_ms, rejoinable=self._still_open,
            read_alone=lambda text: self._stop_phrases.closing(text) is not None,
        )
        self._recognizer = recognizer
        self._thread = threading.Thread(target=self._listen, name="listener-audio", daemon=True)
        self._thread.start()

    def _resume_pending(self) -> None:
        """Offer again what a previous listener of this run sent and did not see finished."""
        now = time.monotonic()
        for turn, fields in self._progress.pending.items():
            self.redelivery.sent(int(turn), AsrFinal(**fields), now - self.redelivery.interval_s)
        self._barged = {turn for turn in self._progress.barged if turn in self.redelivery}
        self._last_turn = self._progress.last_turn

    @staticmethod
    def _progress_line(text: str) -> None:
        print(f"listener: {text}", file=sys.stderr, flush=True)

    # --- bus loop ---------------------------------------------------------------------------

    @handles("play.start")
    def on_play_start(self, env: Envelope) -> None:
        with self._lock:
            self._speaking = env.turn
        self.redelivery.heard(env.turn, env.kind, time.monotonic())

    @handles("play.ready")
    def on_play_ready(self, env: Envelope) -> None:
        """The answer to a guess is ready to play: its turn need not be held open any longer."""
        self._answers_announced = True
        utterance = next((u for u, turn in list(self._turns.items()) if turn == env.turn), None)
        if utterance is not None and self.hearing is not None:
            self.hearing.answer_ready(utterance, env.body.rev)

    def _answer_coming(self, text: str) -> bool:
        """Whether the thinker and speaker will prepare (and announce) an answer to these guessed words:
        the thinker does not answer a stop phrase, and without a speaker nothing is announced."""
        return self._answers_announced and not self._stop_phrases.matches(text)

    def _still_open(self, utterance: int) -> bool:
        """Whether that utterance's turn is still open (being transcribed, or its answer not over): speech that
        goes on from it soon enough rejoins it (``Hearing``'s rejoin_ms); a turn that is over is not asked again."""
        number, turn = self._last_utterance
        with self._lock:
            return utterance in self._turns or (utterance == number and turn in self.redelivery)

    @handles("metrics.turn")
    def on_turn_finished(self, env: Envelope) -> None:
        with self._lock:
            if self._speaking == env.turn:
                self._speaking = None
        self._turn_end(env.turn, speaker=True)

    @handles(*ANSWER_KINDS, "play.done", "play.stopped")
    def on_news(self, env: Envelope) -> None:
        self.redelivery.heard(env.turn, env.kind, time.monotonic())
        body = env.body
        if isinstance(body, LlmDone) and body.finish_reason != "revoked":  # (revoked: a guess's answer dropped)
            self._turn_end(env.turn, thinker=True, nothing_to_play=body.sentences == 0)
        elif env.kind == "play.stopped":
            self._turn_end(env.turn, speaker=True)
        elif env.kind == "llm.accepted" and env.turn in self._barged:
            # Accepted by a thinker that may not have heard the barge-in (it came while it was down):
            # it is said again, so the turn ends cancelled instead of being answered to nobody.
            self.bus.publish(Interrupt(reason=BARGE_IN), turn=env.turn)

    def _turn_end(self, turn: int, *, thinker: bool = False, speaker: bool = False,
                  nothing_to_play: bool = False) -> None:
        """The thinker's or the speaker's end of a pending turn; finished when it has what it needs.

        A turn ends with the speaker's word (its metrics: the answer was played), or the thinker's when
        there is nothing to play. A turn the user spoke over needs both: the thinker's, so that no
        utterance goes unrecorded (it may have been down when the interrupt came), and the speaker's, so
        that what was heard is known (a speaker that restarted meanwhile never heard of the turn) — and
        the thinker's must come after the speaker's: a thinker that restarted between its end and the
        stop never heard what was heard. Offered again, the utterance brings the thinker's end again,
        and with it the speaker's stop again (the speaker says it to every end of a turn it stopped).
        """
        again = None
        with self._lock:
            if turn not in self.redelivery:
                return
            barged = turn in self._barged
            if speaker and barged and turn in self._answered and turn not in self._stopped:
                self._answered.discard(turn)
                again = self.redelivery.pending().get(turn)
            if speaker:
                self._stopped.add(turn)
            if thinker:
                self._answered.add(turn)
            if barged:
                over = turn in self._answered and turn in self._stopped
            else:
                over = speaker or nothing_to_play
        if over:
            self._finished(turn)
        elif again is not None:
            self.bus.publish(again, turn=turn)

    def _finished(self, turn: int) -> None:
        with self._lock:
            self._barged.discard(turn)
            self._answered.discard(turn)
            self._stopped.discard(turn)
        if turn in self.redelivery:
            self.redelivery.finished(turn)
            self._save_progress()

    def tick(self) -> None:
        now = time.monotonic()
        for turn, body in self.redelivery.due(now):
            with self._lock:
                spoken_over = turn in self._barged and turn in self._answered
            # A spoken-over turn the thinker has ended waits only for the speaker to say it stopped.
            self.bus.publish(Interrupt(reason=BARGE_IN) if spoken_over else body, turn=turn)
        waiting_since = self._eof_at if self._eof_at is not None else self._paused_at
        if waiting_since is None:
            return
        if not len(self.redelivery):
            if self._eof_at is None:
                # Paused (--fast) on an utterance whose words never came: a recognizer that hangs.
                if self._turns and now - max(waiting_since, self._heard_at) > self.no_news_s:
                    self._give_up(f"no words from the {self.settings.asr.backend} recognizer for "
                                  f"{self.no_news_s:.0f} s after an utterance ended in {self.settings.audio.input}")
                return  # else reading goes on by itself
            if not self._progress.heard_any:
                what = "no speech was heard" if not self._progress.utterances else (
                    f"nothing could be recognized in the {self._progress.utterances} utterance(s) heard")
                self._give_up(f"{what} in {self.settings.audio.input}")
            else:
                self._eof_at = None
                self._done()
                self.bus.publish(Shutdown(reason="input ended"))
        elif self.redelivery.quiet_for(now) > self.no_news_s and now - waiting_since > self.no_news_s:
            turns = ", ".join(str(t) for t in self.redelivery.pending())
            self._give_up(f"no answer to turn(s) {turns} for {self.no_news_s:.0f} s: "
                          f"is a thinker running on {self.settings.bus.url}?")

    def _give_up(self, reason: str) -> None:
        self._eof_at = None
        print(f"listener: {reason}", file=sys.stderr, flush=True)
        self.bus.publish(Error(where="listener", code="no_answer", message=reason))
        self._done()
        self.bus.publish(Shutdown(reason=reason, failed=True))

    def _done(self) -> None:
        """The run's input is over and handled: its progress record is no longer needed."""
        if self._progress_file is not None:
            self._progress_file.remove()

    # --- audio thread -----------------------------------------------------------------------

    def _listen(self) -> None:
        assert self.source is not None and self.hearing is not None
        # Audio read from the bus (--input bus) is there already: published again, it would be heard twice.
        publish_audio = self.settings.audio.publish_audio and not is_bus_input(self.settings.audio.input)
        try:
            for frame in self.source:
                if self._one_turn_at_a_time and not self.hearing.in_speech:
                    self._wait_for_the_answer()
                if self.stopping:
                    return
                if publish_audio:
                    self.bus.publish(AudioIn(pcm=frame, rate=RATE), turn=self._last_turn)
                self.hearing.feed(frame)
            if self.stopping:
                return  # stopped (close() ends the source): the input did not end, and nothing is drained
            # The input ended: silence lets an utterance in progress end the usual way.
            while self.hearing.in_speech and not self.stopping:
                self.hearing.feed(SILENCE)
            self.hearing.drain()
        except VoicebusError as exc:
            self.bus.report("listener.audio", exc)
            print(f"listener: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            self.stop(f"audio input failed: {exc}")
            return
        self.bus.publish(AudioEnd(last_turn=self._last_turn, reason="end of input"))
        with self._lock:
            self._eof_at = time.monotonic()

    def _wait_for_the_answer(self) -> None:
        """--fast: the file's next words wait until the last turn is over, as a person waits for an answer.

        Read faster than real time, the next question would start while the last one is still being
        transcribed or answered, which is the user speaking over it (barge-in): of a file of questions,
        only the last got an answer. Speaking over an answer needs real time.
        """
        if not self._turn_open():
            return
        self._paused_at = time.monotonic()
        while self._turn_open() and not self.stopping:
            time.sleep(0.02)
        self._paused_at = None

    def _turn_open(self) -> bool:
        """Whether an utterance is being transcribed, or one is waiting for its answer to be over."""
        return bool(self._turns) or len(self.redelivery) > 0

    # --- what the front end heard (audio or decode thread) -----------------------------------

    def _heard(self, event: Event) -> None:
        self._heard_at = time.monotonic()
        if isinstance(event, SpeechStarted):
            self._speech_started(event)
            return
        turn = self._turns.get(event.utterance)
        if turn is None:
            return  # an utterance ignored (half duplex)
        if isinstance(event, Partial):
            self.bus.publish(AsrPartial(text=event.text), turn=turn)
        elif isinstance(event, Ended):
            self._speech_ended(event, turn)
        elif isinstance(event, (Final, NoMatch)):
            self._recognized(event, turn)
        elif isinstance(event, Guess) and self.settings.vad.speculate:
            self._guesses[event.utterance] = (event.rev, event.text)
            self.bus.publish(AsrGuess(text=event.text, rev=event.rev, offset_ms=self._base_ms + event.offset_ms),
                             turn=turn)
        elif isinstance(event, Revoked) and self._guesses.get(event.utterance, (0, ""))[0] == event.rev:
            del self._guesses[event.utterance]
            self.bus.publish(AsrRevoke(rev=event.rev), turn=turn)

    def _speech_started(self, event: SpeechStarted) -> None:
        assert self.hearing is not None
        with self._lock:
            speaking = self._speaking
            interrupted = sorted(set(self.redelivery.pending()) | ({speaking} if speaking else set()))
        if speaking and not self.settings.vad.barge_in:
            # Half duplex (open speakers, no echo cancellation): what we hear while the
            # assistant talks is most likely the assistant itself, so it is not a turn.
            self.hearing.ignore_current()
            return
        self._barge(interrupted)  # before the interrupts: the speaker's answer to them must find it so
        for old in interrupted:
            self.bus.publish(Interrupt(reason=BARGE_IN), turn=old)
        # Turns still being transcribed are open too: their answers must not play over this one.
        self._cut_short.update(self._turns.values())
        turn = new_turn_id()
        self._turns[event.utterance] = turn
        self._progress.utterances += 1
        self._last_turn = turn
        before, self._last_utterance = self._last_utterance, (event.utterance, turn)
        rejoins = before[1] if event.rejoins and event.rejoins == before[0] else 0
        self.bus.publish(VadStart(offset_ms=self._base_ms + event.offset_ms, rejoins=rejoins), turn=turn)

    def _speech_ended(self, event: Ended, turn: int) -> None:
        assert self.hearing is not None
        if event.held_in_vain:
            self._answers_announced = False  # until a play.ready shows answers are prepared again
        now = time.time()
        behind_s = (self.hearing.vad.offset_ms - event.offset_ms) / 1000 if not self.settings.audio.fast else 0.0
        speech_end = now - behind_s
        self._ended[event.utterance] = (event, now, speech_end)
        self.bus.publish(
            VadEnd(offset_ms=self._base_ms + event.offset_ms, speech_ms=event.speech_ms, speech_end_ts=speech_end),
            turn=turn,
        )

    def _recognized(self, event: Final | NoMatch, turn: int) -> None:
        now = time.time()
        ended, vad_end, speech_end = self._ended.pop(event.utterance, (None, now, now))
        guess_rev, guess_text = self._guesses.pop(event.utterance, (0, ""))
        # (a stop phrase said after the words it rejoined is decided on its own audio: "Where is the bus … stop?")
        text = self._stop_phrases.asked(event.text, event.alone) if isinstance(event, Final) else ""
        # A guess is confirmed only by a final of exactly its words; anything else makes it void.
        confirms = guess_rev if isinstance(event, Final) and text == guess_text else 0
        timings = {"speech_end": speech_end, "vad_end": vad_end, "final": now, "asr_s": now - vad_end}
        if ended is not None:
            timings["silence_window_s"] = ended.silence_ms / 1000
            self._progress.resume_ms = max(self._progress.resume_ms, self._base_ms + ended.offset_ms)
        if isinstance(event, NoMatch):
            if event.error is not None:  # a failing recognizer (a cloud service down) is said, not just counted
                self.bus.report("listener.asr", event.error)
            self._turns.pop(event.utterance, None)
            self._cut_short.discard(turn)
            if guess_rev:
                self.bus.publish(AsrRevoke(rev=guess_rev, reason="nothing recognized"), turn=turn)
            self.bus.publish(AsrNoMatch(reason=event.reason, timings=timings), turn=turn)
            self._save_progress()
            return
        timings["decode_s"] = event.decode_s
        body = AsrFinal(text=text, confidence=event.confidence, timings=timings, guess=confirms)
        self._progress.heard_any = True
        self.redelivery.sent(turn, body, time.monotonic())
        self._turns.pop(event.utterance, None)  # (after: the turn is open throughout, see _turn_open)
        self._save_progress()  # before it is sent: a restart offers it again rather than losing it
        self.bus.publish(body, turn=turn)
        if turn in self._cut_short:  # the user spoke again while this was being transcribed
            self._cut_short.discard(turn)
            self._barge([turn])
            self.bus.publish(Interrupt(reason=BARGE_IN), turn=turn)

    def _barge(self, turns: list[int]) -> None:
        """The user spoke over these turns (the interrupt is sent): see ``_turn_end`` for when they are over."""
        with self._lock:
            pending = [turn for turn in turns if turn in self.redelivery]
            self._barged.update(pending)
        if pending:
            self._save_progress()

    def _save_progress(self) -> None:
        if self._progress_file is None:
            return
        self._progress.last_turn = self._last_turn
        self._progress.pending = {str(turn): body.to_dict() for turn, body in self.redelivery.pending().items()}
        with self._lock:
            self._progress.barged = sorted(self._barged)
        self._progress_file.save(self._progress)

    def close(self) -> None:
        if self.source is not None:
            self.source.close()
        if self._thread is not None:
            self._thread.join(timeout=3)
        if self.hearing is not None:
            self.hearing.close()
            self._recognizer.close()
        if self._message_end is not None:
            self._message_end.close()
