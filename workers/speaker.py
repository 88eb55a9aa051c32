"""The speaker: sentences → speech → the audio sink, in order, stoppable mid-sentence.

Three threads, so nothing waits on anything it need not:

    bus loop        queues sentences, records stage timestamps, sets stop flags
    synthesizer     text → PCM chunks, one sentence ahead of playback
    playback        PCM → sink in blocks of at most 20 ms, checking the stop flag
                    between blocks (so an interrupt takes effect within one block)

A turn is finished when its last sentence (``llm.done`` says how many) has
been played; then ``metrics.turn`` carries the stage timestamps.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from dataclasses import dataclass, field

from voicebus.engine.actor import Actor, handles
from voicebus.engine.client import BusClient
from voicebus.engine.messages import Envelope
from voicebus.workers import backends
from voicebus.workers.audio import open_sink
from voicebus.workers.config import Settings
from voicebus.workers.sentences import split_clauses
from voicebus.workers.kinds import (
    AsrFinal,
    LlmDone,
    LlmSentence,
    PlayDone,
    PlayStart,
    PlayStopped,
    Say,
    TurnMetrics,
    VadEnd,
)

BLOCK_MS = 20
TURNS_REMEMBERED = 16


@dataclass
class Turn:
    """What the speaker knows of one turn."""

    turn: int
    expected: int | None = None
    """how many sentences the turn has, once llm.done said so"""
    played: int = 0
    stopped: bool = False
    stop_reason: str = ""
    stop_reported: bool = False
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Chunk:
    """One piece of work for playback: a sentence's PCM (``pcm=None`` ends the sentence)."""

    turn: int
    index: int
    text: str
    pcm: bytes | None
    total_ms: int = 0


class Speaker(Actor):
    name = "speaker"

    def __init__(self, client: BusClient, settings: Settings) -> None:
        super().__init__(client)
        self.settings = settings
        self.synth = None
        self.sink = None
        self._turns: dict[int, Turn] = {}
        self._lock = threading.Lock()
        self._sentences: queue.Queue[tuple[int, int, str] | None] = queue.Queue()
        self._chunks: queue.Queue[Chunk | None] = queue.Queue(maxsize=64)
        self._threads: list[threading.Thread] = []
        self._playing: tuple[int, int] | None = None
        """(turn, index) of the sentence on the sink right now"""

    def backends(self) -> dict[str, str]:
        return {"tts": self.settings.tts.backend, "output": self.settings.audio.output}

    def load(self) -> None:
        print(f"speaker: loading the {self.settings.tts.backend} voice…", file=sys.stderr, flush=True)
        self.synth = backends.open_synthesizer(self.settings)
        audio = self.settings.audio
        self.sink = open_sink(audio.output, self.synth.sample_rate, realtime=not audio.fast)
        self._threads = [
            threading.Thread(target=self._synthesize_loop, name="speaker-synth", daemon=True),
            threading.Thread(target=self._playback_loop, name="speaker-play", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    # --- handlers (bus loop) ----------------------------------------------------------------

    def _turn(self, turn: int) -> Turn:
        """The turn's record; a newer turn stops every older one still speaking."""
        state = self._turns.get(turn)
        if state is None:
            state = self._turns[turn] = Turn(turn)
            for old in list(self._turns.values()):
                if old.turn < turn:
                    self._stop_turn(old, "superseded")
            for old in sorted(self._turns)[:-TURNS_REMEMBERED]:
                del self._turns[old]
        return state

    @handles("vad.end")
    def on_vad_end(self, env: Envelope) -> None:
        assert isinstance(env.body, VadEnd)
        with self._lock:
            t = self._turn(env.turn).timings
            t["speech_end"] = env.body.speech_end_ts
            t["vad_end"] = env.ts

    @handles("asr.final", "ctl.ask")
    def on_request(self, env: Envelope) -> None:
        with self._lock:
            t = self._turn(env.turn).timings
            t.setdefault("asr_final" if isinstance(env.body, AsrFinal) else "request", env.ts)

    @handles("llm.token")
    def on_token(self, env: Envelope) -> None:
        with self._lock:
            self._turn(env.turn).timings.setdefault("first_token", env.ts)

    @handles("llm.sentence")
    def on_sentence(self, env: Envelope) -> None:
        assert isinstance(env.body, LlmSentence)
        with self._lock:
            state = self._turn(env.turn)
            state.timings.setdefault("first_sentence", env.ts)
            if state.stopped:
                return
        self._sentences.put((env.turn, env.body.index, env.body.text))

    @handles("ctl.say")
    def on_say(self, env: Envelope) -> None:
        assert isinstance(env.body, Say)
        with self._lock:
            state = self._turn(env.turn)
            state.expected = 1
            state.timings.setdefault("request", env.ts)
            state.timings.setdefault("first_sentence", env.ts)
        self._sentences.put((env.turn, 0, env.body.text))

    @handles("llm.done")
    def on_done(self, env: Envelope) -> None:
        assert isinstance(env.body, LlmDone)
        with self._lock:
            state = self._turn(env.turn)
            state.expected = env.body.sentences
            self._maybe_finish(state)

    @handles("ctl.interrupt")
    def on_interrupt(self, env: Envelope) -> None:
        with self._lock:
            for state in [t for t in self._turns.values() if env.turn in (0, t.turn)]:
                self._stop_turn(state, "interrupted")

    # --- turn bookkeeping (lock held) -------------------------------------------------------

    @staticmethod
    def _finished(state: Turn) -> bool:
        return state.expected is not None and state.played >= state.expected

    def _maybe_finish(self, state: Turn) -> None:
        if self._finished(state) and not state.stopped and "metrics_sent" not in state.timings:
            state.timings["metrics_sent"] = time.time()
            self.bus.publish(TurnMetrics(timings=latencies(state.timings), outcome="done"), turn=state.turn)

    def _stop_turn(self, state: Turn, reason: str) -> None:
        """Stop a turn that is still speaking; playback reports it if it is on the sink now."""
        if state.stopped or self._finished(state):
            return
        state.stopped = True
        state.stop_reason = reason
        state.timings["interrupted"] = time.time()
        if self._playing is None or self._playing[0] != state.turn:
            self._report_stop(state, state.played, 0, 0, reason)

    def _report_stop(self, state: Turn, index: int, spoken_ms: int, total_ms: int, reason: str) -> None:
        """play.stopped and the turn's metrics, once per turn."""
        if state.stop_reported:
            return
        state.stop_reported = True
        self.bus.publish(
            PlayStopped(index=index, reason=reason, spoken_ms=spoken_ms, total_ms=total_ms), turn=state.turn
        )
        self.bus.publish(TurnMetrics(timings=latencies(state.timings), outcome="interrupted"), turn=state.turn)

    def _is_stopped(self, turn: int) -> bool:
        with self._lock:
            state = self._turns.get(turn)
            return state is None or state.stopped or self.stopping

    # --- synthesis thread -------------------------------------------------------------------

    def _synthesize_loop(self) -> None:
        assert self.synth is not None
        while (item := self._sentences.get()) is not None:
            turn, index, text = item
            if self._is_stopped(turn):
                continue
            # The first sentence of a turn goes out clause by clause: the user hears it sooner.
            pieces = split_clauses(text) if index == 0 else [text]
            try:
                total = 0
                for pcm in (pcm for piece in pieces for pcm in self.synth.synthesize(piece)):
                    if self._is_stopped(turn):
                        break
                    total += len(pcm)
                    self._chunks.put(Chunk(turn, index, text, pcm))
                self._chunks.put(Chunk(turn, index, text, None, total_ms=self._ms(total)))
            except Exception as exc:  # one sentence failing must not silence the rest
                self.bus.report("speaker.synthesize", exc)
                self._chunks.put(Chunk(turn, index, text, None))

    def _ms(self, nbytes: int) -> int:
        assert self.synth is not None
        return nbytes * 1000 // (2 * self.synth.sample_rate)

    # --- playback thread --------------------------------------------------------------------

    def _playback_loop(self) -> None:
        assert self.sink is not None and self.synth is not None
        block = self.synth.sample_rate * 2 * BLOCK_MS // 1000
        played_bytes = received_bytes = 0
        while (chunk := self._chunks.get()) is not None:
            key = (chunk.turn, chunk.index)
            if self._is_stopped(chunk.turn):
                if self._playing == key:
                    self._playback_stopped(chunk, played_bytes, received_bytes)
                continue
            if self._playing != key:
                played_bytes = received_bytes = 0
                self._on_start(chunk)
            if chunk.pcm is None:
                self._on_sentence_end(chunk, played_bytes)
                continue
            received_bytes += len(chunk.pcm)
            for start in range(0, len(chunk.pcm), block):
                if self._is_stopped(chunk.turn):
                    self._playback_stopped(chunk, played_bytes, received_bytes)
                    break
                self.sink.write(chunk.pcm[start : start + block])
                played_bytes += min(block, len(chunk.pcm) - start)

    def _on_start(self, chunk: Chunk) -> None:
        with self._lock:
            self._playing = (chunk.turn, chunk.index)
            state = self._turns.get(chunk.turn)
            if state is not None:
                state.timings.setdefault("first_audio", time.time())
        self.bus.publish(PlayStart(index=chunk.index, text=chunk.text), turn=chunk.turn)

    def _on_sentence_end(self, chunk: Chunk, played_bytes: int) -> None:
        self.bus.publish(PlayDone(index=chunk.index, spoken_ms=self._ms(played_bytes)), turn=chunk.turn)
        with self._lock:
            self._playing = None
            state = self._turns.get(chunk.turn)
            if state is not None:
                state.played = max(state.played, chunk.index + 1)
                self._maybe_finish(state)

    def _playback_stopped(self, chunk: Chunk, played_bytes: int, received_bytes: int) -> None:
        with self._lock:
            self._playing = None
            state = self._turns.get(chunk.turn)
            if state is not None:
                total = chunk.total_ms or self._ms(received_bytes)
                self._report_stop(state, chunk.index, self._ms(played_bytes), total, state.stop_reason)

    def close(self) -> None:
        self._sentences.put(None)
        try:
            self._chunks.put(None, timeout=1)
        except queue.Full:
            pass
        for thread in self._threads:
            thread.join(timeout=2)
        if self.sink is not None:
            self.sink.close()
        if self.synth is not None:
            self.synth.close()


def latencies(t: dict[str, float]) -> dict[str, float]:
    """Stage timestamps plus the latencies the console prints (seconds)."""
    out = {k: v for k, v in t.items() if k != "metrics_sent"}

    def span(a: str, b: str, name: str) -> None:
        if a in t and b in t:
            out[name] = round(t[b] - t[a], 4)

    span("speech_end", "vad_end", "silence_s")
    span("vad_end", "asr_final", "asr_s")
    span("asr_final", "first_token", "first_token_s")
    span("asr_final" if "asr_final" in t else "request", "first_sentence", "first_sentence_s")
    span("first_sentence", "first_audio", "first_audio_s")
    span("vad_end", "first_audio", "total_s")
    span("speech_end", "first_audio", "speech_end_to_audio_s")
    span("request", "first_audio", "request_to_audio_s")
    return out
