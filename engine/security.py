"""CurveZMQ for a bus reachable from the network.

A keys folder holds::

    bus.key  bus.key_secret          the bus's keypair (the secret stays on the bus host)
    client.key  client.key_secret    a client keypair (copy both, plus bus.key, to a worker host)
    allowed/                         public keys of clients the bus admits

Curve alone admits any client that knows the server's public key, so the bus
also runs a ZAP authenticator that checks client keys against ``allowed/``;
unknown keys and plaintext clients are refused.
"""

from __future__ import annotations

import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

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
    def resolve(cls, *, loopback: bool, keys_dir: Path, mode: str) -> Security:
        """``mode``: auto (curve unless the bus is on loopback), curve, or insecure."""
        if mode == "insecure":
            return cls(explicitly_insecure=True)
        if mode == "curve" or (mode == "auto" and not loopback):
            return cls(curve=True, keys_dir=keys_dir)
        if mode == "auto":
            return cls()
        raise ConfigError(f"bus security {mode!r} is not one of auto, curve, insecure")

    def _cert(self, name: str, *, secret: bool) -> tuple[bytes, bytes | None]:
        assert self.keys_dir is not None
        path = self.keys_dir / (f"{name}.key_secret" if secret else f"{name}.key")
        if not path.exists():
            raise ConfigError(
                f"CurveZMQ key {path} not found: run 'voicebus keys init --keys {self.keys_dir}' "
                "(or copy the keys from the bus host), or use --insecure"
            )
        try:
            return zmq.auth.load_certificate(path)
        except (ValueError, OSError) as exc:
            raise ConfigError(f"CurveZMQ key {path} is unreadable: {exc}") from None

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


def allow_key(keys_dir: Path, public_key_file: Path) -> Path:
    """Authorise a client's public key file; returns where it was copied."""
    try:
        public, _ = zmq.auth.load_certificate(public_key_file)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{public_key_file} is not a CurveZMQ public key file: {exc}") from None
    if not public:
        raise ConfigError(f"{public_key_file} holds no public key")
    allowed = keys_dir / ALLOWED
    allowed.mkdir(parents=True, exist_ok=True)
    target = allowed / public_key_file.name
    if target.exists() and target.resolve() != public_key_file.resolve():
        target = allowed / f"{public_key_file.stem}-{public.decode()[:8]}.key"
    # A secret file holds the public key too; copy only the public part.
    if public_key_file.name.endswith("_secret"):
        target = allowed / public_key_file.name.removesuffix("_secret")
        target.write_text(f"metadata\ncurve\n    public-key = \"{public.decode()}\"\n")
    else:
        shutil.copyfile(public_key_file, target)
    return target
