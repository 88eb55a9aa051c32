"""``voicebus tap``: watch the live bus."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from typing import Any

import click

from voicebus.cli.common import SettingsSource, bus_options, make_client
from voicebus.engine.client import SequenceTracker
from voicebus.engine.messages import Body, Envelope

COLORS = {"sys": "bright_black", "sup": "magenta", "ctl": "red", "audio": "bright_black", "vad": "yellow",
          "asr": "green", "llm": "cyan", "play": "blue", "metrics": "bright_white"}
TEXT_LIMIT = 80


def plain_body(env: Envelope) -> dict[str, Any]:
    return env.body.to_dict() if isinstance(env.body, Body) else dict(env.body)


def summarize(env: Envelope) -> str:
    """A short human reading of a body; audio as its duration, never dumped."""
    body = plain_body(env)
    if "pcm" in body and isinstance(body["pcm"], bytes):
        rate = body.get("rate") or 16000
        frame = (body.get("width") or 2) * (body.get("channels") or 1)
        body["pcm"] = f"<{len(body['pcm']) / frame / rate * 1000:.0f} ms audio>"
    parts = []
    for key, value in body.items():
        if isinstance(value, bytes):
            value = f"<{len(value)} bytes>"
        elif isinstance(value, str) and len(value) > TEXT_LIMIT:
            value = value[: TEXT_LIMIT - 1] + "…"
        elif isinstance(value, float):
            value = round(value, 3)
        if isinstance(value, dict) and key == "counters":
            continue
        parts.append(f"{key}={value!r}" if isinstance(value, str) and " " in value else f"{key}={value}")
    return " ".join(parts)


def line(env: Envelope) -> str:
    """One message as a line: its wall-clock time, sender, kind (coloured by family), turn and body."""
    when = datetime.fromtimestamp(env.ts).strftime("%H:%M:%S.%f")[:-3]
    kind = click.style(f"{env.kind:<14}", fg=COLORS.get(env.kind.split(".")[0]))
    turn = f" turn={env.turn}" if env.turn else ""
    return f"{when} {env.src:<28} {kind}{turn} {summarize(env)}"


def as_json(env: Envelope) -> str:
    def default(value: Any) -> Any:
        if isinstance(value, bytes):
            return {"bytes": len(value)}
        return str(value)

    record = {"ts": env.ts, "src": env.src, "seq": env.seq, "kind": env.kind, "session": env.session,
              "turn": env.turn, "body": plain_body(env)}
    return json.dumps(record, default=default, ensure_ascii=False)


HEARTBEAT = "sys.heartbeat"
ANNOUNCE_S = 10.0


class KindFilter:
    """Which kinds the tap shows. Filtering happens here, not in the subscription:

    a sender numbers all its messages in one sequence, so a tap subscribed to some
    kinds only would see gaps that are not loss. Receiving everything keeps the loss
    report exact under any filter, at the price of decoding what is not shown.
    Heartbeats (most of the traffic on an idle bus) are shown only when asked for:
    ``--heartbeats``, or a ``--kinds`` prefix that names them (``sys.``).
    """

    def __init__(self, prefixes: tuple[str, ...], heartbeats: bool) -> None:
        self.prefixes = prefixes
        self.heartbeats = heartbeats or any(HEARTBEAT.startswith(p) for p in prefixes)

    def __call__(self, kind: str) -> bool:
        if kind == HEARTBEAT and not self.heartbeats:
            return False
        return not self.prefixes or kind.startswith(self.prefixes)

    def describe(self) -> str:
        shown = ", ".join(self.prefixes) or "all kinds"
        return shown if self.heartbeats or self.prefixes else f"{shown} but {HEARTBEAT}; --heartbeats shows them"


@click.command()
@click.option("--kinds", "prefixes", multiple=True, metavar="PREFIX",
              help="Only kinds starting with PREFIX (repeatable), e.g. --kinds asr. --kinds llm.sentence")
@click.option("--heartbeats", is_flag=True, help="Show sys.heartbeat too (hidden unless a --kinds prefix names it).")
@click.option("--json", "json_lines", is_flag=True, help="One JSON object per line (bytes shown as their length).")
@click.option("--count", type=click.IntRange(min=1), help="Stop after N messages.")
@click.option("--timeout", type=click.FloatRange(min=0), help="Stop after S seconds (connecting included).")
@click.option("--color/--no-color", default=None, help="Colour the kinds (default: when writing to a terminal).")
@bus_options
def tap(prefixes: tuple[str, ...], heartbeats: bool, json_lines: bool, count: int | None, timeout: float | None,
        color: bool | None, source: SettingsSource) -> None:
    """Show every message on the bus, one line each, and report lost messages per sender."""
    settings = source.load()
    shown = KindFilter(prefixes, heartbeats)
    tracker = SequenceTracker()
    seen = 0
    deadline = None if timeout is None else time.monotonic() + timeout
    with make_client(settings, "tap") as client:
        client.subscribe("")  # everything: see KindFilter
        client.announce(timeout=ANNOUNCE_S if deadline is None else min(ANNOUNCE_S, deadline - time.monotonic()))
        click.echo(f"tapping {settings.bus.url} ({shown.describe()})", err=True)
        try:
            while count is None or seen < count:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                env = client.recv(timeout=0.5 if remaining is None else min(0.5, remaining))
                if env is None or (env.kind == "sys.hello" and env.src == client.src):
                    continue
                gap = tracker.see(env)
                if gap:
                    click.secho(f"!! {gap} message(s) from {env.src} lost before seq {env.seq}", fg="red", err=True)
                if not shown(env.kind):
                    continue
                seen += 1
                if json_lines:
                    click.echo(as_json(env))
                else:
                    click.echo(line(env), color=color)
        except KeyboardInterrupt:
            pass
        bad = client.counters["bad_frames"]
        lost = sum(tracker.lost.values())
        if lost or bad:
            click.echo(f"lost {lost} message(s) ({dict(tracker.lost)}); {bad} undecodable frame(s)", err=True)
    sys.stdout.flush()
