"""The bus: an XSUB/XPUB proxy every worker publishes to and subscribes from.

Publishers connect PUB sockets to the XSUB port; subscribers connect SUB
sockets to the XPUB port, which is the XSUB port plus one. Every socket gets
explicit high-water marks (ZeroMQ's default of 1000 drops messages in bursts,
silently) and a maximum message size (a peer sending a larger frame is
disconnected; the proxy keeps running). Sockets close with a short linger so
no exit path hangs on an unsent message.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

import zmq

from voicebus.engine.errors import ConfigError
from voicebus.engine.messages import MAX_MESSAGE_BYTES
from voicebus.engine.security import Security

log = logging.getLogger(__name__)

DEFAULT_BUS = "tcp://127.0.0.1:7700"
HWM = 500_000
"""Messages buffered per socket before ZeroMQ drops: a 100k burst fits with room."""
SOCKET_MAX_BYTES = MAX_MESSAGE_BYTES + 64 * 1024
"""The socket guard sits above the decoder's limit so envelopes around a full body fit."""
LINGER_MS = 200


@dataclass(frozen=True)
class Endpoints:
    """The bus's two TCP endpoints, named by one URL ``tcp://HOST:PORT``."""

    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Endpoints:
        parts = urlsplit(url if "://" in url else f"tcp://{url}")
        if parts.scheme != "tcp" or not parts.hostname or parts.port is None:
            raise ConfigError(f"bus address {url!r} is not of the form tcp://HOST:PORT")
        return cls(parts.hostname, parts.port)

    @property
    def publish(self) -> str:
        """Where publishers connect (the proxy's XSUB)."""
        return f"tcp://{self._host_for_url}:{self.port}"

    @property
    def subscribe(self) -> str:
        """Where subscribers connect (the proxy's XPUB)."""
        return f"tcp://{self._host_for_url}:{self.port + 1}"

    @property
    def url(self) -> str:
        return self.publish

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def _host_for_url(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host


def tune(sock: zmq.Socket, *, max_bytes: int = SOCKET_MAX_BYTES) -> zmq.Socket:
    """Options every bus socket gets: limits, HWMs, short linger, TCP keepalive."""
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
    # ZMTP heartbeats find a dead or stopped peer in about a second.
    sock.setsockopt(zmq.HEARTBEAT_IVL, 500)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 2000)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    return sock


class Bus:
    """The proxy. ``start()`` binds and runs it in a thread; ``stop()`` ends it."""

    def __init__(self, endpoints: Endpoints, security: Security, *, max_bytes: int = SOCKET_MAX_BYTES) -> None:
        if not endpoints.is_loopback and not security.enabled and not security.explicitly_insecure:
            raise ConfigError(
                f"binding the bus to {endpoints.host} needs CurveZMQ keys: run 'voicebus keys init' "
                "(or pass --insecure to accept unauthenticated clients from the network)"
            )
        self.endpoints = endpoints
        self.security = security
        self.max_bytes = max_bytes
        self._ctx = zmq.Context()
        self._thread: threading.Thread | None = None
        self._control_addr = f"inproc://bus-control-{id(self)}"
        self._bound = threading.Event()
        self._error: BaseException | None = None
        self._authenticator = None

    def start(self) -> Bus:
        if self.security.explicitly_insecure and not self.endpoints.is_loopback:
            log.warning(
                "bus on %s WITHOUT authentication or encryption (--insecure): anyone who can reach "
                "this address can read and inject messages",
                self.endpoints.host,
            )
        self._authenticator = self.security.start_authenticator(self._ctx)
        self._thread = threading.Thread(target=self._run, name="bus-proxy", daemon=True)
        self._thread.start()
        self._bound.wait()
        if self._error is not None:
            self.stop()
            raise ConfigError(f"cannot bind the bus on {self.endpoints.url}: {self._error}") from self._error
        return self

    def _run(self) -> None:
        xsub = tune(self._ctx.socket(zmq.XSUB), max_bytes=self.max_bytes)
        xpub = tune(self._ctx.socket(zmq.XPUB), max_bytes=self.max_bytes)
        control = self._ctx.socket(zmq.PAIR)
        control.setsockopt(zmq.LINGER, 0)
        try:
            for sock in (xsub, xpub):
                self.security.apply_server(sock)
            bind_host = "*" if self.endpoints.host in ("0.0.0.0", "*") else self.endpoints._host_for_url
            xsub.bind(f"tcp://{bind_host}:{self.endpoints.port}")
            xpub.bind(f"tcp://{bind_host}:{self.endpoints.port + 1}")
            control.bind(self._control_addr)
        except zmq.ZMQError as exc:
            self._error = exc
            for sock in (xsub, xpub, control):
                sock.close(linger=0)
            self._bound.set()
            return
        self._bound.set()
        try:
            zmq.proxy_steerable(xsub, xpub, None, control)
        except zmq.ContextTerminated:
            pass
        finally:
            for sock in (xsub, xpub, control):
                sock.close(linger=0)

    def stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            ctl = self._ctx.socket(zmq.PAIR)
            ctl.setsockopt(zmq.LINGER, 0)
            ctl.connect(self._control_addr)
            ctl.send(b"TERMINATE")
            self._thread.join(timeout=2)
            ctl.close(linger=0)
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None
        self._ctx.term()

    def __enter__(self) -> Bus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port_pair(host: str = "127.0.0.1") -> int:
    """A port P such that P and P+1 are both free now (for tests and ad-hoc buses)."""
    for _ in range(200):
        with socket.socket() as s1:
            s1.bind((host, 0))
            port = s1.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as s2:
                try:
                    s2.bind((host, port + 1))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free pair of ports found")
