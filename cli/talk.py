"""``voicebus ask`` and ``voicebus say``: talk to a running voicebus as a client."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import click

from voicebus.cli.common import SettingsSource, bus_options, make_client
from voicebus.engine.client import BusClient
from voicebus.engine.messages import new_turn_id
from voicebus.workers.kinds import Ask, LlmAccepted, LlmDone, LlmError, LlmResend, LlmSentence, Say, TurnMetrics
from voicebus.workers.redelivery import Redelivery
from voicebus.workers.sentences import ends_mid_sentence


ANSWER = ("llm.accepted", "llm.sentence", "llm.done", "llm.error")
"""The kinds ``ask`` reads."""
ANSWERED = ("stop", "length", "stop_phrase")
"""The ``llm.done`` finish reasons of a whole answer: ``ask`` exits 0 on these."""


def exchange(client: BusClient, text: str, turn: int, timeout: float) -> Iterator[LlmAccepted | str | LlmError | LlmDone]:
    """The asker's side of one text turn on ``client`` (subscribed to ``ANSWER``).

    Offers the question until the thinker accepts it, and again whenever the turn
    goes quiet (``Redelivery``); yields what comes back: acceptances with a note,
    the answer's sentences as text, in order and each once (replays repeat some),
    errors, and last the ``llm.done``, once every sentence it counts was yielded
    (missing ones are asked for again with ``llm.resend``). Ends without an
    ``llm.done`` when none came within ``timeout`` seconds.
    """
    body = Ask(text=text)
    redelivery = Redelivery()
    sentences: dict[int, str] = {}
    shown = 0
    client.publish(body, turn=turn)
    redelivery.sent(turn, body, time.monotonic())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for again, repeat in redelivery.due(time.monotonic()):
            client.publish(repeat, turn=again)
        env = client.recv(timeout=0.2)
        if env is None or env.turn != turn:
            continue
        redelivery.heard(turn, env.kind, time.monotonic())
        reply = env.body
        if isinstance(reply, LlmAccepted) and reply.note:
            yield reply
        elif isinstance(reply, LlmSentence):
            sentences.setdefault(reply.index, reply.text)
            while shown in sentences:
                yield sentences[shown]
                shown += 1
        elif isinstance(reply, LlmError):
            yield reply
        elif isinstance(reply, LlmDone):
            if shown < reply.sentences:  # some went missing: ask for them again
                client.publish(LlmResend(from_index=shown), turn=turn)
                continue
            yield reply
            return


def _outcome(done: LlmDone, *, error_shown: bool) -> int:
    """The exit code for how the answer ended; anything but a whole answer says why, on stderr."""
    if done.finish_reason in ANSWERED:
        return 0
    if done.finish_reason == "cancelled":
        click.echo(f"answer interrupted: {done.reason or 'cancelled'}", err=True)
    elif not (done.finish_reason == "error" and error_shown):  # an llm.error already said why
        click.echo(f"no answer: {done.finish_reason}{': ' + done.reason if done.reason else ''}", err=True)
    return 1


def checked_text(text: str) -> str:
    """TEXT as given, or a one-line refusal: nothing to say, or bytes that are not UTF-8.

    A shell passes undecodable bytes through as lone surrogates, which no message can carry.
    """
    if not text.strip():
        raise click.ClickException("the text is empty: nothing to send")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise click.ClickException("the text is not valid UTF-8 (is the terminal's encoding UTF-8?)") from None
    return text


@click.command()
@click.argument("text")
@click.option("--timeout", type=click.FloatRange(min=1), default=120, show_default=True,
              help="Give up after S seconds without the end of the answer.")
@bus_options
def ask(text: str, timeout: float, source: SettingsSource) -> None:
    """Ask TEXT as if the user had said it; print the answer as it streams."""
    text = checked_text(text)
    settings = source.load()
    notes: set[str] = set()
    error_shown = False
    line = ""  # a first clause, printed with the rest of its sentence (workers/sentences.py)
    with make_client(settings, "ask") as client:
        # What it handles, not all of llm.: every token of every answer (and a flood of llm.token.*)
        # would pass through this queue, and could hold up the hello that proves the connection.
        client.subscribe(*ANSWER)
        client.announce()
        for reply in exchange(client, text, new_turn_id(), timeout):
            if isinstance(reply, str):
                line = f"{line} {reply}" if line else reply
                if not ends_mid_sentence(line):
                    click.echo(line)
                    line = ""
            elif isinstance(reply, LlmAccepted) and reply.note not in notes:
                notes.add(reply.note)
                click.echo(f"note: {reply.note}", err=True)
            elif isinstance(reply, LlmError):
                click.echo(f"answer failed: {reply.code}: {reply.message}", err=True)
                error_shown = True
            elif isinstance(reply, LlmDone):
                if line:
                    click.echo(line)
                sys.exit(_outcome(reply, error_shown=error_shown))
    if line:
        click.echo(line)
    click.echo(f"no complete answer within {timeout:.0f} s (is a thinker running on {settings.bus.url}?)", err=True)
    sys.exit(1)


@click.command()
@click.argument("text")
@click.option("--timeout", type=click.FloatRange(min=1), default=60, show_default=True,
              help="Give up after S seconds without the speaker finishing.")
@bus_options
def say(text: str, timeout: float, source: SettingsSource) -> None:
    """Make the speaker say TEXT; returns when it has been spoken."""
    text = checked_text(text)
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
