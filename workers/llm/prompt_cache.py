"""What the local chat model has read, kept on disk, so that the next start does not read it again.

The thinker's prompt is the system prompt and the conversation so far. A thinker
restarted mid-run, or a run that goes on with the conversation of earlier ones
(``voicebus up --continue``), had the model read all of it again before the next
answer: on 2 cores, 6.9 s from the end of speech to the first audio with 40
turns, 10.3 s with 150, against about 0.9 s with the context restored
(``scripts/bench_returning_user.py``). llama.cpp writes its
context (the tokens and their key/value cache) to a file and reads it back
(``llama_state_save_file`` / ``llama_state_load_file``): about 23 KB a token
for SmolLM2-135M, 27 MB for 1,178 tokens, written in tens of milliseconds.

A cache file belongs to one model file, context size, weight layout and
llama-cpp-python version (its name carries a digest of them): the cached
values are only right for the weights that made them. Within that, it is
right for any prompt, since it is used only as far as its tokens match the
new prompt's (llama-cpp-python's own prefix matching); another session's
cache is merely of little use. Files are written atomically, and best effort:
a failure costs the next start its time, not its answer.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llama_cpp import Llama

SUFFIX = ".llama-state"
DIGEST = 16
"""hex digits of the identity digest in a cache file's name"""
STALE_WRITE_S = 600
"""a temporary file this old is a write that a kill cut short (a write takes well under a second)"""
_log = logging.getLogger(__name__)


def cache_file(folder: Path, model_path: Path, context_tokens: int, layout: str) -> Path:
    """Where the cache of ``model_path`` read with ``context_tokens`` and weight ``layout`` lives in ``folder``."""
    import llama_cpp

    stat = model_path.stat()
    # A model replaced in place keeps none of these (a copy that preserves the size and mtime gets a new
    # inode and ctime); llama.cpp itself only checks that the shapes fit.
    identity = "\0".join(map(str, (model_path.resolve(), stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns,
                                    context_tokens, layout, llama_cpp.__version__)))
    return folder / f"{model_path.stem}-{hashlib.sha256(identity.encode()).hexdigest()[:DIGEST]}{SUFFIX}"


def restore(llm: Llama, path: Path) -> int:
    """Load the context kept in ``path`` into ``llm`` (which has read nothing yet); return its token count.

    0 when there is none or it does not load (another llama.cpp, a cut file):
    the model then reads its prompt as if there had been no cache.
    """
    import llama_cpp

    try:
        if not path.is_file() or llm.n_tokens:
            return 0
    except OSError as exc:  # a folder this user cannot read: as if there were no cache
        _log.warning("ignored the chat model's cache %s: %s", path, exc)
        return 0
    capacity = llm.n_ctx()
    tokens = (llama_cpp.llama_token * capacity)()
    count = ctypes.c_size_t(0)
    if not llama_cpp.llama_state_load_file(llm.ctx, os.fsencode(path), tokens, capacity, ctypes.byref(count)):
        _log.warning("ignored the chat model's cache %s: llama.cpp could not load it", path)
        llm.reset()
        return 0
    # What Llama.load_state does after setting a context (llama-cpp-python 0.3.36), for a state read from a
    # file: the tokens it holds, and that the next completion must evaluate before it samples.
    n = count.value
    llm.input_ids[:n] = tokens[:n]
    llm.n_tokens = n
    llm._requires_eval = True  # noqa: SLF001 - no public way to mark a restored context
    return n


def save(llm: Llama, path: Path) -> bool:
    """Write what ``llm`` has read to ``path`` (atomically); remove the caches of other versions of its model."""
    import llama_cpp

    n = llm.n_tokens
    if not n:
        return False
    tokens = (llama_cpp.llama_token * n)(*llm.input_ids[:n].tolist())
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not llama_cpp.llama_state_save_file(llm.ctx, os.fsencode(temporary), tokens, n):
            raise OSError(f"llama.cpp could not write {temporary}")
        os.chmod(temporary, 0o600)  # it holds the conversation, as the history does
        os.replace(temporary, path)
    except OSError as exc:
        _log.warning("could not keep the chat model's cache: %s", exc)
        temporary.unlink(missing_ok=True)
        return False
    _sweep(path)
    return True


def _sweep(kept: Path) -> None:
    """Remove the caches of other versions of ``kept``'s model, and writes a kill cut short long ago."""
    stem = glob.escape(kept.name[: -len(SUFFIX) - DIGEST - 1])
    stale = [other for other in kept.parent.glob(f"{stem}-*{SUFFIX}")
             if other != kept and len(other.name) == len(kept.name)]
    for temporary in kept.parent.glob(f".{stem}-*{SUFFIX}.*.tmp"):
        try:
            if time.time() - temporary.stat().st_mtime > STALE_WRITE_S:
                stale.append(temporary)
        except OSError:
            pass  # another run's, just finished or removed
    for path in stale:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:  # not ours to remove, or not a file: it costs disk space, nothing else
            _log.warning("could not remove an old cache of the chat model: %s", exc)
