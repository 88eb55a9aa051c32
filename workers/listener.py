"""The listener: audio in → voice activity → speech recognition → the user's words on the bus.

Audio is read and recognized on a thread of its own; the bus loop only tracks
what the assistant is doing (for barge-in), acknowledges answered turns and
repeats unanswered ones (see ``redelivery``). When a WAV input ends, the
listener waits for the last answer to be spoken and then asks everyone to
shut down, so ``voicebus up --input q.wav --output a.wav`` exits by itself.
"""

from __future__ import annotations

import sys
import threading
import time

from voicebus.engine.actor import Actor, handles
from voicebus.engine.client import BusClient
from voicebus.engine.errors import VoicebusError
from voicebus.engine.messages import Envelope, Interrupt, Shutdown, new_turn_id
from voicebus.workers import backends
from voicebus.workers.audio import FRAME_BYTES, RATE, open_source
from voicebus.workers.config import Settings
from voicebus.workers.kinds import (
    AsrFinal,
    AsrNoMatch,
    AsrPartial,
    AudioEnd,
    AudioIn,
    VadEnd,
    VadStart,
)
from voicebus.workers.redelivery import ACK_KINDS, Redelivery
from voicebus.workers.vad import Endpointer, SpeechEnd, SpeechStart

SILENCE = bytes(FRAME_BYTES)
EOF_WAIT_S = 300.0
"""After the input ends, how long the last answer may take before we shut down anyway."""


class Listener(Actor):
    name = "listener"

    def __init__(self, client: BusClient, settings: Settings) -> None:
        super().__init__(client)
        self.settings = settings
        self.source = None
        self.recognizer = None
        self.vad: Endpointer | None = None
        self.redelivery = Redelivery()
        self._lock = threading.Lock()
        self._open_turns: set[int] = set()
        """turns whose utterance went out and whose answer has not finished playing"""
        self._speaking: int | None = None
        self._eof_at: float | None = None
        self._last_turn = 0
        self._ignoring = False
        self._thread: threading.Thread | None = None

    def backends(self) -> dict[str, str]:
        return {"asr": self.settings.asr.backend, "input": self.settings.audio.input}

    def load(self) -> None:
        audio, vad = self.settings.audio, self.settings.vad
        self.source = open_source(audio.input, realtime=not audio.fast)
        if self.source is None:
            return  # text only: utterances arrive as ctl.ask, straight to the thinker
        print(f"listener: loading {self.settings.asr.backend} speech recognition…", file=sys.stderr, flush=True)
        self.recognizer = backends.open_recognizer(self.settings, progress=self._progress)
        self.vad = Endpointer(
            aggressiveness=vad.aggressiveness, preroll_ms=vad.preroll_ms, silence_ms=vad.silence_ms,
            min_speech_ms=vad.min_speech_ms,
        )
        self._thread = threading.Thread(target=self._listen, name="listener-audio", daemon=True)
        self._thread.start()

    @staticmethod
    def _progress(text: str) -> None:
        print(f"listener: {text}", file=sys.stderr, flush=True)

    # --- bus loop ---------------------------------------------------------------------------

    @handles("play.start")
    def on_play_start(self, env: Envelope) -> None:
        with self._lock:
            self._speaking = env.turn

    @handles("metrics.turn")
    def on_turn_finished(self, env: Envelope) -> None:
        with self._lock:
            self._open_turns.discard(env.turn)
            if self._speaking == env.turn:
                self._speaking = None

    @handles(*ACK_KINDS)
    def on_answer(self, env: Envelope) -> None:
        self.redelivery.ack(env.turn)

    def tick(self) -> None:
        for turn, body in self.redelivery.due(time.monotonic()):
            self.bus.publish(body, turn=turn)
        with self._lock:
            done = self._eof_at is not None and (
                not self._open_turns or time.monotonic() - self._eof_at > EOF_WAIT_S
            )
        if done:
            self.bus.publish(Shutdown(reason="input ended"))
            self._eof_at = None

    # --- audio thread -----------------------------------------------------------------------

    def _listen(self) -> None:
        assert self.source is not None and self.vad is not None
        publish_audio = self.settings.audio.publish_audio
        try:
            for frame in self.source:
                if self.stopping:
                    return
                if publish_audio:
                    self.bus.publish(AudioIn(pcm=frame, rate=RATE), turn=self._last_turn)
                self._frame(frame)
            # The input ended: silence lets an utterance in progress end the usual way.
            while self.vad.in_speech and not self.stopping:
                self._frame(SILENCE)
        except VoicebusError as exc:
            self.bus.report("listener.audio", exc)
            print(f"listener: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            self.stop(f"audio input failed: {exc}")
            return
        self.bus.publish(AudioEnd(last_turn=self._last_turn, reason="end of input"))
        with self._lock:
            self._eof_at = time.monotonic()

    def _frame(self, frame: bytes) -> None:
        assert self.vad is not None and self.recognizer is not None
        events = self.vad.feed(frame)
        for event in events:
            if isinstance(event, SpeechStart):
                self._speech_started(event)
            elif isinstance(event, SpeechEnd):
                self._speech_ended(event)
        if self.vad.in_speech and not self._ignoring and not any(isinstance(e, SpeechStart) for e in events):
            partial = self.recognizer.feed(frame)
            if partial:
                self.bus.publish(AsrPartial(text=partial), turn=self._last_turn)

    def _speech_started(self, event: SpeechStart) -> None:
        assert self.recognizer is not None
        turn = new_turn_id()
        with self._lock:
            speaking = self._speaking
            interrupted = sorted(self._open_turns | ({speaking} if speaking else set()))
        if speaking and not self.settings.vad.barge_in:
            # Half duplex (open speakers, no echo cancellation): what we hear while the
            # assistant talks is most likely the assistant itself, so it is not a turn.
            self._ignoring = True
            return
        for old in interrupted:
            self.bus.publish(Interrupt(reason="barge-in"), turn=old)
        self._last_turn = turn
        self.bus.publish(VadStart(offset_ms=event.offset_ms), turn=turn)
        self.recognizer.begin()
        partial = None
        for frame in event.preroll:
            partial = self.recognizer.feed(frame) or partial
        if partial:
            self.bus.publish(AsrPartial(text=partial), turn=turn)

    def _speech_ended(self, event: SpeechEnd) -> None:
        assert self.recognizer is not None and self.vad is not None
        if self._ignoring:
            self._ignoring = False
            return
        turn = self._last_turn
        now = time.time()
        behind_s = (self.vad.offset_ms - event.offset_ms) / 1000 if not self.settings.audio.fast else 0.0
        speech_end = now - behind_s
        self.bus.publish(VadEnd(offset_ms=event.offset_ms, speech_ms=event.speech_ms, speech_end_ts=speech_end), turn=turn)
        timings = {"speech_end": speech_end, "vad_end": now}
        try:
            result = self.recognizer.end()
        except VoicebusError as exc:
            self.bus.report("listener.asr", exc)
            self.bus.publish(AsrNoMatch(reason=f"error: {exc.code}", timings=timings), turn=turn)
            return
        timings["final"] = time.time()
        timings["asr_s"] = timings["final"] - now
        if not result.text.strip():
            self.bus.publish(AsrNoMatch(reason="no speech recognized", timings=timings), turn=turn)
            return
        body = AsrFinal(text=result.text.strip(), confidence=result.confidence, timings=timings)
        with self._lock:
            self._open_turns.add(turn)
        self.bus.publish(body, turn=turn)
        self.redelivery.sent(turn, body, time.monotonic())

    def close(self) -> None:
        if self.source is not None:
            self.source.close()
        if self._thread is not None:
            self._thread.join(timeout=3)
        if self.recognizer is not None:
            self.recognizer.close()

