"""``voicebus``: the command group. Each command lives in its own module."""

from __future__ import annotations

import logging

import click

from voicebus.cli import bus_cmd, doctor, keys, record, replay, show, talk, tap, up, worker
from voicebus.cli.common import VoicebusGroup
from voicebus.engine import __version__


@click.group(cls=VoicebusGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="voicebus")
def cli() -> None:
    """A streaming voice assistant: listener, thinker and speaker on a ZeroMQ bus.

    Start everything with 'voicebus up'; watch the conversation with 'voicebus tap'; record it with
    'voicebus record' (or 'up --record'), read it with 'voicebus show', re-run it with 'voicebus replay'.
    """


for command in (up.up, worker.worker, bus_cmd.bus, tap.tap, record.record, show.show, replay.replay, keys.keys,
                talk.ask, talk.say, doctor.doctor):
    cli.add_command(command)


def main() -> None:
    # Library warnings (an insecure bus, say) reach the user as one plain line on stderr.
    logging.basicConfig(level=logging.WARNING, format="voicebus: %(message)s")
    cli(prog_name="voicebus")


if __name__ == "__main__":
    main()
