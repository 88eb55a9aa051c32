"""llama.cpp chat with SmolLM2-135M-Instruct: real model, real tokens.

llama.cpp runs in this process for most tests, so a build that crashes on this
CPU (a SIGSEGV in native code) would kill the whole pytest run. The model
therefore runs once in a child process first (``child_generation``): if that
dies by a signal, the test below fails with the signal's name and every
in-process test is skipped instead of crashing pytest.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from voicebus.engine.errors import BackendError, ConfigError, ModelError
from voicebus.engine.settings import load
from voicebus.workers.backends import open_chat
from voicebus.workers.config import Settings
from voicebus.workers.cores import half_the_cores
from voicebus.workers.llm.cpu import CpuReport, decide_repack, read_cpu_flags
from voicebus.workers.llm.local import LocalChat
from voicebus.workers.llm.models import find_smollm2_gguf
from voicebus.workers.llm.probe import GenerationProbe, ProbeResult

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]

EPYC = CpuReport(
    flags=frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"}),
    system_info="CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | REPACK = 1 | ",
)
SAPPHIRE_RAPIDS = CpuReport(
    flags=frozenset({"avx2", "avx512f", "avx512bw", "amx_tile", "amx_int8", "amx_bf16"}),
    system_info="CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 | REPACK = 1 | ",
)
AMX_BUILD_ONLY = CpuReport(flags=EPYC.flags, system_info="CPU : AVX2 = 1 | AMX_INT8 = 1 | ")
"""A build with the AMX path compiled in, on a CPU whose flags do not show it (a VM hiding it)."""


@pytest.fixture(scope="session")
def child_generation() -> ProbeResult:
    """A multi-token prompt and a short answer from the default model, in a child process, once."""
    return GenerationProbe().run(find_smollm2_gguf(), repack="auto", threads=half_the_cores())


@pytest.fixture(scope="session")
def in_process_llama(child_generation: ProbeResult) -> None:
    """Skips a test that would load llama.cpp here when it crashed in the child: one failure, not a dead run."""
    if child_generation.signal:
        pytest.skip(f"llama.cpp crashed in a child process ({child_generation.signal}); "
                    "see test_multi_token_generation_survives_in_a_child_process")


@pytest.fixture(scope="session")
def chat(in_process_llama: None) -> Iterator[LocalChat]:
    backend = LocalChat(seed=1)
    yield backend
    backend.close()


def test_multi_token_generation_survives_in_a_child_process(child_generation: ProbeResult) -> None:
    assert child_generation.ok, child_generation.detail


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


def test_a_long_conversation_s_prompt_still_fits_the_context(chat: LocalChat, tmp_path: Path) -> None:
    """Found while timing long conversations: the thinker budgeted 4 template tokens a message, SmolLM2's
    template costs 5 for a question and 6 for an answer, and after some 70 turns every prompt outgrew the
    context ("Requested tokens (2061) exceed context window of 2048"): each answer after that was an
    apology. The backend now measures what a message costs in its own template, and the thinker's window,
    budgeted with it, fits."""
    from voicebus.workers.llm.local import _chat_prompt
    from voicebus.workers.memory import Conversation

    max_tokens = 200  # the default llm.max_tokens: the thinker's budget leaves it to the answer
    largest, moved = 0, False
    with Conversation(tmp_path / "c.sqlite", system_prompt=Settings().llm.system_prompt) as conversation:
        for turn in range(1, 160):
            conversation.add_user(turn, f"What is {turn} plus {turn}?")
            messages = conversation.messages(chat.context_tokens - max_tokens, chat.count_tokens,
                                             per_message=chat.message_tokens, stable=True)
            used = len(_chat_prompt(chat._model(), messages)[1])
            largest, moved = max(largest, used), moved or messages[1]["content"] != "What is 1 plus 1?"
            assert used + max_tokens <= chat.context_tokens, (turn, used, chat.message_tokens)
            conversation.add_assistant(turn, f"{turn} plus {turn} is {2 * turn}.")
    assert moved and largest > chat.context_tokens - max_tokens - 300, "the conversation outgrew the window"


def test_prompt_larger_than_context_is_a_backend_error(in_process_llama: None) -> None:
    small = LocalChat(context_tokens=64)
    try:
        long_prompt = [{"role": "user", "content": "word " * 200}]
        with pytest.raises(BackendError):
            drain(small.stream(long_prompt, max_tokens=8, cancel=threading.Event()))
    finally:
        small.close()


def test_load_prints_nothing(in_process_llama: None, capfd: pytest.CaptureFixture[str]) -> None:
    LocalChat().close()
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


def test_missing_model_is_a_model_error_naming_the_path(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="absent.gguf"):
        LocalChat(tmp_path / "absent.gguf")


def test_garbage_gguf_is_a_model_error_not_a_crash(
    in_process_llama: None, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"\x00\x01not a gguf file at all" * 512)
    with pytest.raises(ModelError, match="garbage.gguf"):
        LocalChat(garbage)
    _, err = capfd.readouterr()
    assert err == "", "llama.cpp's complaints belong in logging, not on stderr"


def test_truncated_gguf_is_a_model_error(in_process_llama: None, tmp_path: Path) -> None:
    real = find_smollm2_gguf().read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(real[: len(real) // 3])
    with pytest.raises(ModelError, match="truncated.gguf"):
        LocalChat(truncated)


def test_closed_model_refuses_work(in_process_llama: None) -> None:
    backend = LocalChat()
    backend.close()
    with pytest.raises(BackendError, match="closed"):
        backend.count_tokens("hi")


# --- weight repacking (llm.repack) ------------------------------------------------------------


@pytest.mark.parametrize(("setting", "cpu", "expected"), [
    ("auto", EPYC, True),
    ("auto", SAPPHIRE_RAPIDS, False),
    ("auto", AMX_BUILD_ONLY, False),
    ("on", SAPPHIRE_RAPIDS, True),
    ("off", EPYC, False),
])
def test_repack_decision(setting: str, cpu: CpuReport, expected: bool) -> None:
    choice = decide_repack(setting, cpu)
    assert choice.use_extra_bufts is expected
    if setting == "auto" and not expected:
        assert "AMX" in choice.describe() and "20824" in choice.describe()


def test_unknown_repack_setting_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="llm.repack must be one of auto, on, off"):
        decide_repack("sometimes", EPYC)


def test_cpu_flags_come_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\n"
                       "flags\t\t: fpu sse2 avx avx2 avx512f avx512bw amx_bf16 amx_tile amx_int8\n\n"
                       "processor\t: 1\nflags\t\t: fpu\n")
    report = CpuReport(flags=read_cpu_flags(cpuinfo), system_info="")
    assert report.amx and report.features() == "AVX2 yes, AVX-512 yes, AMX yes"
    assert read_cpu_flags(tmp_path / "absent") == frozenset()
    assert CpuReport(frozenset(), "").features().startswith("CPU flags unknown")


def test_amx_cpu_loads_without_repacking_and_still_answers(in_process_llama: None) -> None:
    import llama_cpp.llama_cpp as low

    defaults = low.llama_model_default_params
    backend = LocalChat(seed=1, cpu=SAPPHIRE_RAPIDS)
    try:
        assert backend._llm.model_params.use_extra_bufts is False
        assert not backend.repack.use_extra_bufts and "AMX" in backend.repack.why
        pieces, finish = drain(backend.stream(QUESTION, max_tokens=16, cancel=threading.Event()))
        assert len(pieces) >= 3 and finish in ("stop", "length")
    finally:
        backend.close()
    assert low.llama_model_default_params is defaults, "llama's defaults were left wrapped"
    assert low.llama_model_default_params().use_extra_bufts is True


def test_repack_setting_reaches_llama_through_open_chat(in_process_llama: None) -> None:
    settings = load(Settings, env={}, overrides={"llm.repack": "off"})
    backend = open_chat(settings)
    try:
        assert isinstance(backend, LocalChat) and backend._llm.model_params.use_extra_bufts is False
    finally:
        backend.close()


def test_a_failed_load_leaves_llamas_defaults_alone(in_process_llama: None, tmp_path: Path) -> None:
    import llama_cpp.llama_cpp as low

    defaults = low.llama_model_default_params
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelError):
        LocalChat(garbage, repack="off")
    assert low.llama_model_default_params is defaults


HISTORY = [{"role": "system", "content": "You are a helpful voice assistant. Answer in one short sentence."}] + [
    message
    for n in range(1, 9)
    for message in ({"role": "user", "content": f"What is {n} times {n + 3}, and what is the capital of Spain?"},
                    {"role": "assistant", "content": f"{n} times {n + 3} is {n * (n + 3)}, and Madrid is the capital."})
]
ASKED = [*HISTORY, {"role": "user", "content": "What is the capital of France?"}]


def reads(chat: LocalChat) -> list[int]:
    """Counts the tokens llama.cpp evaluates from now on, one entry per evaluation."""
    model = chat._model()
    counts: list[int] = []
    evaluate = model.eval
    model.eval = lambda tokens: counts.append(len(tokens)) or evaluate(tokens)  # type: ignore[method-assign]
    return counts


def test_a_kept_context_spares_the_next_model_the_history(in_process_llama: None, tmp_path: Path) -> None:
    """A returning user's first answer waited for the model to read the whole history again (6.9 s with 40
    turns of it, scripts/bench_returning_user.py); the model now starts from the context the last run kept. The restored context must
    be the same as one read anew: the same seeded answer, and only the question is read."""
    fresh = LocalChat(seed=1)
    try:
        fresh.warm_up(HISTORY)
        expected, _ = drain(fresh.stream(ASKED, max_tokens=20, cancel=threading.Event()))
    finally:
        fresh.close()
    first = LocalChat(seed=1, cache_folder=tmp_path)
    try:
        assert first.restored_tokens == 0 and not first.keep_what_was_read()  # nothing read, nothing to keep
        first.warm_up(HISTORY)
        assert first.keep_what_was_read()
        assert not first.keep_what_was_read(), "kept again although nothing new was read"
    finally:
        first.close()
    [kept] = tmp_path.glob("*.llama-state")
    second = LocalChat(seed=1, cache_folder=tmp_path)
    try:
        assert second.restored_tokens > 300
        counted = reads(second)
        second.warm_up(HISTORY)
        assert counted == [], "the warm-up read what the cache held"
        answer, _ = drain(second.stream(ASKED, max_tokens=20, cancel=threading.Event()))
        assert answer == expected
        assert counted[0] < 40, f"read {counted[0]} tokens of a prompt whose history was restored"
    finally:
        second.close()
    assert kept.exists()


def test_a_cut_cache_is_ignored_and_other_versions_are_swept(chat: LocalChat, tmp_path: Path) -> None:
    first = LocalChat(seed=1, cache_folder=tmp_path)
    try:
        first.warm_up(HISTORY)
        first.keep_what_was_read()
    finally:
        first.close()
    [kept] = tmp_path.glob("*.llama-state")
    assert kept.stat().st_mode & 0o777 == 0o600  # it holds the conversation
    kept.write_bytes(kept.read_bytes()[: kept.stat().st_size // 2])  # a disk that filled up mid-write, say
    cut = LocalChat(seed=1, cache_folder=tmp_path)
    try:
        assert cut.restored_tokens == 0
        counted = reads(cut)
        answer, _ = drain(cut.stream(ASKED, max_tokens=20, cancel=threading.Event()))
        assert sum(counted) > 300, "the history was not read after a cache that failed to load"
        assert answer == drain(chat.stream(ASKED, max_tokens=20, cancel=threading.Event()))[0]
    finally:
        cut.close()
    other = LocalChat(seed=1, cache_folder=tmp_path, context_tokens=1024)  # another context: another cache
    try:
        assert other.restored_tokens == 0
        other.warm_up(HISTORY)
        assert other.keep_what_was_read()
    finally:
        other.close()
    [left] = tmp_path.glob("*.llama-state")
    assert left != kept and not kept.exists()
    (tmp_path / left.name.replace(left.name.split("-")[-1], "0123456789abcdef.llama-state")).mkdir()
    last = LocalChat(seed=1, cache_folder=tmp_path, context_tokens=1024)
    try:
        last.warm_up(ASKED)
        assert last.keep_what_was_read(), "an old cache that cannot be removed stopped the keeping"
    finally:
        last.close()
    assert not last.keep_what_was_read()  # closed: nothing to keep, and no error
