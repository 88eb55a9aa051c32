"""Worker names → classes, imported only when that worker starts.

``voicebus worker NAME`` also accepts ``package.module:Class`` for a worker of
your own: any ``Actor`` subclass taking ``(client, settings)``.
"""

from __future__ import annotations

import importlib

from voicebus.engine.actor import Actor
from voicebus.engine.errors import ConfigError

WORKERS = {
    "listener": "voicebus.workers.listener:Listener",
    "thinker": "voicebus.workers.thinker:Thinker",
    "speaker": "voicebus.workers.speaker:Speaker",
}


def worker_class(name: str) -> type[Actor]:
    target = WORKERS.get(name, name)
    module_name, _, class_name = target.partition(":")
    if not class_name:
        raise ConfigError(f"unknown worker {name!r}: use one of {', '.join(WORKERS)} or package.module:Class")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load worker {target}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Actor)):
        raise ConfigError(f"{target} is not an Actor class")
    return cls
