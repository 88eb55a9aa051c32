#!/usr/bin/env python
"""One hop through the voicebus bus, beside raw pyzmq and a bare zmq.proxy.

    python scripts/bench_bus.py [--latency-count 5000] [--burst 100000] [--repeat 3]

Three paths, each measured the same way:

    raw     PUB → SUB directly, plain msgpack of an envelope-shaped map
    bare    PUB → XSUB/XPUB ``zmq.proxy`` → SUB, plain msgpack of the same map
    engine  ``BusClient.publish`` → ``Bus`` → ``BusClient.recv`` (engine codec, typed bodies)

Latency: one-way, timestamped, from this process to a receiver *process* (as worker to
worker), one message at a time, 0.5 ms apart; a sample runs from before encoding to after
decoding (``perf_counter_ns`` is CLOCK_MONOTONIC, one clock for the host): p50/p99 in µs.
The paths take turns in blocks so a shared machine's background load hits them alike. Two
diagnostic rows swap clients and proxies (plain clients on the engine's Bus, engine clients
on the bare proxy) to tell the proxy's share from the clients'.

Throughput: a burst of small messages from this process to a receiver process that keeps
up; messages per second from the first send to the last receive, and how many were lost.
All sockets get the engine's high-water marks, so loss compares like with like; every path
proves its subscriber is connected before sending (no slow-joiner loss is counted).

The proxies run in a thread of this process (the engine's ``Bus`` exactly as ``voicebus bus``
runs it). Prints a table, the engine/bare ratios, a codec breakdown (µs per call, in this
process), and one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import threading
import time
from collections.abc import Callable

import msgpack
import zmq

from voicebus.engine.bus import HWM, Bus, Endpoints, free_port_pair
from voicebus.engine.client import BusClient, SequenceTracker
from voicebus.engine.messages import Envelope, Interrupt, decode, encode
from voicebus.engine.security import Security

KIND = "ctl.interrupt"
IDLE_S = 5.0
"""A receiver that hears nothing for this long stops counting: the rest was lost."""


def plain_map(seq: int, kind: str = KIND) -> dict:
    """The same map the engine sends, built by hand."""
    return {"v": 1, "kind": kind, "src": "bench@host:1", "seq": seq, "ts": time.time(),
            "session": "default", "turn": 0, "body": {"reason": "bench"}}


def raw_socket(ctx: zmq.Context, kind: int) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 200)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    return sock


class BareProxy:
    """XSUB/XPUB joined by ``zmq.proxy`` in a thread; nothing else."""

    def __init__(self) -> None:
        self.port = free_port_pair()
        self.ctx = zmq.Context()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait()

    def _run(self) -> None:
        xsub = raw_socket(self.ctx, zmq.XSUB)
        xpub = raw_socket(self.ctx, zmq.XPUB)
        xsub.bind(f"tcp://127.0.0.1:{self.port}")
        xpub.bind(f"tcp://127.0.0.1:{self.port + 1}")
        self._ready.set()
        try:
            zmq.proxy(xsub, xpub)
        except zmq.ContextTerminated:
            pass
        finally:
            xsub.close(linger=0)
            xpub.close(linger=0)

    @property
    def publish(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def subscribe(self) -> str:
        return f"tcp://127.0.0.1:{self.port + 1}"

    def stop(self) -> None:
        self.ctx.term()  # ends zmq.proxy with ContextTerminated
        self._thread.join(2)


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)
    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000, 1)
    return {"p50_us": pick(0.50), "p99_us": pick(0.99), "mean_us": round(statistics.fmean(ordered) / 1000, 1)}


# --- latency ---------------------------------------------------------------------------------


def _latency_receiver(mode: str, address: str, topic: str, count: int, ready, results) -> None:
    """Stamp each message's arrival (``perf_counter_ns`` is CLOCK_MONOTONIC: one clock for the host)."""
    stamps: dict[int, int] = {}
    if mode == "plain":
        ctx = zmq.Context()
        sub = raw_socket(ctx, zmq.SUB)
        sub.connect(address)
        sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        try:
            if not sub.poll(10_000):
                results.put({})
                return
            ready.set()
            sub.setsockopt(zmq.RCVTIMEO, 10_000)
            while len(stamps) < count:
                try:
                    _, payload = sub.recv_multipart()
                except zmq.Again:
                    break
                if payload:  # empty = a readiness probe
                    seq = msgpack.unpackb(payload, raw=False)["seq"]
                    stamps[seq] = time.perf_counter_ns()
        finally:
            sub.close(linger=0)
            ctx.term()
    else:
        with BusClient(Endpoints.parse(address), name="bench-rx") as rx:
            rx.subscribe(topic)
            rx.announce()
            ready.set()
            while len(stamps) < count:
                env = rx.recv(timeout=10)
                if env is None:
                    break
                stamps[env.seq] = time.perf_counter_ns()
    results.put(stamps)


class PlainSender:
    """A PUB socket sending envelope-shaped maps with plain msgpack on its own topic."""

    def __init__(self, pub_addr: str, *, bind: bool, topic: str) -> None:
        self.ctx = zmq.Context()
        self.pub = raw_socket(self.ctx, zmq.PUB)
        (self.pub.bind if bind else self.pub.connect)(pub_addr)
        self.kind, self.topic = topic, topic.encode()
        self.seq = 0

    def wait_ready(self, ready) -> None:
        deadline = time.monotonic() + 30
        while not ready.is_set():  # probes until the receiver hears one
            if time.monotonic() > deadline:
                raise TimeoutError("receiver never connected")
            self.pub.send_multipart([self.topic, b""])
            ready.wait(0.01)

    def send(self) -> tuple[int, int]:
        self.seq += 1
        t0 = time.perf_counter_ns()
        self.pub.send_multipart([self.topic, msgpack.packb(plain_map(self.seq, self.kind), use_bin_type=True)])
        return self.seq, t0

    def close(self) -> None:
        self.pub.close(linger=200)
        self.ctx.term()


class EngineSender:
    """``BusClient.publish`` of a small typed body."""

    def __init__(self, endpoints: Endpoints) -> None:
        self.tx = BusClient(endpoints, name="bench-tx")
        self.tx.announce()
        self.body = Interrupt(reason="bench")

    def wait_ready(self, ready) -> None:
        if not ready.wait(60):  # the receiver's own hello echo proved its subscription
            raise TimeoutError("receiver never connected")

    def send(self) -> tuple[int, int]:
        t0 = time.perf_counter_ns()
        return self.tx.publish(self.body).seq, t0

    def close(self) -> None:
        self.tx.close()


def latencies(paths: dict[str, tuple[PlainSender | EngineSender, str, str, str]], count: int,
              rounds: int = 10, gap_s: float = 0.0005) -> dict[str, dict[str, float]]:
    """One-way latency to a receiver process per path, one message at a time (``gap_s`` apart).

    ``paths``: name → (sender, receiver mode, receiver address, topic). The paths take turns
    in ``rounds`` blocks, so background load on a shared machine hits each of them alike.
    """
    spawn = mp.get_context("spawn")
    running = {}
    for name, (sender, mode, address, topic) in paths.items():
        ready, results = spawn.Event(), spawn.Queue()
        proc = spawn.Process(target=_latency_receiver, args=(mode, address, topic, count, ready, results))
        proc.start()
        running[name] = (proc, ready, results)
    try:
        sent: dict[str, dict[int, int]] = {name: {} for name in paths}
        for name, (sender, *_) in paths.items():
            sender.wait_ready(running[name][1])
        block = max(1, count // rounds)
        for _ in range(rounds):
            for name, (sender, *_) in paths.items():
                for _ in range(block):
                    seq, t0 = sender.send()
                    sent[name][seq] = t0
                    time.sleep(gap_s)
        out = {}
        for name, (proc, _, results) in running.items():
            stamps = results.get(timeout=60)
            samples = [stamps[seq] - t0 for seq, t0 in sent[name].items() if seq in stamps]
            out[name] = {**percentiles(samples), "lost": len(sent[name]) - len(samples)}
        return out
    finally:
        for proc, _, _ in running.values():
            proc.join(10)
            if proc.is_alive():
                proc.kill()


# --- throughput ------------------------------------------------------------------------------


def _plain_receiver(sub_addr: str, count: int, ready, results) -> None:
    ctx = zmq.Context()
    sub = raw_socket(ctx, zmq.SUB)
    sub.connect(sub_addr)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    try:
        if not sub.poll(10_000):
            results.put({"error": "no probe"})
            return
        ready.set()
        sub.setsockopt(zmq.RCVTIMEO, int(IDLE_S * 1000))  # a blocking receive: plain pyzmq's fastest loop
        got, last, expected, gaps = 0, None, 0, 0
        while got < count:
            try:
                topic, payload = sub.recv_multipart()
            except zmq.Again:
                break
            if topic == b"probe":
                continue
            seq = msgpack.unpackb(payload, raw=False)["seq"]
            gaps += seq - expected
            expected = seq + 1
            got += 1
            last = time.monotonic()
        results.put({"received": got, "last": last, "seq_gaps": gaps})
    finally:
        sub.close(linger=0)
        ctx.term()


def _engine_receiver(url: str, count: int, ready, results) -> None:
    with BusClient(Endpoints.parse(url), name="bench-rx") as rx:
        rx.subscribe(KIND)
        rx.announce()
        ready.set()
        tracker = SequenceTracker()
        got, last = 0, None
        while got < count:
            env = rx.recv(timeout=IDLE_S)
            if env is None:
                break
            tracker.see(env)
            got += 1
            last = time.monotonic()
        results.put({"received": got, "last": last, "seq_gaps": sum(tracker.lost.values())})


def throughput(count: int, start_receiver: Callable[[object, object], mp.Process],
               send: Callable[[object], None]) -> dict[str, float]:
    spawn = mp.get_context("spawn")
    ready, results = spawn.Event(), spawn.Queue()
    proc = start_receiver(ready, results)
    try:
        t0 = send(ready)
        outcome = results.get(timeout=120)
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    if "error" in outcome:
        raise RuntimeError(outcome["error"])
    got = outcome["received"]
    elapsed = (outcome["last"] - t0) if outcome["last"] else float("nan")
    return {"msgs_per_s": round(got / elapsed), "lost": count - got, "seq_gaps": outcome["seq_gaps"],
            "seconds": round(elapsed, 3)}


def throughput_plain(pub_addr: str, sub_addr: str, count: int, *, bind_pub: bool) -> dict[str, float]:
    ctx = zmq.Context()
    pub = raw_socket(ctx, zmq.PUB)
    if bind_pub:
        pub.bind(pub_addr)
    else:
        pub.connect(pub_addr)

    def start(ready, results):
        proc = mp.get_context("spawn").Process(target=_plain_receiver, args=(sub_addr, count, ready, results))
        proc.start()
        return proc

    def send(ready) -> float:
        deadline = time.monotonic() + 30
        while not ready.is_set():  # probes until the receiver hears one
            if time.monotonic() > deadline:
                raise TimeoutError("receiver never connected")
            pub.send_multipart([b"probe", b""])
            ready.wait(0.01)
        topic = KIND.encode()
        t0 = time.monotonic()
        for seq in range(count):
            pub.send_multipart([topic, msgpack.packb(plain_map(seq), use_bin_type=True)])
        return t0

    try:
        return throughput(count, start, send)
    finally:
        pub.close(linger=1000)
        ctx.term()


def throughput_engine(endpoints: Endpoints, count: int) -> dict[str, float]:
    with BusClient(endpoints, name="bench-tx") as tx:
        tx.announce()

        def start(ready, results):
            proc = mp.get_context("spawn").Process(target=_engine_receiver,
                                                   args=(endpoints.url, count, ready, results))
            proc.start()
            return proc

        def send(ready) -> float:
            if not ready.wait(60):
                raise TimeoutError("receiver never connected")
            body = Interrupt(reason="bench")
            t0 = time.monotonic()
            for _ in range(count):
                tx.publish(body)
            return t0

        return throughput(count, start, send)


# --- where the time goes ---------------------------------------------------------------------


def per_op_us(fn: Callable[[], object], n: int = 10_000, repeat: int = 5) -> float:
    """Best of ``repeat`` timings: the least disturbed by other load."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, time.perf_counter() - t0)
    return round(best / n * 1e6, 2)


def codec_breakdown() -> dict[str, float]:
    body = Interrupt(reason="bench")
    env = Envelope(kind=KIND, src="bench@host:1", seq=1, body=body)
    frames = encode(env)
    plain = plain_map(1)
    packed = msgpack.packb(plain, use_bin_type=True)
    return {
        "plain_pack_us": per_op_us(lambda: msgpack.packb(plain_map(1), use_bin_type=True)),
        "plain_unpack_us": per_op_us(lambda: msgpack.unpackb(packed, raw=False)),
        "envelope_new_us": per_op_us(lambda: Envelope(kind=KIND, src="bench@host:1", seq=1, body=body)),
        "engine_encode_us": per_op_us(lambda: encode(env)),
        "engine_decode_us": per_op_us(lambda: decode(frames)),
        "payload_bytes": len(frames[1]),
        "plain_payload_bytes": len(packed),
    }


# --- main --------------------------------------------------------------------------------------


def measure(args: argparse.Namespace) -> tuple[dict[str, dict], dict[str, dict]]:
    """(results of the three paths, diagnostic latencies that mix clients and proxies)."""
    raw_port = free_port_pair()
    proxy = BareProxy()
    bus = Bus(Endpoints("127.0.0.1", free_port_pair()), Security()).start()
    senders: list[PlainSender | EngineSender] = []
    try:
        def plain(pub_addr: str, sub_addr: str, topic: str, *, bind: bool = False):
            senders.append(PlainSender(pub_addr, bind=bind, topic=topic))
            return senders[-1], "plain", sub_addr, topic

        def engine(endpoints: Endpoints):
            senders.append(EngineSender(endpoints))
            return senders[-1], "engine", endpoints.url, KIND

        raw_addr = f"tcp://127.0.0.1:{raw_port}"
        paths = {
            "raw": plain(raw_addr, raw_addr, "bench.raw", bind=True),
            "bare": plain(proxy.publish, proxy.subscribe, "bench.bare"),
            "engine": engine(bus.endpoints),
            "plain clients, engine Bus": plain(bus.endpoints.publish, bus.endpoints.subscribe, "bench.plain"),
            "engine clients, bare proxy": engine(Endpoints("127.0.0.1", proxy.port)),
        }
        print("latency …", file=sys.stderr, flush=True)
        lat = latencies(paths, args.latency_count)
        for sender in senders:
            sender.close()
        senders.clear()

        tputs: dict[str, list[dict]] = {"raw": [], "bare": [], "engine": []}
        for run in range(args.repeat):  # interleaved for the same reason
            print(f"throughput, run {run + 1} of {args.repeat} …", file=sys.stderr, flush=True)
            port = free_port_pair()
            tputs["raw"].append(throughput_plain(f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port}", args.burst,
                                                 bind_pub=True))
            tputs["bare"].append(throughput_plain(proxy.publish, proxy.subscribe, args.burst, bind_pub=False))
            tputs["engine"].append(throughput_engine(bus.endpoints, args.burst))
    finally:
        for sender in senders:
            sender.close()
        bus.stop()
        proxy.stop()
    results = {}
    for name, runs in tputs.items():
        best = max(runs, key=lambda t: t["msgs_per_s"])
        latency = {k: v for k, v in lat[name].items() if k != "lost"}
        results[name] = {**latency, "latency_lost": lat[name]["lost"], "msgs_per_s": best["msgs_per_s"],
                         "msgs_per_s_runs": [t["msgs_per_s"] for t in runs],
                         "lost": max(t["lost"] for t in runs), "seq_gaps": max(t["seq_gaps"] for t in runs)}
    diagnostics = {name: value for name, value in lat.items() if name not in results}
    return results, diagnostics


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency-count", type=int, default=5000)
    parser.add_argument("--burst", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3, help="throughput runs per path (best is reported)")
    args = parser.parse_args()

    started = time.monotonic()
    results, diagnostics = measure(args)
    codec = codec_breakdown()
    eng, bare = results["engine"], results["bare"]
    ratios = {
        "p50": round(eng["p50_us"] / bare["p50_us"], 2),
        "p99": round(eng["p99_us"] / bare["p99_us"], 2),
        "throughput": round(eng["msgs_per_s"] / bare["msgs_per_s"], 2),
    }

    print(f"\none hop, one-way to another process: {args.latency_count} messages one at a time; "
          f"throughput: burst of {args.burst:,}, best of {args.repeat}\n")
    print(f"{'path':<8} {'p50 µs':>8} {'p99 µs':>8} {'mean µs':>8} {'msg/s':>9}  {'lost':>5}  runs")
    for name, r in results.items():
        runs = ", ".join(f"{v:,}" for v in r["msgs_per_s_runs"])
        print(f"{name:<8} {r['p50_us']:>8} {r['p99_us']:>8} {r['mean_us']:>8} {r['msgs_per_s']:>9,}  "
              f"{r['lost']:>5}  {runs}")
    for name, r in diagnostics.items():
        print(f"  ({name}: p50 {r['p50_us']} µs, p99 {r['p99_us']} µs)")
    print(f"\nengine / bare proxy: latency p50 ×{ratios['p50']}, p99 ×{ratios['p99']}; "
          f"throughput ×{ratios['throughput']} (aim: latency ≤ ×1.5, zero loss)")
    print("codec, µs per message: " + ", ".join(f"{k}={v}" for k, v in codec.items()))
    print(f"({time.monotonic() - started:.0f} s)")
    print(json.dumps({"latency_count": args.latency_count, "burst": args.burst, **results,
                      "engine_vs_bare": ratios, "latency_diagnostics": diagnostics,
                      "codec": codec}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
