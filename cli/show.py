"""``voicebus show FILE``: a recording as ``tap`` prints it, each turn's waterfall, its audio as WAV files.

The turn stories built here (``read_turns``) are also what ``voicebus replay``
compares: what was heard, what was answered, when each stage happened.
Times are arrival times on the recorder's clock (one clock for every sender,
so no host's clock skew enters a waterfall); the end of speech, which only
its body knows, is placed by its offset from the ``vad.end`` that carries it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from voicebus.cli.record import check_prefixes
from voicebus.cli.tap import KindFilter, as_json, plain_body
from voicebus.cli.tap import line as tap_line
from voicebus.engine.errors import AudioError
from voicebus.engine.messages import Envelope
from voicebus.engine.recording import Recording

USER_KINDS = ("vad.start", "ctl.ask", "ctl.say")
"""Kinds that open a turn (a user's utterance, a typed question, a say)."""
BAR_WIDTH = 36


@dataclass
class TurnStory:
    """One turn as the bus told it: marks (stage → file time), texts, and what went wrong."""

    turn: int
    source: str = ""
    """voice | text | say ("" while only answer-side messages were seen)"""
    start: float = 0.0
    heard: str = ""
    nomatch: str = ""
    guesses: list[str] = field(default_factory=list)
    revoked: list[int] = field(default_factory=list)
    sentences: dict[int, str] = field(default_factory=dict)
    guess_sentences: dict[int, dict[int, str]] = field(default_factory=dict)
    confirmed_guess: int = 0
    done_text: str = ""
    finish: str = ""
    """the answer's llm.done finish_reason (revoked guesses' are not it)"""
    outcome: str = ""
    """metrics.turn: done | interrupted | error"""
    interrupts: list[str] = field(default_factory=list)
    """reasons of ctl.interrupt for this turn (barge-in…)"""
    stopped: list[str] = field(default_factory=list)
    """play.stopped: what was cut, how much of it was heard"""
    errors: list[str] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)
    events: list[tuple[float, str, str]] = field(default_factory=list)
    """(file time, label, detail) in arrival order, for the waterfall"""
    metrics: dict[str, float] = field(default_factory=dict)
    """the speaker's metrics.turn timings"""

    @property
    def answer(self) -> str:
        chosen = self.sentences or self.guess_sentences.get(self.confirmed_guess, {})
        if chosen:
            return " ".join(chosen[i] for i in sorted(chosen))
        return self.done_text

    @property
    def barge_ins(self) -> int:
        return sum(1 for r in self.interrupts if "barge" in r)

    def mark(self, t: float, stage: str, label: str, detail: str = "", *, first: bool = True) -> None:
        if first and stage in self.marks:
            return
        self.marks.setdefault(stage, t)
        self.events.append((t, label, detail))

    def latencies(self) -> dict[str, float]:
        """Stage latencies (s): the speaker's own figures where it sent them, else from the marks."""
        out = {k: v for k, v in self.metrics.items() if k.endswith("_s")}
        m = self.marks
        origin = "final" if "final" in m else "request"

        def span(name: str, a: str, b: str) -> None:
            if name not in out and a in m and b in m:
                out[name] = round(m[b] - m[a], 4)

        span("silence_s", "speech_end", "vad_end")
        span("asr_s", "vad_end", "final")
        span("first_token_s", origin, "first_token")
        span("first_sentence_s", origin, "first_sentence")
        span("first_audio_s", "first_sentence", "first_audio")
        span("speech_end_to_audio_s", "speech_end", "first_audio")
        span("request_to_audio_s", "request", "first_audio")
        return out

    def summary(self) -> dict[str, Any]:
        """A plain dict for reports (JSON)."""
        return {
            "turn": self.turn, "source": self.source, "heard": self.heard, "nomatch": self.nomatch,
            "answer": self.answer, "finish": self.finish, "outcome": self.outcome, "guesses": self.guesses,
            "revoked": self.revoked, "barge_ins": self.barge_ins, "interrupts": self.interrupts,
            "stopped": self.stopped, "errors": self.errors, "latencies": self.latencies(),
        }


def _clip(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _Builder:
    """Turn stories from messages in arrival order."""

    def __init__(self) -> None:
        self.turns: dict[int, TurnStory] = {}

    def story(self, turn: int, t: float) -> TurnStory:
        story = self.turns.get(turn)
        if story is None:
            story = self.turns[turn] = TurnStory(turn, start=t)
        return story

    def add(self, t: float, env: Envelope) -> None:
        if not env.turn or env.kind.startswith(("audio.", "sys.", "sup.")):
            return  # audio frames carry the latest turn, not their own
        kind, body = env.kind, plain_body(env)
        s = self.story(env.turn, t)
        if kind == "vad.start":
            s.source = s.source or "voice"
            rejoins = body.get("rejoins")
            s.mark(t, "speech_start", "speech start",
                   f"goes on from turn {rejoins}: heard with its words" if rejoins else "")
        elif kind == "vad.end":
            end = body.get("speech_end_ts")
            if isinstance(end, (int, float)):
                s.mark(t - max(0.0, env.ts - end), "speech_end", "speech end", f"{body.get('speech_ms', 0)} ms of speech")
            s.mark(t, "vad_end", "end of turn", "silence window over")
        elif kind == "asr.guess":
            s.guesses.append(str(body.get("text", "")))
            s.mark(t, f"guess{body.get('rev')}", f"guess {body.get('rev')}", repr(_clip(str(body.get("text", "")))))
        elif kind == "asr.revoke":
            s.revoked.append(int(body.get("rev", 0)))
            s.mark(t, f"revoke{body.get('rev')}", f"guess {body.get('rev')} revoked", str(body.get("reason", "")))
        elif kind == "asr.final":
            if "final" not in s.marks:
                s.heard = str(body.get("text", ""))
                s.confirmed_guess = int(body.get("guess") or 0)
            s.mark(t, "final", "final", repr(_clip(s.heard)))
        elif kind == "asr.nomatch":
            s.nomatch = str(body.get("reason", "nothing recognized"))
            s.mark(t, "final", "nothing recognized", s.nomatch)
        elif kind in ("ctl.ask", "ctl.say"):
            if "request" not in s.marks:
                s.source = "text" if kind == "ctl.ask" else "say"
                s.heard = str(body.get("text", ""))
            s.mark(t, "request", "asked" if kind == "ctl.ask" else "say", repr(_clip(s.heard)))
        elif kind == "llm.accepted":
            s.mark(t, "accepted", "accepted")
        elif kind == "llm.token":
            s.mark(t, "first_token", "first token")
        elif kind == "llm.sentence":
            self._sentence(t, s, body)
        elif kind == "llm.done":
            self._done(t, s, body)
        elif kind in ("llm.error", "sys.error"):
            s.errors.append(f"{body.get('code', '')}: {body.get('message', '')}")
            s.mark(t, "error", "error", s.errors[-1], first=False)
        elif kind == "play.ready":
            s.mark(t, f"ready{body.get('rev')}", f"answer to guess {body.get('rev')} ready", "held until confirmed")
        elif kind == "play.start":
            s.mark(t, "first_audio", "first audio", repr(_clip(str(body.get("text", "")))))
        elif kind == "play.stopped":
            what = f"sentence {body.get('index')}: {body.get('spoken_ms')} of {body.get('total_ms')} ms heard"
            stop = f"{body.get('reason', '')}: {what}"
            if stop not in s.stopped:  # the speaker says a stop again until the thinker acknowledges it
                s.stopped.append(stop)
                s.mark(t, "stopped", "playback stopped", stop, first=False)
        elif kind == "play.done":
            s.marks["played"] = t
        elif kind == "ctl.interrupt":
            s.interrupts.append(str(body.get("reason", "")))
            s.mark(t, "interrupt", "interrupted", s.interrupts[-1], first=False)
        elif kind == "metrics.turn":
            if not s.outcome:
                s.outcome = str(body.get("outcome", ""))
                s.metrics = {k: float(v) for k, v in (body.get("timings") or {}).items() if isinstance(v, (int, float))}
            s.mark(t, "finished", "turn finished", s.outcome)

    @staticmethod
    def _sentence(t: float, s: TurnStory, body: dict[str, Any]) -> None:
        index, text, guess = int(body.get("index", 0)), str(body.get("text", "")), int(body.get("guess") or 0)
        if guess:
            s.guess_sentences.setdefault(guess, {}).setdefault(index, text)
        else:
            s.sentences.setdefault(index, text)
        if not body.get("replay"):
            s.mark(t, "first_sentence", "first sentence", f"{'(for guess %d) ' % guess if guess else ''}"
                   f"{_clip(text)!r}")

    @staticmethod
    def _done(t: float, s: TurnStory, body: dict[str, Any]) -> None:
        finish = str(body.get("finish_reason", ""))
        if finish == "revoked":
            s.mark(t, f"dropped{body.get('guess')}", "guess answer dropped", f"guess {body.get('guess')}")
            return
        if not s.finish:
            s.finish = finish
            s.done_text = str(body.get("text", ""))
        s.mark(t, "done", "answer done", finish)


def read_turns(recording: Recording, turns: Iterable[int] = ()) -> list[TurnStory]:
    """The turns of a recording in the order they began (only ``turns`` if given)."""
    builder = _Builder()
    for t, env in recording.messages(turns=turns):
        builder.add(t, env)
    return sorted(builder.turns.values(), key=lambda s: (s.start, s.turn))


# --- printing ---------------------------------------------------------------------------------


def waterfall(story: TurnStory) -> list[str]:
    """The turn as a timeline: each event at its offset from the turn's first one, with a bar."""
    heard = f"heard {story.heard!r}" if story.heard else (story.nomatch or "nothing heard")
    lines = [f"turn {story.turn} · {story.source or '?'} · {_clip(heard, 70)}"]
    if not story.events:
        return lines
    events = sorted(story.events, key=lambda e: e[0])
    t0 = events[0][0]
    span = max(events[-1][0] - t0, 1e-3)
    previous = 0
    for t, label, detail in events:
        pos = round((t - t0) / span * (BAR_WIDTH - 1))
        bar = " " * previous + "━" * (pos - previous) + "●"
        previous = pos
        lines.append(f"  {(t - t0) * 1000:>7.0f} ms  {label:<20} {bar:<{BAR_WIDTH}}  {detail}".rstrip())
    lat = story.latencies()
    total = lat.get("speech_end_to_audio_s", lat.get("request_to_audio_s"))
    if total is not None:
        lines.append(f"  {'':>10}  {'→ first audio':<20} {total * 1000:.0f} ms after the "
                     f"{'end of speech' if 'speech_end_to_audio_s' in lat else 'request'}")
    return lines


def message_line(t: float, env: Envelope, color: bool | None) -> str:
    """One message as ``voicebus tap`` prints it, after its time in the recording."""
    return f"{t:>9.3f} {tap_line(env)}"


def describe_header(recording: Recording) -> str:
    h = recording.header
    when = datetime.fromtimestamp(h.created).strftime("%Y-%m-%d %H:%M:%S")
    backends = " ".join(f"{k}={v}" for k, v in h.backends.items())
    parts = [f"{recording.path}: recorded {when} on {h.host or '?'} with voicebus {h.voicebus or '?'}",
             f"from {h.bus or '?'}"]
    if backends:
        parts.append(backends)
    if h.kinds:
        parts.append(f"kinds {', '.join(h.kinds)}")
    if not h.audio:
        parts.append("no audio")
    return "; ".join(parts)


# --- audio export -----------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def export_audio(recording: Recording, folder: Path) -> list[tuple[Path, float]]:
    """Write the user's audio (audio.in) and the assistant's (audio.out) as WAV files in ``folder``.

    ``user.wav`` is the input stream as the listener published it (one file per
    sender if several published); ``assistant.wav`` is every reply in order and
    ``turn-ID-assistant.wav`` each turn's. Frames at another rate than a file's
    first are resampled to it. Returns (path, seconds) of the files written.
    """
    from voicebus.workers.audio import Resampler, write_wav

    streams: dict[str, tuple[int, bytearray, dict[int, Resampler]]] = {}
    user_srcs: list[str] = []
    for _t, env in recording.messages(kinds=("audio.in", "audio.out")):
        body = plain_body(env)
        pcm, rate = body.get("pcm"), body.get("rate")
        if not isinstance(pcm, bytes) or not isinstance(rate, int) or rate <= 0 or body.get("width", 2) != 2:
            continue
        if (body.get("channels") or 1) != 1:
            import numpy as np

            pcm = np.frombuffer(pcm, "<i2").reshape(-1, body["channels"]).mean(axis=1).astype("<i2").tobytes()
        if env.kind == "audio.in":
            if env.src not in user_srcs:
                user_srcs.append(env.src)
            names = ["user" if user_srcs.index(env.src) == 0 else f"user-{_slug(env.src)}"]
        else:
            names = ["assistant", f"turn-{env.turn}-assistant"]
        for name in names:
            stream = streams.setdefault(name, (rate, bytearray(), {}))
            if rate != stream[0]:
                pcm_at = stream[2].setdefault(rate, Resampler(rate, stream[0])).process(pcm)
            else:
                pcm_at = pcm
            stream[1].extend(pcm_at)
    if not streams:
        return []
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AudioError(f"cannot create {folder}: {exc.strerror or exc}") from None
    written = []
    for name, (rate, pcm, resamplers) in sorted(streams.items()):
        for resampler in resamplers.values():
            pcm.extend(resampler.flush())  # what the filter still holds
        path = folder / f"{name}.wav"
        write_wav(path, bytes(pcm), rate)
        written.append((path, len(pcm) / 2 / rate))
    return written


# --- the command ------------------------------------------------------------------------------


@click.command()
@click.argument("path", metavar="FILE", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--kinds", "prefixes", multiple=True, metavar="PREFIX",
              help="Only kinds starting with PREFIX (repeatable), e.g. --kinds asr. --kinds llm.sentence")
@click.option("--turn", "turns", multiple=True, type=int, metavar="ID", help="Only this turn (repeatable).")
@click.option("--heartbeats", is_flag=True, help="Show sys.heartbeat too (hidden unless a --kinds prefix names it).")
@click.option("--json", "json_lines", is_flag=True, help="Messages as one JSON object per line (with \"t\").")
@click.option("--messages/--no-messages", default=True, help="Print the messages (default) or only the waterfalls.")
@click.option("--waterfalls/--no-waterfalls", default=True, help="Print each turn's timeline after the messages.")
@click.option("--export-audio", "export_dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Write the user's and the assistant's audio as WAV files into DIR.")
@click.option("--color/--no-color", default=None, help="Colour the kinds (default: when writing to a terminal).")
def show(path: Path, prefixes: tuple[str, ...], turns: tuple[int, ...], heartbeats: bool, json_lines: bool,
         messages: bool, waterfalls: bool, export_dir: Path | None, color: bool | None) -> None:
    """Print a recording made by 'voicebus record' or 'voicebus up --record'.

    \b
    voicebus show s.vbrec                          every message, then each turn's waterfall
    voicebus show s.vbrec --no-messages            only the waterfalls
    voicebus show s.vbrec --export-audio out/      user.wav, assistant.wav, one file per reply
    """
    check_prefixes(prefixes)
    recording = Recording(path)
    click.echo(describe_header(recording), err=True)
    shown = KindFilter(prefixes, heartbeats)
    if messages:
        for t, env in recording.messages(turns=turns):
            if not shown(env.kind):
                continue
            if json_lines:
                click.echo(as_json(env)[:-1] + f', "t": {t:.6f}}}')
            else:
                click.echo(message_line(t, env, color), color=color)
    if waterfalls and not json_lines:
        stories = [s for s in read_turns(recording, turns) if s.source]
        for story in stories:
            click.echo("")
            click.echo("\n".join(waterfall(story)))
        if not stories:
            click.echo("no turns in this recording", err=True)
    for problem in recording.stats.problems():
        click.echo(f"note: {problem}", err=True)
    if export_dir is not None:
        written = export_audio(recording, export_dir)
        if not written:
            why = "it was recorded with --no-audio" if not recording.header.audio else \
                "the listener publishes audio.in only with 'up --record' or audio.publish_audio on"
            click.echo(f"no audio in {path}: {why}", err=True)
        for wav, seconds in written:
            click.echo(f"wrote {wav} ({seconds:.1f} s)", err=True)
