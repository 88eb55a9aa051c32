"""``voicebus keys``: CurveZMQ keys for a TCP bus (the default private-folder bus needs none)."""

from __future__ import annotations

from pathlib import Path

import click

from voicebus.engine.security import allow_key, init_keys
from voicebus.engine.settings import BusSettings, expand

DEFAULT_KEYS = BusSettings().keys_dir


@click.group()
def keys() -> None:
    """Create and authorise CurveZMQ keys (needed for a TCP bus; the default local bus needs none)."""


@keys.command("init")
@click.option("--keys", "keys_dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_KEYS,
              show_default=True, help="Keys folder.")
@click.option("--force", is_flag=True, help="Replace existing keys (clients must get the new ones).")
def init(keys_dir: Path, force: bool) -> None:
    """Write a bus keypair and a client keypair, and allow that client.

    Copy client.key, client.key_secret and bus.key to each worker host's keys folder.
    """
    for path in init_keys(expand(keys_dir), force=force):
        click.echo(f"wrote {path}")


@keys.command("allow")
@click.argument("public_key", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--keys", "keys_dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_KEYS,
              show_default=True, help="Keys folder of the bus.")
def allow(public_key: Path, keys_dir: Path) -> None:
    """Authorise a client's public key file (a running bus picks it up within a second)."""
    click.echo(f"allowed {allow_key(expand(keys_dir), public_key)}")
