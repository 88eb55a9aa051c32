"""CurveZMQ for a TCP bus (on the network, or on loopback where every local user can reach it).

A keys folder holds::

    bus.key  bus.key_secret          the bus's keypair (the secret stays on the bus host)
    client.key  client.key_secret    a client keypair (copy both, plus bus.key, to a worker host)
    allowed/                         public keys of clients the bus admits

Curve alone admits any client that knows the server's public key, so the bus
also runs a ZAP authenticator that checks client keys against ``allowed/``;
unknown keys and plaintext clients are refused.

The default bus needs none of this: it lives in a private folder (``ipc://``) that
only its owner can enter. A TCP bus without keys is the *open mode*, allowed only
with an explicit ``--insecure``.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from voicebus.engine.endpoints import Endpoints
from voicebus.engine.errors import ConfigError

BUS_KEY = "bus"
CLIENT_KEY = "client"
ALLOWED = "allowed"


@dataclass(frozen=True)
class Security:
    """How bus sockets authenticate: ``curve`` (with a keys folder) or plaintext."""

    curve: bool = False
    keys_dir: Path | None = None
    explicitly_insecure: bool = False

    @property
    def enabled(self) -> bool:
        return self.curve

    @classmethod
    def resolve(cls, endpoints: Endpoints, *, keys_dir: Path, mode: str) -> Security:
        """``mode``: auto (a private folder needs no keys; TCP, even on loopback, does), curve, or insecure."""
        if mode == "insecure":
            return cls(explicitly_insecure=True)
        if mode == "curve" or (mode == "auto" and not endpoints.is_ipc):
            return cls(curve=True, keys_dir=keys_dir)
        if mode == "auto":
            return cls()
        raise ConfigError(f"bus security {mode!r} is not one of auto, curve, insecure")

    def _cert(self, name: str, *, secret: bool) -> tuple[bytes, bytes | None]:
        assert self.keys_dir is not None
        path = self.keys_dir / (f"{name}.key_secret" if secret else f"{name}.key")
        if not path.exists():
            raise ConfigError(
                f"CurveZMQ key {path} not found: a TCP bus needs keys ('voicebus keys init --keys {self.keys_dir}', "
                "or copy them from the bus host), or --insecure to admit anyone who can reach it; "
                "the default local bus (ipc) needs neither"
            )
        try:
            return zmq.auth.load_certificate(path)
        except (ValueError, OSError) as exc:
            raise ConfigError(f"CurveZMQ key {path} is unreadable: {exc}") from None

    def check_client(self) -> None:
        """ConfigError now, not at connect time, when a client's keys are missing or unreadable."""
        if self.curve:
            self._cert(CLIENT_KEY, secret=True)
            self._cert(BUS_KEY, secret=False)

    def apply_server(self, sock: zmq.Socket) -> None:
        if not self.curve:
            return
        public, secret = self._cert(BUS_KEY, secret=True)
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        sock.curve_server = True

    def apply_client(self, sock: zmq.Socket) -> None:
        if not self.curve:
            return
        public, secret = self._cert(CLIENT_KEY, secret=True)
        server_public, _ = self._cert(BUS_KEY, secret=False)
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        sock.curve_serverkey = server_public

    def start_authenticator(self, ctx: zmq.Context) -> KeyWatcher | None:
        if not self.curve:
            return None
        assert self.keys_dir is not None
        allowed = self.keys_dir / ALLOWED
        if not allowed.is_dir():
            raise ConfigError(f"no {allowed} folder of allowed client keys: run 'voicebus keys init'")
        return KeyWatcher(ctx, allowed)


class KeyWatcher:
    """A ZAP authenticator that re-reads the allowed keys when the folder changes,
    so 'voicebus keys allow' takes effect on a running bus within a second."""

    def __init__(self, ctx: zmq.Context, allowed: Path, *, interval_s: float = 1.0) -> None:
        self.allowed = allowed
        self._auth = ThreadAuthenticator(ctx)
        self._auth.start()
        self._stamp = self._folder_stamp()
        self._auth.configure_curve(domain="*", location=str(allowed))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(interval_s,), name="bus-keys", daemon=True)
        self._thread.start()

    def _folder_stamp(self) -> tuple[tuple[str, float], ...]:
        return tuple(sorted((p.name, p.stat().st_mtime) for p in self.allowed.glob("*.key")))

    def _watch(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            stamp = self._folder_stamp()
            if stamp != self._stamp:
                self._stamp = stamp
                self._auth.configure_curve(domain="*", location=str(self.allowed))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._auth.stop()


def init_keys(keys_dir: Path, *, force: bool = False) -> list[Path]:
    """Write a bus keypair and a client keypair, and allow the client. Returns files written."""
    keys_dir.mkdir(parents=True, exist_ok=True)
    existing = [keys_dir / f"{n}.key_secret" for n in (BUS_KEY, CLIENT_KEY) if (keys_dir / f"{n}.key_secret").exists()]
    if existing and not force:
        raise ConfigError(f"keys already exist in {keys_dir} (use --force to replace them)")
    written = []
    for name in (BUS_KEY, CLIENT_KEY):
        public, secret = zmq.auth.create_certificates(str(keys_dir), name)
        Path(secret).chmod(0o600)
        written += [Path(public), Path(secret)]
    written.append(allow_key(keys_dir, keys_dir / f"{CLIENT_KEY}.key"))
    return written


def key_fingerprint(public: bytes) -> str:
    """A short, file-name-safe name for a Z85 public key (Z85 itself contains '/')."""
    return hashlib.sha256(public).hexdigest()[:12]


def allow_key(keys_dir: Path, public_key_file: Path) -> Path:
    """Authorise a client's public key file; returns where its public part was written.

    The copy keeps the file's name (``laptop.key``); when another key already holds that
    name, it gets the key's fingerprint too (``laptop-1f2e3d4c5b6a.key``), so allowing a
    second host never replaces the first.
    """
    try:
        public, _ = zmq.auth.load_certificate(public_key_file)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{public_key_file} is not a CurveZMQ public key file: {exc}") from None
    if not public:
        raise ConfigError(f"{public_key_file} holds no public key")
    allowed = keys_dir / ALLOWED
    allowed.mkdir(parents=True, exist_ok=True)
    stem = public_key_file.name.removesuffix("_secret").removesuffix(".key") or "client"
    target = allowed / f"{stem}.key"
    if target.exists() and _public_key(target) != public:
        target = allowed / f"{stem}-{key_fingerprint(public)}.key"
    # A secret file holds the public key too; write only the public part, whatever the source.
    target.write_text(f"metadata\ncurve\n    public-key = \"{public.decode()}\"\n")
    return target


def _public_key(path: Path) -> bytes | None:
    try:
        return zmq.auth.load_certificate(path)[0]
    except (ValueError, OSError):
        return None
