"""Pick a chat backend by name.

Each backend's module is imported only when it is opened, so a deployment that
talks to a remote endpoint never loads llama.cpp, and vice versa.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from voicebus.engine.errors import ConfigError
from voicebus.workers.llm.base import ChatBackend


def _local_class() -> Callable[..., ChatBackend]:
    from voicebus.workers.llm.local import LocalChat

    return LocalChat


_BACKENDS: dict[str, Callable[[], Callable[..., ChatBackend]]] = {
    "local": _local_class,
}


def known_chats() -> list[str]:
    """Names ``open_chat`` accepts."""
    return sorted(_BACKENDS)


def open_chat(name: str, **settings: Any) -> ChatBackend:
    """Open the chat backend ``name``, passing ``settings`` to its constructor.

    Raises ConfigError when ``name`` is unknown (listing the known ones) or a
    setting is not one the backend takes.
    """
    try:
        load_class = _BACKENDS[name]
    except KeyError:
        raise ConfigError(
            f"unknown LLM backend {name!r}; known: {', '.join(known_chats())}"
        ) from None
    backend_class = load_class()
    # Bind first, so a misspelt setting is a ConfigError rather than a TypeError
    # raised from somewhere inside the backend.
    try:
        inspect.signature(backend_class).bind(**settings)
    except TypeError as exc:
        raise ConfigError(f"bad settings for LLM backend {name!r}: {exc}") from None
    return backend_class(**settings)
