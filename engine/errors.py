"""The voicebus error tree.

Every failure a user can cause or meet is one of these, so the CLI catches
``VoicebusError`` once, prints ``Name: message`` and exits 1 — no traceback.
Across a process boundary an error travels as a ``sys.error`` message carrying
``code`` and ``transient``.

    VoicebusError                 base; .code (machine readable), .transient
    ├── ConfigError               a setting is missing or invalid
    │   └── MissingExtraError     an optional package is not installed
    ├── AudioError                device missing, unreadable/broken audio file
    ├── ModelError                a model file is missing or fails to load
    ├── BackendError              a backend failed while working (may be transient)
    └── ProtocolError             a frame that is not a valid voicebus message
"""

from __future__ import annotations


class VoicebusError(Exception):
    """Base of every error voicebus reports to a user."""

    code = "error"
    transient = False

    def __init__(self, message: str, *, code: str | None = None, transient: bool | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        if transient is not None:
            self.transient = transient

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(VoicebusError):
    """A setting is missing or invalid; names what to set."""

    code = "config"


class MissingExtraError(ConfigError):
    """An optional package is missing; names the extra that installs it."""

    code = "missing_extra"

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the '{package}' package: pip install 'voicebus[{extra}]'"
        )
        self.package = package
        self.extra = extra


class AudioError(VoicebusError):
    """An audio device or file cannot be used."""

    code = "audio"


class ModelError(VoicebusError):
    """A model is missing or fails to load."""

    code = "model"


class BackendError(VoicebusError):
    """A backend failed while working; ``transient`` says whether a retry may help."""

    code = "backend"


class ProtocolError(VoicebusError):
    """A frame is not a valid voicebus message."""

    code = "protocol"


def require_module(module: str, *, package: str, extra: str, purpose: str):
    """Import an optional module or raise MissingExtraError naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(package, extra, purpose) from exc
