"""``voicebus bus``: run the bus proxy alone."""

from __future__ import annotations

import signal
import threading

import click

from voicebus.cli.common import SettingsSource, bus_options, endpoints, security
from voicebus.engine.bus import Bus


@click.command()
@click.option("--bind", metavar="ipc:///FOLDER|tcp://HOST:PORT", help="Where to listen. Same as --bus.")
@bus_options
def bus(bind: str | None, source: SettingsSource) -> None:
    """Run the message bus in the foreground until Ctrl-C or SIGTERM."""
    given = source.flags.get("bus.url")
    if bind and given and bind != given:
        raise click.UsageError(f"--bind {bind} and --bus {given} disagree; give one of them")
    settings = source.load(bus__url=bind)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    ep = endpoints(settings)
    with Bus(ep, security(settings), max_bytes=settings.bus.max_message_bytes + 64 * 1024):
        click.echo(f"bus on {ep.publish} (publish) and {ep.subscribe} (subscribe)", err=True)
        stop.wait()
