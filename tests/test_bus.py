"""The bus with real sockets: readiness, bursts, limits, CurveZMQ."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import zmq

from voicebus.engine.bus import Bus, Endpoints, free_port_pair
from voicebus.engine.client import BusClient, SequenceTracker
from voicebus.engine.errors import ConfigError
from voicebus.engine.messages import Interrupt, encode, Envelope
from voicebus.engine.security import Security, allow_key, init_keys
from voicebus.workers.kinds import Ask

from conftest import wait_for


def test_endpoints_parse_and_second_port():
    ep = Endpoints.parse("tcp://10.0.0.5:7700")
    assert (ep.publish, ep.subscribe, ep.is_loopback) == ("tcp://10.0.0.5:7700", "tcp://10.0.0.5:7701", False)
    assert Endpoints.parse("127.0.0.1:9000").is_loopback
    with pytest.raises(ConfigError):
        Endpoints.parse("http://x")


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
