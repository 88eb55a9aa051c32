"""The voice message kinds: what listener, thinker and speaker say on the bus.

The turn a message belongs to travels in the envelope (``env.turn``), not in
the body. Timings are wall-clock seconds since the epoch (``time.time()``),
comparable across processes on one host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from voicebus.engine.messages import Body


@dataclass(frozen=True, kw_only=True)
class Ask(Body, kind="ctl.ask"):
    """A user utterance given as text (from the CLI or any client)."""

    text: str


@dataclass(frozen=True, kw_only=True)
class Say(Body, kind="ctl.say"):
    """Speak this text as its own turn."""

    text: str


@dataclass(frozen=True, kw_only=True)
class AudioIn(Body, kind="audio.in"):
    """One frame of microphone audio, raw little-endian PCM."""

    pcm: bytes
    rate: int
    width: int = 2
    """bytes per sample"""
    channels: int = 1


@dataclass(frozen=True, kw_only=True)
class AudioOut(Body, kind="audio.out"):
    """One block of the assistant's voice as it was played (sentence ``index`` of the turn), raw PCM."""

    pcm: bytes
    rate: int
    index: int
    width: int = 2
    channels: int = 1


@dataclass(frozen=True, kw_only=True)
class AudioEnd(Body, kind="audio.end"):
    """The listener's input ended (a WAV file ran out); ``last_turn`` is its final turn (0 if none)."""

    last_turn: int
    reason: str


@dataclass(frozen=True, kw_only=True)
class VadStart(Body, kind="vad.start"):
    offset_ms: int
    """where speech began, in the input stream's own time"""
    rejoins: int = 0
    """the turn this speech goes on from (it began within vad.rejoin_ms of that turn's end): its transcript
    holds that turn's words too, and that turn is barged in on; 0: a new request"""


@dataclass(frozen=True, kw_only=True)
class VadEnd(Body, kind="vad.end"):
    offset_ms: int
    """where speech ended (silence began), in the input stream's own time"""
    speech_ms: int
    speech_end_ts: float
    """wall-clock time at which the speech ended (before the silence window)"""


@dataclass(frozen=True, kw_only=True)
class AsrPartial(Body, kind="asr.partial"):
    text: str


@dataclass(frozen=True, kw_only=True)
class AsrGuess(Body, kind="asr.guess"):
    """A tentative transcript, made at a pause before the turn is over.

    The thinker may start answering it and the speaker may synthesize that answer,
    but nobody plays or remembers anything of it until an ``asr.final`` confirms
    this guess (its ``guess`` field names this ``rev``).
    """

    text: str
    rev: int
    """1, 2, … within the turn: each pause makes a new guess"""
    offset_ms: int
    """input time where the pause began"""


@dataclass(frozen=True, kw_only=True)
class AsrRevoke(Body, kind="asr.revoke"):
    """The guess ``rev`` is void (the person went on speaking): drop whatever was prepared for it."""

    rev: int
    reason: str = "speech resumed"


@dataclass(frozen=True, kw_only=True)
class AsrFinal(Body, kind="asr.final"):
    text: str
    confidence: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    """speech_end, vad_end, final (epoch seconds), asr_s (vad.end → final), decode_s, silence_window_s (the
    window the words asked for; the turn may have been held open longer, until its answer was ready)"""
    guess: int = 0
    """the guess (rev) this final confirms, its text being the guess's; 0: none, and any guess of the turn is void"""


@dataclass(frozen=True, kw_only=True)
class AsrNoMatch(Body, kind="asr.nomatch"):
    reason: str
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class LlmAccepted(Body, kind="llm.accepted"):
    """The thinker has recorded the utterance and will answer it (the sender stops repeating it).

    Sent only once the turn is on disk, so an acknowledged turn survives a thinker
    crash; sent again whenever the utterance is repeated while it is still queued or
    being answered.
    """

    queued: int = 0
    """answers waiting before this one"""
    note: str = ""
    """something the asker should know (the question was cut to fit, the history is not being saved)"""


@dataclass(frozen=True, kw_only=True)
class LlmToken(Body, kind="llm.token"):
    text: str
    index: int


@dataclass(frozen=True, kw_only=True)
class LlmSentence(Body, kind="llm.sentence"):
    text: str
    """what the voice should read (already made speakable)"""
    index: int
    """0-based position in the turn's answer"""
    replay: bool = False
    """sent again (a repeated utterance, a resend request, a resumed turn): receivers drop duplicates by index"""
    played: bool = False
    """(replays) the speaker already finished playing it: a speaker that does not know the turn skips it"""
    guess: int = 0
    """nonzero: part of an answer to the unconfirmed guess of that rev — prepare it, do not play it"""


@dataclass(frozen=True, kw_only=True)
class LlmDone(Body, kind="llm.done"):
    """The end of a turn's answer: every accepted turn gets exactly one (plus replays)."""

    finish_reason: str
    """stop | length | cancelled (interrupted; see reason) | error | stop_phrase | abandoned |
    revoked (the answer to a guess that was not confirmed: ``guess`` says which)"""
    sentences: int
    """how many llm.sentence messages the turn has"""
    text: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    """request, first_token, first_sentence, done (epoch s); ttft_s, tokens_per_s"""
    reason: str = ""
    """why it ended that way, for people (e.g. what interrupted it)"""
    replay: bool = False
    guess: int = 0
    """(revoked) the guess whose speculative answer this ends"""


@dataclass(frozen=True, kw_only=True)
class LlmHeard(Body, kind="llm.heard"):
    """The thinker took a ``play.stopped`` into account: the turn's history keeps what was heard (or
    there was nothing of the turn to cut). The speaker says its stop again until this comes."""

    index: int
    spoken_ms: int
    """the stop it answers (``play.stopped``'s index and spoken_ms)"""


@dataclass(frozen=True, kw_only=True)
class LlmResend(Body, kind="llm.resend"):
    """Send this turn's sentences again from ``from_index`` (a receiver found a gap)."""

    from_index: int = 0


@dataclass(frozen=True, kw_only=True)
class LlmError(Body, kind="llm.error"):
    code: str
    message: str
    transient: bool = False


@dataclass(frozen=True, kw_only=True)
class PlayReady(Body, kind="play.ready"):
    """The first audio of the answer to guess ``rev`` is ready: held, a confirmation plays it at once (or
    already playing, when the confirmation came first).

    The listener waits for it (up to ``vad.hold_ms``) before it ends the turn: ending it sooner would
    make nothing play sooner, and a person who goes on speaking meanwhile revokes a guess instead of
    being answered half-way."""

    rev: int


@dataclass(frozen=True, kw_only=True)
class PlayStart(Body, kind="play.start"):
    index: int
    text: str = ""


@dataclass(frozen=True, kw_only=True)
class PlayDone(Body, kind="play.done"):
    index: int
    spoken_ms: int


@dataclass(frozen=True, kw_only=True)
class PlayStopped(Body, kind="play.stopped"):
    index: int
    """the sentence that was cut (or the next one due, if between sentences)"""
    reason: str
    spoken_ms: int
    """how much of that sentence was played"""
    total_ms: int
    """its full length (0 if not synthesized yet)"""


@dataclass(frozen=True, kw_only=True)
class TurnMetrics(Body, kind="metrics.turn"):
    """Stage timestamps (epoch s) and latencies (s) of a finished turn."""

    timings: dict[str, float]
    outcome: str = "done"
    """done | interrupted | error"""
