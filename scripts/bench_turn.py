"""Benchmark a voice turn, stage by stage, through the real ``voicebus up``.

    python scripts/bench_turn.py [--turns 5] [--quick] [--gap 7] [--skip-http]

Part 1, voice: synthesized questions (the embedded piper voice, each followed by
``--gap`` seconds of silence) are played in real time into ``voicebus up --input
Q.wav --output none`` with the embedded defaults, once per ASR backend
(pocketsphinx, whisper), each with a fresh state dir. A bus client collects
``metrics.turn`` and ``llm.done``; psutil samples the resident memory of every
process under ``voicebus up``.

Part 2, chat over HTTP vs in process: the same questions as text (``ctl.ask``)
into ``voicebus up --input none --output none``, once with ``--llm local`` and
once with ``--llm openai`` against llama-cpp-python's OpenAI-compatible server
on the same GGUF (1 thread, like the local backend's default on 2 cores).

Prints a table (stages as rows, configurations as columns, median / p90), then
one JSON object with every figure on the last line of stdout. Progress goes to
stderr. Every child process is stopped on any exit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from voicebus.engine.bus import Endpoints, free_port_pair
from voicebus.engine.client import BusClient
from voicebus.engine.messages import Envelope, new_turn_id

QUESTIONS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "Who wrote Romeo and Juliet?",
    "What color is the sky on a clear day?",
    "How many days are in a week?",
    "What do bees make?",
    "What is the boiling point of water?",
    "Name a planet in our solar system.",
]
WARM_UP = "Hello there."
"""Said first and left out of the figures: the first turn of a fresh process pays one-off costs."""

WORKER_ROLES = ("listener", "thinker", "speaker")
ROLES = ("bus", *WORKER_ROLES, "supervisor")
MB = 1024 * 1024

# (key, label, how to get seconds from a metrics.turn timings dict)
VOICE_STAGES: list[tuple[str, str, Callable[[dict], float | None]]] = [
    ("vad_end_delay", "VAD end delay (speech end → vad.end)", lambda t: t.get("silence_s")),
    ("asr", "ASR (vad.end → asr.final)", lambda t: t.get("asr_s")),
    ("first_token", "first token (asr.final → token)", lambda t: t.get("first_token_s")),
    ("first_sentence", "first sentence (asr.final → sentence)", lambda t: t.get("first_sentence_s")),
    ("first_audio", "first audio (sentence → audio)", lambda t: t.get("first_audio_s")),
    ("total", "TOTAL vad.end → first audio", lambda t: t.get("total_s")),
    ("speech_end_to_audio", "speech end → first audio (incl. silence)",
     lambda t: _diff(t, "speech_end", "first_audio")),
]
LLM_STAGES: list[tuple[str, str, Callable[[dict], float | None]]] = [
    ("llm_ttft", "llm ttft (thinker: request → token)", lambda t: t.get("ttft_s")),
    ("llm_tokens_per_s", "llm tokens/s", lambda t: t.get("tokens_per_s")),
]
TEXT_STAGES: list[tuple[str, str, Callable[[dict], float | None]]] = [
    ("ttft", "ttft (request → first token)", lambda t: t.get("ttft_s")),
    ("request_to_sentence", "request → first sentence", lambda t: _diff(t, "request", "first_sentence")),
    ("request_to_audio", "request → first audio", lambda t: t.get("request_to_audio_s")),
    ("tokens_per_s", "tokens/s", lambda t: t.get("tokens_per_s")),
]


def _diff(t: dict, a: str, b: str) -> float | None:
    return t[b] - t[a] if a in t and b in t else None


def log(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(values: list[float]) -> dict:
    return {
        "median": _round(percentile(values, 0.5)),
        "p90": _round(percentile(values, 0.9)),
        "n": len(values),
    }


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


# --- processes --------------------------------------------------------------------------


def role_of(proc: psutil.Process) -> str | None:
    """bus / listener / thinker / speaker from a ``voicebus`` child's command line."""
    try:
        argv = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    if "worker" in argv:
        i = argv.index("worker")
        return argv[i + 1] if i + 1 < len(argv) else "worker"
    if argv and argv[-1] == "bus":
        return "bus"
    return f"other:{proc.name()}"


class MemorySampler(threading.Thread):
    """Max RSS per role (and peak total RSS/PSS) of a process tree, sampled in the background."""

    def __init__(self, root_pid: int, *, interval_s: float = 0.25, pss_every: int = 4,
                 extra: dict[int, str] | None = None) -> None:
        super().__init__(name="memory-sampler", daemon=True)
        self.root_pid = root_pid
        self.interval_s = interval_s
        self.pss_every = pss_every
        self.extra = dict(extra or {})
        self.max_rss: dict[str, int] = {}
        self.peak_total_rss = 0
        self.peak_total_pss = 0
        self.seen: dict[int, float] = {}
        """pid → create_time of every process met (for the leftover sweep)"""
        self._halt = threading.Event()
        self._roles: dict[int, str | None] = {}
        self._cpu: dict[int, float] = {}
        """pid → CPU seconds (user + system) at its last sample"""
        self._me = psutil.Process()
        self._t0 = time.monotonic()
        self._busy0 = _busy_cpu_s()
        self._me0 = _cpu_s(self._me)
        self.cpu: dict = {}

    def run(self) -> None:
        n = 0
        while not self._halt.is_set():
            self.sample(with_pss=n % self.pss_every == 0)
            n += 1
            self._halt.wait(self.interval_s)

    def sample(self, *, with_pss: bool) -> None:
        try:
            root = psutil.Process(self.root_pid)
            procs = [(root, "supervisor"), *((p, None) for p in root.children(recursive=True))]
        except psutil.NoSuchProcess:
            procs = []
        for pid, role in self.extra.items():
            try:
                procs.append((psutil.Process(pid), role))
            except psutil.NoSuchProcess:
                pass
        total_rss = total_pss = 0
        for proc, role in procs:
            try:
                if proc.pid not in self._roles or self._roles[proc.pid] is None:
                    self._roles[proc.pid] = role or role_of(proc)
                    if proc.pid not in self.extra:  # extras are someone else's to stop
                        self.seen[proc.pid] = proc.create_time()
                role = self._roles[proc.pid]
                if role is None:
                    continue
                self._cpu[proc.pid] = _cpu_s(proc)
                if with_pss:
                    info = proc.memory_full_info()
                    rss, pss = info.rss, info.pss
                else:
                    rss, pss = proc.memory_info().rss, 0
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            self.max_rss[role] = max(self.max_rss.get(role, 0), rss)
            total_rss += rss
            total_pss += pss
        self.peak_total_rss = max(self.peak_total_rss, total_rss)
        if with_pss:
            self.peak_total_pss = max(self.peak_total_pss, total_pss)

    def stop(self) -> None:
        """Stop sampling; note how busy the machine was meanwhile, by us and by everyone else."""
        self._halt.set()
        self.join(timeout=2)
        wall = time.monotonic() - self._t0
        ours = sum(self._cpu.values()) + _cpu_s(self._me) - self._me0
        busy = _busy_cpu_s() - self._busy0
        self.cpu = {
            "wall_s": round(wall, 1),
            "ours_cores": round(ours / wall, 2),
            "others_cores": round(max(0.0, busy - ours) / wall, 2),
            "cores": psutil.cpu_count(),
        }

    def report(self) -> dict:
        out = {role: round(rss / MB, 1) for role, rss in sorted(self.max_rss.items())}
        out["total_rss"] = round(self.peak_total_rss / MB, 1)
        out["total_pss"] = round(self.peak_total_pss / MB, 1)
        return out


def _cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent not idle (all cores)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def kill_leftovers(seen: dict[int, float], keep: int | None = None) -> list[int]:
    """SIGKILL every process in ``seen`` still running (same pid and start time)."""
    killed = []
    for pid, created in seen.items():
        if pid == keep:
            continue
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE:
                proc.kill()
                killed.append(pid)
        except psutil.NoSuchProcess:
            pass
    return killed


class Up:
    """``voicebus up`` as a child process with a bus client on its bus; always cleaned up."""

    def __init__(self, workdir: Path, label: str, args: list[str], env: dict[str, str]) -> None:
        self.label = label
        # A private bus folder of its own, directly under /tmp (a unix socket path takes 107 bytes at most).
        self.bus_folder = Path(tempfile.mkdtemp(prefix="vb-bench-", dir="/tmp"))
        self.url = f"ipc://{self.bus_folder}"
        self.log_path = workdir / f"{label}.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "voicebus.cli.main", "up", "--bus", self.url, *args],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=workdir, stdin=subprocess.DEVNULL,
        )
        self.sampler = MemorySampler(self.proc.pid)
        self.sampler.start()
        self.client: BusClient | None = None

    def connect(self, *prefixes: str, timeout: float = 60) -> BusClient:
        """A client proven connected (the bus child may still be starting)."""
        import voicebus.workers.kinds  # noqa: F401  (typed bodies for the voice kinds)

        client = BusClient(Endpoints.parse(self.url), name="bench")
        client.subscribe(*prefixes)
        try:
            client.announce(timeout=timeout)  # ZeroMQ reconnects while the bus child starts
        except ConnectionError:
            client.close()
            state = f"exited with {self.proc.returncode}" if self.proc.poll() is not None else "is running"
            raise RuntimeError(f"{self.label}: no bus at {self.url} within {timeout:.0f} s; voicebus up {state}\n{self.tail()}") from None
        self.client = client
        return client

    def tail(self, lines: int = 30) -> str:
        self._log.flush()
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        """SIGINT, wait, SIGKILL; then kill any child that outlived it."""
        try:
            if self.client is not None:
                self.client.close()
                self.client = None
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
                try:
                    self.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    log(f"{self.label}: voicebus up ignored SIGINT for 15 s; killing it")
                    self.proc.kill()
                    self.proc.wait(timeout=5)
        finally:
            self.sampler.stop()
            time.sleep(0.2)
            killed = kill_leftovers(self.sampler.seen, keep=self.proc.pid)
            if killed:
                log(f"{self.label}: killed leftover processes {killed}")
            self._log.close()
            shutil.rmtree(self.bus_folder, ignore_errors=True)


# --- part 1: voice turns ------------------------------------------------------------------


def synthesize_questions(path: Path, texts: list[str], *, lead_s: float, gap_s: float) -> float:
    """Write the questions, each followed by ``gap_s`` of silence, to ``path``; return its length (s)."""
    from voicebus.workers.audio import write_wav
    from voicebus.workers.tts.piper import PiperSynthesizer

    voice = PiperSynthesizer()
    try:
        rate = voice.sample_rate
        parts = [bytes(int(rate * lead_s) * 2)]
        for text in texts:
            parts.extend(voice.synthesize(text))
            parts.append(bytes(int(rate * gap_s) * 2))
    finally:
        voice.close()
    pcm = b"".join(parts)
    write_wav(path, pcm, rate)
    return len(pcm) / 2 / rate


@dataclass
class Run:
    """What one configuration produced."""

    label: str
    turns: list[dict] = field(default_factory=list)
    """per turn: text heard, metrics timings, llm.done timings, outcome"""
    memory: dict = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    cpu: dict = field(default_factory=dict)
    """CPU use during the run, in cores: ours (voicebus + server + this script) and everyone else's"""
    ready_s: float | None = None
    """voicebus up start → every worker ready"""
    exit_code: int | None = None


def base_env(state_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOICEBUS_", "OPENAI_"))}
    env.update({"VOICEBUS_STATE_DIR": str(state_dir), "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


class Readiness:
    """Which workers are ready (sys.ready, or a heartbeat that says so)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = set(names)
        self.ready: dict[str, float] = {}

    def see(self, env: Envelope) -> None:
        body = env.body
        name = getattr(body, "name", None)
        if name in self.names and name not in self.ready:
            if env.kind == "sys.ready" or (env.kind == "sys.heartbeat" and getattr(body, "state", "") == "ready"):
                self.ready[name] = time.monotonic()

    @property
    def all(self) -> bool:
        return set(self.ready) >= self.names


def error_text(env: Envelope) -> str | None:
    body = env.body
    if env.kind == "sys.error":
        return f"{env.src}: {getattr(body, 'where', '?')}: {getattr(body, 'message', body)}"
    if env.kind == "llm.error":
        return f"turn {env.turn}: llm.error {getattr(body, 'code', '?')}: {getattr(body, 'message', body)}"
    if env.kind == "sup.gave_up":
        return f"supervisor gave up: {body}"
    return None


def run_voice(asr: str, wav: Path, workdir: Path, *, expected: int, timeout_s: float) -> Run:
    """One ``voicebus up --input wav`` run; turns in the order they were heard."""
    run = Run(f"voice-{asr}")
    state = workdir / f"state-{asr}"
    state.mkdir()
    if asr == "whisper":
        from voicebus.workers.asr.whisper_model import ensure_whisper_model

        t0 = time.monotonic()
        ensure_whisper_model(state / "models", progress=lambda s: log(f"whisper: {s}"))
        log(f"whisper model ready in {time.monotonic() - t0:.1f} s (not timed)")
    up = Up(workdir, run.label, ["--input", str(wav), "--output", "none", "--asr", asr], base_env(state))
    started = time.monotonic()
    try:
        client = up.connect("metrics.turn", "llm.done", "asr.final", "asr.nomatch", "sys.ready",
                            "sys.heartbeat", "sys.error", "llm.error", "sup.gave_up")
        readiness = Readiness(WORKER_ROLES)
        by_turn: dict[int, dict] = {}
        ready_wall: float | None = None
        order: list[int] = []
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            env = client.recv(timeout=0.5)
            if env is None:
                if up.proc.poll() is not None:
                    break
                continue
            readiness.see(env)
            if readiness.all and run.ready_s is None:
                run.ready_s = round(max(readiness.ready.values()) - started, 2)
                ready_wall = time.time() - (time.monotonic() - max(readiness.ready.values()))
                log(f"{run.label}: all workers ready {run.ready_s:.1f} s after start")
            if (err := error_text(env)) is not None:
                run.errors.append(err)
                log(f"{run.label}: {err}")
                continue
            if env.turn == 0 or env.kind.startswith("sys."):
                continue
            rec = by_turn.get(env.turn)
            if rec is None:
                rec = by_turn[env.turn] = {"turn": env.turn}
                order.append(env.turn)
            if env.kind == "asr.final":
                rec.setdefault("heard", env.body.text)
            elif env.kind == "asr.nomatch":
                rec["nomatch"] = env.body.reason
            elif env.kind == "llm.done":
                rec["llm"] = dict(env.body.timings)
                rec["answer"] = env.body.text
                rec["finish"] = env.body.finish_reason
            elif env.kind == "metrics.turn" and "metrics" not in rec:
                rec["metrics"] = dict(env.body.timings)
                rec["outcome"] = env.body.outcome
                t = rec["metrics"]
                # Spoken before every worker was up: it measured loading, not a turn.
                rec["cold"] = ready_wall is None or t.get("speech_end", t.get("vad_end", 0)) < ready_wall
                done = sum(1 for r in by_turn.values() if "metrics" in r)
                log(f"{run.label}: turn {done}/{expected} heard {rec.get('heard', '?')!r}: "
                    f"vad.end → first audio {fmt_s(t.get('total_s'))} "
                    f"(ASR {fmt_s(t.get('asr_s'))}, first sentence {fmt_s(t.get('first_sentence_s'))}, "
                    f"first audio {fmt_s(t.get('first_audio_s'))}) [{rec['outcome']}"
                    f"{', before every worker was ready: left out' if rec['cold'] else ''}]")
                if done >= expected:
                    break
        else:
            run.errors.append(f"timed out after {timeout_s:.0f} s")
            log(f"{run.label}: timed out after {timeout_s:.0f} s")
        if up.proc.poll() is None:
            try:
                up.proc.wait(timeout=20)  # it shuts itself down once the last answer is spoken
            except subprocess.TimeoutExpired:
                run.errors.append("voicebus up did not shut down by itself 20 s after the last answer")
        run.exit_code = up.proc.poll()
        run.turns = [by_turn[t] for t in order]
    finally:
        up.stop()
        run.memory = up.sampler.report()
        run.cpu = up.sampler.cpu
    if run.exit_code not in (0, None):
        run.errors.append(f"voicebus up exited with {run.exit_code}")
        log(f"{run.label}: voicebus up exited with {run.exit_code}; log tail:\n{up.tail()}")
    return run


# --- part 2: text turns, HTTP vs in process ---------------------------------------------------


class LlamaServer:
    """llama-cpp-python's OpenAI-compatible server on the embedded GGUF; always stopped."""

    def __init__(self, workdir: Path, *, threads: int = 1, ctx: int = 2048, timeout_s: float = 90) -> None:
        from voicebus.workers.llm.models import find_smollm2_gguf

        self.port = free_port_pair()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = workdir / "llama-server.log"
        self._log = self.log_path.open("w")
        gguf = find_smollm2_gguf()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
             "--port", str(self.port), "--n_ctx", str(ctx), "--n_threads", str(threads),
             "--n_threads_batch", str(threads)],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        self.model = ""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"llama_cpp.server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as resp:
                    data = json.load(resp)
                self.model = data["data"][0]["id"]
                return
            except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"llama_cpp.server not answering within {timeout_s:.0f} s:\n{self.tail()}")
                time.sleep(0.25)

    def tail(self, lines: int = 20) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()


def run_text(backend: str, questions: list[str], workdir: Path, *, warm_up: bool, server: LlamaServer | None,
             timeout_s: float) -> Run:
    """``voicebus up --input none --output none --llm BACKEND``; each question as ``ctl.ask``, one at a time."""
    from voicebus.workers.kinds import Ask

    run = Run(f"text-{backend}")
    state = workdir / f"state-text-{backend}"
    state.mkdir()
    extra = {}
    if server is not None:
        extra = {"OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": "local", "VOICEBUS_LLM_MODEL": server.model}
    up = Up(workdir, run.label, ["--input", "none", "--output", "none", "--llm", backend], base_env(state, **extra))
    if server is not None:
        up.sampler.extra[server.proc.pid] = "llama-server"
    started = time.monotonic()
    try:
        client = up.connect("metrics.turn", "llm.", "sys.ready", "sys.heartbeat", "sys.error", "sup.gave_up")
        readiness = Readiness(("thinker", "speaker"))
        deadline = started + timeout_s
        while not readiness.all:
            env = client.recv(timeout=0.5)
            if env is not None:
                readiness.see(env)
                if (err := error_text(env)) is not None:
                    run.errors.append(err)
                    log(f"{run.label}: {err}")
            if up.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{run.label}: workers not ready\n{up.tail()}")
        run.ready_s = round(max(readiness.ready.values()) - started, 2)
        log(f"{run.label}: thinker and speaker ready {run.ready_s:.1f} s after start")
        texts = ([WARM_UP] if warm_up else []) + questions
        for i, text in enumerate(texts):
            rec = ask_one(client, Ask(text=text), run, up, deadline)
            rec["warm_up"] = warm_up and i == 0
            run.turns.append(rec)
            llm = rec.get("llm", {})
            log(f"{run.label}: {'warm-up' if rec['warm_up'] else f'ask {i + (0 if warm_up else 1)}/{len(questions)}'} "
                f"{text!r}: ttft {fmt_s(llm.get('ttft_s'))}, request → first sentence "
                f"{fmt_s(_diff(llm, 'request', 'first_sentence'))}, "
                f"request → first audio {fmt_s(rec.get('metrics', {}).get('request_to_audio_s'))}"
                f"{' [' + rec['finish'] + ']' if rec.get('finish') not in (None, 'stop', 'length') else ''}")
    finally:
        up.stop()
        run.memory = up.sampler.report()
        run.cpu = up.sampler.cpu
    return run


def ask_one(client: BusClient, body, run: Run, up: Up, deadline: float) -> dict:
    """Publish one ``ctl.ask`` (repeated until accepted); wait for its llm.done and metrics.turn."""
    turn = new_turn_id()
    rec: dict = {"turn": turn, "heard": body.text}
    client.publish(body, turn=turn)
    accepted = False
    resend_at = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        if not accepted and time.monotonic() >= resend_at:
            client.publish(body, turn=turn)
            resend_at = time.monotonic() + 1.0
        env = client.recv(timeout=0.2)
        if env is None:
            if up.proc.poll() is not None:
                raise RuntimeError(f"{run.label}: voicebus up exited with {up.proc.returncode}\n{up.tail()}")
            continue
        if (err := error_text(env)) is not None:
            run.errors.append(err)
            log(f"{run.label}: {err}")
        if env.turn != turn:
            continue
        if env.kind.startswith("llm."):
            accepted = True
        if env.kind == "llm.done":
            rec["llm"] = dict(env.body.timings)
            rec["answer"] = env.body.text
            rec["finish"] = env.body.finish_reason
            if env.body.sentences == 0:
                return rec  # nothing to speak: no metrics.turn will come
        elif env.kind == "metrics.turn":
            rec["metrics"] = dict(env.body.timings)
            rec["outcome"] = env.body.outcome
            if "llm" in rec:
                return rec
    run.errors.append(f"turn {turn} ({body.text!r}): no answer before the deadline")
    return rec


# --- reporting ------------------------------------------------------------------------------


def fmt_s(x: float | None) -> str:
    return "–" if x is None else f"{x * 1000:.0f} ms"


def stage_figures(turns: list[dict], stages, source: str) -> dict:
    out = {}
    for key, _label, get in stages:
        values = [v for r in turns if (v := get(r.get(source, {}))) is not None]
        out[key] = summary(values)
    return out


def cell(s: dict | None, *, rate: bool = False) -> str:
    if not s or s.get("median") is None:
        return "–"
    if rate:
        return f"{s['median']:.0f} / {s['p90']:.0f}"
    return f"{s['median'] * 1000:.0f} / {s['p90'] * 1000:.0f}"


def cpu_cell(cpu: dict) -> str:
    if not cpu:
        return "–"
    return f"{cpu['ours_cores']:.2f} / {cpu['others_cores']:.2f} of {cpu['cores']}"


def mb(x: float | None) -> str:
    return "–" if x is None else f"{x:.0f}"


def table(title: str, columns: list[str], rows: list[tuple[str, list[str]]]) -> str:
    width0 = max(len(title), *(len(r[0]) for r in rows))
    widths = [max(len(c), *(len(r[1][i]) for r in rows)) for i, c in enumerate(columns)]
    lines = [f"{title:<{width0}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(columns, widths))]
    lines.append("-" * len(lines[0]))
    for label, cells in rows:
        lines.append(f"{label:<{width0}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    return "\n".join(lines)


def measured(run: Run) -> list[dict]:
    """The turns that count: answered, not the warm-up."""
    return [r for r in run.turns if not r.get("warm_up") and not r.get("cold") and "metrics" in r]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=5, help="questions per configuration (default 5)")
    parser.add_argument("--quick", action="store_true", help="2 turns per configuration")
    parser.add_argument("--gap", type=float, default=7.0, help="seconds of silence after each spoken question")
    parser.add_argument("--asr", default="pocketsphinx,whisper", help="ASR backends to compare (comma separated)")
    parser.add_argument("--skip-http", action="store_true", help="leave out part 2 (chat over HTTP vs in process)")
    parser.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                        help=f"do not open each run with {WARM_UP!r} (left out of the figures)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, WAV, state)")
    args = parser.parse_args()
    n = 2 if args.quick else args.turns
    if n < 1:
        parser.error("--turns must be at least 1")
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(n)]
    asrs = [a.strip() for a in args.asr.split(",") if a.strip()]

    def on_signal(signum: int, frame: object) -> None:
        # Once: the clean-up that follows (bounded waits) must not be cut short by a second signal.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt  # SIGTERM takes the same clean-up path as Ctrl-C

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    t_start = time.monotonic()
    load_start = [round(x, 2) for x in os.getloadavg()]
    workdir = Path(tempfile.mkdtemp(prefix="voicebus-bench-"))
    log(f"work folder {workdir}")
    voice_runs: dict[str, Run] = {}
    text_runs: dict[str, Run] = {}
    http_failure: str | None = None
    server: LlamaServer | None = None
    interrupted = False
    try:
        wav = workdir / "questions.wav"
        spoken = ([WARM_UP] if args.warm_up else []) + questions
        length = synthesize_questions(wav, spoken, lead_s=1.0, gap_s=args.gap)
        log(f"synthesized {len(spoken)} questions: {length:.1f} s of audio, played in real time")
        for asr in asrs:
            log(f"voice run with --asr {asr}…")
            run = run_voice(asr, wav, workdir, expected=len(spoken), timeout_s=length + 90)
            for i, rec in enumerate(run.turns):
                rec["warm_up"] = args.warm_up and i == 0 and "metrics" in rec
            voice_runs[asr] = run
        if not args.skip_http:
            log("text run with --llm local…")
            text_runs["local"] = run_text("local", questions, workdir, warm_up=args.warm_up, server=None,
                                          timeout_s=60 + 30 * len(questions))
            log("starting llama_cpp.server…")
            try:
                t0 = time.monotonic()
                server = LlamaServer(workdir)
                log(f"llama_cpp.server ready in {time.monotonic() - t0:.1f} s on {server.base_url} "
                    f"(model {server.model!r})")
                log("text run with --llm openai…")
                text_runs["openai"] = run_text("openai", questions, workdir, warm_up=args.warm_up, server=server,
                                               timeout_s=60 + 30 * len(questions))
            except RuntimeError as exc:
                http_failure = str(exc)
                log(f"HTTP backend failed: {exc}")
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted; cleaning up")
    finally:
        if server is not None:
            server.stop()
        if args.keep:
            log(f"kept {workdir}")
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)

    if interrupted:
        return 130
    # ---- figures -----------------------------------------------------------------------------
    result: dict = {"turns": n, "gap_s": args.gap, "questions": questions, "voice": {}, "text": {},
                    "wall_s": round(time.monotonic() - t_start, 1),
                    "loadavg_start": load_start, "loadavg_end": [round(x, 2) for x in os.getloadavg()]}
    for asr, run in voice_runs.items():
        turns = measured(run)
        stages = stage_figures(turns, VOICE_STAGES, "metrics")
        stages.update(stage_figures(turns, LLM_STAGES, "llm"))
        result["voice"][asr] = {
            "stages": stages,
            "memory_mb": run.memory,
            "ready_s": run.ready_s,
            "cpu_cores": run.cpu,
            "answered": len(turns),
            "outcomes": [r.get("outcome") for r in turns],
            "left_out_cold": sum(1 for r in run.turns if r.get("cold") and not r.get("warm_up")),
            "heard": [r.get("heard") for r in run.turns if not r.get("warm_up")],
            "answers": [r.get("answer") for r in turns],
            "errors": run.errors,
            "exit_code": run.exit_code,
            "per_turn": [{k: _round(get(r["metrics"])) for k, _l, get in VOICE_STAGES} for r in turns],
        }
    for backend, run in text_runs.items():
        turns = [r for r in run.turns if not r.get("warm_up") and "llm" in r]
        result["text"][backend] = {
            "stages": {key: summary([v for r in turns if (v := get({**r.get("metrics", {}), **r["llm"]})) is not None])
                       for key, _l, get in TEXT_STAGES},
            "memory_mb": run.memory,
            "ready_s": run.ready_s,
            "cpu_cores": run.cpu,
            "answered": len(turns),
            "finish": [r.get("finish") for r in turns],
            "answers": [r.get("answer") for r in turns],
            "errors": run.errors,
        }
    if http_failure:
        result["text"]["openai"] = {"failed": http_failure}
    ps = result["voice"].get("pocketsphinx")
    if ps:
        total = ps["stages"]["total"]["median"]
        rss = ps["memory_mb"].get("total_rss")
        result["aims"] = {
            "pocketsphinx_total_median_le_0.8s": None if total is None else total <= 0.8,
            "pocketsphinx_total_rss_lt_1536mb": None if rss is None else rss < 1536,
        }

    # ---- table -----------------------------------------------------------------------------
    out = []
    if voice_runs:
        cols = [f"{asr} (n={result['voice'][asr]['answered']})" for asr in voice_runs]
        rows = []
        for key, label, _ in VOICE_STAGES + LLM_STAGES:
            rows.append((label, [cell(result["voice"][a]["stages"][key], rate=key == "llm_tokens_per_s")
                                 for a in voice_runs]))
        out.append(table("voice turn, median / p90 (ms)", cols, rows))
        roles = [r for r in ROLES if any(r in result["voice"][a]["memory_mb"] for a in voice_runs)]
        mem_rows = [(f"max RSS {r}", [mb(result["voice"][a]["memory_mb"].get(r)) for a in voice_runs])
                    for r in roles]
        mem_rows.append(("peak total RSS (all processes)", [f"{result['voice'][a]['memory_mb']['total_rss']:.0f}"
                                                             for a in voice_runs]))
        mem_rows.append(("peak total PSS (shared pages once)",
                         [f"{result['voice'][a]['memory_mb']['total_pss']:.0f}" for a in voice_runs]))
        mem_rows.append(("CPU cores busy: ours / others'", [cpu_cell(result["voice"][a]["cpu_cores"])
                                                            for a in voice_runs]))
        out.append(table("resident memory (MB)", cols, mem_rows))
    if text_runs or http_failure:
        backends = list(text_runs)
        cols = [f"{b}{' (HTTP)' if b == 'openai' else ' (in process)'} (n={result['text'][b]['answered']})"
                for b in backends]
        rows = [(label, [cell(result["text"][b]["stages"][key], rate=key == "tokens_per_s") for b in backends])
                for key, label, _ in TEXT_STAGES]
        extra_roles = [r for r in ("thinker", "speaker", "llama-server")
                       if any(r in result["text"][b]["memory_mb"] for b in backends)]
        rows += [(f"max RSS {r} (MB)", [mb(result["text"][b]["memory_mb"].get(r)) for b in backends])
                 for r in extra_roles]
        rows.append(("peak total RSS (MB)", [f"{result['text'][b]['memory_mb']['total_rss']:.0f}" for b in backends]))
        rows.append(("CPU cores busy: ours / others'", [cpu_cell(result["text"][b]["cpu_cores"]) for b in backends]))
        if backends:
            out.append(table("text turn (ctl.ask), median / p90 (ms)", cols, rows))
        if http_failure:
            out.append(f"openai backend FAILED: {http_failure.splitlines()[0]}")
    problems = [f"{k}: {e}" for k, v in {**{f'voice-{a}': r for a, r in voice_runs.items()},
                                        **{f'text-{b}': r for b, r in text_runs.items()}}.items() for e in v.errors]
    if problems:
        out.append("problems:\n  " + "\n  ".join(problems[:20]))
    print("\n\n".join(out), flush=True)
    print(json.dumps(result, separators=(",", ":")), flush=True)
    return 0 if not problems and not http_failure else 1


if __name__ == "__main__":
    sys.exit(main())
