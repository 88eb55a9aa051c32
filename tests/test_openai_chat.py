"""OpenAI-compatible chat over real HTTP.

Two servers: llama-cpp-python's own OpenAI-compatible server (a subprocess
with SmolLM2-135M) for real streaming, and a scripted stdlib server that
misbehaves on purpose — 401, 404, 429 with Retry-After, 500, a stream cut
mid-way, a content filter — to check how each failure is mapped, retried and
bounded. The scripted server picks its behaviour from the request's model name,
``"<scenario>-<tag>"``, so each test has its own request counter.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

pytest.importorskip("openai", reason="the openai package (extra 'openai') is not installed")

from voicebus.engine.errors import BackendError, ConfigError  # noqa: E402
from voicebus.workers.llm.models import find_smollm2_gguf  # noqa: E402
from voicebus.workers.llm.openai_chat import AzureOpenAIChat, OpenAIChat  # noqa: E402

from support.openai_server import Script  # noqa: E402

HELLO = [{"role": "user", "content": "Say hello."}]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def drain(gen: Generator[str, None, str], pieces: list[str] | None = None) -> tuple[list[str], str]:
    """All pieces of a stream and its finish reason; ``pieces`` keeps them if it raises."""
    pieces = [] if pieces is None else pieces
    while True:
        try:
            pieces.append(next(gen))
        except StopIteration as stop:
            return pieces, stop.value


# -- the scripted server ---------------------------------------------------------


@pytest.fixture
def make_chat(scripted: tuple[str, Script]) -> Iterator[Callable[..., OpenAIChat]]:
    url, _ = scripted
    chats: list[OpenAIChat] = []

    def make(model: str, **kwargs: object) -> OpenAIChat:
        kwargs = {"backoff_s": 0.05, **kwargs}
        chat = OpenAIChat(base_url=f"{url}/v1", api_key="test-key", model=model, **kwargs)
        chats.append(chat)
        return chat

    yield make
    for chat in chats:
        chat.close()


def failure(chat: OpenAIChat, *, max_tokens: int = 16) -> tuple[BackendError, list[str], float]:
    """Run a stream that must fail; the error, the pieces that came first, and how long it took."""
    pieces: list[str] = []
    started = time.monotonic()
    with pytest.raises(BackendError) as info:
        drain(chat.stream(HELLO, max_tokens=max_tokens, cancel=threading.Event()), pieces)
    return info.value, pieces, time.monotonic() - started


# -- error mapping ----------------------------------------------------------------


def test_a_good_stream_yields_pieces_and_its_finish_reason(make_chat) -> None:
    pieces, finish = drain(make_chat("ok-plain").stream(HELLO, max_tokens=8, cancel=threading.Event()))
    assert pieces == ["Hello", " there", "."]
    assert finish == "stop"


def test_401_is_a_permanent_auth_error_naming_the_key(make_chat, scripted) -> None:
    error, _, _ = failure(make_chat("auth-x"))
    assert (error.code, error.transient) == ("auth", False)
    assert "OPENAI_API_KEY" in error.message and "Incorrect API key" in error.message
    assert len(scripted[1].seen("auth-x")) == 1  # not retried


def test_404_names_the_unknown_model(make_chat, scripted) -> None:
    error, _, _ = failure(make_chat("missing-model"))
    assert (error.code, error.transient) == ("not_found", False)
    assert "'missing-model'" in error.message
    assert len(scripted[1].seen("missing-model")) == 1


def test_429_retry_after_is_honoured_then_the_request_succeeds(make_chat, scripted) -> None:
    started = time.monotonic()
    pieces, finish = drain(make_chat("flaky429-s").stream(HELLO, max_tokens=8, cancel=threading.Event()))
    elapsed = time.monotonic() - started
    seen = scripted[1].seen("flaky429-s")
    assert (pieces, finish) == (["Hello", " there", "."], "stop")
    assert len(seen) == 3
    gaps = [b.at - a.at for a, b in zip(seen, seen[1:])]
    assert all(0.9 <= gap < 2.0 for gap in gaps), gaps  # Retry-After: 1, not the 0.05 s backoff
    assert elapsed < 5


def test_retry_after_ms_takes_precedence(make_chat, scripted) -> None:
    drain(make_chat("flaky429ms-s", backoff_s=5).stream(HELLO, max_tokens=8, cancel=threading.Event()))
    seen = scripted[1].seen("flaky429ms-s")
    gaps = [b.at - a.at for a, b in zip(seen, seen[1:])]
    assert len(seen) == 3
    assert all(0.25 <= gap < 1.5 for gap in gaps), gaps  # 300 ms, not the 5 s backoff


def test_persistent_429_gives_up_after_max_retries(make_chat, scripted) -> None:
    error, _, elapsed = failure(make_chat("always429-x", max_retries=3))
    assert (error.code, error.transient) == ("rate_limited", True)
    assert len(scripted[1].seen("always429-x")) == 4  # one try + three retries
    assert elapsed < 3


def test_a_retry_after_beyond_the_cap_gives_up_at_once(make_chat, scripted) -> None:
    error, _, elapsed = failure(make_chat("slow429-x", max_wait_s=10))
    assert error.code == "rate_limited" and "120" in error.message
    assert len(scripted[1].seen("slow429-x")) == 1
    assert elapsed < 2


def test_exhausted_quota_is_not_retried(make_chat, scripted) -> None:
    error, _, _ = failure(make_chat("quota-x"))
    assert (error.code, error.transient) == ("quota", False)
    assert len(scripted[1].seen("quota-x")) == 1


def test_500_is_retried_with_growing_backoff_then_reported(make_chat, scripted) -> None:
    error, _, _ = failure(make_chat("e500-x", max_retries=3, backoff_s=0.1))
    seen = scripted[1].seen("e500-x")
    gaps = [b.at - a.at for a, b in zip(seen, seen[1:])]
    assert (error.code, error.transient) == ("server", True)
    assert len(seen) == 4
    # 0.1, 0.2, 0.4 s with ±20 % jitter: each wait clearly longer than the one before.
    assert 0.07 <= gaps[0] < 0.5 and gaps[1] > gaps[0] * 1.2 and gaps[2] > gaps[1] * 1.2, gaps


def test_backoff_waits_are_capped_at_max_wait(make_chat, scripted) -> None:
    error, _, elapsed = failure(make_chat("e500-capped", max_retries=3, backoff_s=5, max_wait_s=0.1))
    assert error.code == "server"
    assert len(scripted[1].seen("e500-capped")) == 4
    assert elapsed < 2  # 3 waits of 0.1 s, not 5 + 10 + 20 s


def test_a_prompt_rejected_by_the_content_filter(make_chat, scripted) -> None:
    error, _, _ = failure(make_chat("reject-x"))
    assert (error.code, error.transient) == ("content_filter", False)
    assert "content management policy" in error.message
    assert len(scripted[1].seen("reject-x")) == 1


def test_a_filtered_answer_returns_content_filter(make_chat) -> None:
    pieces, finish = drain(make_chat("filtered-x").stream(HELLO, max_tokens=8, cancel=threading.Event()))
    assert pieces == ["Hello", " there", "."]
    assert finish == "content_filter"


@pytest.mark.parametrize("scenario", ["drop", "dropeof"])
def test_a_stream_cut_midway_yields_what_came_then_stream_dropped(make_chat, scripted, scenario) -> None:
    model = f"{scenario}-x"
    error, pieces, elapsed = failure(make_chat(model))
    assert pieces == ["Hello", " there"]
    assert (error.code, error.transient) == ("stream_dropped", True)
    assert len(scripted[1].seen(model)) == 1  # never re-sent once pieces went out
    assert elapsed < 5


def test_no_answer_within_the_timeout_is_a_timeout_not_retried(make_chat, scripted) -> None:
    error, _, elapsed = failure(make_chat("stall-x", timeout_s=0.5))
    assert (error.code, error.transient) == ("timeout", True)
    assert len(scripted[1].seen("stall-x")) == 1
    assert 0.4 < elapsed < 3


def test_connection_refused_is_retried_then_reported() -> None:
    chat = OpenAIChat(base_url=f"http://127.0.0.1:{free_port()}/v1", api_key="k", model="m",
                      max_retries=2, backoff_s=0.2)
    try:
        error, _, elapsed = failure(chat)
    finally:
        chat.close()
    assert (error.code, error.transient) == ("connection", True)
    assert 0.45 < elapsed < 3  # waited ~0.2 + ~0.4 s between the three attempts


def test_cancel_stops_the_stream_and_closes_the_connection(make_chat, scripted) -> None:
    cancel = threading.Event()
    gen = make_chat("slow-cancel").stream(HELLO, max_tokens=500, cancel=cancel)
    assert [next(gen), next(gen)] == [" w0", " w1"]
    cancel.set()
    cancelled_at = time.monotonic()
    pieces, finish = drain(gen)
    assert (pieces, finish) == ([], "cancelled")
    deadline = time.monotonic() + 5
    while "slow-cancel" not in scripted[1].disconnected and time.monotonic() < deadline:
        scripted[1].stop.wait(0.02)
    assert scripted[1].disconnected["slow-cancel"] - cancelled_at < 1.0


def test_closing_the_generator_early_closes_the_connection(make_chat, scripted) -> None:
    gen = make_chat("slow-close").stream(HELLO, max_tokens=500, cancel=threading.Event())
    next(gen)
    gen.close()
    closed_at = time.monotonic()
    deadline = time.monotonic() + 5
    while "slow-close" not in scripted[1].disconnected and time.monotonic() < deadline:
        scripted[1].stop.wait(0.02)
    assert scripted[1].disconnected["slow-close"] - closed_at < 1.0


def test_cancel_during_a_retry_wait_returns_cancelled_promptly(make_chat, scripted) -> None:
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    started = time.monotonic()
    _, finish = drain(make_chat("e500-cancel", backoff_s=5).stream(HELLO, max_tokens=8, cancel=cancel))
    assert finish == "cancelled"
    assert time.monotonic() - started < 2  # not the 5 s backoff
    assert len(scripted[1].seen("e500-cancel")) == 1


# -- configuration and Azure request shape -------------------------------------------


def test_api_openai_com_without_a_key_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        OpenAIChat(base_url=None, api_key=None, model="gpt-4o-mini")


def test_token_count_is_a_four_characters_a_token_estimate(make_chat) -> None:
    chat = make_chat("ok-count")
    assert chat.count_tokens("") == 0
    assert chat.count_tokens("a" * 40) == 10
    assert chat.context_tokens == 8192


@pytest.mark.parametrize(
    ("kwargs", "variable"),
    [
        ({"endpoint": None, "deployment": "d"}, "AZURE_OPENAI_ENDPOINT"),
        ({"endpoint": "https://x.openai.azure.com", "deployment": None}, "AZURE_OPENAI_CHAT_DEPLOYMENT"),
    ],
)
def test_azure_missing_settings_name_the_variable(kwargs: dict, variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        AzureOpenAIChat(api_key="k", **kwargs)


def test_azure_request_shape_with_a_key(scripted) -> None:
    url, script = scripted
    chat = AzureOpenAIChat(endpoint=url, deployment="ok-azurekey", api_version="2024-10-21", api_key="sekret")
    try:
        pieces, finish = drain(chat.stream(HELLO, max_tokens=8, cancel=threading.Event()))
    finally:
        chat.close()
    (request,) = script.seen("ok-azurekey")
    headers = {k.lower(): v for k, v in request.headers.items()}
    assert request.path == "/openai/deployments/ok-azurekey/chat/completions"
    assert request.query == {"api-version": ["2024-10-21"]}
    assert headers["api-key"] == "sekret" and "authorization" not in headers
    assert request.body["stream"] is True and request.body["max_tokens"] == 8
    assert (pieces, finish) == (["Hello", " there", "."], "stop")


def test_azure_keyless_sends_the_entra_token(scripted) -> None:
    url, script = scripted
    chat = AzureOpenAIChat(endpoint=url, deployment="ok-azuretoken", api_version="2024-10-21",
                           api_key=None, token_provider=lambda: "entra-token")
    try:
        drain(chat.stream(HELLO, max_tokens=8, cancel=threading.Event()))
    finally:
        chat.close()
    (request,) = script.seen("ok-azuretoken")
    headers = {k.lower(): v for k, v in request.headers.items()}
    assert headers["authorization"] == "Bearer entra-token" and "api-key" not in headers


def test_azure_token_failure_is_an_auth_error(scripted) -> None:
    def no_credential() -> str:
        raise RuntimeError("DefaultAzureCredential failed to retrieve a token")

    url, script = scripted
    chat = AzureOpenAIChat(endpoint=url, deployment="ok-azurenotoken", api_key=None, token_provider=no_credential)
    try:
        error, _, _ = failure(chat)
    finally:
        chat.close()
    assert (error.code, error.transient) == ("auth", False)
    assert "AZURE_OPENAI_API_KEY" in error.message
    assert script.seen("ok-azurenotoken") == []  # nothing was sent without a credential


def test_azure_keyless_without_azure_identity_names_the_key() -> None:
    try:
        import azure.identity  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("azure-identity is installed: keyless sign-in is available")
    with pytest.raises(ConfigError, match="AZURE_OPENAI_API_KEY"):
        AzureOpenAIChat(endpoint="https://x.openai.azure.com", deployment="d", api_key=None)


def test_azure_404_names_the_deployment(scripted) -> None:
    url, _ = scripted
    chat = AzureOpenAIChat(endpoint=url, deployment="missing-deployment", api_key="k")
    try:
        error, _, _ = failure(chat)
    finally:
        chat.close()
    assert error.code == "not_found"
    assert "deployment 'missing-deployment'" in error.message
    assert "AZURE_OPENAI_API_KEY" not in error.message


def test_azure_401_names_the_azure_key(scripted) -> None:
    url, _ = scripted
    chat = AzureOpenAIChat(endpoint=url, deployment="auth-azure", api_key="wrong")
    try:
        error, _, _ = failure(chat)
    finally:
        chat.close()
    assert error.code == "auth" and "AZURE_OPENAI_API_KEY" in error.message


# -- llama.cpp's OpenAI-compatible server: real streaming ---------------------------


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama.cpp's OpenAI-compatible server (``python -m voicebus.workers.llm.serve``: llama_cpp.server
    with the embedded backend's repack decision, so it runs on AMX CPUs) with SmolLM2-135M; its base URL."""
    pytest.importorskip("llama_cpp.server.app", reason="llama-cpp-python[server] is not installed")
    port = free_port()
    log_path: Path = tmp_path_factory.mktemp("llama-server") / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "voicebus.workers.llm.serve", "--model", str(find_smollm2_gguf()),
             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited ({proc.returncode}):\n{log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{base_url}/models", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server not ready in 90 s:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.1)  # poll interval, bounded by the deadline above
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture
def llama_chat(llama_server: str) -> Iterator[OpenAIChat]:
    chat = OpenAIChat(base_url=llama_server, api_key=None, model="smollm2", timeout_s=60)
    yield chat
    chat.close()


@pytest.mark.slow
def test_llama_server_streams_in_several_pieces(llama_chat: OpenAIChat) -> None:
    drain(llama_chat.stream(HELLO, max_tokens=4, cancel=threading.Event()))  # warm up the prompt cache
    started = time.perf_counter()
    gen = llama_chat.stream(QUESTION, max_tokens=48, cancel=threading.Event())
    first = next(gen)
    first_latency = time.perf_counter() - started
    rest, finish = drain(gen)
    elapsed = time.perf_counter() - started
    answer = first + "".join(rest)
    print(f"\nllama server over HTTP: first piece {first_latency * 1000:.0f} ms, "
          f"{1 + len(rest)} pieces in {elapsed:.2f} s: {answer!r}")
    assert len(rest) >= 3
    assert finish in ("stop", "length")
    assert len(answer.split()) >= 3


@pytest.mark.slow
def test_llama_server_max_tokens_ends_with_length(llama_chat: OpenAIChat) -> None:
    story = [{"role": "user", "content": "Write a long story about a dragon who bakes bread."}]
    pieces, finish = drain(llama_chat.stream(story, max_tokens=6, cancel=threading.Event()))
    assert finish == "length"
    assert 1 <= len(pieces) <= 6  # the server streams one token a chunk


@pytest.mark.slow
def test_llama_server_cancel_stops_within_a_piece_and_the_server_goes_on(llama_chat: OpenAIChat) -> None:
    story = [{"role": "user", "content": "Write a long story about a dragon who bakes bread."}]
    cancel = threading.Event()
    gen = llama_chat.stream(story, max_tokens=400, cancel=cancel)
    next(gen), next(gen)
    cancel.set()
    assert drain(gen) == ([], "cancelled")
    # The abandoned completion must not hold the (single-slot) server: the next one is prompt.
    started = time.monotonic()
    pieces, finish = drain(llama_chat.stream(HELLO, max_tokens=8, cancel=threading.Event()))
    assert pieces and finish in ("stop", "length")
    assert time.monotonic() - started < 10


def test_warm_up_only_asks_a_server_on_this_machine(make_chat, scripted) -> None:
    chat = make_chat("ok-warm")
    chat.warm_up(HELLO)
    (request,) = scripted[1].seen("ok-warm")
    assert request.body["max_tokens"] == 1 and request.body["messages"] == HELLO
    # A remote host gets no request: a try would take seconds of retries (the name does not resolve).
    remote = OpenAIChat(base_url="http://api.example.invalid/v1", api_key="k", model="m", backoff_s=5.0)
    start = time.monotonic()
    remote.warm_up(HELLO)
    assert time.monotonic() - start < 1.0
    remote.close()
    make_chat("auth-warm").warm_up(HELLO)  # a failing local server is not fatal at load
