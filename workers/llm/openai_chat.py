"""Chat through an OpenAI-compatible HTTP API: OpenAI, Azure OpenAI, Ollama, vLLM, llama.cpp's server.

Both backends share ``_HttpChat``: it opens a streamed chat completion under
one bounded retry policy, yields the text pieces, and turns every failure into
a ``BackendError`` with a stable code, so a failed turn ends cleanly:

    code             when                                          transient  retried
    auth             HTTP 401/403; names the key variable          no         no
    not_found        HTTP 404: unknown model or deployment         no         no
    content_filter   HTTP 400 with error code "content_filter"     no         no
    context_length   HTTP 400 "context_length_exceeded"            no         no
    bad_request      any other 4xx                                 no         no
    quota            HTTP 429 "insufficient_quota" (billing)       no         no
    rate_limited     HTTP 429                                      yes        yes
    server           HTTP 5xx                                      yes        yes
    connection       connection refused/reset before a response    yes        yes
    timeout          no response within ``timeout_s``              yes        no
                     (HTTP 408 from the server: retried)
    stream_dropped   the stream broke after it started             yes        no
    client           the openai client itself refused (bad option) no         no

Retries happen only before the first piece is yielded (never re-sending a
half-spoken answer). Waits grow exponentially from ``backoff_s`` up to
``max_wait_s``; a server's ``Retry-After``/``retry-after-ms`` takes precedence,
and one longer than ``max_wait_s`` gives up at once: retrying sooner than the
server asked would only fail again, and the user is waiting on silence.
Timeouts are not retried: the user has already waited ``timeout_s``.

The openai client's own retries are switched off (``max_retries=0``): it would
otherwise retry 429/5xx/connection errors itself — twice by default, with its
own waits — multiplying ours and hiding how long a turn can stall.
"""

from __future__ import annotations

import email.utils
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Generator, Iterator
from types import ModuleType
from urllib.parse import urlsplit
from typing import Any

from voicebus.engine.errors import BackendError, ConfigError, require_module
from voicebus.workers.llm.base import Message

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4
"""OpenAI's rule of thumb for English text; good enough to budget a context."""
MESSAGE_TOKENS = 4
"""OpenAI's documented cost of a chat message beyond its text (role markers), for the same budget."""

_FINISH_REASONS = {"stop", "length", "content_filter"}
_AZURE_SCOPE = "https://cognitiveservices.azure.com/.default"


class _HttpChat:
    """Streaming, retries and error mapping shared by the OpenAI and Azure OpenAI backends."""

    name = "openai"
    _key_variable = "OPENAI_API_KEY"
    _model_kind = "model"

    def __init__(
        self,
        *,
        openai: ModuleType,
        client: Any,
        model: str,
        where: str,
        timeout_s: float,
        context_tokens: int,
        max_retries: int,
        backoff_s: float,
        max_wait_s: float,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> None:
        self._openai = openai
        self.temperature = temperature
        """None: the server's default"""
        self.seed = seed
        """None: the server draws one (OpenAI treats a seed as best effort)"""
        self._client = client
        self.model = model
        self.where = where
        """Base URL or endpoint, for error messages."""
        self.timeout_s = timeout_s
        self.context_tokens = context_tokens
        self.message_tokens = MESSAGE_TOKENS
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_wait_s = max_wait_s

    def count_tokens(self, text: str) -> int:
        """An estimate (``CHARS_PER_TOKEN`` characters a token): the server's tokenizer is unknown."""
        return math.ceil(len(text) / CHARS_PER_TOKEN)

    def stream(
        self, messages: list[Message], *, max_tokens: int, cancel: threading.Event, prefix: str = ""
    ) -> Generator[str, None, str]:
        """Yield the answer's text pieces; return "stop", "length", "content_filter" or "cancelled".

        ``cancel`` is checked between pieces and during retry waits; the HTTP
        stream is closed as soon as it is seen. ``prefix`` (the part of the
        answer already delivered) goes as a final assistant message: servers
        that support assistant prefill (llama.cpp, vLLM, Ollama) continue it;
        others answer after it. Failures raise BackendError.
        """
        if cancel.is_set():
            return "cancelled"
        if prefix:
            messages = [*messages, {"role": "assistant", "content": prefix}]
        chunks = self._open(messages, max_tokens, cancel)
        if chunks is None:
            return "cancelled"
        try:
            return (yield from self._pieces(chunks, cancel))
        finally:
            # Also on cancel and GeneratorExit: frees the connection and tells
            # the server to stop generating for nobody.
            chunks.close()

    def warm_up(self, messages: list[Message], cancel: threading.Event | None = None) -> None:
        """On a server on this machine, have it evaluate the prompt once (it caches the prefix).

        A remote service is left alone: there a warm-up would cost a paid request.
        A server that fails now is not fatal; the first real turn reports it.
        """
        host = urlsplit(self.where).hostname or ""
        if host not in ("localhost", "127.0.0.1", "::1"):
            return
        try:
            for _ in self.stream(messages, max_tokens=1, cancel=cancel or threading.Event()):
                pass
        except BackendError:
            pass

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._client.close()

    # -- opening, with retries ------------------------------------------------

    def _open(self, messages: list[Message], max_tokens: int, cancel: threading.Event) -> Any:
        """Start a streamed completion; None if cancelled while waiting to retry."""
        for attempt in range(self.max_retries + 1):
            hint: float | None = None
            try:
                sampling = {key: value for key, value in (("temperature", self.temperature), ("seed", self.seed))
                            if value is not None}
                return self._client.chat.completions.create(
                    model=self.model, messages=messages, stream=True, max_tokens=max_tokens, **sampling
                )
            except self._openai.APITimeoutError as exc:
                raise self._timeout_error() from exc
            except self._openai.APIConnectionError as exc:
                error = BackendError(
                    f"cannot connect to {self.where}: {exc.__cause__ or exc}",
                    code="connection",
                    transient=True,
                )
            except self._openai.APIStatusError as exc:
                error = self._status_error(exc)
                hint = _retry_after(exc.response.headers)
            except self._openai.OpenAIError as exc:
                raise BackendError(f"chat request failed: {exc}", code="client") from exc
            if not error.transient or attempt == self.max_retries:
                raise error
            if hint is not None and hint > self.max_wait_s:
                raise BackendError(
                    f"{error.message} (server asks to retry after {hint:g} s; giving up)",
                    code=error.code,
                    transient=True,
                )
            wait = hint if hint is not None else min(_backoff(self.backoff_s, attempt), self.max_wait_s)
            log.warning("%s; retry %d/%d in %.2f s", error.message, attempt + 1, self.max_retries, wait)
            if cancel.wait(wait):
                return None
        raise AssertionError("unreachable: the last attempt raises")

    def _status_error(self, exc: Any) -> BackendError:
        """Map an HTTP error response to a BackendError (see the table above)."""
        status, code = exc.status_code, exc.code
        detail = f"HTTP {status} from {self.where}: {_server_message(exc)}"
        if status in (401, 403):
            return BackendError(
                f"the server rejected the credentials; check {self._key_variable} ({detail})",
                code="auth",
                transient=False,
            )
        if status == 404:
            return BackendError(
                f"{self._model_kind} {self.model!r} not found ({detail})", code="not_found", transient=False
            )
        if status == 400 and code == "content_filter":
            return BackendError(f"the prompt was rejected by the content filter ({detail})",
                                code="content_filter", transient=False)
        if status == 400 and code == "context_length_exceeded":
            return BackendError(f"the conversation does not fit the model's context ({detail})",
                                code="context_length", transient=False)
        if status == 429 and code == "insufficient_quota":
            return BackendError(f"quota exhausted ({detail})", code="quota", transient=False)
        if status == 429:
            return BackendError(f"rate limited ({detail})", code="rate_limited", transient=True)
        if status == 408:
            return BackendError(f"request timed out ({detail})", code="timeout", transient=True)
        if status >= 500:
            return BackendError(f"server error ({detail})", code="server", transient=True)
        return BackendError(f"request refused ({detail})", code="bad_request", transient=False)

    def _timeout_error(self) -> BackendError:
        return BackendError(
            f"no response from {self.where} within {self.timeout_s:g} s",
            code="timeout",
            transient=True,
        )

    # -- reading the stream -----------------------------------------------------

    def _pieces(self, chunks: Iterator[Any], cancel: threading.Event) -> Generator[str, None, str]:
        finish: str | None = None
        try:
            for chunk in chunks:
                # Azure sends chunks without choices (prompt filter results); skip them.
                for choice in chunk.choices:
                    if choice.index != 0:
                        continue
                    piece = choice.delta.content if choice.delta is not None else None
                    if piece:
                        if cancel.is_set():
                            return "cancelled"
                        yield piece
                        if cancel.is_set():
                            return "cancelled"
                    if choice.finish_reason:
                        finish = choice.finish_reason
        except self._openai.APIConnectionError as exc:  # includes APITimeoutError
            if finish is not None:
                return _finish(finish)  # the answer was complete; only the goodbye was lost
            raise BackendError(
                f"the stream from {self.where} broke after it started: {exc.__cause__ or exc}",
                code="stream_dropped",
                transient=True,
            ) from exc
        except self._openai.APIError as exc:  # an error event inside the stream
            if exc.code == "content_filter":
                return "content_filter"
            raise BackendError(f"the server reported an error mid-stream: {_server_message(exc)}",
                               code="server", transient=True) from exc
        if finish is None:
            # A connection closed cleanly before the last chunk: no finish reason ever came.
            raise BackendError(
                f"the stream from {self.where} ended without a finish reason",
                code="stream_dropped",
                transient=True,
            )
        return _finish(finish)


class OpenAIChat(_HttpChat):
    """Any OpenAI-compatible chat completions endpoint (OpenAI, Ollama, vLLM, llama.cpp server)."""

    name = "openai"

    def __init__(
        self,
        *,
        base_url: str | None,
        api_key: str | None,
        model: str,
        timeout_s: float = 30,
        max_retries: int = 3,
        context_tokens: int = 8192,
        backoff_s: float = 0.5,
        max_wait_s: float = 10.0,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> None:
        """Configure the client; nothing is sent until ``stream``.

        ``base_url`` None means api.openai.com, which needs ``api_key``
        (ConfigError naming OPENAI_API_KEY otherwise). Local servers ignore
        the key, so with a ``base_url`` it may be None.
        """
        openai = require_module("openai", package="openai", extra="openai", purpose="the OpenAI chat backend")
        if not model:
            raise ConfigError("the OpenAI chat backend needs a model name")
        if api_key is None and base_url is None:
            raise ConfigError("OpenAI needs an API key: set OPENAI_API_KEY")
        client = openai.OpenAI(
            base_url=base_url,
            # Always explicit, so the client never falls back to environment
            # variables behind the settings' back.
            api_key=api_key if api_key is not None else "no-key",
            timeout=timeout_s,
            max_retries=0,  # our policy only; see the module docstring
        )
        super().__init__(
            openai=openai,
            client=client,
            model=model,
            where=str(client.base_url),
            timeout_s=timeout_s,
            context_tokens=context_tokens,
            max_retries=max_retries,
            backoff_s=backoff_s,
            max_wait_s=max_wait_s,
            temperature=temperature,
            seed=seed,
        )


class AzureOpenAIChat(_HttpChat):
    """An Azure OpenAI chat deployment, with an API key or keyless (Microsoft Entra ID)."""

    name = "azure-openai"
    _key_variable = "AZURE_OPENAI_API_KEY"
    _model_kind = "deployment"

    def __init__(
        self,
        *,
        endpoint: str | None,
        deployment: str | None,
        api_version: str = "2024-10-21",
        api_key: str | None,
        token_provider: Callable[[], str] | None = None,
        timeout_s: float = 30,
        max_retries: int = 3,
        context_tokens: int = 8192,
        backoff_s: float = 0.5,
        max_wait_s: float = 10.0,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> None:
        """Configure the client; nothing is sent until ``stream``.

        Without ``api_key`` the request carries a Microsoft Entra ID token from
        ``token_provider``, by default ``azure.identity.DefaultAzureCredential``
        (needs ``azure-identity``; otherwise ConfigError naming
        AZURE_OPENAI_API_KEY). Missing endpoint/deployment raise ConfigError
        naming AZURE_OPENAI_ENDPOINT / AZURE_OPENAI_CHAT_DEPLOYMENT.
        """
        openai = require_module("openai", package="openai", extra="azure", purpose="the Azure OpenAI chat backend")
        if not endpoint:
            raise ConfigError("Azure OpenAI needs an endpoint: set AZURE_OPENAI_ENDPOINT")
        if not deployment:
            raise ConfigError("Azure OpenAI needs a chat deployment: set AZURE_OPENAI_CHAT_DEPLOYMENT")
        if api_key is not None:
            auth: dict[str, Any] = {"api_key": api_key}
        else:
            auth = {"azure_ad_token_provider": _guarded(token_provider or _entra_token_provider())}
        client = openai.AzureOpenAI(
            azure_endpoint=endpoint,
            azure_deployment=deployment,
            api_version=api_version,
            timeout=timeout_s,
            max_retries=0,  # our policy only; see the module docstring
            **auth,
        )
        super().__init__(
            openai=openai,
            client=client,
            model=deployment,
            where=endpoint,
            timeout_s=timeout_s,
            context_tokens=context_tokens,
            max_retries=max_retries,
            backoff_s=backoff_s,
            max_wait_s=max_wait_s,
            temperature=temperature,
            seed=seed,
        )


def _entra_token_provider() -> Callable[[], str]:
    """A bearer-token provider from ``azure-identity``'s DefaultAzureCredential."""
    try:
        from azure.identity import DefaultAzureCredential, get_bearer_token_provider
    except ImportError:
        raise ConfigError(
            "Azure OpenAI needs a key: set AZURE_OPENAI_API_KEY "
            "(or pip install 'voicebus[azure-identity]' for keyless Microsoft Entra ID sign-in)"
        ) from None
    return get_bearer_token_provider(DefaultAzureCredential(), _AZURE_SCOPE)


def _guarded(provider: Callable[[], str]) -> Callable[[], str]:
    """Wrap a token provider so that failing to get a token is an ``auth`` BackendError.

    The openai client calls the provider inside ``create`` and lets its
    exceptions (azure-identity's CredentialUnavailableError, …) escape as they are.
    """

    def token() -> str:
        try:
            return provider()
        except Exception as exc:
            raise BackendError(
                f"cannot get a Microsoft Entra ID token ({exc}); sign in (az login, managed "
                "identity) or set AZURE_OPENAI_API_KEY",
                code="auth",
                transient=False,
            ) from exc

    return token


def _finish(reason: str) -> str:
    # Tool/function calls are not used here; anything unknown ended normally.
    return reason if reason in _FINISH_REASONS else "stop"


def _backoff(first_s: float, attempt: int) -> float:
    """Exponential wait before retry ``attempt`` (0-based), with ±20 % jitter so clients spread out."""
    return first_s * (2**attempt) * random.uniform(0.8, 1.2)


def _retry_after(headers: Any) -> float | None:
    """Seconds the server asked us to wait (``retry-after-ms`` or ``Retry-After``), if any."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:  # the HTTP-date form
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _server_message(exc: Any) -> str:
    """The server's own error message (the client's wraps it in a dict repr), shortened."""
    body = exc.body
    text = body.get("message") if isinstance(body, dict) else None
    text = str(text or exc.message)
    return text if len(text) <= 300 else text[:299] + "…"
