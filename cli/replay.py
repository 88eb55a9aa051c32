"""``voicebus replay FILE``: re-drive a recording's user side through fresh workers, then compare turn by turn.

What is replayed is the user's side only: the ``audio.in`` frames (at their
recorded timing, scaled by ``--speed``; ``--fast`` sends them at once) and the
``ctl.ask``/``ctl.say`` texts. Everything else — transcripts, answers, audio,
latencies — is made anew by a ``voicebus up`` that replay starts itself on a
private bus, with its own fresh state (no conversation history; the model cache
is shared), listening with ``--input bus`` and recording itself (``--record``).
A recording without audio (``--no-audio``) replays its voice turns as text: the
words recorded then are asked.

The new run uses the recorded settings (backends, model, prompts, windows; no
secrets, no devices) unless told otherwise: ``--asr/--llm/--tts``, ``--config``,
``--set section.key=value`` and the environment all override them. ``--seed``
fixes the chat model's sampling where the backend takes a seed.

Turns are paired in order: voice turns with voice turns, typed ones by the turn
ids replay gave them. The report puts then and now side by side and flags what
differs beyond the tolerances; the exit code is 0 when nothing did, 2 when the
replay diverged, 1 when it could not run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from voicebus.cli.replay_report import TEXT_MATCH, Tolerances, compare, describe_backends, pair_turns, report_lines
from voicebus.cli.show import TurnStory, plain_body, read_turns
from voicebus.engine.bus import Endpoints
from voicebus.engine.client import BusClient
from voicebus.engine.errors import ConfigError, VoicebusError
from voicebus.engine.messages import Envelope, Shutdown, new_turn_id
from voicebus.engine.recording import Recording
from voicebus.engine.settings import expand, load
from voicebus.workers.config import Settings
from voicebus.workers.kinds import Ask, AudioEnd, AudioIn, Say

EXIT_DIVERGED = 2
REPLAYED_SECTIONS = ("vad", "asr", "llm", "tts")
"""Recorded settings a replay reuses; audio, bus, state and supervisor belong to the machine replaying."""
SOURCE_NAME = "listener-input"
"""The bus audio source's name on the bus (``workers.audio.bus_source``): its sys.ready opens the gate."""


class ReplayError(VoicebusError):
    """The replay could not run (the new workers failed, or never answered)."""

    code = "replay"


# --- the user's side of a recording -----------------------------------------------------------


@dataclass(frozen=True)
class UserEvent:
    """Something the user did, at file time ``t``: a frame of audio, a typed question, a say."""

    t: float
    kind: str
    """audio | ask | say | end"""
    body: AudioIn | None = None
    text: str = ""
    turn: int = 0
    """(ask/say) the turn it had then"""


def user_side(recording: Recording, then: list[TurnStory]) -> tuple[list[UserEvent], bool]:
    """The user's events in time order, and whether they include audio.

    Audio comes from the first sender of ``audio.in`` in the file. Without any,
    voice turns are asked as text at the time their transcript arrived.
    """
    events: list[UserEvent] = []
    audio_src = None
    asked: set[int] = set()
    for t, env in recording.messages(kinds=("audio.in", "audio.end", "ctl.ask", "ctl.say")):
        if env.kind == "audio.in":
            audio_src = audio_src or env.src
            if env.src == audio_src and isinstance(env.body, AudioIn):
                events.append(UserEvent(t, "audio", body=env.body))
        elif env.kind == "audio.end":
            if env.src == audio_src:
                events.append(UserEvent(t, "end"))
        elif env.turn not in asked:  # senders repeat a question until it is accepted
            asked.add(env.turn)
            text = str(plain_body(env).get("text", ""))
            events.append(UserEvent(t, "ask" if env.kind == "ctl.ask" else "say", text=text, turn=env.turn))
    has_audio = audio_src is not None
    if not has_audio:
        for story in then:
            if story.source == "voice" and story.heard:
                events.append(UserEvent(story.marks.get("final", story.start), "ask", text=story.heard,
                                        turn=story.turn))
    events.sort(key=lambda e: e.t)
    return events, has_audio


# --- the settings of the new run --------------------------------------------------------------


def recorded_backends(recording: Recording) -> dict[str, str]:
    """The backends of the recorded run: from the header, else from the workers' sys.hello."""
    found = {k: v for k, v in recording.header.backends.items() if k in ("asr", "llm", "tts")}
    if len(found) < 3:
        for _t, env in recording.messages(kinds=("sys.hello",)):
            for stage, name in (plain_body(env).get("backends") or {}).items():
                if stage in ("asr", "llm", "tts"):
                    found.setdefault(stage, str(name))
    return found


def known_settings() -> set[str]:
    """Every "section.key" this voicebus knows."""
    defaults = Settings()
    return {f"{sec.name}.{f.name}" for sec in dataclasses.fields(defaults)
            for f in dataclasses.fields(getattr(defaults, sec.name))}


def replay_config(recording: Recording, user_config: Path | None) -> dict[str, dict[str, Any]]:
    """The recorded settings of ``REPLAYED_SECTIONS`` (no secrets, only known fields), the user's file on top."""
    known = known_settings()
    tree: dict[str, dict[str, Any]] = {}
    for key, value in recording.header.settings.items():
        section, _, name = key.partition(".")
        if section in REPLAYED_SECTIONS and f"{section}.{name}" in known and value != "***" and value is not None:
            tree.setdefault(section, {})[name] = value
    if user_config is not None:
        try:
            mine = tomllib.loads(expand(user_config).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {user_config} not found") from None
        except (tomllib.TOMLDecodeError, OSError) as exc:
            raise ConfigError(f"config file {user_config} is not valid TOML: {exc}") from None
        for section, values in mine.items():
            if isinstance(values, dict):
                tree.setdefault(section, {}).update(values)
    return tree


def toml_text(tree: dict[str, dict[str, Any]]) -> str:
    """A settings tree as TOML (values are text, numbers, booleans or lists of text)."""
    lines = []
    for section, values in tree.items():
        lines.append(f"[{section}]")
        for name, value in values.items():
            lines.append(f"{name} = {json.dumps(value, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


def parse_set(values: tuple[str, ...]) -> dict[str, str]:
    """``--set section.key=value`` → environment variables for the new run; BadParameter if unknown."""
    fields = known_settings()
    env = {}
    for item in values:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in fields:
            raise click.BadParameter(f"{item!r}: expected section.key=value with a known setting (e.g. "
                                     "vad.silence_ms=700)", param_hint="--set")
        env[f"VOICEBUS_{key.replace('.', '_').upper()}"] = value
    return env


# --- the new run ------------------------------------------------------------------------------


@dataclass
class Progress:
    """What the new run has done so far, from the messages the replay client sees."""

    ready: set[str] = field(default_factory=set)
    finished: set[int] = field(default_factory=set)
    heard: dict[int, str] = field(default_factory=dict)
    shutdown: str = ""


class LiveRun:
    """``voicebus up --input bus|none --record NOW`` on a private bus, and a client that feeds it."""

    def __init__(self, workdir: Path, args: list[str], env: dict[str, str], log: Callable[[str], None]) -> None:
        self.workdir = workdir
        self.folder = Path(tempfile.mkdtemp(prefix="vb-replay-", dir="/tmp"))  # a short path for unix sockets
        self.url = f"ipc://{self.folder}"
        self.log = log
        self.stderr_path = workdir / "up.stderr"
        with open(workdir / "up.stdout", "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "voicebus.cli.main", "up", "--bus", self.url, *args],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
            )
        self.client: BusClient | None = None
        self.progress = Progress()

    def failure(self) -> str:
        """The run's own last word on stderr (status lines and workers' logs aside)."""
        lines = [ln.strip() for ln in self.stderr_path.read_text(errors="replace").splitlines()]
        errors = [ln for ln in lines if re.match(r"^(voicebus: |\w+Error: )", ln)]
        return (errors or [f"exit code {self.proc.returncode}"])[-1]

    def connect(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ReplayError(f"voicebus up stopped: {self.failure()}")
            client = BusClient(Endpoints.parse(self.url), name="replay")
            client.subscribe("sys.ready", "sys.heartbeat", "ctl.shutdown", "metrics.turn", "llm.done", "asr.final",
                             "asr.nomatch")
            try:
                client.announce(timeout=1.0)
                self.client = client
                return
            except ConnectionError:
                client.close()
                if time.monotonic() > deadline:
                    raise ReplayError(f"the new run's bus did not answer within {timeout:.0f} s") from None

    def pump(self, until: float) -> None:
        """Read the bus until monotonic time ``until``; ReplayError if the run died meanwhile."""
        assert self.client is not None
        while (remaining := until - time.monotonic()) > 0:
            env = self.client.recv(timeout=min(remaining, 0.1))
            if env is not None:
                self._note(env)
            elif self.proc.poll() is not None:
                return

    def _note(self, env: Envelope) -> None:
        body = plain_body(env)
        p = self.progress
        if env.kind == "sys.ready" or (env.kind == "sys.heartbeat" and body.get("state") == "ready"):
            p.ready.add(str(body.get("name")))  # heartbeats repeat it, should a sys.ready come too early for us
        elif env.kind == "ctl.shutdown":
            p.shutdown = p.shutdown or str(body.get("reason", ""))
        elif env.kind == "asr.final" and env.turn not in p.heard:
            p.heard[env.turn] = str(body.get("text", ""))
            self.log(f"heard: {p.heard[env.turn]!r}")
        elif env.kind == "metrics.turn" or (env.kind == "asr.nomatch") or (
            env.kind == "llm.done" and body.get("finish_reason") != "revoked" and not body.get("sentences")
        ):
            p.finished.add(env.turn)

    def wait_ready(self, names: set[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not names <= self.progress.ready:
            if self.proc.poll() is not None:
                raise ReplayError(f"voicebus up stopped before it was ready: {self.failure()}")
            if time.monotonic() > deadline:
                missing = ", ".join(sorted(names - self.progress.ready))
                raise ReplayError(f"the new run was not ready within {timeout:.0f} s (waiting for {missing})")
            self.pump(time.monotonic() + 0.1)

    def send(self, event: UserEvent) -> int:
        """Publish a user event; returns the new turn id of a question (0 otherwise)."""
        assert self.client is not None
        if event.kind == "audio":
            assert event.body is not None
            self.client.publish(event.body)
        elif event.kind == "end":
            self.client.publish(AudioEnd(last_turn=0, reason="replay ended"))
        else:
            turn = new_turn_id()
            self.client.publish(Ask(text=event.text) if event.kind == "ask" else Say(text=event.text), turn=turn)
            return turn
        return 0

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float) -> int:
        """End the run (ctl.shutdown, then signals) and return its exit code."""
        if self.alive and self.client is not None:
            self.client.publish(Shutdown(reason="replay finished"))
        for sig, wait in ((None, timeout), (signal.SIGINT, 15.0), (signal.SIGKILL, 10.0)):
            if sig is not None and self.alive:
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    pass
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        if self.client is not None:
            self.client.close()
        shutil.rmtree(self.folder, ignore_errors=True)
        return self.proc.returncode if self.proc.returncode is not None else -9


def feed(run: LiveRun, events: list[UserEvent], *, speed: float, fast: bool, deadline: float) -> dict[int, int]:
    """Send the user's events at their recorded timing; returns {turn then: turn now} of the questions.

    ``fast``: audio at once; each question only once the previous one's turn is over.
    """
    asked: dict[int, int] = {}
    if not events:
        return asked
    t0, start = events[0].t, time.monotonic()
    sent_audio = False
    for event in events:
        if not run.alive:
            break
        if fast and event.kind in ("ask", "say"):
            while asked and not set(asked.values()) <= run.progress.finished and run.alive:
                if time.monotonic() > deadline:
                    return asked
                run.pump(time.monotonic() + 0.1)
        elif not fast:
            run.pump(start + (event.t - t0) / speed)
        turn = run.send(event)
        if turn:
            asked[event.turn] = turn
        sent_audio |= event.kind == "audio"
        if event.kind == "end":
            sent_audio = False
    if sent_audio:  # the recording ended without audio.end (a recorder stopped mid-session)
        run.send(UserEvent(events[-1].t, "end"))
    return asked


# --- the command ------------------------------------------------------------------------------


def _state_dir(user_state: Path, workdir: Path) -> Path:
    """A fresh state dir for the new run that shares the user's model cache (whisper is assembled once)."""
    state = workdir / "state"
    state.mkdir()
    models = expand(user_state) / "models"
    try:
        models.mkdir(parents=True, exist_ok=True)
        (state / "models").symlink_to(models, target_is_directory=True)
    except OSError:
        pass  # an unwritable home: the run assembles its own copy
    return state


@click.command()
@click.argument("path", metavar="FILE", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--asr", metavar="NAME", help="Speech recognition now (default: as recorded).")
@click.option("--llm", metavar="NAME", help="Chat model now (default: as recorded).")
@click.option("--tts", metavar="NAME", help="Voice now (default: as recorded).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="TOML settings on top of the recorded ones.")
@click.option("--set", "set_values", multiple=True, metavar="SECTION.KEY=VALUE",
              help="One setting for the new run (repeatable), e.g. --set vad.silence_ms=700.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Sampling seed for the chat model, where the backend takes one (llm.seed).")
@click.option("--speed", type=click.FloatRange(min=0.1, max=20), default=1.0, show_default=True,
              help="Play the user's side this many times faster than recorded.")
@click.option("--fast", is_flag=True,
              help="Send the audio at once and each question after the last answer: only what was heard and "
                   "answered is judged, not latencies or turn-taking.")
@click.option("--output", default="none", show_default=True, metavar="none|speaker|PATH.wav",
              help="Where the new run's voice goes.")
@click.option("--save", "save_path", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Keep the new run's recording in FILE (for 'voicebus show').")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path), metavar="FILE",
              help="Write the report as JSON to FILE ('-': stdout, instead of the text report).")
@click.option("--max-latency-ratio", type=click.FloatRange(min=1), default=2.0, show_default=True,
              help="A stage may take this many times as long as it did then…")
@click.option("--latency-slack", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="…or this many seconds longer, whichever allows more.")
@click.option("--text-match", type=click.Choice(TEXT_MATCH), default="words", show_default=True,
              help="How what was heard must match: exact, words (case and punctuation aside), loose (80%), ignore.")
@click.option("--answer-match", type=click.Choice(TEXT_MATCH), default="words", show_default=True,
              help="How the answers must match (ignore for a model that samples differently each time).")
@click.option("--timeout", type=click.FloatRange(min=1), default=120, show_default=True,
              help="Seconds allowed for loading, and for the answers after the recording's user side ended.")
def replay(path: Path, asr: str | None, llm: str | None, tts: str | None, config_file: Path | None,
           set_values: tuple[str, ...], seed: int, speed: float, fast: bool, output: str, save_path: Path | None,
           json_path: Path | None, max_latency_ratio: float, latency_slack: float, text_match: str,
           answer_match: str, timeout: float) -> None:
    """Re-drive a recording's user side through fresh workers, and compare each turn then and now.

    \b
    voicebus replay s.vbrec                          the same backends: did anything change?
    voicebus replay s.vbrec --asr pocketsphinx       another recognizer on the same voice
    voicebus replay s.vbrec --json report.json       the report for tools

    Exit code 0: every turn within tolerance; 2: the replay diverged; 1: it could not run.
    """
    recording = Recording(path)
    env_set = parse_set(set_values)
    if save_path is not None and save_path.exists():
        raise ConfigError(f"{save_path} exists: choose another name for --save")
    then = [s for s in read_turns(recording) if s.source]
    events, has_audio = user_side(recording, then)
    if not events:
        raise ReplayError(f"{path} has nothing of the user's to replay (no audio.in, ctl.ask or transcript)")
    then_backends = recorded_backends(recording)
    now_backends = {**then_backends, **{k: v for k, v in (("asr", asr), ("llm", llm), ("tts", tts)) if v}}
    user_settings = load(Settings, config_file=config_file)
    tolerances = Tolerances(max_latency_ratio, latency_slack, text_match, answer_match, timing=not fast)
    quiet = json_path is not None and str(json_path) == "-"

    def log(text: str) -> None:
        if not quiet:
            click.echo(f"replay: {text}", err=True)

    workdir = Path(tempfile.mkdtemp(prefix="voicebus-replay-"))
    try:
        config = workdir / "replay.toml"
        config.write_text(toml_text(replay_config(recording, config_file)))
        now_path = save_path or workdir / "now.vbrec"
        args = ["--config", str(config), "--record", str(now_path), "--input", "bus" if has_audio else "none",
                "--output", output]
        args += [f"--{stage}={name}" for stage, name in now_backends.items()]
        if fast:
            args.append("--fast")
        env = {k: v for k, v in os.environ.items() if k not in ("VOICEBUS_SETTINGS_JSON", "VOICEBUS_CONFIG")}
        env.update({"VOICEBUS_STATE_DIR": str(_state_dir(user_settings.state.dir, workdir)),
                    "VOICEBUS_LLM_SEED": str(seed), **env_set})
        log(f"starting the workers ({describe_backends(now_backends)})…")
        run = LiveRun(workdir, args, env, log)
        try:
            run.connect(timeout)
            run.wait_ready({"thinker", "speaker", *([SOURCE_NAME, "listener"] if has_audio else [])}, timeout)
            span = (events[-1].t - events[0].t) / speed
            log(f"replaying {len(then)} turn(s), {span:.1f} s of the user's side"
                f"{' (fast)' if fast else f' at ×{speed:g}' if speed != 1 else ''}")
            deadline = time.monotonic() + (0 if fast else span) + timeout
            asked = feed(run, events, speed=speed, fast=fast, deadline=deadline)
            waiting = set(asked.values())
            while run.alive and time.monotonic() < deadline:
                if not has_audio and waiting <= run.progress.finished:
                    break  # text only: nobody else ends the run
                run.pump(time.monotonic() + 0.2)
            timed_out = run.alive and time.monotonic() >= deadline
            code = run.stop(timeout=10)
            if timed_out:
                log(f"the new run did not finish within {timeout:.0f} s of the end of the user's side")
            elif code not in (0, None):
                log(f"voicebus up exited with code {code}: {run.failure()}")
        finally:
            if run.alive:
                run.stop(timeout=5)
        now_recording = Recording(now_path)
        now = [s for s in read_turns(now_recording) if s.source]
        comparisons = [compare(c, tolerances) for c in pair_turns(then, now, asked, has_audio)]
        diverged = any(c.differences for c in comparisons) or timed_out
        result = {
            "recording": str(path), "then": {"backends": then_backends, "created": recording.header.created},
            "now": {"backends": now_backends, "recording": str(save_path) if save_path else None,
                    "exit_code": code, "timed_out": timed_out},
            "speed": speed, "fast": fast, "tolerances": dataclasses.asdict(tolerances),
            "turns": [c.to_json() for c in comparisons], "diverged": diverged,
        }
        if json_path is not None:
            text = json.dumps(result, indent=2, ensure_ascii=False)
            if quiet:
                click.echo(text)
            else:
                json_path.write_text(text + "\n")
        if not quiet:
            click.echo(f"then: {describe_backends(then_backends)}   now: {describe_backends(now_backends)}")
            click.echo("\n".join(report_lines(comparisons)))
            total = sum(1 for c in comparisons if c.differences)
            click.echo("")
            click.echo(f"{len(comparisons)} turn(s), {total} diverged" + (", timed out" if timed_out else ""))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    sys.exit(EXIT_DIVERGED if diverged else 0)
