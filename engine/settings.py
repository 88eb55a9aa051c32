"""Settings: frozen dataclasses filled once at the entry point.

A settings tree is a dataclass whose fields are *sections* (dataclasses of
plain values). Each value comes from, lowest priority first:

    the field's default < the TOML config file ([section] key = value)
    < environment (VOICEBUS_SECTION_KEY, or a field's classic names such as SPEECH_KEY)
    < command-line flags (``overrides``, keyed "section.key")

A supervisor hands its resolved tree to its children whole (``to_env``), so
every worker of one ``voicebus up`` sees exactly the same settings.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from voicebus.engine.endpoints import default_url
from voicebus.engine.errors import ConfigError
from voicebus.engine.messages import MAX_MESSAGE_BYTES

T = TypeVar("T")
RESOLVED_ENV = "VOICEBUS_SETTINGS_JSON"
CONFIG_ENV = "VOICEBUS_CONFIG"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_names(*names: str) -> dict[str, Any]:
    """Field metadata: extra environment variables that set this field (classic names)."""
    return {"env": names}


def secret() -> dict[str, Any]:
    """Field metadata: a value never printed (keys, tokens)."""
    return {"secret": True}


@dataclass(frozen=True)
class BusSettings:
    url: str = field(default_factory=default_url)
    """ipc:///FOLDER (default: a private folder, $XDG_RUNTIME_DIR/voicebus or /tmp/voicebus-UID)
    or tcp://HOST:PORT (publish port; subscribe is PORT+1)"""
    security: str = "auto"
    """auto (none in a private folder, CurveZMQ on TCP) | curve | insecure (TCP without keys: open to all who reach it)"""
    keys_dir: Path = Path("~/.config/voicebus/keys")
    max_message_bytes: int = MAX_MESSAGE_BYTES


@dataclass(frozen=True)
class SupervisorSettings:
    heartbeat_timeout_s: float = 3.0
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 5.0
    max_restarts: int = 5
    restart_window_s: float = 60.0
    stable_after_s: float = 30.0
    """a worker up this long has its backoff reset"""
    stop_timeout_s: float = 4.0
    """ctl.shutdown → SIGTERM → SIGKILL all within this"""


def load(
    cls: type[T],
    *,
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> T:
    """Build the settings tree ``cls`` from defaults, file, environment and flags."""
    env = os.environ if env is None else env
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if RESOLVED_ENV in env and config_file is None:
        # A supervisor's child: its settings arrive resolved; only explicit flags go on top.
        return _apply(from_json(cls, env[RESOLVED_ENV]), overrides)
    if config_file is None and env.get(CONFIG_ENV):
        config_file = Path(env[CONFIG_ENV])
    file_values = _read_toml(config_file) if config_file else {}
    unknown_sections = set(file_values) - {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if unknown_sections:
        raise ConfigError(f"{config_file}: unknown section(s) {', '.join(sorted(unknown_sections))}")
    sections = {}
    for sec in dataclasses.fields(cls):  # type: ignore[arg-type]
        sec_cls = _hints(cls)[sec.name]
        from_file = file_values.get(sec.name, {})
        if not isinstance(from_file, dict):
            raise ConfigError(f"{config_file}: [{sec.name}] must be a table")
        sections[sec.name] = _load_section(sec.name, sec_cls, from_file, env, overrides, config_file)
    return cls(**sections)


def _apply(settings: T, overrides: Mapping[str, Any]) -> T:
    """``settings`` with "section.key" values replaced (converted like flags)."""
    for key, value in overrides.items():
        section_name, _, name = key.partition(".")
        section = getattr(settings, section_name)
        hint = _hints(type(section))[name]
        section = dataclasses.replace(section, **{name: _convert(value, hint, f"--{name.replace('_', '-')}")})
        settings = dataclasses.replace(settings, **{section_name: section})  # type: ignore[type-var]
    return settings


def _load_section(name, sec_cls, from_file, env, overrides, config_file):
    known = {f.name for f in dataclasses.fields(sec_cls)}
    unknown = set(from_file) - known
    if unknown:
        raise ConfigError(f"{config_file}: unknown setting(s) {', '.join(f'{name}.{k}' for k in sorted(unknown))}")
    hints = _hints(sec_cls)
    values = {}
    for f in dataclasses.fields(sec_cls):
        key = f"{name}.{f.name}"
        if key in overrides:
            values[f.name] = _convert(overrides[key], hints[f.name], f"--{f.name.replace('_', '-')}")
            continue
        for var in (f"VOICEBUS_{name}_{f.name}".upper(), *f.metadata.get("env", ())):
            if var in env:
                values[f.name] = _convert(env[var], hints[f.name], var)
                break
        else:
            if f.name in from_file:
                values[f.name] = _convert(from_file[f.name], hints[f.name], f"{config_file}: {key}")
    return sec_cls(**values)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path.expanduser(), "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except (tomllib.TOMLDecodeError, OSError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(value: Any, hint: Any, source: str) -> Any:
    """Turn a file/env/flag value into the field's type, or ConfigError naming the source."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or value == "":
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], source)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError(f"{value!r} is not a yes/no value")
        if hint is int and not isinstance(value, bool):
            return int(value)
        if hint is float and not isinstance(value, bool):
            return float(value)
        if hint is str:
            if not isinstance(value, (str, int, float)):
                raise ValueError(f"{value!r} is not text")
            return str(value)
        if hint is Path:
            return Path(str(value))
        if origin is tuple:
            items = [s.strip() for s in value.split(",")] if isinstance(value, str) else list(value)
            return tuple(str(i) for i in items if i != "")
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    raise ConfigError(f"{source}: cannot read a {hint} setting")


def to_json(settings: Any) -> str:
    """The resolved tree as JSON, for child processes."""

    def plain(obj: Any) -> Any:
        if isinstance(obj, Path):
            return str(obj)
        if isinstance(obj, tuple):
            return list(obj)
        return obj

    tree = {
        sec.name: {k: plain(v) for k, v in dataclasses.asdict(getattr(settings, sec.name)).items()}
        for sec in dataclasses.fields(settings)
    }
    return json.dumps(tree)


def from_json(cls: type[T], text: str) -> T:
    try:
        tree = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{RESOLVED_ENV} is not valid JSON: {exc}") from None
    hints = _hints(cls)
    sections = {}
    for sec in dataclasses.fields(cls):  # type: ignore[arg-type]
        sec_cls = hints[sec.name]
        sec_hints = _hints(sec_cls)
        raw = tree.get(sec.name, {})
        sections[sec.name] = sec_cls(
            **{k: _convert(v, sec_hints[k], f"{RESOLVED_ENV} {sec.name}.{k}") for k, v in raw.items() if k in sec_hints}
        )
    return cls(**sections)


def to_env(settings: Any) -> dict[str, str]:
    return {RESOLVED_ENV: to_json(settings)}


def describe(settings: Any) -> list[tuple[str, str]]:
    """(key, value) pairs for display, secrets masked."""
    rows = []
    for sec in dataclasses.fields(settings):
        section = getattr(settings, sec.name)
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if f.metadata.get("secret") and value:
                value = "***"
            rows.append((f"{sec.name}.{f.name}", str(value)))
    return rows


def expand(path: Path) -> Path:
    return Path(os.path.expandvars(str(path))).expanduser()


__all__ = [
    "BusSettings", "SupervisorSettings", "load", "to_env", "from_json", "to_json", "describe",
    "env_names", "secret", "expand",
]
