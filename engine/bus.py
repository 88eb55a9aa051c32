"""The bus: an XSUB/XPUB proxy every worker publishes to and subscribes from.

Publishers connect PUB sockets to the proxy's XSUB; subscribers connect SUB
sockets to its XPUB (two sockets in a private folder, or TCP ports PORT and
PORT+1: see ``voicebus.engine.endpoints``). Every socket gets explicit
high-water marks and a maximum message size (a peer sending a larger frame is
disconnected; the proxy keeps running). Sockets close with a short linger so
no exit path hangs on an unsent message.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import threading

import zmq

from voicebus.engine.endpoints import Endpoints, free_port_pair
from voicebus.engine.errors import ConfigError
from voicebus.engine.messages import MAX_MESSAGE_BYTES
from voicebus.engine.security import Security

__all__ = ["Bus", "Endpoints", "HWM", "free_port_pair", "tune"]

log = logging.getLogger(__name__)

HWM = 50_000
"""Messages queued per socket (and per peer) before ZeroMQ drops what comes next.

This is the memory bound under a flood: a queued small message costs about 400 bytes
(two 64-byte zmq_msg_t plus the payload and malloc's share; measured), so a full
queue holds ~20 MB, and ~50 MB of 640-byte audio frames. A publisher's burst passes
four such queues (its PUB, the proxy's XSUB and XPUB, the SUB), so the 100k burst a
turn can produce is not dropped even by a subscriber that pauses; 500k per queue let
a flooded worker grow by 120–190 MB and keep it (tests/test_flood.py has the figures). What is dropped stays visible: every
sender numbers its messages, and receivers count the gaps.
"""
SOCKET_MAX_BYTES = MAX_MESSAGE_BYTES + 64 * 1024
"""The socket guard sits above the decoder's limit so envelopes around a full body fit."""
LINGER_MS = 200
KEEPALIVE_IDLE_S = 10
KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_PROBES = 3
"""A TCP peer that vanished (host down, cable out) is noticed after ~25 s of silence and reconnected."""
LOCK_FILE = "bus.lock"


def tune(sock: zmq.Socket, *, max_bytes: int = SOCKET_MAX_BYTES) -> zmq.Socket:
    """Options every bus socket gets: limits, HWMs, short linger, TCP keepalive.

    No ZMTP heartbeats (``ZMQ_HEARTBEAT_IVL``): a receiver whose queue is full stops
    reading its connection, so it cannot see the peer's PINGs; the heartbeat then times
    out a healthy connection, and the reconnect aborts the process with
    ``Assertion failed: _input_stopped`` (libzmq issue 3937; a flood did exactly this to
    our workers). Liveness is the application's job already: every worker sends
    ``sys.heartbeat`` and the supervisor echoes its own through the bus. Only a TCP peer
    that vanished without closing needs the transport's help, and kernel keepalives give
    it without touching ZeroMQ's reading; they probe only idle connections.
    """
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, KEEPALIVE_IDLE_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, KEEPALIVE_INTERVAL_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, KEEPALIVE_PROBES)
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
        self._lock_fd: int | None = None

    def start(self) -> Bus:
        self._warn_if_open()
        try:
            self._claim_folder()
            self._authenticator = self.security.start_authenticator(self._ctx)
        except BaseException:
            self.stop()
            raise
        self._thread = threading.Thread(target=self._run, name="bus-proxy", daemon=True)
        self._thread.start()
        self._bound.wait()
        if self._error is not None:
            self.stop()
            raise ConfigError(f"cannot bind the bus on {self.endpoints.url}: {self._error}") from self._error
        return self

    def _warn_if_open(self) -> None:
        if self.endpoints.is_ipc or self.security.enabled or not self.security.explicitly_insecure:
            return
        if self.endpoints.is_loopback:
            log.warning("bus on %s without keys (--insecure): any local user can connect, listen and "
                        "drive the assistant", self.endpoints.url)
        else:
            log.warning("bus on %s WITHOUT authentication or encryption (--insecure): anyone who can reach "
                        "this address can read and inject messages", self.endpoints.host)

    def _claim_folder(self) -> None:
        """ipc: a private folder, and a lock held while we run.

        libzmq unlinks an existing socket file when it binds, so a second bus on the same
        folder would silently take the path over from a running one; the lock makes it
        fail instead. The kernel drops the lock when we die, however we die, so a
        leftover socket from a killed bus never blocks its replacement.
        """
        if not self.endpoints.is_ipc:
            return
        self.endpoints.prepare()
        try:
            self._lock_fd = _lock_folder(self.endpoints.folder, create=True)
        except BlockingIOError:
            raise ConfigError(f"a bus is already running at {self.endpoints.url}") from None
        except OSError as exc:
            raise ConfigError(_unusable_lock(self.endpoints.folder, exc)) from None

    def _run(self) -> None:
        xsub = tune(self._ctx.socket(zmq.XSUB), max_bytes=self.max_bytes)
        xpub = tune(self._ctx.socket(zmq.XPUB), max_bytes=self.max_bytes)
        control = self._ctx.socket(zmq.PAIR)
        control.setsockopt(zmq.LINGER, 0)
        try:
            for sock in (xsub, xpub):
                self.security.apply_server(sock)
            for sock, address in zip((xsub, xpub), self._bind_addresses()):
                sock.bind(address)
            if self.endpoints.is_ipc:
                for path in self.endpoints.socket_paths:
                    os.chmod(path, 0o600)  # the folder keeps others out; this says so twice
            control.bind(self._control_addr)
        except (zmq.ZMQError, OSError) as exc:
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

    def _bind_addresses(self) -> tuple[str, str]:
        ep = self.endpoints
        if ep.is_ipc:
            return ep.publish, ep.subscribe
        host = "*" if ep.host in ("0.0.0.0", "*") else ep._host_for_url
        return f"tcp://{host}:{ep.port}", f"tcp://{host}:{ep.port + 1}"

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
        if self._lock_fd is not None:
            for path in self.endpoints.socket_paths:  # ours while we hold the lock
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Bus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _lock_folder(folder: str, *, create: bool) -> int:
    """The fd of the bus folder's lock file, locked (closing it unlocks); BlockingIOError while a running bus
    holds the lock, FileNotFoundError when there is no lock file and ``create`` is false."""
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    fd = os.open(os.path.join(folder, LOCK_FILE), flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


def _unusable_lock(folder: str, exc: OSError) -> str:
    return (f"cannot lock the bus folder {folder} ({os.path.join(folder, LOCK_FILE)}: {exc.strerror or exc}); "
            f"remove it, or give this run a bus of its own: --bus ipc:///tmp/voicebus-second")


def ensure_free(endpoints: Endpoints) -> None:
    """ConfigError if a bus already runs at ``endpoints``: its folder's lock is held (ipc), or its ports are taken
    (tcp). For ``voicebus up`` before it starts anything: its workers would otherwise join the running bus."""
    busy = f"a bus is already running at {endpoints.url} (another voicebus up?); stop it, or give this run a bus of its own"
    if endpoints.is_ipc:
        try:
            fd = _lock_folder(endpoints.folder, create=False)
        except BlockingIOError:
            raise ConfigError(f"{busy}: --bus ipc:///tmp/voicebus-second") from None
        except FileNotFoundError:
            return  # no lock file: no bus has run here
        except OSError as exc:
            raise ConfigError(_unusable_lock(endpoints.folder, exc)) from None
        os.close(fd)  # closing drops our lock too
        return
    for port in (endpoints.port, endpoints.port + 1):
        with socket.socket(socket.AF_INET6 if ":" in endpoints.host else socket.AF_INET) as probe:
            try:
                probe.bind((endpoints.host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ConfigError(f"{busy}: --bus tcp://{endpoints.host}:{endpoints.port + 2}") from None
                return  # another failure (an address not on this host): the bus reports it when it binds
