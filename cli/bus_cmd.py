"""``voicebus bus``: run the bus proxy alone."""

from __future__ import annotations

import signal
import threading

import click

from voicebus.cli.common import SettingsSource, bus_options, endpoints, security
from voicebus.engine.bus import Bus


@click.command()
@click.option("--bind", metavar="tcp://HOST:PORT", help="Where to listen (publish port; subscribe is PORT+1). Same as --bus.")
@bus_options
def bus(bind: str | None, source: SettingsSource) -> None:
    """Run the message bus in the foreground until Ctrl-C or SIGTERM."""
    settings = source.load(bus__url=bind)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    ep = endpoints(settings)
    with Bus(ep, security(settings), max_bytes=settings.bus.max_message_bytes + 64 * 1024):
        click.echo(f"bus on {ep.publish} (publish) and {ep.subscribe} (subscribe)", err=True)
        stop.wait()
