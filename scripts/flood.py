"""Flood a bus: publish small messages of the given kinds at a fixed rate, then print how many went out.

    python scripts/flood.py tcp://127.0.0.1:7700 SECONDS RATE KIND[,KIND…]

For failure campaigns (``scripts/chaos.py``) and the flood tests. Connects to the bus's
publish endpoint with a raw PUB socket, no keys (ipc and ``--insecure`` buses only).
The kinds are meant to be unknown ones under a prefix somebody subscribes to
(``llm.token.flood``): they fill receive queues and are dropped unread. Prints
``SENT SECONDS`` on stdout.
"""

from __future__ import annotations

import argparse
import time

import msgpack
import zmq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", help="the bus's publish endpoint")
    parser.add_argument("seconds", type=float)
    parser.add_argument("rate", type=int, help="messages per second")
    parser.add_argument("kinds", help="comma-separated topics, sent in turn")
    args = parser.parse_args()
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 1_000_000)  # the flooder's own queue is not under test
    pub.connect(args.address)
    time.sleep(0.3)  # not readiness: a flood that starts 0.3 s late is the same flood
    frames = [(kind.encode(), msgpack.packb({"v": 1, "kind": kind, "src": "flood@host:1", "seq": 1, "ts": time.time(),
                                             "session": "default", "turn": 0, "body": {"reason": "flood " * 10}}))
              for kind in args.kinds.split(",")]
    sent, start = 0, time.monotonic()
    end = start + args.seconds
    while (now := time.monotonic()) < end:
        due = int((now - start) * args.rate)
        while sent < due:
            topic, payload = frames[sent % len(frames)]
            pub.send(topic, zmq.SNDMORE)
            pub.send(payload)
            sent += 1
        time.sleep(0.001)
    print(sent, round(time.monotonic() - start, 2), flush=True)
    pub.close(linger=0)
    ctx.term()


if __name__ == "__main__":
    main()
