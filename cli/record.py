"""``voicebus record FILE``: write everything on the bus to a recording; ``up --record`` uses the same tap.

The recorder has a SUB socket of its own rather than a ``BusClient`` receive:
a recording keeps each message's frames exactly as they came off the bus (see
``voicebus.engine.recording``), and a client hands out decoded envelopes. A
client is still used to publish the recorder's ``sys.hello``; it is connected
when that hello comes back through its own SUB socket — which proves the
subscription reached the bus, so nothing published after ``connect`` returns is
missed. A recorder started mid-session records from then on.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import click
import zmq

from voicebus.cli.common import SettingsSource, bus_options, endpoints, make_client, security
from voicebus.engine import __version__
from voicebus.engine.bus import tune
from voicebus.engine.client import SequenceTracker
from voicebus.engine.errors import ConfigError, ProtocolError
from voicebus.engine.messages import Hello, decode
from voicebus.engine.recording import RecordingError, RecordingWriter
from voicebus.workers.config import Settings

AUDIO_KINDS = (b"audio.in", b"audio.out")
"""Frames of sound: the user's voice (audio.in) and the assistant's (audio.out). ``--no-audio`` drops both."""
HELLO = b"sys.hello"
ANNOUNCE_S = 10.0


@dataclass
class Tally:
    """What a recorder has written so far."""

    messages: int = 0
    bytes: int = 0
    audio_in_s: float = 0.0
    audio_out_s: float = 0.0
    left_out: int = 0
    """messages received but not recorded (--kinds, --no-audio)"""
    undecodable: int = 0
    """recorded as they came, but not valid voicebus messages"""
    lost: dict[str, int] = field(default_factory=dict)


def audio_seconds(body: dict) -> float:
    pcm = body.get("pcm")
    if not isinstance(pcm, bytes):
        return 0.0
    frame = (body.get("width") or 2) * (body.get("channels") or 1)
    return len(pcm) / frame / (body.get("rate") or 16000)


class Recorder:
    """A raw tap of the bus writing to ``writer``: ``connect``, then ``step`` until done, then ``close``.

    ``prefixes`` keeps only kinds starting with one of them; ``audio=False``
    leaves audio frames out. Everything else is recorded, even frames that do not
    decode (they are part of what the bus carried).
    """

    def __init__(
        self, settings: Settings, writer: RecordingWriter, *, prefixes: Iterable[str] = (), audio: bool = True
    ) -> None:
        self.writer = writer
        self.prefixes = tuple(p.encode() for p in prefixes)
        self.audio = audio
        self.tally = Tally()
        self._tracker = SequenceTracker()
        self.client = make_client(settings, "recorder")
        self._ctx = zmq.Context()
        self._sub = tune(self._ctx.socket(zmq.SUB))
        security(settings).apply_client(self._sub)
        self._sub.connect(endpoints(settings).subscribe)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.url = settings.bus.url
        self.connected = False

    def connect(self, timeout: float = ANNOUNCE_S) -> None:
        """Publish our hello until it comes back (recording what arrives meanwhile); ConnectionError if not."""
        hello = Hello(name="recorder", pid=os.getpid(), host=socket.gethostname(), version=__version__)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sent = self.client.publish(hello)
            resend_at = min(deadline, time.monotonic() + 0.1)
            while (remaining := resend_at - time.monotonic()) > 0:
                frames = self._recv(remaining)
                if frames is not None and self._take(frames) == sent.seq:
                    self.connected = True
                    return
        raise ConnectionError(f"no answer from the bus at {self.url} within {timeout:.0f} s")

    def step(self, timeout: float) -> bool:
        """Record the next message, waiting up to ``timeout`` s; False if none came."""
        frames = self._recv(timeout)
        if frames is None:
            return False
        self._take(frames)
        return True

    def drain(self) -> None:
        """Record whatever is already waiting."""
        while self.step(0):
            pass

    def _recv(self, timeout: float) -> list[bytes] | None:
        if not self._sub.poll(max(0, int(timeout * 1000))):
            return None
        return self._sub.recv_multipart()

    def _take(self, frames: list[bytes]) -> int | None:
        """Record one message; returns its seq if it is our own hello (not recorded)."""
        t = self.writer.now()
        topic = frames[0]
        env = None
        if len(frames) >= 2:
            try:
                env = decode(frames[:2], max_bytes=len(frames[1]) + 1)
            except ProtocolError:
                pass
        if env is not None:
            if topic == HELLO and env.src == self.client.src:
                return env.seq
            gap = self._tracker.see(env)
            if gap:
                self.tally.lost[env.src] = self.tally.lost.get(env.src, 0) + gap
        if (self.prefixes and not topic.startswith(self.prefixes)) or (not self.audio and topic in AUDIO_KINDS):
            self.tally.left_out += 1
            return None
        if len(frames) < 2:
            frames = [*frames, b""]
        if env is None:
            self.tally.undecodable += 1
        elif topic in AUDIO_KINDS:
            seconds = audio_seconds(env.body if isinstance(env.body, dict) else env.body.to_dict())
            if topic == b"audio.in":
                self.tally.audio_in_s += seconds
            else:
                self.tally.audio_out_s += seconds
        self.tally.bytes += self.writer.write(topic, frames[1], *frames[2:], t=t)
        self.tally.messages += 1
        return None

    def close(self) -> None:
        self._sub.close(linger=0)
        self._ctx.term()
        self.client.close()
        self.writer.close()


def check_prefixes(prefixes: Iterable[str]) -> tuple[str, ...]:
    """``--kinds`` prefixes, each a prefix of some known kind; ConfigError naming a typo."""
    import voicebus.workers.kinds  # noqa: F401  (the voice kinds, registered on import)
    from voicebus.engine.messages import kinds

    known = sorted(kinds())
    for prefix in prefixes:
        if not any(kind.startswith(prefix) for kind in known):
            families = sorted({k.split(".")[0] + "." for k in known})
            raise ConfigError(f"unknown kind {prefix!r}: no message kind starts with it (kinds begin with "
                              f"{', '.join(families)})")
    return tuple(prefixes)


# --- progress ---------------------------------------------------------------------------------


class Progress:
    """A status line on stderr: redrawn in place on a terminal, a line every ``quiet_s`` otherwise."""

    def __init__(self, path: Path, stream: TextIO | None = None, *, interval_s: float = 0.5, quiet_s: float = 10.0):
        self.path = path
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.interval_s = interval_s if self.live else quiet_s
        self._next = time.monotonic() + self.interval_s

    @staticmethod
    def line(tally: Tally) -> str:
        audio = f", {tally.audio_in_s:.1f} s of audio in" if tally.audio_in_s else ""
        audio += f", {tally.audio_out_s:.1f} s out" if tally.audio_out_s else ""
        return f"recorded {tally.messages} message(s){audio}, {tally.bytes / 1e6:.2f} MB"

    def update(self, tally: Tally) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.interval_s
        if self.live:
            self.stream.write(f"\r\x1b[2K{self.line(tally)}")
            self.stream.flush()
        else:
            print(self.line(tally), file=self.stream, flush=True)

    def done(self, tally: Tally) -> None:
        if self.live:
            self.stream.write("\r\x1b[2K")
        extra = []
        if tally.left_out:
            extra.append(f"{tally.left_out} left out by --kinds/--no-audio")
        if tally.lost:
            extra.append(f"{sum(tally.lost.values())} lost on the bus ({tally.lost})")
        if tally.undecodable:
            extra.append(f"{tally.undecodable} undecodable (kept as received)")
        tail = f" ({'; '.join(extra)})" if extra else ""
        print(f"{self.line(tally)} to {self.path}{tail}", file=self.stream, flush=True)


# --- `voicebus up --record` -------------------------------------------------------------------


def header_settings(settings: Settings) -> dict[str, Any]:
    """The settings for a recording's header: {"section.key": plain value}, secrets masked as "***"."""
    out: dict[str, Any] = {}
    for sec in dataclasses.fields(settings):
        section = getattr(settings, sec.name)
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if f.metadata.get("secret"):
                value = "***" if value else ""
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f"{sec.name}.{f.name}"] = value
    return out


def session_backends(settings: Settings) -> dict[str, str]:
    return {"asr": settings.asr.backend, "llm": settings.llm.backend, "tts": settings.tts.backend,
            "input": settings.audio.input, "output": settings.audio.output}


class SessionRecorder:
    """``voicebus up --record FILE``: a recorder thread in the supervisor's process.

    A thread rather than a child process: the recording must begin before the
    first worker starts and end after the last one stopped, which is exactly the
    supervisor's own lifetime, and a thread needs no readiness protocol between
    processes to get that order. Its load is small (about 60 messages a second
    with audio, one write each) and it only reads the bus, so it cannot disturb
    the supervisor's loop. ``start`` is called once the bus is up and returns
    when the recorder's subscription is proven; ``stop`` drains and closes.
    """

    def __init__(self, settings: Settings, path: Path) -> None:
        if path.exists():  # (the writer's own hint names `voicebus record`'s --append and --force)
            raise RecordingError(f"{path} exists: choose another name (voicebus up never overwrites a recording)")
        writer = RecordingWriter(
            path, bus=settings.bus.url, audio=True, backends=session_backends(settings),
            settings=header_settings(settings),
        )
        self.path = path
        self.recorder = Recorder(settings, writer)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, timeout: float = 15.0) -> None:
        """Connect (waiting for the bus to come up) and record from a thread; idempotent."""
        if self._thread is not None:
            return
        self.recorder.connect(timeout)
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.recorder.step(0.1)
        except BaseException as exc:  # a full disk: the session goes on, the recording says it stopped
            self._error = exc
            print(f"voicebus: the recording stopped: {exc}", file=sys.stderr, flush=True)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            if self._error is None:
                self.recorder.drain()
        self.recorder.close()
        Progress(self.path).done(self.recorder.tally)


# --- `voicebus record` ------------------------------------------------------------------------


@click.command()
@click.argument("path", metavar="FILE", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--kinds", "prefixes", multiple=True, metavar="PREFIX",
              help="Only kinds starting with PREFIX (repeatable), e.g. --kinds asr. --kinds llm.")
@click.option("--no-audio", is_flag=True, help="Leave audio frames out (your voice; the assistant's too).")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), help="Stop after S seconds.")
@click.option("--count", type=click.IntRange(min=1), help="Stop after N messages recorded.")
@click.option("--wait", "wait_s", type=click.FloatRange(min=0.1), default=ANNOUNCE_S, show_default=True,
              help="How long to wait for the bus (start the recorder first to catch a session from its start).")
@click.option("--append", is_flag=True, help="Continue FILE if it exists (a new segment).")
@click.option("--force", is_flag=True, help="Overwrite FILE if it exists.")
@bus_options
def record(path: Path, prefixes: tuple[str, ...], no_audio: bool, duration: float | None, count: int | None,
           wait_s: float, append: bool, force: bool, source: SettingsSource) -> None:
    """Record every message on the bus to FILE (customarily *.vbrec), until Ctrl-C, --duration or --count.

    \b
    voicebus record session.vbrec                 everything, your voice included
    voicebus record --no-audio bug.vbrec          every event and transcript, no sound
    voicebus up --record session.vbrec            record a session from its very start

    Read it back with 'voicebus show FILE'; re-drive it with 'voicebus replay FILE'.
    """
    check_prefixes(prefixes)
    settings = source.load()
    security(settings)  # a bad --bus or missing keys: say so before creating FILE
    existed = path.exists()
    writer = RecordingWriter(path, bus=settings.bus.url, kinds=prefixes, audio=not no_audio, append=append,
                             overwrite=force)
    try:
        recorder = Recorder(settings, writer, prefixes=prefixes, audio=not no_audio)
    except BaseException:
        writer.close()
        raise
    progress = Progress(path)
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    deadline = None if duration is None else time.monotonic() + duration
    try:
        try:
            recorder.connect(wait_s)
        except ConnectionError:
            if not existed and not recorder.tally.messages:
                path.unlink(missing_ok=True)  # nothing recorded: leave no empty recording behind
            raise
        kept = ", ".join(prefixes) or "every kind"
        click.echo(f"recording {settings.bus.url} to {path} ({kept}{', no audio' if no_audio else ''}); "
                   "Ctrl-C stops", err=True)
        while not stop.is_set() and (count is None or recorder.tally.messages < count):
            remaining = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
            if remaining <= 0:
                break
            recorder.step(remaining)
            progress.update(recorder.tally)
    except KeyboardInterrupt:
        pass
    finally:
        recorder.close()
    progress.done(recorder.tally)
