"""llama.cpp chat with SmolLM2-135M-Instruct: real model, real tokens."""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from voicebus.engine.errors import BackendError, ConfigError, ModelError
from voicebus.workers.llm.local import LocalChat
from voicebus.workers.llm.models import find_smollm2_gguf

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]


@pytest.fixture(scope="session")
def chat() -> Iterator[LocalChat]:
    backend = LocalChat(seed=1)
    yield backend
    backend.close()


def drain(gen: Generator[str, None, str]) -> tuple[list[str], str]:
    """All pieces of a stream and the finish reason it returned."""
    pieces: list[str] = []
    while True:
        try:
            pieces.append(next(gen))
        except StopIteration as stop:
            return pieces, stop.value


def test_find_smollm2_gguf_finds_the_packaged_file() -> None:
    path = find_smollm2_gguf()
    assert path.suffix == ".gguf" and path.is_file()
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"


def test_answer_streams_in_several_pieces(chat: LocalChat) -> None:
    started = time.perf_counter()
    gen = chat.stream(QUESTION, max_tokens=64, cancel=threading.Event())
    first = next(gen)
    first_latency = time.perf_counter() - started
    rest, finish = drain(gen)
    elapsed = time.perf_counter() - started
    answer = first + "".join(rest)
    tokens = chat.count_tokens(answer)
    print(f"\nllama first piece {first_latency * 1000:.0f} ms, {tokens} tokens in {elapsed:.2f} s: {answer!r}")
    assert len(rest) >= 3
    assert finish in ("stop", "length")
    assert len(answer.split()) >= 3 and tokens >= 4


def test_max_tokens_is_respected(chat: LocalChat) -> None:
    pieces, finish = drain(chat.stream(STORY, max_tokens=8, cancel=threading.Event()))
    assert finish == "length"
    assert 1 <= chat.count_tokens("".join(pieces)) <= 9


def test_cancel_after_first_piece_stops_at_once(chat: LocalChat) -> None:
    drain(chat.stream(STORY, max_tokens=1, cancel=threading.Event()))
    one_token_run = chat._llm.n_tokens  # the templated prompt plus a token
    cancel = threading.Event()
    gen = chat.stream(STORY, max_tokens=200, cancel=cancel)
    next(gen)
    cancel.set()
    more, finish = drain(gen)
    assert finish == "cancelled"
    assert len(more) <= 1
    # llama's own count of evaluated tokens proves the model stopped computing,
    # not just that we stopped reading.
    assert chat._llm.n_tokens <= one_token_run + 2


def test_cancel_before_start_yields_nothing(chat: LocalChat) -> None:
    cancel = threading.Event()
    cancel.set()
    assert drain(chat.stream(QUESTION, max_tokens=32, cancel=cancel)) == ([], "cancelled")


def test_abandoned_stream_does_not_disturb_the_next(chat: LocalChat) -> None:
    clean, _ = drain(chat.stream(QUESTION, max_tokens=32, cancel=threading.Event()))
    gen = chat.stream(STORY, max_tokens=100, cancel=threading.Event())
    next(gen)
    gen.close()
    after, finish = drain(chat.stream(QUESTION, max_tokens=32, cancel=threading.Event()))
    assert finish in ("stop", "length")
    assert "".join(after) == "".join(clean)


def test_new_stream_supersedes_an_unfinished_one(chat: LocalChat) -> None:
    old = chat.stream(STORY, max_tokens=100, cancel=threading.Event())
    next(old)
    pieces, finish = drain(chat.stream(QUESTION, max_tokens=16, cancel=threading.Event()))
    assert pieces and finish in ("stop", "length")
    assert drain(old) == ([], "cancelled")


def test_same_seed_gives_the_same_answer(chat: LocalChat) -> None:
    first, _ = drain(chat.stream(QUESTION, max_tokens=24, cancel=threading.Event()))
    second, _ = drain(chat.stream(QUESTION, max_tokens=24, cancel=threading.Event()))
    assert "".join(first) == "".join(second)


def test_count_tokens(chat: LocalChat) -> None:
    assert chat.count_tokens("") == 0
    assert 0 < chat.count_tokens("Hello world") < chat.count_tokens("Hello world, how are you today?")
    assert chat.context_tokens == 2048


def test_prompt_larger_than_context_is_a_backend_error() -> None:
    small = LocalChat(context_tokens=64)
    try:
        long_prompt = [{"role": "user", "content": "word " * 200}]
        with pytest.raises(BackendError):
            drain(small.stream(long_prompt, max_tokens=8, cancel=threading.Event()))
    finally:
        small.close()


def test_load_prints_nothing(capfd: pytest.CaptureFixture[str]) -> None:
    LocalChat().close()
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


def test_missing_model_is_a_model_error_naming_the_path(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="absent.gguf"):
        LocalChat(tmp_path / "absent.gguf")


def test_garbage_gguf_is_a_model_error_not_a_crash(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"\x00\x01not a gguf file at all" * 512)
    with pytest.raises(ModelError, match="garbage.gguf"):
        LocalChat(garbage)
    _, err = capfd.readouterr()
    assert err == "", "llama.cpp's complaints belong in logging, not on stderr"


def test_truncated_gguf_is_a_model_error(tmp_path: Path) -> None:
    real = find_smollm2_gguf().read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(real[: len(real) // 3])
    with pytest.raises(ModelError, match="truncated.gguf"):
        LocalChat(truncated)


def test_closed_model_refuses_work() -> None:
    backend = LocalChat()
    backend.close()
    with pytest.raises(BackendError, match="closed"):
        backend.count_tokens("hi")
