"""A scripted OpenAI-compatible HTTP server that misbehaves on purpose (stdlib only).

It picks its behaviour from the request's model name, ``"<scenario>-<tag>"``:
ok, auth (401), missing (404), flaky429/always429/slow429 (Retry-After),
quota, e500, reject (400 content filter), filtered (finish_reason
content_filter), drop/dropeof (stream cut), slow, stall, echo ("You said: <the
question>."), count (sentences "One." "Two." … at a steady pace, continuing after
an assistant prefix the way a prefill-capable server does). Each tag has its own
request counter, so tests do not disturb each other.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest


@dataclass
class Request:
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: dict
    at: float


@dataclass
class Script:
    """What the scripted server saw, shared with its handler threads."""

    requests: list[Request] = field(default_factory=list)
    disconnected: dict[str, float] = field(default_factory=dict)
    """model -> when a streaming write found the client gone."""
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def seen(self, model: str) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.body.get("model") == model]


def _chunk(content: str | None = None, finish: str | None = None) -> bytes:
    delta = {"content": content} if content is not None else {}
    event = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "scripted",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(event)}\n\n".encode()


COUNT_WORDS = "One Two Three Four Five Six Seven Eight Nine Ten Eleven Twelve".split()


class ScriptedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    script: Script  # set on a subclass per server

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        url = urlsplit(self.path)
        request = Request(url.path, parse_qs(url.query), dict(self.headers), body, time.monotonic())
        with self.script.lock:
            self.script.requests.append(request)
        model = body["model"]
        self.body = body
        attempt = len(self.script.seen(model))
        getattr(self, "scenario_" + model.split("-")[0])(model, attempt)

    # -- plain answers

    def send_json(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def send_error_json(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        self.send_json(status, {"error": {"message": message, "type": "error", "code": code}}, headers)

    def start_sse(self, *, chunked: bool = True) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")  # body delimited by closing the socket
        self.end_headers()

    def write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def finish_sse(self) -> None:
        self.write_chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")

    def stream_ok(self, finish: str = "stop") -> None:
        self.start_sse()
        for piece in ("Hello", " there", "."):
            self.write_chunk(_chunk(piece))
        self.write_chunk(_chunk(finish=finish))
        self.finish_sse()

    # -- scenarios, chosen by the model name's prefix

    def scenario_ok(self, model: str, attempt: int) -> None:
        self.stream_ok()

    def scenario_auth(self, model: str, attempt: int) -> None:
        self.send_error_json(401, "invalid_api_key", "Incorrect API key provided.")

    def scenario_missing(self, model: str, attempt: int) -> None:
        self.send_error_json(404, "DeploymentNotFound", "The API deployment for this resource does not exist.")

    def scenario_flaky429(self, model: str, attempt: int) -> None:
        if attempt <= 2:
            self.send_error_json(429, "rate_limit_exceeded", "Slow down.", {"Retry-After": "1"})
        else:
            self.stream_ok()

    def scenario_flaky429ms(self, model: str, attempt: int) -> None:
        if attempt <= 2:
            self.send_error_json(429, "rate_limit_exceeded", "Slow down.", {"retry-after-ms": "300"})
        else:
            self.stream_ok()

    def scenario_always429(self, model: str, attempt: int) -> None:
        self.send_error_json(429, "rate_limit_exceeded", "Slow down.", {"Retry-After": "0"})

    def scenario_slow429(self, model: str, attempt: int) -> None:
        self.send_error_json(429, "rate_limit_exceeded", "Come back later.", {"Retry-After": "120"})

    def scenario_quota(self, model: str, attempt: int) -> None:
        self.send_error_json(429, "insufficient_quota", "You exceeded your current quota.")

    def scenario_e500(self, model: str, attempt: int) -> None:
        self.send_error_json(500, "server_error", "The server had an error.")

    def scenario_reject(self, model: str, attempt: int) -> None:
        self.send_json(400, {"error": {
            "message": "The response was filtered due to the prompt triggering content management policy.",
            "type": None, "param": "prompt", "code": "content_filter", "status": 400,
            "innererror": {"code": "ResponsibleAIPolicyViolation",
                           "content_filter_result": {"violence": {"filtered": True, "severity": "high"}}},
        }})

    def scenario_filtered(self, model: str, attempt: int) -> None:
        self.stream_ok(finish="content_filter")

    def scenario_drop(self, model: str, attempt: int) -> None:
        # Two pieces, then the socket closes inside the chunked body.
        self.start_sse()
        self.write_chunk(_chunk("Hello"))
        self.write_chunk(_chunk(" there"))
        self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True

    def scenario_dropeof(self, model: str, attempt: int) -> None:
        # Close-delimited body: the cut looks like a clean end, minus the finish reason.
        self.start_sse(chunked=False)
        self.wfile.write(_chunk("Hello") + _chunk(" there"))
        self.wfile.flush()
        self.close_connection = True

    def stream_paced(self, model: str, pieces: Iterable[str], every_s: float) -> None:
        """Stream ``pieces`` one every ``every_s``; note when the client hangs up instead."""
        self.start_sse()
        try:
            for piece in pieces:
                self.write_chunk(_chunk(piece))
                if self.script.stop.wait(every_s):
                    return
            self.write_chunk(_chunk(finish="stop"))
            self.finish_sse()
        except OSError:
            self.script.disconnected[model] = time.monotonic()
            self.close_connection = True

    def scenario_slow(self, model: str, attempt: int) -> None:
        self.stream_paced(model, (f" w{i}" for i in range(200)), 0.05)

    def scenario_echo(self, model: str, attempt: int) -> None:
        # A warm-up request carries only the system prompt.
        question = next((m["content"] for m in reversed(self.body["messages"]) if m["role"] == "user"), "nothing")
        self.start_sse()
        for piece in ("You said: ", question.rstrip(".?!"), "."):
            self.write_chunk(_chunk(piece))
        self.write_chunk(_chunk(finish="stop"))
        self.finish_sse()

    def scenario_count(self, model: str, attempt: int) -> None:
        """``count-<tag>[-N]``: N (default 8) numbered sentences, one piece every 40 ms."""
        parts = model.split("-")
        total = int(parts[2]) if len(parts) > 2 else 8
        messages = self.body["messages"]
        done = COUNT_WORDS.index(messages[-1]["content"].split()[-1].rstrip(".")) + 1 if (
            messages[-1]["role"] == "assistant") else 0
        pieces = (piece for n in range(done, total) for piece in (" " if n else "", COUNT_WORDS[n], ".") if piece)
        self.stream_paced(model, pieces, 0.04)

    def scenario_stall(self, model: str, attempt: int) -> None:
        self.script.stop.wait(30)  # never answers while the test runs
        self.close_connection = True


class ScriptedServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # Clients hang up on purpose here (cancel, timeouts, pool closed): not a server bug.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture(scope="module")
def scripted() -> Iterator[tuple[str, Script]]:
    script = Script()
    handler = type("Handler", (ScriptedHandler,), {"script": script})
    server = ScriptedServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="scripted-openai", daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", script
    script.stop.set()
    server.shutdown()
    server.server_close()
    thread.join(5)
