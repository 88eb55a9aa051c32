"""The speaker: sentences → speech → the audio sink, in order, once, stoppable mid-sentence.

Three threads, so nothing waits on anything it need not:

    bus loop        orders sentences per turn, records stage timestamps, sets stop flags
    synthesizer     text → PCM chunks, one sentence ahead of playback
    playback        PCM → sink in blocks of at most 20 ms, checking the stop flag
                    between blocks (so an interrupt takes effect within one block)

Each turn's sentences are played in index order, each once: a duplicate (a
replay after a failure) is dropped, a sentence that arrives early waits for
the ones before it, and a gap that does not fill — lost with a bus that died,
or a speaker that restarted mid-turn — is asked for again with ``llm.resend``.
A replayed sentence marked ``played`` was heard before this speaker started and
is skipped. Turns play in the order they arrive; only ``ctl.interrupt`` stops one
(even one this speaker has not heard of yet), and an interrupt of a turn that
ended already is answered with that end again (``play.stopped`` or
``metrics.turn``), so an interrupter that missed it hears it.

A turn is finished when all its sentences (``llm.done`` says how many) are
played; then ``metrics.turn`` carries the stage timestamps. A turn stopped
(``play.stopped``) says so again when its ``llm.done`` comes (a thinker that
took the turn only after the stop learns what was heard), and every
``RESEND_EVERY_S`` until the thinker acknowledges it (``llm.heard``): a stop
lost on its way would leave the whole answer in the history. Stops not yet
acknowledged are kept on disk (``run_state``), so that a speaker restarted
meanwhile says them again.

Speculation: sentences marked with a ``guess`` answer a transcript nobody has
confirmed yet. They are synthesized at once but their audio is *held*. The
``asr.final`` that confirms the guess (or the thinker sending them again as
confirmed) releases it to playback at once; ``asr.revoke``, a newer guess, a
final that confirms something else, or the thinker's ``revoked`` end drops it.
Nothing held is ever played without a confirmation, so a speaker that missed
one plays nothing rather than a wrong answer. The first audio held for a guess
is announced (``play.ready``): the listener ends the turn no sooner than that.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from voicebus.engine.actor import Actor, handles
from voicebus.engine.client import BusClient
from voicebus.engine.errors import AudioError, ConfigError, ProtocolError
from voicebus.engine.messages import Envelope
from voicebus.workers import backends
from voicebus.workers.audio import WavSink, open_sink
from voicebus.workers.config import Settings
from voicebus.workers.kinds import (
    AsrFinal,
    AsrGuess,
    AsrRevoke,
    AudioOut,
    LlmDone,
    LlmHeard,
    LlmResend,
    LlmSentence,
    PlayDone,
    PlayReady,
    PlayStart,
    PlayStopped,
    Say,
    TurnMetrics,
    VadEnd,
)
from voicebus.workers.run_state import RunFile, run_key, sweep
from voicebus.workers.sentences import split_clauses

BLOCK_MS = 20
TURNS_REMEMBERED = 256
GAP_WAIT_S = 0.3
"""A gap this old is asked for again (sentences of one sender normally arrive in order within ms)."""
RESEND_EVERY_S = 2.0
STOP_OFFERED_S = 60.0
"""How long a stop is said again while no thinker acknowledges it (one may be restarting meanwhile)."""
OUTPUT_RECORD_S = 7 * 24 * 3600.0
"""How long the record that a run's output was opened is kept (a new ``voicebus up`` has another)."""
RELEASE = -1
"""Synthesis-queue marker: the guess was confirmed, its held audio goes to playback (when playback's queue
had no room for it at the confirmation; else it went at once)."""
DROP = -2
"""Synthesis-queue marker: the turn's held audio is void."""


GUESS_MARKS = ("first_token", "first_sentence", "guess_ready")
"""Timings that belong to the answer of one guess: a revoked guess's would make the turn's look early."""


@dataclass
class Turn:
    """What the speaker knows of one turn."""

    turn: int
    expected: int | None = None
    """how many sentences the turn has, once llm.done said so"""
    received: dict[int, tuple[str, bool]] = field(default_factory=dict)
    """index → (text, already played before this speaker knew the turn)"""
    next: int = 0
    """the next index to hand to the synthesizer"""
    finished: set[int] = field(default_factory=set)
    """indexes played (or skipped as played before)"""
    stopped: bool = False
    stop_reason: str = ""
    stop_report: PlayStopped | None = None
    """what play.stopped said (said again to a thinker that ends the turn later)"""
    stop_offered_at: float = 0.0
    """(monotonic) when the stop was last said"""
    stop_unheard_since: float | None = None
    """(monotonic) since when the stop waits for the thinker's llm.heard; None: no stop waits (none was made,
    it was acknowledged, or no thinker acknowledged it within STOP_OFFERED_S)"""
    gap_since: float | None = None
    resent_at: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    guess: int = 0
    """the unconfirmed guess whose answer is being prepared (its audio held); 0 when none"""
    confirmed: bool = True
    """False while the sentences received answer an unconfirmed guess"""
    guess_at: dict[int, float] = field(default_factory=dict)
    """rev → when that asr.guess was sent: the confirmed one's is the turn's "guess" timing"""

    def drop_guess(self) -> None:
        """Forget what was prepared for the unconfirmed guess, its timings too (the next answer sets them)."""
        for mark in GUESS_MARKS:
            self.timings.pop(mark, None)
        self.received.clear()
        self.next = 0
        self.finished.clear()
        self.expected = None
        self.guess = 0
        self.confirmed = True

    @property
    def done(self) -> bool:
        return self.expected is not None and len(self.finished) >= self.expected

    def first_unheard(self) -> int:
        """The first sentence not played yet: where a stop cuts the answer."""
        index = 0
        while index in self.finished:
            index += 1
        return index

    def has_gap(self) -> bool:
        """Some sentence is missing before one that arrived (or before the announced end)."""
        if self.stopped or self.done or not self.confirmed:
            return False
        known_end = max(self.received, default=-1) + 1
        if self.expected is not None:
            known_end = max(known_end, self.expected)
        return self.next < known_end and self.next not in self.received


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
        self._sentences: queue.Queue[tuple[int, int, str, int] | None] = queue.Queue()
        """(turn, index, text, guess) to synthesize; guess > 0 holds the audio; or a marker (index RELEASE/DROP)"""
        self._held_lock = threading.Lock()
        """guards _held and _released (taken after self._lock, never before it)"""
        self._held: dict[tuple[int, int], list[Chunk]] = {}
        """(turn, guess) → synthesized audio waiting for the guess to be confirmed"""
        self._released: set[tuple[int, int]] = set()
        """(turn, guess) confirmed: audio synthesized for it from now on goes straight to playback"""
        self._chunks: queue.Queue[Chunk | None] = queue.Queue(maxsize=64)
        self._threads: list[threading.Thread] = []
        self._playing: tuple[int, int] | None = None
        """(turn, index) of the sentence on the sink right now"""
        self._unheard_file: RunFile | None = None
        """the stops no thinker has acknowledged yet, for a speaker that replaces this one"""
        self._unheard_unsaved = False
        """whether writing that record failed (said once)"""

    def backends(self) -> dict[str, str]:
        return {"tts": self.settings.tts.backend, "output": self.settings.audio.output}

    def load(self) -> None:
        print(f"speaker: loading the {self.settings.tts.backend} voice…", file=sys.stderr, flush=True)
        self.synth = backends.open_synthesizer(self.settings)
        audio = self.settings.audio
        runs = self._runs_folder()
        key = run_key(audio.output, self.settings.state.run_started)
        # A speaker restarted mid-run goes on after the answers its predecessor wrote to a file.
        opened = RunFile(runs / f"output-{key}.json") if runs is not None else None
        append = opened is not None and bool(opened.load())
        self.sink = open_sink(audio.output, self.synth.sample_rate, realtime=not audio.fast, append=append)
        if opened is not None and isinstance(self.sink, WavSink):  # (what a device played cannot be added to)
            opened.save({"output": audio.output, "opened": time.time()})
        self._unheard_file = RunFile(runs / f"speaker-{key}.json") if runs is not None else None
        self._resume_unheard()
        self._threads = [
            threading.Thread(target=self._synthesize_loop, name="speaker-synth", daemon=True),
            threading.Thread(target=self._playback_loop, name="speaker-play", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _runs_folder(self) -> Path | None:
        """Where this run's records go (unacknowledged stops, an output file opened), or None where the
        state folder is unusable: a speaker needs none to speak, what it did then just does not outlive it."""
        try:
            runs = backends.state_dir(self.settings) / "runs"
        except ConfigError as exc:
            print(f"speaker: a restart will forget unacknowledged stops and start the output afresh: {exc}",
                  file=sys.stderr, flush=True)
            return None
        sweep(runs, "speaker-", STOP_OFFERED_S)  # runs that ended with a stop unacknowledged
        sweep(runs, "output-", OUTPUT_RECORD_S)
        return runs

    def _resume_unheard(self) -> None:
        """Say again the stops a previous speaker of this run made and no thinker acknowledged (recent ones)."""
        if self._unheard_file is None:
            return
        now, wall = time.monotonic(), time.time()
        for turn, stop in self._unheard_file.load().items():
            try:
                age = wall - float(stop["since"])
                report = PlayStopped.from_dict(stop)
                turn = int(turn)
            except (KeyError, TypeError, ValueError, ProtocolError):
                continue  # not a record a speaker wrote
            if age > STOP_OFFERED_S:
                continue
            print(f"speaker: saying again the stop of turn {turn}, which no thinker acknowledged before this "
                  "speaker started", file=sys.stderr, flush=True)
            state = self._turn(turn)
            state.stopped, state.stop_reason, state.stop_report = True, report.reason, report
            state.stop_unheard_since = now - max(0.0, age)  # said at the first tick
        self._save_unheard()

    def _save_unheard(self) -> None:
        """(lock held, or before the bus loop starts) The stops waiting for llm.heard, as they are now."""
        if self._unheard_file is None:
            return
        now, wall = time.monotonic(), time.time()
        unheard = {str(state.turn): {**state.stop_report.to_dict(), "since": wall - (now - state.stop_unheard_since)}
                   for state in self._turns.values()
                   if state.stop_report is not None and state.stop_unheard_since is not None}
        if not unheard:
            self._unheard_file.remove()
        elif not self._unheard_file.save(unheard) and not self._unheard_unsaved:
            self._unheard_unsaved = True
            print(f"speaker: cannot write {self._unheard_file.path}: a restart will forget unacknowledged stops",
                  file=sys.stderr, flush=True)

    # --- handlers (bus loop) ----------------------------------------------------------------

    def _turn(self, turn: int) -> Turn:
        state = self._turns.get(turn)
        if state is None:
            state = self._turns[turn] = Turn(turn)
            for old in sorted(self._turns)[:-TURNS_REMEMBERED]:
                del self._turns[old]
                with self._held_lock:
                    self._released = {key for key in self._released if key[0] != old}
        return state

    @handles("vad.end")
    def on_vad_end(self, env: Envelope) -> None:
        assert isinstance(env.body, VadEnd)
        with self._lock:
            t = self._turn(env.turn).timings
            t.setdefault("speech_end", env.body.speech_end_ts)
            t.setdefault("vad_end", env.ts)

    @handles("asr.final", "ctl.ask")
    def on_request(self, env: Envelope) -> None:
        with self._lock:
            state = self._turn(env.turn)
            state.timings.setdefault("asr_final" if isinstance(env.body, AsrFinal) else "request", env.ts)
            if isinstance(env.body, AsrFinal) and not state.confirmed:
                if env.body.guess == state.guess:
                    self._confirm(state)
                else:
                    self._drop_guess(state)

    @handles("asr.guess")
    def on_guess(self, env: Envelope) -> None:
        assert isinstance(env.body, AsrGuess)
        with self._lock:
            self._turn(env.turn).guess_at.setdefault(env.body.rev, env.ts)

    @handles("asr.revoke")
    def on_revoke(self, env: Envelope) -> None:
        assert isinstance(env.body, AsrRevoke)
        with self._lock:
            state = self._turn(env.turn)
            if not state.confirmed and state.guess == env.body.rev:
                self._drop_guess(state)

    @handles("llm.token")
    def on_token(self, env: Envelope) -> None:
        with self._lock:
            self._turn(env.turn).timings.setdefault("first_token", env.ts)

    @handles("llm.sentence")
    def on_sentence(self, env: Envelope) -> None:
        body = env.body
        assert isinstance(body, LlmSentence)
        with self._lock:
            state = self._turn(env.turn)
            if body.guess:
                if state.confirmed and (state.received or state.timings.get("asr_final")):
                    return  # late: the turn is already confirmed (or confirmed something else)
                if body.guess < state.guess:
                    return  # an older guess's sentence
                if body.guess > state.guess:
                    self._drop_guess(state)
                    state.guess, state.confirmed = body.guess, False
            elif not state.confirmed:
                self._confirm(state)  # the thinker sends a guess's sentences again once it is confirmed
            if not body.replay:
                state.timings.setdefault("first_sentence", env.ts)
            if state.stopped or body.index in state.received or body.index < state.next:
                return  # stopped, or a duplicate
            state.received[body.index] = (body.text, body.played)
            self._advance(state)

    @handles("ctl.say")
    def on_say(self, env: Envelope) -> None:
        assert isinstance(env.body, Say)
        with self._lock:
            state = self._turn(env.turn)
            if state.received:
                return  # a repeat
            state.expected = 1
            state.timings.setdefault("request", env.ts)
            state.timings.setdefault("first_sentence", env.ts)
            state.received[0] = (env.body.text, False)
            self._advance(state)

    @handles("llm.done")
    def on_done(self, env: Envelope) -> None:
        assert isinstance(env.body, LlmDone)
        with self._lock:
            state = self._turn(env.turn)
            if env.body.finish_reason == "revoked":
                if not state.confirmed and state.guess == env.body.guess:
                    self._drop_guess(state)
                return
            if not state.confirmed:
                self._confirm(state)
            state.expected = env.body.sentences
            if state.stop_report is not None:
                # The thinker ends a turn this speaker stopped: it may have taken the turn only after the
                # stop (it was down), so it hears again what was heard, for the history.
                state.stop_unheard_since = None
                self._offer_stop(state)
                return
            self._advance(state)
            self._maybe_finish(state)

    @handles("llm.heard")
    def on_heard(self, env: Envelope) -> None:
        assert isinstance(env.body, LlmHeard)
        with self._lock:
            state = self._turns.get(env.turn)
            report = state.stop_report if state is not None else None
            if report is not None and (report.index, report.spoken_ms) == (env.body.index, env.body.spoken_ms):
                if state.stop_unheard_since is not None:
                    state.stop_unheard_since = None
                    self._save_unheard()

    @handles("ctl.interrupt")
    def on_interrupt(self, env: Envelope) -> None:
        reason = getattr(env.body, "reason", "") or "interrupted"
        with self._lock:
            if env.turn == 0:  # everything playing or waiting
                for state in list(self._turns.values()):
                    self._stop_turn(state, reason)
                return
            # One turn, known or not: an interrupt can overtake the turn's first message (it is urgent), and
            # a speaker that restarted never heard of it. Either way it is stopped here now, and whoever
            # interrupts it again (the listener, until it hears) is told again how it ended.
            state = self._turn(env.turn)
            if state.stop_report is not None:
                self.bus.publish(state.stop_report, turn=state.turn)
            elif "metrics_sent" in state.timings:
                self.bus.publish(TurnMetrics(timings=latencies(state.timings), outcome="done"), turn=state.turn)
            else:
                self._stop_turn(state, reason)

    def tick(self) -> None:
        """Ask again for sentences that went missing; say again stops no thinker acknowledged."""
        now = time.monotonic()
        wanted = []
        with self._lock:
            for state in self._turns.values():
                if state.stop_unheard_since is not None and now - state.stop_offered_at >= RESEND_EVERY_S:
                    self._offer_stop(state)
                if not state.has_gap():
                    state.gap_since = None
                    continue
                if state.gap_since is None:
                    state.gap_since = now
                if now - state.gap_since >= GAP_WAIT_S and now - state.resent_at >= RESEND_EVERY_S:
                    state.resent_at = now
                    wanted.append((state.turn, state.next))
        for turn, index in wanted:
            self.bus.publish(LlmResend(from_index=index), turn=turn)

    # --- turn bookkeeping (lock held) -------------------------------------------------------

    def _advance(self, state: Turn) -> None:
        """Hand the synthesizer every sentence that is next in order; skip those played before."""
        while state.next in state.received and not state.stopped:
            text, played_before = state.received[state.next]
            if played_before:
                state.finished.add(state.next)
            else:
                self._sentences.put((state.turn, state.next, text, 0 if state.confirmed else state.guess))
            state.next += 1
        self._maybe_finish(state)

    def _confirm(self, state: Turn) -> None:
        """The guess is the turn: its held audio goes to playback now, not after the synthesis under way
        (the listener ends the turn when the first audio is held, so the rest of the sentence usually is
        still being synthesized then: waiting for it cost ~100 ms a turn)."""
        state.confirmed = True
        state.timings.setdefault("confirmed", time.time())
        if state.guess in state.guess_at:
            state.timings.setdefault("guess", state.guess_at[state.guess])
        key = (state.turn, state.guess)
        with self._held_lock:  # the synthesis thread adds to held audio under it: the order stays
            held = self._held.get(key, [])
            while held:
                try:
                    self._chunks.put_nowait(held[0])
                except queue.Full:  # playback is far behind: the synthesis thread releases the rest
                    self._sentences.put((state.turn, RELEASE, "", state.guess))
                    return
                held.pop(0)
            self._held.pop(key, None)
            self._released.add(key)

    def _drop_guess(self, state: Turn) -> None:
        if not state.confirmed:
            self._sentences.put((state.turn, DROP, "", state.guess))  # the synthesis thread owns held audio
            state.timings["revoked"] = state.timings.get("revoked", 0) + 1
            state.drop_guess()

    def _maybe_finish(self, state: Turn) -> None:
        if state.done and not state.stopped and "metrics_sent" not in state.timings:
            state.timings["metrics_sent"] = time.time()
            self.bus.publish(TurnMetrics(timings=latencies(state.timings), outcome="done"), turn=state.turn)

    def _stop_turn(self, state: Turn, reason: str) -> None:
        """Stop a turn that is still speaking; playback reports it if it is on the sink now."""
        if state.stopped or state.done:
            return
        state.stopped = True
        state.stop_reason = reason
        state.timings["interrupted"] = time.time()
        if self._playing is None or self._playing[0] != state.turn:
            self._report_stop(state, state.first_unheard(), 0, 0, reason)

    def _report_stop(self, state: Turn, index: int, spoken_ms: int, total_ms: int, reason: str) -> None:
        """play.stopped and the turn's metrics, once per turn."""
        if state.stop_report is not None:
            return
        state.stop_report = PlayStopped(index=index, reason=reason, spoken_ms=spoken_ms, total_ms=total_ms)
        self._offer_stop(state)
        self.bus.publish(TurnMetrics(timings=latencies(state.timings), outcome="interrupted"), turn=state.turn)

    def _offer_stop(self, state: Turn) -> None:
        """Say the turn's stop (again), until the thinker acknowledges it or STOP_OFFERED_S have passed."""
        assert state.stop_report is not None
        now = time.monotonic()
        if state.stop_unheard_since is None:
            state.stop_unheard_since = now
            self._save_unheard()
        elif now - state.stop_unheard_since > STOP_OFFERED_S:
            state.stop_unheard_since = None
            self._save_unheard()
            print(f"speaker: no thinker acknowledged the stop of turn {state.turn} in {STOP_OFFERED_S:.0f} s;"
                  " its history may keep more of the answer than was heard", file=sys.stderr, flush=True)
            return
        state.stop_offered_at = now
        self.bus.publish(state.stop_report, turn=state.turn)

    def _is_stopped(self, turn: int) -> bool:
        with self._lock:
            state = self._turns.get(turn)
            return state is None or state.stopped or self.stopping

    # --- synthesis thread -------------------------------------------------------------------

    def _synthesize_loop(self) -> None:
        assert self.synth is not None
        while (item := self._sentences.get()) is not None:
            turn, index, text, guess = item
            if index == RELEASE:
                self._chunks_of(turn, guess, play=True)
                continue
            if index == DROP:
                self._chunks_of(turn, guess, play=False)
                continue
            if self._is_stopped(turn) or (guess and not self._preparing(turn, guess)):
                continue
            self._synthesize(turn, index, text, guess)
            if guess:
                with self._lock:
                    state = self._turns.get(turn)
                    if state is not None and state.guess == guess:  # (not one dropped while it was synthesized)
                        state.timings.setdefault("guess_ready", time.time())

    def _synthesize(self, turn: int, index: int, text: str, guess: int = 0) -> None:
        """Synthesize one sentence into playback's queue, or hold it while its guess is unconfirmed.

        The first audio of a guess's answer is announced (``play.ready``), held or, if the confirmation
        came first, playing: the listener ends a turn no sooner than that, and an announcement that comes
        late still tells it that answers are prepared here."""
        assert self.synth is not None
        announce = guess != 0 and index == 0

        def put(chunk: Chunk) -> None:
            nonlocal announce
            if not (guess and self._hold(turn, guess, chunk)):
                self._chunks.put(chunk)
            if announce and chunk.pcm is not None:
                announce = False
                self.bus.publish(PlayReady(rev=guess), turn=turn)

        # The first sentence of a turn goes out clause by clause: the user hears it sooner.
        pieces = split_clauses(text) if index == 0 else [text]
        try:
            total = 0
            for pcm in (pcm for piece in pieces for pcm in self.synth.synthesize(piece)):
                if self._is_stopped(turn):
                    break
                total += len(pcm)
                put(Chunk(turn, index, text, pcm))
            put(Chunk(turn, index, text, None, total_ms=self._ms(total)))
        except Exception as exc:  # one sentence failing must not silence the rest
            self.bus.report("speaker.synthesize", exc)
            put(Chunk(turn, index, text, None))

    def _preparing(self, turn: int, guess: int) -> bool:
        """Whether the turn still waits on (or has confirmed) this guess: else its work is wasted."""
        with self._lock:
            state = self._turns.get(turn)
            return state is not None and state.guess == guess

    def _hold(self, turn: int, guess: int, chunk: Chunk) -> bool:
        """Keep a chunk of an unconfirmed guess's answer. Not kept (False) once the guess is confirmed: the
        caller sends it to playback, after what the confirmation moved there."""
        with self._held_lock:
            if (turn, guess) in self._released:
                return False
            self._held.setdefault((turn, guess), []).append(chunk)
            return True

    def _chunks_of(self, turn: int, guess: int, *, play: bool) -> None:
        """(synthesis thread) A guess's held audio: to playback, in order (confirmed), or away (void)."""
        with self._held_lock:
            chunks = self._held.pop((turn, guess), [])
            if play:
                self._released.add((turn, guess))
        for chunk in chunks:
            if play:
                self._chunks.put(chunk)

    def _ms(self, nbytes: int) -> int:
        assert self.synth is not None
        return nbytes * 1000 // (2 * self.synth.sample_rate)

    # --- playback thread --------------------------------------------------------------------

    def _playback_loop(self) -> None:
        assert self.sink is not None and self.synth is not None
        rate = self.synth.sample_rate
        block = rate * 2 * BLOCK_MS // 1000
        publish_audio = self.settings.audio.publish_audio  # for recorders: the voice as it was played
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
                pcm = chunk.pcm[start : start + block]
                try:
                    self.sink.write(pcm)
                except AudioError as exc:  # a full disk, a device unplugged: a new speaker reopens it
                    self.fail(exc)
                    return
                if publish_audio:
                    self.bus.publish(AudioOut(pcm=pcm, rate=rate, index=chunk.index), turn=chunk.turn)
                played_bytes += len(pcm)

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
                state.finished.add(chunk.index)
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
        try:
            if self.sink is not None:
                self.sink.close()
        finally:
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
    origin = "asr_final" if "asr_final" in t else "request"
    if origin in t and "first_sentence" in t:
        # A guess's sentence may be ready before the final: then nobody waited for it.
        out["first_sentence_s"] = round(max(0.0, t["first_sentence"] - t[origin]), 4)
    if "first_sentence" in t and "first_audio" in t:
        # Held audio may not play before its confirmation: first audio counts from when it was allowed to,
        # so that the stages add up to what the user waited.
        allowed = max(t["first_sentence"], t.get("confirmed", t["first_sentence"]))
        out["first_audio_s"] = round(t["first_audio"] - allowed, 4)
    span("asr_final", "first_audio", "final_to_audio_s")
    span("vad_end", "first_audio", "total_s")
    span("speech_end", "first_audio", "speech_end_to_audio_s")
    span("request", "first_audio", "request_to_audio_s")
    if "guess" in t and "confirmed" in t:
        # The answer's preparation began at the guess instead of at the confirmation: that head start,
        # up to the time the preparation took, is what the user did not wait.
        head_start = t["confirmed"] - t["guess"]
        prepared_in = t.get("guess_ready", t.get("first_audio", t["confirmed"])) - t["guess"]
        out["speculation_saved_s"] = round(max(0.0, min(head_start, prepared_in)), 4)
    return out
