"""What every command shares: settings from file/env/flags, bus options, the error boundary."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from voicebus.engine import __version__
from voicebus.engine.bus import Endpoints
from voicebus.engine.client import BusClient
from voicebus.engine.errors import VoicebusError
from voicebus.engine.security import Security
from voicebus.engine.settings import expand, load
from voicebus.workers.config import Settings


class VoicebusGroup(click.Group):
    """The one error boundary: a VoicebusError becomes ``Name: message`` and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except VoicebusError as exc:
            click.echo(f"{type(exc).__name__}: {exc}", err=True)
            ctx.exit(1)
        except BrokenPipeError:
            # The reader went away (`voicebus show FILE | head`): nothing to say. Python's own advice:
            # point stdout at devnull, or flushing it on the way out raises again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(1)
        except ConnectionError as exc:
            click.echo(f"ConnectionError: {exc}", err=True)
            ctx.exit(1)


@dataclass(frozen=True)
class SettingsSource:
    """Where a command's settings come from; ``load`` adds the command's own flags on top."""

    config_file: Path | None
    flags: dict[str, Any]

    def load(self, **overrides: Any) -> Settings:
        """``overrides`` are keyed like "asr__backend" (section__field); None means not given."""
        merged = dict(self.flags)
        # A command's own flag left unset must not hide the shared one (``bus --bind`` vs ``--bus``).
        merged.update({key.replace("__", "."): value for key, value in overrides.items() if value is not None})
        return load(Settings, config_file=self.config_file, overrides=merged)


def bus_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--bus, --insecure, --keys and --config, passed to the command as ``source``."""

    @click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
                  help="TOML settings file (also VOICEBUS_CONFIG).")
    @click.option("--bus", "bus_url", metavar="ipc:///FOLDER|tcp://HOST:PORT",
                  help="The bus: a private folder, or TCP (publish port; subscribe is PORT+1). Default: "
                       "ipc://$XDG_RUNTIME_DIR/voicebus (else ipc:///tmp/voicebus-UID), or VOICEBUS_BUS_URL.")
    @click.option("--insecure", is_flag=True, default=None,
                  help="Allow a TCP bus without CurveZMQ keys: anyone who can reach it (on loopback, any local "
                       "user) can listen and inject.")
    @click.option("--keys", "keys_dir", type=click.Path(file_okay=False, path_type=Path),
                  help="CurveZMQ keys folder (default ~/.config/voicebus/keys).")
    @functools.wraps(fn)
    def wrapper(*args: Any, config_file: Path | None, bus_url: str | None, insecure: bool | None,
                keys_dir: Path | None, **kwargs: Any) -> Any:
        flags = {"bus.url": bus_url, "bus.security": "insecure" if insecure else None, "bus.keys_dir": keys_dir}
        kwargs["source"] = SettingsSource(config_file, flags)
        return fn(*args, **kwargs)

    return wrapper


def endpoints(settings: Settings) -> Endpoints:
    return Endpoints.parse(settings.bus.url)


def security(settings: Settings) -> Security:
    return Security.resolve(endpoints(settings), keys_dir=expand(settings.bus.keys_dir), mode=settings.bus.security)


def make_client(settings: Settings, name: str) -> BusClient:
    import voicebus.workers.kinds  # noqa: F401  (typed bodies for the voice kinds)

    return BusClient(
        endpoints(settings), security(settings), name=name, session=settings.state.session,
        max_bytes=settings.bus.max_message_bytes, version=__version__,
    )


def fail(message: str) -> None:
    click.echo(message, err=True)
    sys.exit(1)
