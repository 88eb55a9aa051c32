"""``voicebus ask`` and ``voicebus say``: talk to a running voicebus as a client."""

from __future__ import annotations

import sys
import time

import click

from voicebus.cli.common import SettingsSource, bus_options, make_client
from voicebus.engine.messages import new_turn_id
from voicebus.workers.kinds import Ask, LlmDone, LlmError, LlmSentence, Say, TurnMetrics
from voicebus.workers.redelivery import ACK_KINDS, Redelivery


@click.command()
@click.argument("text")
@click.option("--timeout", type=click.FloatRange(min=1), default=120, show_default=True,
              help="Give up after S seconds without the end of the answer.")
@bus_options
def ask(text: str, timeout: float, source: SettingsSource) -> None:
    """Ask TEXT as if the user had said it; print the answer as it streams."""
    settings = source.load()
    turn = new_turn_id()
    body = Ask(text=text)
    redelivery = Redelivery()
    with make_client(settings, "ask") as client:
        client.subscribe("llm.")
        client.announce()
        client.publish(body, turn=turn)
        redelivery.sent(turn, body, time.monotonic())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for again, repeat in redelivery.due(time.monotonic()):
                client.publish(repeat, turn=again)
            env = client.recv(timeout=0.2)
            if env is None or env.turn != turn:
                continue
            if env.kind in ACK_KINDS:
                redelivery.ack(turn)
            if isinstance(env.body, LlmSentence):
                click.echo(env.body.text)
            elif isinstance(env.body, LlmDone):
                return
            elif isinstance(env.body, LlmError):
                click.echo(f"answer failed: {env.body.code}: {env.body.message}", err=True)
                sys.exit(1)
    click.echo(f"no complete answer within {timeout:.0f} s (is a thinker running on {settings.bus.url}?)", err=True)
    sys.exit(1)


@click.command()
@click.argument("text")
@click.option("--timeout", type=click.FloatRange(min=1), default=60, show_default=True,
              help="Give up after S seconds without the speaker finishing.")
@bus_options
def say(text: str, timeout: float, source: SettingsSource) -> None:
    """Make the speaker say TEXT; returns when it has been spoken."""
    settings = source.load()
    turn = new_turn_id()
    with make_client(settings, "say") as client:
        client.subscribe("metrics.turn")
        client.announce()
        client.publish(Say(text=text), turn=turn)
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            env = client.recv(timeout=remaining)
            if env is not None and env.turn == turn and isinstance(env.body, TurnMetrics):
                return
    click.echo(f"the speaker did not finish within {timeout:.0f} s (is one running on {settings.bus.url}?)", err=True)
    sys.exit(1)
