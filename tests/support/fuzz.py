"""Bad frames for the bus, and a raw ZeroMQ publisher proven connected before it sends them.

A raw PUB has no hello handshake of its own: whatever it sends before the
proxy's subscriptions have reached it is dropped (the slow joiner). So it
sends a valid probe until a real client hears it, and only then the garbage.
"""

from __future__ import annotations

import itertools
import random
import time

import msgpack
import zmq

from voicebus.engine.client import BusClient
from voicebus.engine.bus import Endpoints
from voicebus.engine.messages import PROTOCOL_VERSION, Envelope, encode

PROBE_KIND = "test.probe"


def envelope_map(kind: str, body: object, **changes: object) -> dict:
    data = {"v": PROTOCOL_VERSION, "kind": kind, "src": "fuzz@test:1", "seq": 1, "ts": time.time(),
            "session": "default", "turn": 0, "body": body}
    data.update(changes)
    return data


def packed(kind: str, body: object, **changes: object) -> bytes:
    return msgpack.packb(envelope_map(kind, body, **changes), use_bin_type=True)


def bad_frames(topic: str, good_body: dict, *, seed: int = 7) -> list[tuple[str, list[bytes]]]:
    """(expected error code, frames) for every way a frame on ``topic`` can be wrong.

    ``good_body`` is a valid body for ``topic``'s kind; its first field is given a wrong type.
    """
    t = topic.encode()
    good = packed(topic, good_body)
    field_name = next(iter(good_body))
    rng = random.Random(seed)
    cases = [
        ("frame_count", [t]),
        ("frame_count", [t, good, b"extra"]),
        ("not_msgpack", [t, good[: len(good) // 2]]),  # truncated
        ("not_msgpack", [t, good + b"\xc1"]),  # trailing garbage
        ("not_msgpack", [t, b"\xc1\xc1\xc1"]),  # never-used byte
        ("not_msgpack", [t, b"\xdd\xff\xff\xff\xff"]),  # an array claiming 4 G items
        ("not_msgpack", [t, b"\xdf\xff\xff\xff\xff"]),  # a map claiming 4 G pairs
        ("not_msgpack", [t, b"\x91" * 5000 + b"\x00"]),  # nested 5000 deep
        ("not_msgpack", [t, msgpack.packb({1: 2})]),  # non-string map key
        ("bad_envelope", [t, msgpack.packb([1, 2, 3])]),
        ("bad_envelope", [t, msgpack.packb("just text")]),
        ("bad_envelope", [t, msgpack.packb({"v": PROTOCOL_VERSION})]),  # fields missing
        ("bad_envelope", [t, packed(topic, good_body, seq="one")]),
        ("bad_envelope", [t, packed(topic, good_body, turn=True)]),
        ("bad_envelope", [t, packed(topic, good_body, ts="now")]),
        ("bad_envelope", [t, packed(topic, [1, 2])]),  # body not a map
        ("bad_envelope", [t + b"\xff", packed(topic, good_body)]),  # topic not UTF-8 (still matches the prefix)
        ("bad_version", [t, packed(topic, good_body, v=99)]),
        ("bad_version", [t, packed(topic, good_body, v="1")]),
        ("topic_mismatch", [t, packed(topic + "x", good_body)]),
        ("bad_field", [t, packed(topic, {**good_body, field_name: 12345})]),
        ("bad_field", [t, packed(topic, {**good_body, field_name: [1, 2]})]),
        ("bad_field", [t, packed(topic, {})]),  # required field missing
    ]
    for size in (1, 7, 64, 1000):
        cases.append(("", [t, rng.randbytes(size)]))  # random bytes: the code depends on the bytes
    return cases


def random_frames(topic: str, count: int, *, seed: int = 11) -> list[list[bytes]]:
    """``count`` frames of random bytes (never a valid envelope: no random map holds all eight keys)."""
    rng = random.Random(seed)
    return [[topic.encode(), rng.randbytes(rng.randint(1, 96))] for _ in range(count)]


class RawPublisher:
    """A bare PUB socket on the bus's publish port, proven connected through ``witness``.

    ``witness`` is a connected client; the probe kind is subscribed on it here.
    """

    def __init__(self, endpoints: Endpoints, witness: BusClient, *, timeout: float = 10.0) -> None:
        self._ctx = zmq.Context()
        self.sock = self._ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 1_000_000)
        self.sock.connect(endpoints.publish)
        self._seq = itertools.count(1)
        witness.subscribe(PROBE_KIND)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seq = self.probe()
            until = time.monotonic() + 0.1
            while (left := until - time.monotonic()) > 0:
                env = witness.recv(timeout=left)
                if env is not None and env.kind == PROBE_KIND and env.src == "raw@test:0" and env.seq == seq:
                    return
        self.close()
        raise TimeoutError("the raw publisher never reached the bus")

    def probe(self) -> int:
        seq = next(self._seq)
        self.sock.send_multipart(encode(Envelope(kind=PROBE_KIND, src="raw@test:0", seq=seq, body={})))
        return seq

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def close(self) -> None:
        self.sock.close(linger=0)
        self._ctx.term()
