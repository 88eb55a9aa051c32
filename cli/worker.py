"""``voicebus worker NAME``: run one worker (the supervisor starts these)."""

from __future__ import annotations

import sys

import click

from voicebus.cli.common import SettingsSource, bus_options, make_client
from voicebus.workers.registry import worker_class


@click.command()
@click.argument("name", metavar="NAME")
@bus_options
def worker(name: str, source: SettingsSource) -> None:
    """Run one worker in the foreground: listener, thinker, speaker, or package.module:Class.

    Usually started by 'voicebus up'; run it by hand to put one worker on another host.
    """
    settings = source.load()
    cls = worker_class(name)
    actor = cls(make_client(settings, cls.name), settings)
    sys.exit(actor.run())
