"""``voicebus up``: the supervisor in the foreground."""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import click

from voicebus.cli.common import SettingsSource, bus_options, make_client
from voicebus.cli.console import WATCH, ConsoleView
from voicebus.cli.record import SessionRecorder
from voicebus.engine.client import BusClient
from voicebus.engine.settings import to_env
from voicebus.engine.spawner import WorkerSpec
from voicebus.engine.supervisor import Supervisor
from voicebus.workers.preflight import preflight
from voicebus.workers.registry import WORKERS


def worker_argv(*args: str) -> list[str]:
    """A fresh interpreter running ``voicebus ARGS`` (no dependence on PATH)."""
    return [sys.executable, "-m", "voicebus.cli.main", *args]


def parse_only(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...]:
    if not value:
        return tuple(WORKERS)
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    unknown = [n for n in names if n not in WORKERS]
    if unknown:
        raise click.BadParameter(f"unknown worker(s) {', '.join(unknown)}; choose from {', '.join(WORKERS)}")
    return names


@click.command()
@click.option("--input", "input_", metavar="mic|FILE|bus|none",
              help="Audio in: a microphone, a file (WAV, FLAC, OGG/Opus, MP3), the bus (audio.in), or none (default: mic).")
@click.option("--output", metavar="speaker|PATH.wav|none", help="Audio out (default: speaker).")
@click.option("--fast", is_flag=True, default=None,
              help="Read/write audio files as fast as possible, not in real time; each question waits for the last answer.")
@click.option("--asr", metavar="NAME", help="Speech recognition: pocketsphinx | whisper | azure.")
@click.option("--llm", metavar="NAME", help="Chat model: local | openai | azure.")
@click.option("--tts", metavar="NAME", help="Voice: piper | azure.")
@click.option("--barge-in/--no-barge-in", default=None,
              help="Let speech interrupt the assistant (turn off for open speakers without echo cancellation).")
@click.option("--only", callback=parse_only, metavar="NAME[,NAME]",
              help="Supervise only these workers (e.g. --only speaker on a second host, with --bus).")
@click.option("--start-bus/--join-bus", default=None,
              help="Start the bus here, or join a running one at --bus. Default: start it unless --only is given.")
@click.option("--continue", "continue_", is_flag=True, default=None,
              help="Go on with the conversation of earlier runs (the chat model sees it); default: a new one.")
@click.option("--record", "record_path", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Record the whole session, your voice included, to FILE (see 'voicebus show', 'voicebus replay').")
@bus_options
def up(input_: str | None, output: str | None, fast: bool | None, asr: str | None, llm: str | None,
       tts: str | None, barge_in: bool | None, only: tuple[str, ...], start_bus: bool | None,
       continue_: bool | None, record_path: Path | None, source: SettingsSource) -> None:
    """Run the voice loop: bus, listener, thinker and speaker, restarted on failure.

    \b
    voicebus up                                       microphone and speakers
    voicebus up --input q.wav --output a.wav          the same loop on files
    voicebus up --only speaker --bus tcp://HOST:7700  a second host

    Exits 0 on Ctrl-C, on a stop phrase, or when the input file has been answered;
    non-zero when a worker had to be given up.
    """
    settings = source.load(
        audio__input=input_, audio__output=output, audio__fast=fast, asr__backend=asr, llm__backend=llm,
        tts__backend=tts, vad__barge_in=barge_in, state__continue_conversation=continue_,
    )
    # Restarted workers get the same: a thinker restarted mid-run still sees the whole of this run's conversation.
    settings = replace(settings, state=replace(settings.state, run_started=time.time()))
    if record_path is not None:  # the recording holds the user's voice and the assistant's
        settings = replace(settings, audio=replace(settings.audio, publish_audio=True))
    if start_bus is None:
        start_bus = set(only) == set(WORKERS)
    preflight(settings, only, start_bus=start_bus)
    env = to_env(settings)
    recorder = SessionRecorder(settings, record_path) if record_path else None

    def client_factory() -> BusClient:
        # The supervisor connects once the bus runs and starts the workers right after:
        # the recorder proves its own subscription first, so it misses nothing of theirs.
        if recorder is not None:
            recorder.start()
        return make_client(settings, "supervisor")

    view = ConsoleView()
    supervisor = Supervisor(
        client_factory=client_factory,
        workers=[WorkerSpec(name, worker_argv("worker", name), env) for name in only],
        bus=WorkerSpec("bus", worker_argv("bus"), env, heartbeats=False) if start_bus else None,
        settings=settings.supervisor,
        view=view,
        watch=WATCH,
    )
    try:
        code = supervisor.run()
    finally:
        view.close()
        if recorder is not None:
            recorder.stop()
    if code:
        click.echo(f"voicebus: {supervisor.failure}", err=True)
    sys.exit(code)
