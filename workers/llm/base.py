"""The chat interface every LLM backend implements.

``stream`` is a generator: it yields text pieces as the model produces them and
*returns* the finish reason (``"stop"``, ``"length"``, ``"cancelled"``,
``"content_filter"``). It checks ``cancel`` between pieces so an interrupt stops
generation within one token. ``prefix`` is the beginning of the answer that was
already delivered (a thinker resuming a turn after a crash): the stream yields
what comes after it. Failures raise ``voicebus.engine.errors.BackendError``
(``transient=True`` where a retry may help).
"""

from __future__ import annotations

import threading
from collections.abc import Generator
from typing import Protocol

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": "..."}


class ChatBackend(Protocol):
    name: str
    context_tokens: int
    """How many tokens the model's context holds (prompt + answer)."""
    message_tokens: int
    """Tokens each message of a prompt costs beyond its text (the chat template's role markers); rounded up,
    so that a prompt budgeted with it fits."""

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` takes in this model (an estimate is fine for remote models)."""

    def stream(
        self, messages: list[Message], *, max_tokens: int, cancel: threading.Event, prefix: str = ""
    ) -> Generator[str, None, str]:
        """Yield the answer's text pieces; return the finish reason."""

    def close(self) -> None:
        """Release the model/connection."""
