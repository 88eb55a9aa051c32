"""The bus with real sockets: addresses, the private folder, readiness, bursts, limits, CurveZMQ."""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq

from voicebus.engine.bus import HWM, LOCK_FILE, Bus, Endpoints, ensure_free, free_port_pair, tune
from voicebus.engine.client import BusClient, SequenceTracker
from voicebus.engine.endpoints import default_url
from voicebus.engine.errors import ConfigError
from voicebus.engine.messages import Interrupt, encode, Envelope, new_envelope
from voicebus.engine.security import Security, allow_key, init_keys
from voicebus.workers.kinds import Ask

from conftest import wait_for
from support.procs import bus_folder  # noqa: F401  (a fixture)

NOBODY = 65534


def test_endpoints_parse_and_second_port():
    ep = Endpoints.parse("tcp://10.0.0.5:7700")
    assert (ep.publish, ep.subscribe, ep.is_loopback) == ("tcp://10.0.0.5:7700", "tcp://10.0.0.5:7701", False)
    assert Endpoints.parse("127.0.0.1:9000").is_loopback
    v6 = Endpoints.parse("tcp://[::1]:65534")
    assert (v6.host, v6.port, v6.subscribe, v6.is_loopback) == ("::1", 65534, "tcp://[::1]:65535", True)
    with pytest.raises(ConfigError):
        Endpoints.parse("http://x")


def test_endpoints_ipc_names_two_sockets_in_one_folder():
    ep = Endpoints.parse("ipc:///run/user/1000/voicebus/")
    assert (ep.url, ep.publish, ep.subscribe) == (
        "ipc:///run/user/1000/voicebus", "ipc:///run/user/1000/voicebus/pub", "ipc:///run/user/1000/voicebus/sub")
    assert ep.is_ipc and ep.is_loopback and Endpoints.parse(ep.url) == ep
    assert Endpoints.parse("ipc://~/vb").folder == os.path.expanduser("~/vb")


@pytest.mark.parametrize("url, says", [
    ("tcp://127.0.0.1:99999", "port 99999 is out of range"),
    ("tcp://127.0.0.1:65535", "so PORT is 1 to 65534"),
    ("tcp://127.0.0.1:0", "out of range"),
    ("tcp://127.0.0.1:abc", "port 'abc' is not a number"),
    ("tcp://127.0.0.1:-1", "port '-1' is not a number"),
    ("tcp://[::1:7700", "IPv6 host goes in brackets"),
    ("tcp://::1:7700", "is not a host name"),
    ("tcp://:7700", "not of the form"),
    ("tcp://host name:7700", "is not a host name"),
    ("ipc://relative", "absolute folder"),
    ("ipc://@voicebus", "abstract socket"),
    ("ipc:///tmp/" + "d" * 102, "too long for a unix socket (111 bytes"),
])
def test_bad_bus_addresses_are_config_errors(url, says):
    with pytest.raises(ConfigError, match=None) as caught:
        Endpoints.parse(url)
    assert says in str(caught.value)


def test_default_bus_is_a_private_folder_in_the_runtime_dir(monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert default_url() == "ipc:///run/user/1000/voicebus"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_url() == f"ipc:///tmp/voicebus-{os.geteuid()}"


def test_private_folder_is_created_0700_and_refused_when_not_private(bus_folder):
    folder = bus_folder / "bus"
    Endpoints.ipc(folder).prepare()
    assert folder.stat().st_mode & 0o777 == 0o700
    folder.chmod(0o750)
    with pytest.raises(ConfigError, match="open to other users \\(mode 750\\)"):
        Endpoints.ipc(folder).prepare()
    folder.chmod(0o700)
    if os.geteuid() == 0:
        os.chown(folder, NOBODY, NOBODY)
        with pytest.raises(ConfigError, match=f"belongs to uid {NOBODY}, not to you"):
            Endpoints.ipc(folder).prepare()
        with pytest.raises(ConfigError, match=f"belongs to uid {NOBODY}"):
            BusClient(Endpoints.ipc(folder), name="refused")
    (bus_folder / "link").symlink_to(folder)
    with pytest.raises(ConfigError, match="is a symbolic link"):
        Endpoints.ipc(bus_folder / "link").prepare()
    (bus_folder / "file").write_text("")
    with pytest.raises(ConfigError, match="is not a folder"):
        Endpoints.ipc(bus_folder / "file").prepare()


def test_security_by_transport(tmp_path):
    def resolve(url: str, mode: str = "auto") -> Security:
        return Security.resolve(Endpoints.parse(url), keys_dir=tmp_path, mode=mode)

    assert resolve("ipc:///tmp/vb") == Security()  # the folder's permissions are the access control
    assert resolve("tcp://127.0.0.1:7700").curve  # loopback TCP admits every local user: keys
    assert resolve("tcp://10.0.0.5:7700").curve
    assert resolve("tcp://127.0.0.1:7700", "insecure").explicitly_insecure
    with pytest.raises(ConfigError, match="a TCP bus needs keys .* or --insecure"):
        resolve("tcp://127.0.0.1:7700").check_client()


def test_open_mode_on_loopback_warns_in_one_line(caplog):
    with caplog.at_level(logging.WARNING, logger="voicebus.engine.bus"):
        with Bus(Endpoints("127.0.0.1", free_port_pair()), Security(explicitly_insecure=True)):
            pass
    [warning] = [r.getMessage() for r in caplog.records]
    assert "any local user can connect" in warning and "\n" not in warning


def test_bus_sockets_have_bounded_queues_and_no_zmtp_heartbeats():
    """ZMTP heartbeats on a full receive queue abort the process (libzmq issue 3937): none here."""
    ctx = zmq.Context()
    try:
        sock = tune(ctx.socket(zmq.SUB))
        assert sock.getsockopt(zmq.HEARTBEAT_IVL) == 0 and sock.getsockopt(zmq.HEARTBEAT_TIMEOUT) == -1
        assert sock.getsockopt(zmq.RCVHWM) == sock.getsockopt(zmq.SNDHWM) == HWM == 50_000
        assert sock.getsockopt(zmq.TCP_KEEPALIVE) == 1
        sock.close(linger=0)
    finally:
        ctx.term()


def test_a_lock_file_that_cannot_be_locked_is_one_line_naming_it(bus_folder):
    """Found in review: a bus.lock that is a folder (or unreadable) reached voicebus up as a traceback."""
    url = f"ipc://{bus_folder}"
    (bus_folder / LOCK_FILE).mkdir()
    said = f"cannot lock the bus folder {bus_folder} ({bus_folder / LOCK_FILE}: Is a directory)"
    with pytest.raises(ConfigError, match=re.escape(said)):
        ensure_free(Endpoints.parse(url))
    with pytest.raises(ConfigError, match=re.escape(said)):
        Bus(Endpoints.parse(url), Security()).start()


def test_one_bus_per_folder_and_a_killed_bus_frees_it(bus_folder):
    url = f"ipc://{bus_folder}"
    proc = subprocess.Popen([sys.executable, "-m", "voicebus.cli.main", "bus", "--bus", url],
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None and proc.stderr.readline().startswith("bus on ")
        with pytest.raises(ConfigError, match="a bus is already running at"):
            Bus(Endpoints.parse(url), Security()).start()
    finally:
        proc.send_signal(signal.SIGKILL)  # no clean-up: its socket files stay behind
        proc.wait(10)
    assert (bus_folder / "pub").exists()
    with Bus(Endpoints.parse(url), Security()):
        with BusClient(Endpoints.parse(url), name="after") as client:
            client.announce(timeout=5)
    assert not (bus_folder / "pub").exists(), "a stopped bus removes its sockets"


def test_message_right_after_ready_is_received(make_client):
    listener = make_client("listener", subscribe=("ctl.",))
    sender = make_client("sender")
    sender.publish(Ask(text="hello"), turn=1)
    env = wait_for(listener, lambda e: e.kind == "ctl.ask", timeout=5)
    assert env.body == Ask(text="hello") and env.turn == 1


def test_burst_of_100k_loses_nothing_to_a_live_subscriber(make_client):
    receiver = make_client("receiver", subscribe=("ctl.",))
    sender = make_client("sender")
    count = 100_000
    got = 0
    tracker = SequenceTracker()

    def receive():
        nonlocal got
        while got < count:
            env = receiver.recv(timeout=10)
            if env is None:
                return
            tracker.see(env)
            got += 1

    thread = threading.Thread(target=receive)
    thread.start()
    body = Interrupt(reason="burst")
    for _ in range(count):
        sender.publish(body)
    thread.join(60)
    assert got == count
    assert sum(tracker.lost.values()) == 0


def test_oversized_frame_disconnects_only_its_sender(bus, make_client):
    receiver = make_client("receiver", subscribe=("ctl.", "big"))
    ctx = zmq.Context.instance()
    rogue = ctx.socket(zmq.PUB)
    rogue.connect(bus.endpoints.publish)
    try:
        time.sleep(0.3)  # a raw PUB has no readiness handshake; this only gives the big frame a chance
        rogue.send_multipart([b"big", b"x" * (10 * 1024 * 1024)])
        good = make_client("good")
        good.publish(Ask(text="still here"))
        env = wait_for(receiver, lambda e: True, timeout=5)
        assert env.body == Ask(text="still here")
    finally:
        rogue.close(linger=0)


def test_sequence_tracker_counts_gaps():
    tracker = SequenceTracker()
    def env(seq):
        return Envelope(kind="k", src="a", seq=seq, body={})
    assert [tracker.see(env(s)) for s in (1, 2, 5, 6, 1)] == [0, 0, 2, 0, 0]
    assert tracker.lost["a"] == 2


def test_public_bind_without_keys_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="keys init"):
        Bus(Endpoints("0.0.0.0", free_port_pair()), Security())


@pytest.fixture
def curve_bus(tmp_path):
    keys = tmp_path / "keys"
    init_keys(keys)
    security = Security(curve=True, keys_dir=keys)
    with Bus(Endpoints("127.0.0.1", free_port_pair()), security) as running:
        yield running, keys


def test_curve_allowed_client_works(curve_bus):
    bus, keys = curve_bus
    with BusClient(bus.endpoints, Security(curve=True, keys_dir=keys), name="a") as a, \
         BusClient(bus.endpoints, Security(curve=True, keys_dir=keys), name="b") as b:
        a.subscribe("ctl.")
        a.announce(timeout=5)
        b.announce(timeout=5)
        b.publish(Ask(text="secret"))
        assert wait_for(a, lambda e: e.kind == "ctl.ask", timeout=5).body == Ask(text="secret")


def test_curve_refuses_unknown_key_and_plaintext(curve_bus, tmp_path):
    bus, keys = curve_bus
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    zmq.auth.create_certificates(str(stranger), "client")
    (stranger / "bus.key").write_bytes((keys / "bus.key").read_bytes())
    with BusClient(bus.endpoints, Security(curve=True, keys_dir=stranger), name="stranger") as s:
        with pytest.raises(ConnectionError):
            s.announce(timeout=1.5)
    with BusClient(bus.endpoints, Security(), name="plain") as p:
        with pytest.raises(ConnectionError):
            p.announce(timeout=1.5)
    # and an allowed client does not hear what the stranger publishes
    with BusClient(bus.endpoints, Security(curve=True, keys_dir=keys), name="ok") as ok, \
         BusClient(bus.endpoints, Security(curve=True, keys_dir=stranger), name="stranger2") as s2:
        ok.subscribe("ctl.")
        ok.announce(timeout=5)
        for _ in range(20):
            s2.publish(Ask(text="injected"))
        assert ok.recv(timeout=1.0) is None


def test_allow_key_admits_a_new_client(curve_bus, tmp_path):
    bus, keys = curve_bus
    other = tmp_path / "other"
    other.mkdir()
    public, _ = zmq.auth.create_certificates(str(other), "client")
    (other / "bus.key").write_bytes((keys / "bus.key").read_bytes())
    allow_key(keys, Path(public).rename(other / "laptop.key"))
    (other / "client.key").write_bytes((other / "laptop.key").read_bytes())
    # The running bus re-reads allowed/ within a second; a client refused before that stays
    # refused (libzmq does not retry a failed handshake), so it connects anew — as a restarted worker would.
    deadline = time.monotonic() + 10
    while True:
        with BusClient(bus.endpoints, Security(curve=True, keys_dir=other), name="laptop") as c:
            try:
                c.announce(timeout=1)
                break
            except ConnectionError:
                assert time.monotonic() < deadline, "allowed key never admitted"


# --- another local user ---------------------------------------------------------------------------


def _as_another_user(url: str, results) -> None:
    """A client in a child process that has become ``nobody``: try every way onto the bus."""
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    endpoints = Endpoints.parse(url)
    found: dict[str, str] = {}
    with socket.socket(socket.AF_UNIX) as raw:  # the kernel's answer, without ZeroMQ in the way
        try:
            raw.connect(str(endpoints.socket_paths[0]))
            found["connect"] = "connected"
        except OSError as exc:
            found["connect"] = type(exc).__name__
    try:
        BusClient(endpoints, name="stranger").close()
        found["voicebus"] = "connected"
    except ConfigError as exc:
        found["voicebus"] = str(exc)
    # A plain PUB needs no voicebus code at all: inject for two seconds, as an attacker would.
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.connect(endpoints.publish)
    deadline = time.monotonic() + 2.0
    seq = 0
    while time.monotonic() < deadline:
        seq += 1
        env = new_envelope("ctl.ask", f"stranger@x:{os.getpid()}", seq, time.time(), "default", 1, Ask(text="injected"))
        pub.send_multipart(encode(env))
        time.sleep(0.02)
    pub.close(linger=0)
    ctx.term()
    results.send(found)


def run_as_another_user(url: str) -> dict[str, str]:
    # Forked, then setuid: this interpreter lives under /root (mode 0700), which nobody could exec.
    fork = multiprocessing.get_context("fork")
    receive, send = fork.Pipe(duplex=False)
    child = fork.Process(target=_as_another_user, args=(url, send), name="nobody")
    child.start()
    try:
        assert receive.poll(20), "the child running as nobody did not report"
        return receive.recv()
    finally:
        child.join(10)
        assert child.exitcode == 0


def injected(owner: BusClient, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        env = owner.recv(timeout=remaining)
        if env is not None and env.kind == "ctl.ask" and env.src.startswith("stranger@"):
            return True
    return False


@pytest.mark.skipif(os.geteuid() != 0, reason="becoming another user needs root")
def test_another_local_user_cannot_publish_on_the_private_bus(bus_folder):
    url = f"ipc://{bus_folder}"
    proc = subprocess.Popen([sys.executable, "-m", "voicebus.cli.main", "bus", "--bus", url],
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None and proc.stderr.readline().startswith("bus on ")
        with BusClient(Endpoints.parse(url), name="owner") as owner, \
             BusClient(Endpoints.parse(url), name="owner-too") as sender:
            owner.subscribe("ctl.")
            owner.announce(timeout=10)
            sender.announce(timeout=10)

            found = run_as_another_user(url)
            assert found["connect"] == "PermissionError"
            assert f"belongs to uid 0, not to you (uid {NOBODY})" in found["voicebus"]
            assert not injected(owner, 1.0), "another user's message reached the bus"

            sender.publish(Ask(text="mine"), turn=2)  # while the owner's own messages pass
            assert wait_for(owner, lambda e: e.kind == "ctl.ask", timeout=5).body == Ask(text="mine")

            # The control: with the folder and sockets opened up, the same child does get through,
            # so the refusal above is the permissions' doing, not the harness's.
            bus_folder.chmod(0o711)
            for path in Endpoints.parse(url).socket_paths:
                path.chmod(0o666)
            assert run_as_another_user(url)["connect"] == "connected"
            assert injected(owner, 5.0)
    finally:
        proc.terminate()
        proc.wait(10)
