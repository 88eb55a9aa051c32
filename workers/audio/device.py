"""Finding a sound device through sounddevice/PortAudio, with one-line errors.

sounddevice is imported lazily: on a headless host without the PortAudio
library the import itself fails with OSError, and file-only runs must not care.
Every failure here becomes an AudioError saying what is wrong and what to do.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

from voicebus.engine.errors import AudioError

Kind = Literal["input", "output"]

_ALTERNATIVE = {"input": "use --input FILE.wav", "output": "use --output FILE.wav (or --output none)"}
_NO_PORTAUDIO = "PortAudio library not found; install libportaudio2 (apt-get install libportaudio2)"


def import_sounddevice() -> ModuleType:
    """Import sounddevice, turning a missing library or package into AudioError."""
    try:
        return importlib.import_module("sounddevice")
    except OSError:  # the Python package is there but libportaudio is not
        raise AudioError(_NO_PORTAUDIO) from None
    except ImportError:
        raise AudioError("the 'sounddevice' package is not installed; pip install sounddevice") from None


@dataclass(frozen=True)
class DeviceChoice:
    """A device and the rate to open it at."""

    index: int
    """PortAudio device index."""
    name: str
    """Human-readable device name (for messages)."""
    rate: int
    """Hertz to open the stream at: the wanted rate when supported, else the device's default."""


def parse_device(device: str | int | None) -> str | int | None:
    """Turn a device given on the command line ("3", "USB Mic", "") into what sounddevice takes."""
    if isinstance(device, str):
        device = device.strip()
        if not device:
            return None
        if device.isdigit():
            return int(device)
    return device


def choose_device(sd: ModuleType, kind: Kind, device: str | int | None, rate: int) -> DeviceChoice:
    """Resolve ``device`` (None = the system default) for mono int16 ``kind`` audio at ``rate``.

    If the device cannot run at ``rate``, its default rate is chosen and the
    caller resamples. Raises AudioError when there is no such device.
    """
    device = parse_device(device)
    what = f"{kind} device"
    try:
        info = sd.query_devices(device, kind)
    except (ValueError, sd.PortAudioError) as exc:
        if device is None:
            raise AudioError(f"no {what} found; {_ALTERNATIVE[kind]}") from None
        raise AudioError(
            f"{what} {device!r} not found ({exc}); list devices with 'python -m sounddevice', "
            f"or {_ALTERNATIVE[kind]}"
        ) from None
    index, name = int(info["index"]), str(info["name"])
    for candidate in (rate, int(info["default_samplerate"])):
        if _supports(sd, kind, index, candidate):
            return DeviceChoice(index, name, candidate)
    raise AudioError(f"{what} {name!r} accepts neither {rate} Hz nor its default rate as mono int16; "
                     f"choose another device or {_ALTERNATIVE[kind]}")


def _supports(sd: ModuleType, kind: Kind, index: int, rate: int) -> bool:
    check = sd.check_input_settings if kind == "input" else sd.check_output_settings
    try:
        check(device=index, channels=1, dtype="int16", samplerate=rate)
    except (ValueError, sd.PortAudioError):
        return False
    return True


def open_failed(kind: Kind, choice: DeviceChoice, exc: BaseException) -> AudioError:
    """The error for a device that was found but would not open or stopped working."""
    return AudioError(f"{kind} device {choice.name!r} failed: {exc}; {_ALTERNATIVE[kind]}")
