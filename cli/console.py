"""What ``voicebus up`` shows: the conversation on stdout, a live status line and logs on stderr."""

from __future__ import annotations

import shutil
import sys
from typing import TextIO

import click

from voicebus.engine.messages import Envelope, Error
from voicebus.engine.supervisor import ChildStatus
from voicebus.workers.kinds import Ask, AsrFinal, LlmError, PlayStart, TurnMetrics
from voicebus.workers.sentences import ends_mid_sentence

STATE_MARKS = {"ready": "●", "running": "●", "loading": "◐", "starting": "○", "restarting": "↻", "stopped": "■", "gave up": "✗"}
WATCH = ("asr.final", "ctl.ask", "play.start", "metrics.turn", "llm.error", "sys.error")


def latency_line(timings: dict[str, float]) -> str:
    """Where the wait went: speech end → first audio, split into its stages.

    The silence window (how long the VAD waits to be sure the user has finished)
    is shown apart: it is a setting, not processing time.
    """
    def ms(key: str) -> str:
        value = timings.get(key)
        return "–" if value is None else f"{value * 1000:.0f} ms"

    tail = f"first sentence {ms('first_sentence_s')} + first audio {ms('first_audio_s')}"
    if "speculation_saved_s" in timings:
        # The answer was prepared from a guess during the silence window: the stages overlapped.
        saved = f"; answer prepared during the silence window: {ms('speculation_saved_s')} saved"
        tail = f"final → first audio {ms('final_to_audio_s')}"
    else:
        saved = ""
    if "speech_end_to_audio_s" in timings:
        return (f"  [speech end → first audio {ms('speech_end_to_audio_s')} = silence window {ms('silence_s')}"
                f" + ASR {ms('asr_s')} + {tail}{saved}]")
    return f"  [request → first audio {ms('request_to_audio_s')} = {tail}{saved}]"


class ConsoleView:
    def __init__(self, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
        self.out = out
        self.err = err
        self.live = err.isatty()
        self._status = ""
        self._shown_status = ""
        self._heard: set[int] = set()
        self._clause_open: int | None = None  # the turn whose last piece said ended mid-sentence

    # --- supervisor.View --------------------------------------------------------------------

    def child_line(self, name: str, line: str) -> None:
        self._print(f"[{name}] {line}", err=True)

    def event(self, text: str) -> None:
        self._print(click.style(f"supervisor: {text}", fg="yellow"), err=True)

    def status(self, rows: list[ChildStatus]) -> None:
        parts = []
        for row in rows:
            restarts = f" ↻{row.restarts}" if row.restarts else ""
            pid = f" {row.pid}" if row.pid else ""
            parts.append(f"{STATE_MARKS.get(row.state, '?')} {row.name}{pid} {row.state}{restarts}")
        self._status = " │ ".join(parts)
        if self.live:
            self._draw_status()
        elif self._status != self._shown_status:
            # Not a terminal: a line per change, so logs stay readable.
            self._shown_status = self._status
            print(self._status, file=self.err, flush=True)

    def message(self, env: Envelope) -> None:
        body = env.body
        if isinstance(body, (AsrFinal, Ask)):
            if env.turn not in self._heard:  # senders repeat an utterance until it is accepted
                self._heard.add(env.turn)
                self._print(f"You: {body.text}")
        elif isinstance(body, PlayStart) and body.text:
            # the first piece of an answer may be a clause (workers/sentences.py): the rest goes under it
            label = " " * len("Assistant: ") if self._clause_open == env.turn else "Assistant: "
            self._clause_open = env.turn if ends_mid_sentence(body.text) else None
            self._print(label + body.text)
        elif isinstance(body, TurnMetrics):
            self._print(latency_line(body.timings))
        elif isinstance(body, LlmError):
            self._print(click.style(f"  [answer failed: {body.code}: {body.message}]", fg="red"))
        elif isinstance(body, Error):
            self._print(click.style(f"{env.src}: {body.where}: {body.message}", fg="red"), err=True)

    # --- drawing ----------------------------------------------------------------------------

    def _print(self, text: str, *, err: bool = False) -> None:
        if self.live:
            self.err.write("\r\x1b[2K")
        # click.echo drops the colour codes when that stream is not a terminal (a log file, a pipe).
        stream = self.err if err else self.out
        click.echo(text, file=stream)
        stream.flush()
        if self.live:
            self._draw_status()

    def _draw_status(self) -> None:
        width = shutil.get_terminal_size((100, 20)).columns
        self.err.write("\r\x1b[2K" + self._status[: width - 1])
        self.err.flush()

    def close(self) -> None:
        if self.live:
            self.err.write("\n")
            self.err.flush()
