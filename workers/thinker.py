"""The thinker: user utterance → chat model stream → sentences, exactly once, with memory on disk.

Handlers run on the bus loop and only record, queue or set flags; generation
runs on its own thread, one turn at a time in the order turns were accepted
(so ``ctl.interrupt`` is seen within one token, and two askers never cancel
each other; a barge-in, which is about audio, ends voice turns, never a text
asker's answer). Every accepted turn ends with exactly one ``llm.done``.

Delivery (see ``turnlog``): a turn is written to disk before ``llm.accepted``
goes out, and each sentence before its ``llm.sentence``. A repeated utterance
of a queued or running turn is acknowledged again; of a finished turn, it gets
the stored answer again (``replay``). ``llm.resend`` asks for sentences again
from an index. A thinker that starts finds the turns its predecessor accepted
and did not finish, sends what was already said, and continues the answer.

Memory keeps what the user received: a text turn (``ctl.ask``) keeps the whole
answer the asker was sent; a voice turn (``asr.final``) keeps what was heard,
cut where ``play.stopped`` says playback stopped. ``llm.heard`` acknowledges a
stop once the history has it (the speaker says the stop again until then).

Speculation: an ``asr.guess`` (a tentative transcript at a pause) that finds the
thinker idle starts an answer at once. Its sentences go out marked with the
guess, and nothing of it is recorded. The ``asr.final`` that confirms the guess
commits it: the turn and the sentences so far are recorded and sent again as
confirmed, and generation goes on as for any turn. A revoke, a newer guess, or a
final that does not confirm it cancels it; its ``llm.done`` says ``revoked``.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from voicebus.engine.actor import Actor, handles
from voicebus.engine.client import BusClient
from voicebus.engine.errors import BackendError, VoicebusError
from voicebus.engine.messages import Envelope, Error, Shutdown, first_turn_id_at
from voicebus.workers import backends
from voicebus.workers.config import Settings
from voicebus.workers.kinds import (
    AsrFinal,
    AsrGuess,
    AsrRevoke,
    LlmAccepted,
    LlmDone,
    LlmError,
    LlmHeard,
    LlmResend,
    LlmSentence,
    LlmToken,
    PlayDone,
    PlayStopped,
)
from voicebus.workers.memory import Conversation
from voicebus.workers.sentences import SentenceCutter, speakable
from voicebus.workers.stop_phrases import StopPhrases
from voicebus.workers.turnlog import BARGE_IN, TEXT, VOICE, TurnLog, TurnRecord

APOLOGY = "Sorry, I could not answer that just now."
RESUME_WITHIN_S = 600.0
"""A turn its predecessor left unfinished is resumed if it was accepted this recently, else closed."""
PROMPT_MARGIN_TOKENS = 32
KEEP_EVERY_TOKENS = 256
"""The local model's context is written down after a turn once it holds this many tokens the last copy
does not (every few turns: ~23 KB a token, ~30 ms a write), and when the thinker stops."""
QUESTION_TOKENS = 64
"""Room the history window keeps for the next question, so it can be read before the question comes (a
longer question gets its room from the history then)."""


@dataclass
class Answer:
    """The answer being generated: its sentences as sent, and how much was heard."""

    sentences: list[str] = field(default_factory=list)
    raws: list[str] = field(default_factory=list)
    """what the model wrote for each sentence ("" for the apology, which is no answer)"""
    heard: str | None = None
    """(voice) set when playback was cut: the part actually heard"""
    tokens: int = 0


@dataclass
class Job:
    turn: int
    channel: str
    received: float
    cancel: threading.Event = field(default_factory=threading.Event)
    reason: str = ""
    """why it was cancelled"""
    answer: Answer = field(default_factory=Answer)
    guess: int = 0
    """nonzero while this answers an unconfirmed guess (asr.guess rev): nothing is recorded yet"""
    text: str = ""
    """(speculative) the guessed words"""
    ended: LlmDone | None = None
    """(speculative) its generation finished before the confirmation came"""
    recorded: bool = False
    """its end is in the turn log"""


class Thinker(Actor):
    name = "thinker"

    def __init__(self, client: BusClient, settings: Settings) -> None:
        super().__init__(client)
        self.settings = settings
        self.chat = None
        self.memory: Conversation | None = None
        self.log: TurnLog | None = None
        self._queue: deque[Job] = deque()
        self._wake = threading.Condition()
        self._current: Job | None = None
        self._speculation: Job | None = None
        """the answer being prepared for an unconfirmed guess (queued, running or finished)"""
        self._stop_phrases = StopPhrases(settings.llm.stop_phrases)
        self._thread: threading.Thread | None = None
        self._window: tuple[str, ...] = ()
        """how the last prompt the model read begins (see ``_read_ahead``)"""
        self._closing = threading.Event()
        """set by close(): a warm-up under way stops at its next step"""
        self._since_turn: int | None = None
        """the model sees no turn older than this (this run's conversation: state.continue_conversation)"""

    def backends(self) -> dict[str, str]:
        return {"llm": self.settings.llm.backend}

    def load(self) -> None:
        print(f"thinker: loading the {self.settings.llm.backend} chat model…", file=sys.stderr, flush=True)
        self.chat = backends.open_chat(self.settings, keep_context=True)
        self.memory = Conversation(
            backends.state_dir(self.settings) / "conversation.sqlite",
            self.settings.state.session,
            self.settings.llm.system_prompt,
            on_degraded=self._memory_degraded,
        )
        self.log = TurnLog(self.memory)
        if not self.settings.state.continue_conversation:
            self._since_turn = first_turn_id_at(self.settings.state.run_started or time.time())
        self._resume_unfinished()
        warm_up = getattr(self.chat, "warm_up", None)
        messages = self._prompt(None)
        if warm_up is not None:  # local models, and servers on this machine: a remote one would cost a request
            warm_up(messages)
        self._window = window_start(messages)
        self._thread = threading.Thread(target=self._generate_loop, name="thinker-generate", daemon=True)
        self._thread.start()

    def _resume_unfinished(self) -> None:
        """Queue the turns a previous thinker accepted and did not finish (recent ones)."""
        assert self.log is not None
        now = time.time()
        for record in self.log.unfinished():
            if now - record.accepted > RESUME_WITHIN_S:
                self.log.finish(record.turn, "abandoned", "the thinker stopped before answering", "")
                continue
            print(f"thinker: resuming turn {record.turn} ({len(record.sentences)} sentence(s) already said)",
                  file=sys.stderr, flush=True)
            self._queue.append(Job(record.turn, record.channel, record.accepted))
            if self._since_turn is not None:  # answered in this run, it belongs to this run's conversation
                self._since_turn = min(self._since_turn, record.turn)

    def _memory_degraded(self, reason: str) -> None:
        print(f"thinker: {reason}", file=sys.stderr, flush=True)
        self.bus.publish(Error(where="thinker.memory", code="memory", message=reason, transient=False))

    # --- handlers (bus loop: quick) ---------------------------------------------------------

    @handles("asr.final", "ctl.ask")
    def on_utterance(self, env: Envelope) -> None:
        assert self.log is not None
        text = env.body.text.strip()  # type: ignore[union-attr]
        channel = VOICE if isinstance(env.body, AsrFinal) else TEXT
        if not text:
            self.bus.publish(LlmError(code="empty", message="nothing to answer: the utterance is empty"), turn=env.turn)
            self.bus.publish(LlmDone(finish_reason="error", sentences=0, reason="empty utterance"), turn=env.turn)
            return
        if isinstance(env.body, AsrFinal) and self._commit(env.turn, env.body):
            return
        position = self._position(env.turn)
        if position is not None:  # a repeat of a turn queued or being answered
            self.bus.publish(LlmAccepted(queued=position, note=self._note()), turn=env.turn)
            return
        record = self.log.get(env.turn)
        if record is not None and record.done:
            self._send_again(record, 0)
            return
        if record is not None:  # accepted, but its answer was lost with a failure: answer it (again)
            self._enqueue(Job(env.turn, record.channel, time.time()), "")
            return
        if self._stop_phrases.matches(text):
            self.log.accept(env.turn, channel, text)
            self.log.finish(env.turn, "stop_phrase", text, "")
            self.bus.publish(LlmDone(finish_reason="stop_phrase", sentences=0, reason=text), turn=env.turn)
            self.bus.publish(Shutdown(reason=f"stop phrase: {text}"))
            return
        text, cut = self._fit(text)
        self.log.accept(env.turn, channel, text)
        self._enqueue(Job(env.turn, channel, time.time()), cut)

    def _enqueue(self, job: Job, note: str) -> None:
        if self._speculation is not None and self._speculation.turn != job.turn:
            self._revoke(self._speculation, "a confirmed turn came first")  # real work goes first
        with self._wake:
            self._queue.append(job)
            queued = len(self._queue) - 1 + (self._current is not None)
            self._wake.notify()
        note = "; ".join(n for n in (note, self._note()) if n)
        self.bus.publish(LlmAccepted(queued=queued, note=note), turn=job.turn)

    @handles("asr.guess")
    def on_guess(self, env: Envelope) -> None:
        """Start answering a tentative transcript, if nothing confirmed is waiting."""
        assert self.log is not None and isinstance(env.body, AsrGuess)
        guess = env.body
        old = self._speculation
        if old is not None and old.turn == env.turn and old.guess >= guess.rev:
            return  # a repeat, or older than what is being prepared
        if old is not None:
            self._revoke(old, "a newer guess")
        with self._wake:
            busy = bool(self._queue) or (self._current is not None and not self._current.guess)
        text = guess.text.strip()
        if busy or not text or self._stop_phrases.matches(text) or self.log.get(env.turn) is not None:
            return
        job = Job(env.turn, VOICE, time.time(), guess=guess.rev, text=self._fit(text)[0])
        with self._wake:
            self._speculation = job
            self._queue.appendleft(job)
            self._wake.notify()

    @handles("asr.revoke")
    def on_revoke(self, env: Envelope) -> None:
        assert isinstance(env.body, AsrRevoke)
        job = self._speculation
        if job is not None and job.turn == env.turn and job.guess == env.body.rev:
            self._revoke(job, env.body.reason)

    def _commit(self, turn: int, final: AsrFinal) -> bool:
        """The final confirms the guess being answered: make that answer the turn's. False if it does not."""
        assert self.log is not None
        job = self._speculation
        if job is None or job.turn != turn:
            return False
        if not final.guess or final.guess != job.guess or final.text.strip() != job.text:
            self._revoke(job, "the final transcript differs")
            return False
        self._speculation = None
        self.log.accept(turn, VOICE, job.text)
        with self._wake:
            job.guess = 0  # from here on, sentences are recorded before they are sent
            said = list(zip(job.answer.sentences, job.answer.raws))
            ended, job.ended = job.ended, None
        for index, (text, raw) in enumerate(said):
            self.log.add_sentence(turn, index, text, raw)
        # Sent again as confirmed: this is what tells a speaker to play what it prepared.
        for index, (text, _raw) in enumerate(said):
            self.bus.publish(LlmSentence(text=text, index=index, replay=True), turn=turn)
        self.bus.publish(LlmAccepted(queued=0, note=self._note()), turn=turn)
        if ended is not None:  # it finished before the confirmation: record and send its end now
            self.log.finish(turn, ended.finish_reason, ended.reason, self._delivered(job))
            job.recorded = True
            self.bus.publish(ended, turn=turn)
        return True

    def _revoke(self, job: Job, reason: str) -> None:
        """Drop a speculative answer; whoever prepared it hears ``revoked``."""
        with self._wake:
            if self._speculation is job:
                self._speculation = None
            job.reason = reason
            job.cancel.set()
            queued = job in self._queue
            if queued:
                self._queue.remove(job)
            finished = job.ended is not None
        if queued or finished:  # a running one says it when its generation stops
            self.bus.publish(self._revoked(job), turn=job.turn)

    @staticmethod
    def _revoked(job: Job) -> LlmDone:
        return LlmDone(finish_reason="revoked", sentences=len(job.answer.sentences), reason=job.reason,
                       guess=job.guess, timings={"tokens": job.answer.tokens})

    @handles("llm.resend")
    def on_resend(self, env: Envelope) -> None:
        assert self.log is not None and isinstance(env.body, LlmResend)
        record = self.log.get(env.turn)
        if record is not None:
            self._send_again(record, env.body.from_index)

    @handles("ctl.interrupt")
    def on_interrupt(self, env: Envelope) -> None:
        assert self.log is not None
        reason = getattr(env.body, "reason", "") or "interrupted"

        def ends(job: Job) -> bool:
            # The voice user speaking over a text asker's answer stops its audio, not the asker's answer.
            return env.turn in (0, job.turn) and not (reason == BARGE_IN and job.channel == TEXT)

        with self._wake:
            if self._current is not None and ends(self._current):
                self._current.reason = reason
                self._current.cancel.set()
            dropped = [job for job in self._queue if job.turn == env.turn and ends(job)]
            for job in dropped:
                self._queue.remove(job)
        for job in dropped:  # not started: it ends now, with nothing said
            self.log.finish(job.turn, "cancelled", reason, "")
            self.bus.publish(LlmDone(finish_reason="cancelled", sentences=0, reason=reason), turn=job.turn)

    @handles("play.done")
    def on_play_done(self, env: Envelope) -> None:
        assert self.log is not None and isinstance(env.body, PlayDone)
        self.log.mark_played(env.turn, env.body.index)

    @handles("play.stopped")
    def on_play_stopped(self, env: Envelope) -> None:
        """A voice turn's playback was cut: its history keeps only what was heard."""
        assert self.log is not None and isinstance(env.body, PlayStopped)
        body = env.body
        record = self.log.get(env.turn)
        # A speaker that restarted mid-turn reports from where *it* began; what its predecessor played
        # (play.done, recorded as played) was heard all the same.
        index, spoken_ms, total_ms = body.index, body.spoken_ms, body.total_ms
        played = 0
        while record is not None and played < len(record.sentences) and record.sentences[played].played:
            played += 1
        if played > index:
            index, spoken_ms, total_ms = played, 0, 0
        with self._wake:
            current = self._current
            # A text turn was delivered as text: playback does not cut it.
            if current is not None and current.turn == env.turn and not current.guess and current.channel == VOICE:
                current.answer.heard = spoken_part(current.answer.sentences, index, spoken_ms, total_ms)
                current.reason = current.reason or body.reason
                current.cancel.set()
                # Not acknowledged yet: the speaker says its stop again at this turn's llm.done, and the
                # history takes it then, once the turn is recorded as finished.
                return
            # Waiting to be answered (a restarted thinker resumes it): it was spoken over, so what was heard
            # is all of it. Answered now, it would be heard by no one, or played by a speaker restarted after
            # this acknowledgement, which would not know the turn was stopped.
            spoken_over = [job for job in self._queue if job.turn == env.turn and not job.guess and job.channel == VOICE]
            for job in spoken_over:
                self._queue.remove(job)
        if record is not None and record.channel == VOICE and (record.done or spoken_over):
            said = [s.text for s in record.sentences if s.raw]
            finish, reason = (record.finish, record.reason) if record.done else ("cancelled", body.reason)
            self.log.finish(env.turn, finish, reason, spoken_part(said, index, spoken_ms, total_ms))
            if not record.done:
                self.bus.publish(LlmDone(finish_reason=finish, sentences=len(record.sentences), reason=reason),
                                 turn=env.turn)
        # Recorded, or nothing to cut (a text turn, one not answered yet, one this thinker never had): a turn
        # answered later ends with an llm.done, which brings the stop again.
        self.bus.publish(LlmHeard(index=body.index, spoken_ms=body.spoken_ms), turn=env.turn)

    def _position(self, turn: int) -> int | None:
        """Where ``turn`` is among the queued and running turns (0 = being answered), or None.

        A running turn that was interrupted still counts until its generation stops: it ends with its
        own llm.done, and a repeat that crosses the interrupt must not start a second answer.
        """
        with self._wake:
            ahead = [self._current] if self._current is not None else []
            confirmed = [job for job in (*ahead, *self._queue) if not job.guess]
            for index, job in enumerate(confirmed):
                if job.turn == turn:
                    return index
        return None

    def _note(self) -> str:
        return self.memory.degraded if self.memory is not None else ""

    def _send_again(self, record: TurnRecord, from_index: int) -> None:
        """The stored sentences from ``from_index`` (and the end, if the turn is done), marked as replays."""
        for s in record.sentences[from_index:]:
            self.bus.publish(LlmSentence(text=s.text, index=s.index, replay=True, played=s.played), turn=record.turn)
        if record.done:
            self.bus.publish(
                LlmDone(finish_reason=record.finish, sentences=len(record.sentences), reason=record.reason, replay=True),
                turn=record.turn,
            )

    def _fit(self, text: str) -> tuple[str, str]:
        """The question cut to what the model can take beside its system prompt and answer, and a note if cut."""
        assert self.chat is not None
        llm = self.settings.llm
        room = self.chat.context_tokens - llm.max_tokens - self.chat.count_tokens(llm.system_prompt)
        room -= PROMPT_MARGIN_TOKENS
        tokens = self.chat.count_tokens(text)
        if tokens <= room:
            return text, ""
        keep = max(1, room) * len(text) // tokens
        while keep > 1 and self.chat.count_tokens(text[:keep]) > room:
            keep = keep * 9 // 10
        return text[:keep], f"the question was cut to its first {keep} characters ({room} tokens fit beside the answer)"

    # --- generation (own thread) ------------------------------------------------------------

    def _generate_loop(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self.stopping:
                    self._wake.wait(0.5)
                if self.stopping:
                    return
                job = self._current = self._queue.popleft()
            try:
                done = self._answer_turn(job)
            except Exception as exc:  # report, end the turn, and keep serving: the next turn may well work
                print(f"thinker: turn {job.turn} failed: {exc!r}", file=sys.stderr, flush=True)
                self.bus.report("thinker.generate", exc)
                done = self._end_failed(job, exc)
            # No longer current before the end goes out: a repeat that follows it must find the turn done.
            with self._wake:
                self._current = None
                if job.guess and not job.cancel.is_set():
                    job.ended, done = done, None  # prepared for a guess: its end waits for the confirmation
                confirmed_meanwhile = not job.guess and not job.recorded and done is not None
            if confirmed_meanwhile:  # the confirmation came between the generation's end and now
                assert self.log is not None and done is not None
                self.log.finish(job.turn, done.finish_reason, done.reason, self._delivered(job))
            if done is not None:
                self.bus.publish(done, turn=job.turn)
            self._read_ahead()
            with self._wake:
                idle = not self._queue and not self.stopping  # a waiting turn goes first; close() keeps it all
            if idle:
                self._keep_what_was_read(KEEP_EVERY_TOKENS)

    def _read_ahead(self) -> None:
        """When the history window has moved, have the model read the new one now, while nothing waits.

        The window over the history moves every few dozen turns (``Conversation.messages``, stable), and a
        prompt that begins differently is read whole again: with the local model on 2 cores, the first
        token of every such answer came after 6.3 s instead of 0.16 s (a 1,800-token window). Read now,
        while the answer plays, the next question finds it cached (0.67 s at most over 150 turns:
        scripts/bench_long_conversation.py).
        """
        warm_up = getattr(self.chat, "warm_up", None)
        with self._wake:
            if warm_up is None or self._queue or self.stopping:
                return
        try:
            messages = self._prompt(None)
            if window_start(messages) == self._window:
                return  # the next prompt begins as the last one did: the model has it already
            self._window = window_start(messages)
            warm_up(messages, cancel=self._closing)
        except VoicebusError:
            pass  # the next turn meets the failure and reports it
        except Exception as exc:  # a bug here must not end the thread that answers every turn
            self.bus.report("thinker.read_ahead", exc)

    def _keep_what_was_read(self, unless_fewer_than: int = 1) -> None:
        """Write down the local model's context, so that a restarted thinker, or a run that continues this
        conversation, need not read it again (the first answer after 40 turns: 6.9 s, 0.9 s with the context
        kept; scripts/bench_returning_user.py)."""
        keep = getattr(self.chat, "keep_what_was_read", None)
        if keep is None:
            return
        try:
            keep(unless_fewer_than=unless_fewer_than)
        except Exception as exc:  # the copy only saves time: a failure must not end the thread that answers
            self.bus.report("thinker.keep_context", exc)

    def _end_failed(self, job: Job, exc: Exception) -> LlmDone:
        """Every accepted turn gets its llm.done, even one whose answering failed unexpectedly."""
        reason = f"{getattr(exc, 'code', type(exc).__name__)}: {exc}"
        if not job.guess:
            try:
                assert self.log is not None
                self.log.finish(job.turn, "error", reason, self._delivered(job))
                job.recorded = True
            except VoicebusError:
                pass  # the history is broken too (already reported); the asker still hears the end
        return LlmDone(finish_reason="error", sentences=len(job.answer.sentences), reason=reason, guess=job.guess)

    def _answer_turn(self, job: Job) -> LlmDone:
        """Answer one turn, record it as done (unless it answers a guess), and return its llm.done."""
        assert self.log is not None and self.chat is not None
        answer = job.answer
        record = None if job.guess else self.log.get(job.turn)
        if record is not None and record.sentences:  # resuming: say again what may not have been heard
            self._send_again(record, 0)
            answer.sentences = [s.text for s in record.sentences]
            answer.raws = [s.raw for s in record.sentences]
        timings: dict[str, float] = {"request": job.received}
        finish, pieces = "stop", []
        if job.cancel.is_set():
            finish = "cancelled"
        else:
            try:
                finish, pieces = self._generate(job, timings)
            except BackendError as exc:
                finish = "error"
                job.reason = f"{exc.code}: {exc}"
                self._apologize(job, exc)
        if job.cancel.is_set():
            finish = "cancelled"
        timings["done"] = time.time()
        timings["tokens"] = answer.tokens
        if "first_token" in timings:
            timings["ttft_s"] = timings["first_token"] - job.received
            gen_s = timings["done"] - timings["first_token"]
            if answer.tokens > 1 and gen_s > 0:
                timings["tokens_per_s"] = (answer.tokens - 1) / gen_s
        with self._wake:
            speculative = job.guess
        if speculative:
            if finish == "cancelled":
                return self._revoked(job)
            return LlmDone(finish_reason=finish, sentences=len(answer.sentences), text="".join(pieces),
                           timings=timings, reason=job.reason)
        # The record first: whoever reacts to llm.done finds the answer stored.
        self.log.finish(job.turn, finish, job.reason, self._delivered(job))
        job.recorded = True
        return LlmDone(finish_reason=finish, sentences=len(answer.sentences), text="".join(pieces), timings=timings,
                       reason=job.reason)

    def _generate(self, job: Job, timings: dict[str, float]) -> tuple[str, list[str]]:
        assert self.chat is not None
        answer = job.answer
        prefix = " ".join(r for r in answer.raws if r)
        max_tokens = self.settings.llm.max_tokens - (self.chat.count_tokens(prefix) if prefix else 0)
        if prefix and max_tokens <= 0:
            return "length", []
        messages = self._prompt(job.turn)
        self._window = window_start(messages)
        if job.guess:  # the guessed words are in no history yet
            messages.append({"role": "user", "content": job.text})
        cutter = SentenceCutter(self.settings.llm.first_clause_words)
        pieces: list[str] = []
        finish = "stop"
        stream = self.chat.stream(messages, max_tokens=max_tokens, cancel=job.cancel, prefix=prefix)
        while True:
            try:
                piece = next(stream)
            except StopIteration as done:
                finish = done.value or "stop"
                break
            timings.setdefault("first_token", time.time())
            answer.tokens += 1
            pieces.append(piece)
            if not job.guess:
                self.bus.publish(LlmToken(text=piece, index=answer.tokens - 1), turn=job.turn)
            self._emit(job, cutter.feed(piece), timings)
        if finish != "cancelled":
            self._emit(job, cutter.flush(), timings)  # what arrived passed the service's filters
        if finish == "content_filter":
            raise BackendError("the service's content filter withheld the rest of the answer", code="content_filter")
        return finish, pieces

    def _emit(self, job: Job, sentences: list[str], timings: dict[str, float]) -> None:
        for raw in sentences:
            text = speakable(raw)
            if text:
                timings.setdefault("first_sentence", time.time())
                self._say(job, text, raw)

    def _say(self, job: Job, text: str, raw: str) -> None:
        """Record a sentence, then send it: a crash in between loses nothing (a guess's is not recorded)."""
        assert self.log is not None
        with self._wake:  # play.stopped, or the confirmation of a guess, may come at once and must find it
            index = len(job.answer.sentences)
            job.answer.sentences.append(text)
            job.answer.raws.append(raw)
            guess = job.guess
        if not guess:
            self.log.add_sentence(job.turn, index, text, raw)
        self.bus.publish(LlmSentence(text=text, index=index, guess=guess), turn=job.turn)

    def _apologize(self, job: Job, exc: BackendError) -> None:
        """llm.error with the reason, and a short spoken apology: the conversation goes on."""
        self.bus.publish(LlmError(code=exc.code, message=str(exc), transient=exc.transient), turn=job.turn)
        self._say(job, APOLOGY, "")

    @staticmethod
    def _delivered(job: Job) -> str:
        """What the user received of the answer: the history's assistant message."""
        answer = job.answer
        said = [text for text, raw in zip(answer.sentences, answer.raws) if raw]  # the apology is no answer
        if job.channel == VOICE and answer.heard is not None:
            return answer.heard
        return " ".join(said)

    def _prompt(self, turn: int | None) -> list[dict[str, str]]:
        """System prompt and as much history up to ``turn`` as fits beside the answer: this run's, or all runs'
        with state.continue_conversation."""
        assert self.memory is not None and self.chat is not None
        budget = max(256, self.chat.context_tokens - self.settings.llm.max_tokens)
        return self.memory.messages(budget, self.chat.count_tokens, per_message=self.chat.message_tokens,
                                    until_turn=turn, stable=True, reserve=QUESTION_TOKENS, since_turn=self._since_turn)

    def close(self) -> None:
        self._closing.set()
        with self._wake:
            if self._current is not None:
                self._current.cancel.set()
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self.chat is not None:
            if self._thread is None or not self._thread.is_alive():  # the model is not in use
                self._keep_what_was_read()
            self.chat.close()
        if self.memory is not None:
            self.memory.close()


def window_start(messages: list[dict[str, str]]) -> tuple[str, ...]:
    """How a prompt begins: its system prompt and first message of history (the prefix a model caches)."""
    return tuple(m["content"] for m in messages[:2])


def spoken_part(sentences: list[str], index: int, spoken_ms: int, total_ms: int) -> str:
    """The sentences before ``index`` in full, and the words of sentence ``index`` heard so far."""
    heard = list(sentences[:index])
    if index < len(sentences) and total_ms > 0 and spoken_ms > 0:
        words = sentences[index].split()
        count = int(len(words) * min(1.0, spoken_ms / total_ms))
        if count:
            heard.append(" ".join(words[:count]) + "…")
    return " ".join(heard)
