"""The thinker: user utterance → chat model stream → sentences, with memory on disk.

Handlers run on the bus loop and only queue work or set flags; generation runs
on its own thread, so ``ctl.interrupt`` is seen within one token. The history
keeps what the assistant actually got to say: when the speaker reports
``play.stopped``, the turn's answer is cut to the spoken part.
"""

from __future__ import annotations

import queue
import re
import sys
import threading
import time
from dataclasses import dataclass, field

from voicebus.engine.actor import Actor, handles
from voicebus.engine.client import BusClient
from voicebus.engine.errors import BackendError
from voicebus.engine.messages import Envelope, Shutdown
from voicebus.workers import backends
from voicebus.workers.config import Settings
from voicebus.workers.kinds import LlmAccepted, LlmDone, LlmError, LlmSentence, LlmToken, PlayStopped
from voicebus.workers.memory import Conversation
from voicebus.workers.sentences import SentenceCutter, speakable

APOLOGY = "Sorry, I could not answer that just now."
TURNS_REMEMBERED = 32


def normalize(text: str) -> str:
    """Lower case, punctuation dropped, spaces folded: how stop phrases are compared."""
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


@dataclass
class Job:
    turn: int
    text: str
    received: float
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class Answer:
    """What one turn's answer became: its sentences, and how much of it was spoken."""

    sentences: list[str] = field(default_factory=list)
    spoken: str | None = None
    """set when playback was cut: the part actually heard"""
    finished: bool = False


class Thinker(Actor):
    name = "thinker"

    def __init__(self, client: BusClient, settings: Settings) -> None:
        super().__init__(client)
        self.settings = settings
        self.chat = None
        self.memory: Conversation | None = None
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._current: Job | None = None
        self._queued: set[int] = set()
        self._answers: dict[int, Answer] = {}
        self._lock = threading.Lock()
        self._stop_phrases = {normalize(p) for p in settings.llm.stop_phrases if normalize(p)}
        self._thread: threading.Thread | None = None

    def backends(self) -> dict[str, str]:
        return {"llm": self.settings.llm.backend}

    def load(self) -> None:
        print(f"thinker: loading the {self.settings.llm.backend} chat model…", file=sys.stderr, flush=True)
        self.chat = backends.open_chat(self.settings)
        self.memory = Conversation(
            backends.state_dir(self.settings) / "conversation.sqlite",
            self.settings.state.session,
            self.settings.llm.system_prompt,
        )
        warm_up = getattr(self.chat, "warm_up", None)
        if warm_up is not None:  # local models, and servers on this machine: a remote one would cost a request
            warm_up(self._prompt())
        self._thread = threading.Thread(target=self._generate_loop, name="thinker-generate", daemon=True)
        self._thread.start()

    # --- handlers (bus loop: quick) ---------------------------------------------------------

    @handles("asr.final", "ctl.ask")
    def on_utterance(self, env: Envelope) -> None:
        text = env.body.text.strip()  # type: ignore[union-attr]
        if not text:
            return
        if self._known(env.turn):
            # A repeat: the sender missed our acceptance, so say it again.
            self.bus.publish(LlmAccepted(), turn=env.turn)
            return
        if normalize(text) in self._stop_phrases:
            self.bus.publish(LlmDone(finish_reason="stop_phrase", sentences=0), turn=env.turn)
            self.bus.publish(Shutdown(reason=f"stop phrase: {text}"))
            return
        with self._lock:
            # A newer utterance supersedes whatever is being answered or waiting.
            if self._current is not None:
                self._current.cancel.set()
            self._queued.add(env.turn)
        self._jobs.put(Job(env.turn, text, time.time()))
        self.bus.publish(LlmAccepted(queued=self._jobs.qsize() - 1), turn=env.turn)

    @handles("ctl.interrupt")
    def on_interrupt(self, env: Envelope) -> None:
        with self._lock:
            job = self._current
            if job is not None and env.turn in (0, job.turn):
                job.cancel.set()

    @handles("play.stopped")
    def on_play_stopped(self, env: Envelope) -> None:
        body = env.body
        assert isinstance(body, PlayStopped)
        with self._lock:
            answer = self._answers.get(env.turn)
            if answer is None:
                return
            answer.spoken = spoken_part(answer.sentences, body.index, body.spoken_ms, body.total_ms)
            if self._current is not None and self._current.turn == env.turn:
                self._current.cancel.set()
            if answer.finished:
                self._remember_answer(env.turn, answer)

    def _known(self, turn: int) -> bool:
        """True for an utterance already answered, being answered, or queued (a redelivery)."""
        with self._lock:
            if turn in self._queued or (self._current is not None and self._current.turn == turn):
                return True
        assert self.memory is not None
        return self.memory.has_answer(turn)

    # --- generation (own thread) ------------------------------------------------------------

    def _generate_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._lock:
                self._queued.discard(job.turn)
                if job.cancel.is_set() or not self._jobs.empty():
                    # Superseded before it started: a newer utterance is waiting.
                    continue
                self._current = job
            try:
                self._answer(job)
            except Exception as exc:  # report and keep serving: the next turn may well work
                self.bus.report("thinker.generate", exc)
            finally:
                with self._lock:
                    self._current = None

    def _answer(self, job: Job) -> None:
        assert self.memory is not None and self.chat is not None
        llm = self.settings.llm
        self.memory.add_user(job.turn, job.text)
        answer = Answer()
        with self._lock:
            self._answers[job.turn] = answer
            for old in sorted(self._answers)[:-TURNS_REMEMBERED]:
                del self._answers[old]
        messages = self._prompt()
        timings: dict[str, float] = {"request": job.received}
        cutter = SentenceCutter()
        tokens = 0
        finish = "stop"
        pieces: list[str] = []

        def emit(sentences: list[str]) -> None:
            for sentence in sentences:
                spoken = speakable(sentence)
                if spoken:
                    timings.setdefault("first_sentence", time.time())
                    with self._lock:  # recorded before it is sent: play.stopped may follow at once
                        index = len(answer.sentences)
                        answer.sentences.append(spoken)
                    self.bus.publish(LlmSentence(text=spoken, index=index), turn=job.turn)

        try:
            stream = self.chat.stream(messages, max_tokens=llm.max_tokens, cancel=job.cancel)
            while True:
                try:
                    piece = next(stream)
                except StopIteration as done:
                    finish = done.value or "stop"
                    break
                timings.setdefault("first_token", time.time())
                tokens += 1
                pieces.append(piece)
                self.bus.publish(LlmToken(text=piece, index=tokens - 1), turn=job.turn)
                emit(cutter.feed(piece))
            if finish != "cancelled":
                emit(cutter.flush())  # what arrived passed the service's filters
            if finish == "content_filter":
                raise BackendError("the service's content filter withheld the rest of the answer", code="content_filter")
        except BackendError as exc:
            finish = "error"
            self._apologize(job.turn, answer, exc)
        if job.cancel.is_set():
            finish = "cancelled"
        timings["done"] = time.time()
        if "first_token" in timings:
            timings["ttft_s"] = timings["first_token"] - job.received
            gen_s = timings["done"] - timings["first_token"]
            if tokens > 1 and gen_s > 0:
                timings["tokens_per_s"] = (tokens - 1) / gen_s
        with self._lock:  # history first: whoever reacts to llm.done sees it
            answer.finished = True
            self._remember_answer(job.turn, answer)
        self.bus.publish(
            LlmDone(finish_reason=finish, sentences=len(answer.sentences), text="".join(pieces), timings=timings),
            turn=job.turn,
        )

    def _apologize(self, turn: int, answer: Answer, exc: BackendError) -> None:
        """llm.error with the reason, and a short spoken apology: the conversation goes on."""
        self.bus.publish(LlmError(code=exc.code, message=str(exc), transient=exc.transient), turn=turn)
        with self._lock:
            # The apology is spoken but is no answer: the history keeps what came before it.
            if answer.spoken is None:
                answer.spoken = " ".join(answer.sentences)
            index = len(answer.sentences)
            answer.sentences.append(APOLOGY)
        self.bus.publish(LlmSentence(text=APOLOGY, index=index), turn=turn)

    def _prompt(self) -> list[dict[str, str]]:
        """System prompt and as much recent history as fits beside the answer."""
        assert self.memory is not None and self.chat is not None
        budget = max(256, self.chat.context_tokens - self.settings.llm.max_tokens)
        return self.memory.messages(budget, self.chat.count_tokens, per_message=4)

    def _remember_answer(self, turn: int, answer: Answer) -> None:
        """Store the heard part of the answer (called with the lock held)."""
        assert self.memory is not None
        text = answer.spoken if answer.spoken is not None else " ".join(answer.sentences)
        self.memory.set_assistant(turn, text)

    def close(self) -> None:
        with self._lock:
            if self._current is not None:
                self._current.cancel.set()
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self.chat is not None:
            self.chat.close()
        if self.memory is not None:
            self.memory.close()


def spoken_part(sentences: list[str], index: int, spoken_ms: int, total_ms: int) -> str:
    """The sentences before ``index`` in full, and the words of sentence ``index`` heard so far."""
    heard = list(sentences[:index])
    if index < len(sentences) and total_ms > 0 and spoken_ms > 0:
        words = sentences[index].split()
        count = int(len(words) * min(1.0, spoken_ms / total_ms))
        if count:
            heard.append(" ".join(words[:count]) + "…")
    return " ".join(heard)
