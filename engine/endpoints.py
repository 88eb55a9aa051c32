"""Where the bus lives: one URL names both of its sockets.

    ipc:///FOLDER     the default: a private folder holding two unix sockets, FOLDER/pub
                      (publishers connect) and FOLDER/sub (subscribers connect). Only the
                      folder's owner can reach them, so no keys are needed on one machine.
    tcp://HOST:PORT   publishers connect to PORT, subscribers to PORT+1. Any local user can
                      reach even a loopback port, so TCP takes CurveZMQ keys (or --insecure).

The default folder is ``$XDG_RUNTIME_DIR/voicebus`` (a per-user, 0700 folder on systemd
systems), else ``/tmp/voicebus-UID``. Whoever touches the folder first — the bus or a
client — creates it 0700; one that exists but is not ours, or is open to others, is
refused: someone else could be listening there.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from voicebus.engine.errors import ConfigError

PUBLISH_SOCKET = "pub"
SUBSCRIBE_SOCKET = "sub"
MAX_SOCKET_PATH = 107
"""sizeof(sockaddr_un.sun_path) on Linux is 108, one of which is the terminating NUL."""
_HOST = re.compile(r"[A-Za-z0-9._-]+|\*")


def default_url() -> str:
    """The private local bus of the user running this."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    folder = Path(runtime) / "voicebus" if os.path.isabs(runtime) else Path(f"/tmp/voicebus-{os.geteuid()}")
    return f"ipc://{folder}"


@dataclass(frozen=True)
class Endpoints:
    """The bus's two sockets: ``Endpoints(host, port)`` for TCP, ``Endpoints.ipc(folder)`` for a folder."""

    host: str = ""
    port: int = 0
    folder: str = ""
    """ipc only: the private folder holding both sockets."""

    @classmethod
    def ipc(cls, folder: str | os.PathLike[str]) -> Endpoints:
        return cls.parse(f"ipc://{os.fspath(folder)}")

    @classmethod
    def parse(cls, url: str) -> Endpoints:
        """``tcp://HOST:PORT`` (``HOST:PORT`` alone means TCP too) or ``ipc:///FOLDER``; ConfigError if neither."""
        text = str(url).strip()
        scheme, sep, rest = text.partition("://")
        if not sep:
            scheme, rest = "tcp", text
        if scheme == "ipc":
            return cls(folder=_ipc_folder(url, rest))
        if scheme != "tcp":
            raise ConfigError(f"bus address {url!r} is not of the form ipc:///FOLDER or tcp://HOST:PORT")
        host, port = _tcp_host_port(url, rest)
        return cls(host, port)

    @property
    def is_ipc(self) -> bool:
        return bool(self.folder)

    @property
    def publish(self) -> str:
        """Where publishers connect (the proxy's XSUB)."""
        if self.is_ipc:
            return f"ipc://{self.folder}/{PUBLISH_SOCKET}"
        return f"tcp://{self._host_for_url}:{self.port}"

    @property
    def subscribe(self) -> str:
        """Where subscribers connect (the proxy's XPUB)."""
        if self.is_ipc:
            return f"ipc://{self.folder}/{SUBSCRIBE_SOCKET}"
        return f"tcp://{self._host_for_url}:{self.port + 1}"

    @property
    def url(self) -> str:
        """The one URL that names both sockets (what ``--bus`` takes)."""
        return f"ipc://{self.folder}" if self.is_ipc else self.publish

    @property
    def is_loopback(self) -> bool:
        """Unreachable from other hosts: a folder, or TCP on a loopback address."""
        if self.is_ipc or self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def socket_paths(self) -> tuple[Path, Path]:
        """ipc only: the files of the publish and subscribe sockets."""
        folder = Path(self.folder)
        return folder / PUBLISH_SOCKET, folder / SUBSCRIBE_SOCKET

    def prepare(self) -> None:
        """Before binding or connecting: an ipc bus's folder exists and is private to us."""
        if self.is_ipc:
            ensure_private_folder(Path(self.folder))

    @property
    def _host_for_url(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host


def _ipc_folder(url: str, path: str) -> str:
    if path.startswith("@"):
        raise ConfigError(f"bus address {url!r} is an abstract socket, which any local user can reach: "
                          "name a folder, ipc:///FOLDER")
    if "\0" in path:
        raise ConfigError(f"bus address {url!r} contains a NUL character")
    expanded = os.path.expanduser(path)
    if not os.path.isabs(expanded):
        raise ConfigError(f"bus address {url!r} needs an absolute folder, ipc:///FOLDER")
    folder = os.path.normpath(expanded)
    longest = len(os.fsencode(folder)) + 1 + max(len(PUBLISH_SOCKET), len(SUBSCRIBE_SOCKET))
    if longest > MAX_SOCKET_PATH:
        raise ConfigError(f"bus folder {folder} is too long for a unix socket ({longest} bytes with the socket "
                          f"name; at most {MAX_SOCKET_PATH}): choose a shorter folder")
    return folder


def _tcp_host_port(url: str, rest: str) -> tuple[str, int]:
    form = f"bus address {url!r} is not of the form tcp://HOST:PORT"
    if rest.startswith("["):  # [IPv6]:PORT
        host, bracket, tail = rest[1:].partition("]")
        if not bracket or not tail.startswith(":"):
            raise ConfigError(f"{form} (an IPv6 host goes in brackets: tcp://[::1]:PORT)")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{form}: {host!r} is not an IPv6 address") from None
        port_text = tail[1:]
    else:
        host, colon, port_text = rest.rpartition(":")
        if not colon or not host:
            raise ConfigError(form)
        if not _HOST.fullmatch(host):
            raise ConfigError(f"{form}: {host!r} is not a host name or address")
    if not port_text.isascii() or not port_text.isdigit():
        raise ConfigError(f"{form}: port {port_text!r} is not a number")
    port = int(port_text)
    if not 1 <= port <= 65534:
        raise ConfigError(f"bus address {url!r}: port {port} is out of range; the bus takes PORT and PORT+1, "
                          "so PORT is 1 to 65534")
    return host, port


def ensure_private_folder(folder: Path) -> None:
    """Create ``folder`` 0700 if missing; ConfigError unless it is a real folder of ours that others cannot enter.

    Creating it (rather than waiting for the bus to) closes a race on shared parents
    such as /tmp: nobody else can slip in a folder of their own after we looked.
    """
    try:
        folder.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot create the bus folder {folder}: {exc.strerror or exc}") from None
    try:
        info = os.lstat(folder)  # lstat: a symlink planted by someone else must not redirect us
    except OSError as exc:
        raise ConfigError(f"cannot inspect the bus folder {folder}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(info.st_mode):
        what = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a folder"
        raise ConfigError(f"the bus folder {folder} is {what}: remove it or choose another with --bus ipc:///FOLDER")
    me = os.geteuid()
    if info.st_uid != me:
        raise ConfigError(f"the bus folder {folder} belongs to uid {info.st_uid}, not to you (uid {me}): "
                          "someone else could be listening there; choose another with --bus ipc:///FOLDER")
    if info.st_mode & 0o077:
        raise ConfigError(f"the bus folder {folder} is open to other users (mode {stat.S_IMODE(info.st_mode):03o}): "
                          f"run 'chmod 700 {folder}' or choose another")


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
