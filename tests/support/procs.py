"""Real ``voicebus up`` processes for the supervisor tests, and a recorder of everything on the bus.

Each ``Up`` runs in its own session (process group), with its output in files,
and ``Launcher.cleanup`` kills the group and every descendant ever seen — so a
failing test leaves nothing behind, not even a SIGSTOPped worker.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil
import pytest

from voicebus.engine.bus import Endpoints
from voicebus.engine.client import BusClient
from voicebus.engine.messages import Envelope, Heartbeat, Hello

WORKER_NAMES = ("listener", "thinker", "speaker")


FLOOD = [sys.executable, str(Path(__file__).resolve().parents[2] / "scripts" / "flood.py")]
"""``scripts/flood.py``: FLOOD + [publish address, seconds, rate, "kind,kind"] prints "SENT SECONDS"."""


def clean_env(state_dir: Path, **extra: str) -> dict[str, str]:
    """This environment without any VOICEBUS_* setting, plus a private state dir and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOICEBUS_")}
    env["VOICEBUS_STATE_DIR"] = str(state_dir)
    env.update(extra)
    return env


def private_bus_folder() -> Path:
    """A new 0700 folder for an ipc bus, directly under /tmp.

    pytest's tmp_path is too deep for a unix socket path (107 bytes at most); the
    caller removes the folder (``Launcher`` and the ``bus_folder`` fixture do).
    """
    return Path(tempfile.mkdtemp(prefix="vb-", dir="/tmp"))


@pytest.fixture
def bus_folder():
    folder = private_bus_folder()
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (a zombie waiting for a reaper counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def poll(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(interval)


class Up:
    """One ``voicebus up`` in its own process group."""

    def __init__(self, args: Iterable[str], env: dict[str, str], log_dir: Path, label: str) -> None:
        self.label = label
        self.args = list(args)
        self.stdout_path = log_dir / f"{label}.stdout"
        self.stderr_path = log_dir / f"{label}.stderr"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "voicebus.cli.main", "up", *self.args],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
            )
        self.seen_pids: set[int] = set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def descendants(self) -> list[psutil.Process]:
        try:
            found = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self.seen_pids.update(p.pid for p in found)
        return found

    def _live_commands(self) -> list[tuple[int, list[str]]]:
        found = []
        for proc in self.descendants():
            try:
                found.append((proc.pid, proc.cmdline()))
            except psutil.Error:  # gone, or a zombie not reaped yet
                continue
        return found

    def worker_pids(self) -> dict[str, int]:
        """{worker name: pid} of the running ``voicebus worker NAME`` children."""
        pids = {}
        for pid, cmd in self._live_commands():
            if "worker" in cmd and cmd.index("worker") + 1 < len(cmd):
                pids[cmd[cmd.index("worker") + 1]] = pid
        return pids

    def bus_pid(self) -> int | None:
        """The pid of the running ``voicebus bus`` child, if there is one."""
        return next((pid for pid, cmd in self._live_commands() if cmd[-1:] == ["bus"]), None)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def interrupt(self, timeout: float = 15) -> int:
        """Ctrl-C, as a user would; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.wait(timeout)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.label} still running after {timeout} s; stderr:\n{self.stderr()[-3000:]}")

    def kill_everything(self) -> None:
        self.descendants()
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in self.seen_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


def ask(url: str, text: str, state_dir: Path, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """``voicebus ask TEXT`` against the bus at ``url``."""
    return subprocess.run(
        [sys.executable, "-m", "voicebus.cli.main", "ask", text, "--bus", url, "--timeout", str(int(timeout))],
        env=clean_env(state_dir), capture_output=True, text=True, timeout=timeout + 30,
    )


class Launcher:
    """Starts ``Up``s for one test; ``cleanup`` (from a fixture) kills them whatever happened."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.ups: list[Up] = []
        self.watchers: list[BusWatcher] = []
        self.folders: list[Path] = []

    def bus_url(self) -> str:
        """A private ipc bus of its own for this test (the default kind of bus, on a short path)."""
        self.folders.append(private_bus_folder())
        return f"ipc://{self.folders[-1]}"

    def up(self, *args: str, label: str = "up", **env_extra: str) -> Up:
        state = self.tmp_path / f"state-{label}"
        state.mkdir(exist_ok=True)
        up = Up(args, clean_env(state, **env_extra), self.tmp_path, label)
        self.ups.append(up)
        return up

    def watch(self, endpoints: Endpoints, *prefixes: str) -> BusWatcher:
        watcher = BusWatcher(endpoints, prefixes or ("",))
        self.watchers.append(watcher)
        return watcher

    def cleanup(self) -> None:
        for watcher in self.watchers:
            watcher.close()
        for up in self.ups:
            up.kill_everything()
        for folder in self.folders:
            shutil.rmtree(folder, ignore_errors=True)


class BusWatcher:
    """Records every message it hears, from a thread; tests search the record with deadlines."""

    def __init__(self, endpoints: Endpoints, prefixes: Iterable[str], *, timeout: float = 30.0) -> None:
        self.client = BusClient(endpoints, name="watcher")
        self.client.subscribe(*prefixes)
        try:
            self.client.announce(timeout=timeout)
        except ConnectionError:
            self.client.close()
            raise
        self.messages: list[Envelope] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bus-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            env = self.client.recv(timeout=0.1)
            if env is not None:
                with self._cond:
                    self.messages.append(env)
                    self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.messages)

    def select(self, predicate: Callable[[Envelope], bool], since: int = 0) -> list[Envelope]:
        with self._cond:
            return [e for e in self.messages[since:] if predicate(e)]

    def wait(self, predicate: Callable[[Envelope], bool], timeout: float, what: str, since: int = 0) -> Envelope:
        deadline = time.monotonic() + timeout
        index = since
        with self._cond:
            while True:
                while index < len(self.messages):
                    env = self.messages[index]
                    index += 1
                    if predicate(env):
                        return env
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(f"no {what} on the bus within {timeout} s")
                self._cond.wait(remaining)

    # --- common questions ----------------------------------------------------------------------

    def wait_ready(self, names: Iterable[str], timeout: float = 60.0, since: int = 0) -> dict[str, int]:
        """{name: pid} once each worker has sent a heartbeat saying ``ready``."""
        pids = {}
        for name in names:
            beat = self.wait(lambda e, n=name: isinstance(e.body, Heartbeat) and e.body.name == n
                             and e.body.state == "ready", timeout, f"ready heartbeat from {name}", since)
            pids[name] = beat.body.pid
        return pids

    def wait_new_hello(self, name: str, old_pid: int, timeout: float, since: int = 0) -> int:
        env = self.wait(lambda e: isinstance(e.body, Hello) and e.body.name == name and e.body.pid != old_pid,
                        timeout, f"sys.hello from a new {name}", since)
        return env.body.pid

    def heartbeat_pids(self, name: str, since: int = 0) -> set[int]:
        return {e.body.pid for e in self.select(lambda e: isinstance(e.body, Heartbeat) and e.body.name == name, since)}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.client.close()


@pytest.fixture
def launcher(tmp_path: Path):
    running = Launcher(tmp_path)
    yield running
    running.cleanup()
