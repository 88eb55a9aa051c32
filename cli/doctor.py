"""``voicebus doctor``: is everything the configured backends need present, and does the local model run?"""

from __future__ import annotations

import sys

import click

from voicebus.cli.common import SettingsSource, bus_options
from voicebus.workers.doctor import run_checks
from voicebus.workers.llm.probe import GenerationProbe


@click.command()
@click.pass_context
@click.option("--asr", metavar="NAME", help="Check this speech recognition backend instead of the configured one.")
@click.option("--llm", metavar="NAME", help="Check this chat backend instead of the configured one.")
@click.option("--tts", metavar="NAME", help="Check this voice backend instead of the configured one.")
@bus_options
def doctor(ctx: click.Context, asr: str | None, llm: str | None, tts: str | None, source: SettingsSource) -> None:
    """For each configured backend: package installed, settings present, model found, service answering.

    The local chat model also runs a short generation in a child process, so a
    llama.cpp that crashes on this CPU is reported, not fatal.
    """
    settings = source.load(asr__backend=asr, llm__backend=llm, tts__backend=tts)
    # A caller may hand in the test generation's probe as click's context object
    # (the tests do, to point it at a child that crashes); by default it is the real one.
    probe = ctx.find_object(GenerationProbe)
    failed = False
    for check in run_checks(settings, llm_probe=probe):
        mark = click.style("ok  ", fg="green") if check.ok else click.style("FAIL", fg="red")
        click.echo(f"{mark} {check.stage:<5} {check.what:<10} {check.detail}")
        failed |= not check.ok
    sys.exit(1 if failed else 0)
