"""Shared fixtures: a real bus on free ports, bus clients that always close."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from voicebus.engine.bus import Bus, Endpoints, free_port_pair
from voicebus.engine.client import BusClient
from voicebus.engine.messages import Envelope
from voicebus.engine.security import Security

import voicebus.workers.kinds  # noqa: F401  (registers the voice kinds)
from support.openai_server import scripted  # noqa: F401  (a fixture: a misbehaving OpenAI-compatible server)
from support.procs import launcher  # noqa: F401  (a fixture: voicebus up processes, always cleaned up)


@pytest.fixture
def bus() -> Iterator[Bus]:
    with Bus(Endpoints("127.0.0.1", free_port_pair()), Security()) as running:
        yield running


@pytest.fixture
def make_client(bus: Bus) -> Iterator[Callable[..., BusClient]]:
    clients: list[BusClient] = []

    def make(name: str = "test", *, subscribe: tuple[str, ...] = (), ready: bool = True) -> BusClient:
        client = BusClient(bus.endpoints, name=name)
        clients.append(client)
        client.subscribe(*subscribe)
        if ready:
            client.announce()
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def run_actor(bus: Bus, tmp_path) -> Iterator[Callable[..., object]]:
    """Start a worker class in a thread on the test bus; ``overrides`` are settings ("llm.max_tokens": 5)."""
    from voicebus.engine.settings import load
    from voicebus.workers.config import Settings

    running = []

    def start(cls, **overrides):
        settings = load(Settings, env={}, overrides={"state.dir": tmp_path, **overrides})
        actor = cls(BusClient(bus.endpoints, name=cls.name), settings)
        thread = threading.Thread(target=actor.run, name=f"test-{cls.name}", daemon=True)
        thread.start()
        running.append((actor, thread))
        return actor

    yield start
    for actor, thread in running:
        actor.stop("test over")
        thread.join(10)
        assert not thread.is_alive(), f"{actor.name} did not stop"


def wait_for(
    client: BusClient, predicate: Callable[[Envelope], bool], *, timeout: float = 10.0
) -> Envelope:
    """The first message matching ``predicate``; fails the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        env = client.recv(timeout=remaining)
        if env is not None and predicate(env):
            return env
    pytest.fail(f"no matching message within {timeout} s")
