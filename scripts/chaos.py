"""Chaos campaign: kill -9 every process of a real ``voicebus up`` again and again, under load, and count.

    python scripts/chaos.py [--kills 50] [--llm local|scripted] [--max-minutes 120] [--seed 1]

The default run takes about 30 minutes on 2 cores (the thinker's restarts, ~12 s each under load, dominate).

One ``voicebus up`` on a private ipc bus, ``--output none`` (a real-time null sink: an
answer takes its spoken time), its listener reading a long file of spoken questions
(the embedded piper voice, 2–4 s apart) in real time, and text askers asking at the
same time: some run the real ``voicebus ask``, some are bus clients doing what it does.
The campaign then kills the listener, the thinker, the speaker and the bus ``--kills``
times each with SIGKILL, each at a chosen moment (idle, mid-utterance, between a guess
and its final, between acceptance and the end, mid-answer, mid-playback), waits for the
process to be back, and goes on. Between kills it floods the bus (~150k msg/s of kinds
the workers *and* the supervisor subscribe to) and fuzzes it with malformed frames.

Everything is judged from what was on the bus — a recorder subscribed before the start
to every kind that matters (not the flood's) — and from the SQLite history afterwards:

    answered    the turn's answer was generated once (at most one non-replay llm.done), it
                ended stop/length, its end reached the asker (text: ``ask`` exited 0), and
                (voice) the speaker played all of it (metrics.turn outcome done)
    lost        accepted (voice: asked) and never finished; for text, ``ask`` exited non-zero
    duplicated  two non-replay llm.done for a turn; a sentence played twice (play.done twice)
                other than one cut by a speaker kill (counted apart); one utterance answered
                under two turn ids
    memory      an answered text turn whose assistant row is empty or missing, or not what
                ``ask`` printed; a voice turn whose row is not what was played (all of it, or
                up to where play.stopped says playback stopped)

Prints a table (stderr has the progress), then one JSON line on stdout. Exit status 0 when
nothing was lost, duplicated or misremembered and no flood cost a restart; 1 otherwise;
2 when the campaign could not run (a process did not come back, the stack died).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import zmq

from voicebus.cli.talk import ANSWER, ANSWERED, exchange
from voicebus.engine.bus import Endpoints, tune
from voicebus.engine.client import BusClient
from voicebus.engine.errors import ProtocolError
from voicebus.engine.messages import Envelope, decode, new_turn_id
from voicebus.workers.kinds import LlmDone, LlmError

ROOT = Path(__file__).resolve().parents[1]
WORKERS = ("listener", "thinker", "speaker")
PROBE_KIND = "chaos.probe"
TARGETS = (*WORKERS, "bus")
RECORDED = (
    "sys.hello", "sys.ready", "sys.error", "sys.bye", "sys.heartbeat", "sup.", "ctl.ask", "ctl.say",
    "asr.", "vad.", "audio.end", "llm.accepted", "llm.sentence", "llm.done", "llm.error", "llm.resend",
    "play.", "metrics.turn",
)
"""What the recorder hears: every kind a turn is judged by. Not ctl.interrupt, ctl.shutdown nor llm.token,
whose prefixes the flood uses: a recorder drowned by the flood would report losses that did not happen."""
FLOOD_TOPICS = ("ctl.interrupt.flood", "llm.token.flood", "sys.flood", "ctl.shutdown.flood")
"""Subscriptions are prefixes: thinker and speaker take ctl.interrupt, listener and speaker llm.token, the
supervisor sys., and every worker and the supervisor ctl.shutdown. The kinds themselves are unknown, so they
pass through untouched: the flood costs queue space and time, nothing else."""
QUEUE_MB = 50_000 * 400 / 2**20
WORKER_GROWTH_MB = QUEUE_MB + 24
WARM = {"speaker": ("play.start", 8), "thinker": ("llm.done", 4)}
"""What a worker does before a flood measures it (kind, count since it started): by then a speaker's voice
model has grown its buffers, and a thinker has read the conversation back (prompt buffers, key/value
cache pages)."""
BUS_GROWTH_MB = 8 * QUEUE_MB + 24
"""Memory bounds under a flood, as tests/test_flood.py derives them from the bus's HWM."""

VOICE_QUESTIONS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What color is the sky on a clear day?",
    "How many days are in a week?",
    "What is the largest ocean on Earth?",
    "Who wrote Romeo and Juliet?",
    "At what temperature does water boil?",
    "How many minutes are in an hour?",
    "Which planet is closest to the sun?",
    "How many wheels does a bicycle have?",
    "What is the opposite of cold?",
    "Where do penguins live?",
    "What color are ripe bananas?",
    "What do bees make?",
    "How many hours are in a day?",
    "What is the tallest animal in the world?",
    "What language is spoken in Brazil?",
    "How many continents are there?",
    "What do we call frozen water?",
    "Which season comes after winter?",
]
TEXT_TOPICS = ["the moon", "rivers", "apples", "trains", "the ocean", "music", "clocks", "bread", "snow", "birds"]

MOMENTS: dict[str, tuple[Callable[[Envelope], bool] | None, tuple[float, float]]] = {
    "idle": (None, (0.0, 2.0)),
    "mid-utterance": (lambda e: e.kind == "vad.start", (0.1, 0.9)),
    "guess→final": (lambda e: e.kind == "asr.guess", (0.0, 0.15)),
    "accepted→end": (lambda e: e.kind == "llm.accepted", (0.0, 0.1)),
    "mid-answer": (lambda e: e.kind == "llm.sentence" and not e.body.replay and not e.body.guess, (0.0, 0.1)),
    "mid-playback": (lambda e: e.kind == "play.start", (0.05, 0.5)),
}
"""moment → (the bus message that starts it, the delay range after it, seconds)."""


def log(text: str) -> None:
    print(f"chaos {time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


class CampaignError(Exception):
    """The campaign cannot go on (a process did not come back, the stack died)."""


# --- the voice input --------------------------------------------------------------------------


@dataclass(frozen=True)
class Spoken:
    """One question in the input file, and where."""

    text: str
    start_ms: int
    end_ms: int


def synthesize_input(path: Path, seconds: float, gap_s: tuple[float, float], rng: random.Random,
                     cache: Path) -> list[Spoken]:
    """A file of questions (the embedded piper voice) with random gaps, at least ``seconds`` long."""
    from voicebus.workers.audio import write_wav

    rate = 16000
    clips = _question_clips(cache, rate)
    silence = lambda s: bytes(int(rate * s) * 2)  # noqa: E731
    parts, spoken, at = [silence(1.0)], [], 1000
    while at < seconds * 1000:
        text = rng.choice([q for q in VOICE_QUESTIONS if not spoken or q != spoken[-1].text])
        pcm = clips[text]
        length = len(pcm) * 1000 // (2 * rate)
        spoken.append(Spoken(text, at, at + length))
        gap = rng.uniform(*gap_s)
        parts += [pcm, silence(gap)]
        at += length + int(gap * 1000)
    write_wav(path, b"".join(parts), rate)
    return spoken


def _question_clips(cache: Path, rate: int) -> dict[str, bytes]:
    """Each question spoken once, 16 kHz int16, cached across runs."""
    cache.mkdir(parents=True, exist_ok=True)
    clips, missing = {}, []
    for text in VOICE_QUESTIONS:
        file = cache / f"{hashlib.sha1(text.encode()).hexdigest()[:16]}-{rate}.pcm"
        if file.exists():
            clips[text] = file.read_bytes()
        else:
            missing.append((text, file))
    if missing:
        from voicebus.workers.audio import Resampler
        from voicebus.workers.tts.piper import PiperSynthesizer

        log(f"synthesizing {len(missing)} question(s) with the embedded piper voice")
        voice = PiperSynthesizer()
        try:
            for text, file in missing:
                resampler = Resampler(voice.sample_rate, rate)
                pcm = b"".join(resampler.process(c) for c in voice.synthesize(text)) + resampler.flush()
                clips[text] = pcm[: len(pcm) - len(pcm) % 2]
                file.write_bytes(clips[text])
        finally:
            voice.close()
    return clips


# --- watching the bus -------------------------------------------------------------------------


class Recorder:
    """Every recorded message with the monotonic time it arrived; the workers' current pids.

    A plain SUB socket that reconnects every 10 ms (clients back off to 1 s): after a bus restart it is
    connected before the workers flush what they queued meanwhile, so it sees what they see.
    """

    def __init__(self, endpoints: Endpoints) -> None:
        self.endpoints = endpoints
        self._ctx = zmq.Context()
        self.sub = tune(self._ctx.socket(zmq.SUB))
        self.sub.setsockopt(zmq.RECONNECT_IVL, 10)
        self.sub.setsockopt(zmq.RECONNECT_IVL_MAX, 10)
        self.sub.connect(endpoints.subscribe)
        for prefix in (*RECORDED, PROBE_KIND):
            self.sub.setsockopt(zmq.SUBSCRIBE, prefix.encode())
        self.messages: list[tuple[float, Envelope]] = []
        self.bad_frames = 0
        self.pids: dict[str, int] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-recorder", daemon=True)

    def start(self, timeout: float) -> None:
        """Record from a thread, once a probe sent through the bus came back (the subscriptions are in)."""
        self._thread.start()
        probe = BusClient(self.endpoints, name="chaos-probe")
        try:
            probe.announce(timeout=timeout)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                sent = probe.publish_kind(PROBE_KIND, {})
                if self.wait(lambda e: e.src == probe.src and e.seq == sent.seq, 0.2) is not None:
                    return
            raise CampaignError("the recorder never heard its own probe through the bus")
        finally:
            probe.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.sub.poll(100):
                continue
            while True:
                try:
                    frames = self.sub.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    env = decode(frames)
                except ProtocolError:
                    self.bad_frames += 1
                    continue
                self._add(env)

    def _add(self, env: Envelope) -> None:
        now = time.monotonic()
        with self._cond:
            self.messages.append((now, env))
            if env.kind in ("sys.ready", "sys.heartbeat") and getattr(env.body, "name", "") in WORKERS:
                if env.kind != "sys.heartbeat" or env.body.state == "ready":
                    self.pids[env.body.name] = env.body.pid
            self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.messages)

    def select(self, predicate: Callable[[Envelope], bool], since: int = 0) -> list[Envelope]:
        with self._cond:
            return [env for _, env in self.messages[since:] if predicate(env)]

    def timed(self, since: int = 0) -> list[tuple[float, Envelope]]:
        with self._cond:
            return list(self.messages[since:])

    def wait(self, predicate: Callable[[Envelope], bool], timeout: float, since: int = 0
             ) -> tuple[float, Envelope] | None:
        """The first (arrival time, message) from ``since`` on that matches, or None after ``timeout``."""
        deadline = time.monotonic() + timeout
        index = since
        with self._cond:
            while True:
                while index < len(self.messages):
                    at, env = self.messages[index]
                    index += 1
                    if predicate(env):
                        return at, env
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(min(remaining, 0.5))

    def dump(self, path: Path) -> None:
        """Everything recorded, one JSON line per message (arrival time, kind, src, turn, body)."""
        with open(path, "w", encoding="utf-8") as out:
            for at, env in self.timed():
                body = env.body.to_dict() if hasattr(env.body, "to_dict") else env.body
                out.write(json.dumps({"at": round(at, 3), "kind": env.kind, "src": env.src, "seq": env.seq,
                                      "turn": env.turn, "body": body}, default=repr) + "\n")

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2)
        self.sub.close(linger=0)
        self._ctx.term()


# --- the stack --------------------------------------------------------------------------------


class Stack:
    """One ``voicebus up`` in its own process group, its output in files."""

    def __init__(self, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.stderr_path = log_dir / "up.stderr"
        with open(log_dir / "up.stdout", "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "voicebus.cli.main", "up", *args], env=env,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
        self.seen: set[int] = set()

    def children(self) -> dict[str, int]:
        """{listener|thinker|speaker|bus: pid} of the running children."""
        found = {}
        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return found
        for proc in procs:
            self.seen.add(proc.pid)
            try:
                cmd = proc.cmdline()
                if proc.status() == psutil.STATUS_ZOMBIE:
                    continue
            except psutil.Error:
                continue
            if "worker" in cmd and cmd.index("worker") + 1 < len(cmd):
                found[cmd[cmd.index("worker") + 1]] = proc.pid
            elif cmd[-1:] == ["bus"]:
                found["bus"] = proc.pid
        return found

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 30) -> int | None:
        """Ctrl-C as a user would; then the whole group, whatever happened."""
        if self.alive():
            self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
        self.children()
        for pid in [self.proc.pid, *self.seen]:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(10)
        return code

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-lines:])


def scripted_server() -> tuple[str, Callable[[], None]]:
    """The tests' scripted OpenAI-compatible server, in a thread: its URL and how to stop it."""
    sys.path.insert(0, str(ROOT / "tests"))
    from support.openai_server import Script, ScriptedHandler, ScriptedServer

    script = Script()
    handler = type("Handler", (ScriptedHandler,), {"script": script})
    server = ScriptedServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="scripted-openai", daemon=True)
    thread.start()

    def stop() -> None:
        script.stop.set()
        server.shutdown()
        server.server_close()

    return f"http://127.0.0.1:{server.server_address[1]}/v1", stop


# --- text askers ------------------------------------------------------------------------------


@dataclass
class Asked:
    """One text question and what its asker got."""

    asker: str
    kind: str
    """cli (the real 'voicebus ask') | client (a bus client doing what it does)"""
    text: str
    started: float
    ended: float = 0.0
    code: int | None = None
    printed: list[str] = field(default_factory=list)
    stderr: str = ""
    turn: int = 0


class TextAsker(threading.Thread):
    def __init__(self, name: str, kind: str, url: str, endpoints: Endpoints, rng: random.Random,
                 pause_s: tuple[float, float], timeout: float, stop: threading.Event, out: list[Asked]) -> None:
        super().__init__(name=f"asker-{name}", daemon=True)
        self.asker, self.kind, self.url, self.endpoints = name, kind, url, endpoints
        self.rng, self.pause_s, self.timeout, self._stop_asking, self.out = rng, pause_s, timeout, stop, out
        self.count = 0
        self.client: BusClient | None = None

    def run(self) -> None:
        try:
            if self.kind == "client":
                self.client = BusClient(self.endpoints, name=f"chaos-{self.asker}")
                self.client.subscribe(*ANSWER)
                self.client.announce(timeout=30)
            while not self._stop_asking.is_set():
                self.count += 1
                text = f"Question {self.count} from {self.asker}: what do you know about {self.rng.choice(TEXT_TOPICS)}?"
                asked = Asked(self.asker, self.kind, text, time.monotonic())
                self.out.append(asked)
                if self.kind == "cli":
                    self._ask_cli(asked)
                else:
                    self._ask_client(asked)
                asked.ended = time.monotonic()
                if asked.code:
                    log(f"{self.asker}: ask exited {asked.code}: {asked.stderr.strip()[-200:]}")
                self._stop_asking.wait(self.rng.uniform(*self.pause_s))
        finally:
            if self.client is not None:
                self.client.close()

    def _ask_cli(self, asked: Asked) -> None:
        try:
            done = subprocess.run(
                [sys.executable, "-m", "voicebus.cli.main", "ask", asked.text, "--bus", self.url,
                 "--timeout", str(int(self.timeout))],
                capture_output=True, text=True, timeout=self.timeout + 30, env=_clean_env(),
            )
            asked.code, asked.printed, asked.stderr = done.returncode, done.stdout.splitlines(), done.stderr
        except subprocess.TimeoutExpired:
            asked.code, asked.stderr = 124, "ask did not exit"

    def _ask_client(self, asked: Asked) -> None:
        """What cli/talk.py's ask does, on a long-lived client."""
        assert self.client is not None
        asked.turn = new_turn_id()
        error_shown = False
        for reply in exchange(self.client, asked.text, asked.turn, self.timeout):
            if isinstance(reply, str):
                asked.printed.append(reply)
            elif isinstance(reply, LlmError):
                error_shown = True
                asked.stderr += f"answer failed: {reply.code}: {reply.message}\n"
            elif isinstance(reply, LlmDone):
                ok = reply.finish_reason in ANSWERED
                if not ok and not (reply.finish_reason == "error" and error_shown):
                    asked.stderr += f"no answer: {reply.finish_reason}: {reply.reason}\n"
                asked.code = 0 if ok else 1
                return
        asked.code, asked.stderr = 1, asked.stderr + f"no complete answer within {self.timeout:.0f} s\n"


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOICEBUS_", "OPENAI_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


# --- floods and fuzz --------------------------------------------------------------------------


FUZZ_TOPICS = {
    "ctl.ask": {"text": "hello"},
    "asr.final": {"text": "hello"},
    "llm.sentence": {"text": "One.", "index": 0},
    "llm.done": {"finish_reason": "stop", "sentences": 1},
    "play.done": {"index": 0, "spoken_ms": 10},
    "metrics.turn": {"timings": {}},
    "sys.heartbeat": {"name": "x", "pid": 1, "uptime": 1.0, "state": "ready"},
}


def rss_mb(pid: int) -> float | None:
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.Error:
        return None


@dataclass
class FloodResult:
    sent: int = 0
    seconds: float = 0.0
    pids_before: dict[str, int] = field(default_factory=dict)
    pids_after: dict[str, int] = field(default_factory=dict)
    growth_mb: dict[str, float] = field(default_factory=dict)
    restarts: list[str] = field(default_factory=list)
    """sup.exited / sup.restarting / sup.gave_up during the flood and its settling (must stay empty)"""
    settled_s: float = 0.0

    @property
    def harmless(self) -> bool:
        return not self.restarts and self.pids_before == self.pids_after and all(
            growth < (BUS_GROWTH_MB if name == "bus" else WORKER_GROWTH_MB) for name, growth in self.growth_mb.items())


def flood(stack: Stack, recorder: Recorder, endpoints: Endpoints, seconds: float, rate: int) -> FloodResult:
    result = FloodResult()
    pids = {**stack.children(), "supervisor": stack.proc.pid}
    result.pids_before = {k: v for k, v in pids.items() if k != "supervisor"}
    before = {name: rss_mb(pid) or 0.0 for name, pid in pids.items()}
    peak = dict(before)
    mark = recorder.mark()
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "flood.py"), endpoints.publish, str(seconds), str(rate),
                             ",".join(FLOOD_TOPICS)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + seconds + 30
    while proc.poll() is None and time.monotonic() < deadline:
        for name, pid in pids.items():
            peak[name] = max(peak[name], rss_mb(pid) or 0.0)
        time.sleep(0.1)
    if proc.poll() is None:
        proc.kill()
    out, err = proc.communicate(timeout=10)
    if out.split():
        result.sent, result.seconds = int(out.split()[0]), float(out.split()[1])
    else:
        log(f"flooder failed: {err.strip()[-300:]}")
    # Settled: every worker heard from after the flood, and queues drained for a while.
    ended = recorder.mark()
    settle_start = time.monotonic()
    heard: set[str] = set()
    while heard != set(WORKERS) and time.monotonic() - settle_start < 20:
        recorder.wait(lambda e: e.kind == "sys.heartbeat" and getattr(e.body, "name", "") in WORKERS, 1, ended)
        heard |= {e.body.name for e in recorder.select(lambda e: e.kind == "sys.heartbeat"
                                                       and getattr(e.body, "name", "") in WORKERS, ended)}
    settle_until = time.monotonic() + 3
    while time.monotonic() < settle_until:
        for name, pid in pids.items():
            peak[name] = max(peak[name], rss_mb(pid) or 0.0)
        time.sleep(0.1)
    result.settled_s = round(time.monotonic() - settle_start, 1)
    result.growth_mb = {name: round(peak[name] - before[name], 1) for name in pids}
    result.restarts = [f"{e.kind} {getattr(e.body, 'worker', '')}" for e in
                       recorder.select(lambda e: e.kind.startswith("sup."), mark)]
    result.pids_after = stack.children()
    return result


def fuzz(endpoints: Endpoints, count: int) -> int:
    """Malformed frames of every kind the tests know, on the kinds workers handle; how many were sent."""
    sys.path.insert(0, str(ROOT / "tests"))
    from support.fuzz import RawPublisher, bad_frames, random_frames

    witness = BusClient(endpoints, name="chaos-fuzz")
    sent = 0
    try:
        witness.announce(timeout=20)
        raw = RawPublisher(endpoints, witness)
        try:
            for topic, body in FUZZ_TOPICS.items():
                for _, frames in bad_frames(topic, body):
                    raw.send(frames)
                    sent += 1
                for frames in random_frames(topic, count // len(FUZZ_TOPICS), seed=random.randrange(1 << 30)):
                    raw.send(frames)
                    sent += 1
        finally:
            raw.close()
    finally:
        witness.close()
    return sent


# --- the campaign -----------------------------------------------------------------------------


@dataclass
class Kill:
    target: str
    moment: str
    pid: int
    at: float
    """monotonic time of the SIGKILL"""
    wall: float
    triggered: bool = True
    """False when the moment's message did not come in time and the kill happened anyway"""
    recovered_s: float | None = None
    new_pid: int | None = None
    mark: int = 0
    """the recorder's position just before the kill"""


class Campaign:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.kills: list[Kill] = []
        self.floods: list[FloodResult] = []
        self.fuzzed = 0
        self.asked: list[Asked] = []
        self.notes: list[str] = []
        self.stop_asking = threading.Event()

    # -- setting up

    def run(self) -> dict:
        args = self.args
        work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="voicebus-chaos-"))
        work.mkdir(parents=True, exist_ok=True)
        self.work = work
        bus_folder = Path(tempfile.mkdtemp(prefix="vb-", dir="/tmp"))
        self.url = f"ipc://{bus_folder}"
        self.endpoints = Endpoints.parse(self.url)
        state = work / "state"
        state.mkdir(exist_ok=True)
        shared_models = Path(args.models).expanduser()
        if shared_models.is_dir() and not (state / "models").exists():
            (state / "models").symlink_to(shared_models)  # the assembled whisper model: not rebuilt per run
        self.db_path = state / "conversation.sqlite"
        started = time.monotonic()
        log(f"work dir {work}, bus {self.url}")
        spoken = synthesize_input(work / "questions.wav", args.max_minutes * 60 + 120, args.gap, self.rng,
                                  Path(args.cache).expanduser())
        self.spoken = spoken
        log(f"voice input: {len(spoken)} questions, {spoken[-1].end_ms / 60000:.1f} min")
        stop_server = None
        env = _clean_env(VOICEBUS_STATE_DIR=str(state))
        up_args = ["--input", str(work / "questions.wav"), "--output", "none", "--bus", self.url]
        if args.llm == "scripted":
            base_url, stop_server = scripted_server()
            env.update(VOICEBUS_LLM_BASE_URL=base_url, VOICEBUS_LLM_API_KEY="chaos", VOICEBUS_LLM_MODEL=args.model,
                       VOICEBUS_LLM_TIMEOUT_S="10")
            up_args += ["--llm", "openai"]
        else:
            up_args += ["--llm", "local"]
        self.recorder = Recorder(self.endpoints)
        self.stack = Stack(up_args, env, work)
        askers: list[TextAsker] = []
        try:
            self.recorder.start(timeout=30)
            self._wait_ready(started)
            self.ready_s = round(time.monotonic() - started, 1)
            log(f"every worker ready after {self.ready_s} s")
            for i in range(args.text_askers):
                kind = "cli" if i < args.cli_askers else "client"
                askers.append(TextAsker(f"{kind}{i}", kind, self.url, self.endpoints, random.Random(self.rng.random()),
                                        args.ask_pause, args.ask_timeout, self.stop_asking, self.asked))
            for asker in askers:
                asker.start()
            self.campaign_started = time.monotonic()
            self._kill_loop()
            self.cut = self._drain(askers)
            self.code = self.stack.stop()
            self.elapsed_s = round(time.monotonic() - started, 1)
            log(f"voicebus up exited {self.code}; campaign took {self.elapsed_s / 60:.1f} min")
        finally:
            self.stop_asking.set()
            for asker in askers:
                asker.join(max(1.0, args.ask_timeout + 35))
            if self.stack.alive():
                self.stack.stop(5)
            self.recorder.close()
            self.recorder.dump(work / "bus.jsonl")
            if stop_server is not None:
                stop_server()
            shutil.rmtree(bus_folder, ignore_errors=True)
        return analyse(self)

    def _wait_ready(self, started: float) -> None:
        deadline = started + 180
        while set(self.recorder.pids) != set(WORKERS) or set(self.stack.children()) != set(TARGETS):
            if not self.stack.alive():
                raise CampaignError(f"voicebus up exited {self.stack.proc.returncode}:\n{self.stack.tail()}")
            if time.monotonic() > deadline:
                raise CampaignError(f"the workers were not ready within 180 s:\n{self.stack.tail()}")
            time.sleep(0.2)

    # -- killing

    def _kill_loop(self) -> None:
        args = self.args
        left = {name: args.kills for name in TARGETS}
        total = sum(left.values())
        floods_at = {round(total * (i + 1) / (args.floods + 1)) for i in range(args.floods)} if args.floods else set()
        fuzz_at = {round(total * (i + 1.5) / (args.fuzz + 1)) for i in range(args.fuzz)} if args.fuzz else set()
        last: dict[str, float] = {name: -1e9 for name in TARGETS}
        end_by = self.campaign_started + args.max_minutes * 60 - args.drain_s
        done = 0
        while any(left.values()):
            if time.monotonic() > end_by:
                self.notes.append(f"stopped after {done} of {total} kills: --max-minutes reached")
                log(self.notes[-1])
                break
            if done in floods_at:
                floods_at.discard(done)
                self._flood()
            if done in fuzz_at:
                fuzz_at.discard(done)
                sent = fuzz(self.endpoints, args.fuzz_frames)
                self.fuzzed += sent
                log(f"fuzz: {sent} malformed frames")
            now = time.monotonic()
            ready = [n for n in TARGETS if left[n] and now - last[n] >= args.spacing]
            if not ready:
                time.sleep(min(last[n] + args.spacing for n in TARGETS if left[n]) - now)
                continue
            # The most behind first, so that the four stay interleaved.
            most = max(left[n] for n in ready)
            target = self.rng.choice([n for n in ready if left[n] == most])
            kill = self._kill(target)
            left[target] -= 1
            done += 1
            last[target] = kill.at
            self._recover(kill)
            log(f"[{done}/{total}] {target} {kill.pid} killed {kill.moment}{'' if kill.triggered else ' (untriggered)'}"
                f" → back in {kill.recovered_s:.2f} s")
            self.stop_asking.wait(self.rng.uniform(*args.between_s))

    def _kill(self, target: str) -> Kill:
        moments = list(MOMENTS)
        if target == "bus":
            moments.remove("idle")  # every moment is some message in flight for the bus
        moment = self.rng.choice(moments)
        trigger, (low, high) = MOMENTS[moment]
        triggered = True
        if trigger is not None:
            triggered = self.recorder.wait(trigger, self.args.moment_wait_s, self.recorder.mark()) is not None
        time.sleep(self.rng.uniform(low, high))
        pid = self.stack.children().get(target)
        if pid is None:
            raise CampaignError(f"no {target} process to kill:\n{self.stack.tail()}")
        mark = self.recorder.mark()
        os.kill(pid, signal.SIGKILL)
        kill = Kill(target, moment, pid, time.monotonic(), time.time(), triggered, mark=mark)
        self.kills.append(kill)
        return kill

    def _recover(self, kill: Kill) -> None:
        """Wait until the killed process is back: a new worker's sys.ready, or (the bus) every worker heard
        through the new bus."""
        deadline = kill.at + self.args.recover_s
        mark = kill.mark
        if kill.target == "bus":
            heard: dict[str, float] = {}
            while set(heard) != set(WORKERS) and time.monotonic() < deadline:
                got = self.recorder.wait(lambda e: e.kind == "sys.heartbeat" and e.ts > kill.wall + 0.05
                                         and getattr(e.body, "name", "") in WORKERS and e.body.name not in heard,
                                         deadline - time.monotonic(), mark)
                if got is None:
                    break
                heard.setdefault(got[1].body.name, got[0])
            if set(heard) == set(WORKERS):
                kill.recovered_s = min(heard.values()) - kill.at
                kill.new_pid = self.stack.children().get("bus")
        else:
            got = self.recorder.wait(lambda e: e.kind == "sys.ready" and e.body.name == kill.target
                                     and e.body.pid != kill.pid, max(0.0, deadline - time.monotonic()), mark)
            if got is not None:
                kill.recovered_s = max(0.0, got[0] - kill.at)
                kill.new_pid = got[1].body.pid
        if kill.recovered_s is None:
            raise CampaignError(f"{kill.target} did not come back within {self.args.recover_s:.0f} s of its kill "
                                f"({kill.moment}):\n{self.stack.tail()}")
        if not self.stack.alive():
            raise CampaignError(f"voicebus up exited {self.stack.proc.returncode}:\n{self.stack.tail()}")

    def _flood(self) -> None:
        args = self.args
        # A process that just started is still growing (models, arenas): its growth is not the flood's.
        if self.kills:
            self.stop_asking.wait(max(0.0, self.kills[-1].at + args.settle_s - time.monotonic()))
        for name in WARM:
            self._warm(name)
        log(f"flood: {args.flood_rate} msg/s for {args.flood_s:.0f} s on {', '.join(FLOOD_TOPICS)}")
        result = flood(self.stack, self.recorder, self.endpoints, args.flood_s, args.flood_rate)
        self.floods.append(result)
        log(f"flood: {result.sent} sent in {result.seconds} s; growth MB {result.growth_mb}; "
            f"restarts {result.restarts or 'none'}; settled in {result.settled_s} s")

    def _warm(self, name: str, limit_s: float = 30.0) -> None:
        """Wait (up to ``limit_s``) until worker ``name`` has done its ``WARM`` since it started. A process
        restarted shortly before a flood grows by itself over its first turns, which the flood's memory
        bound counted as the flood's harm: a new piper by ~180 MB (onnxruntime's arena; seeds 5, 7 and 10),
        a new thinker by 48 MB while it read the conversation back (seed 11, a thinker 19 s old)."""
        pid = self.stack.children().get(name)
        if pid is None:
            return
        kind, count = WARM[name]
        deadline = time.monotonic() + limit_s
        done = lambda: len(self.recorder.select(lambda e: e.kind == kind and e.src.endswith(f":{pid}")))  # noqa: E731
        while done() < count and time.monotonic() < deadline and not self.stop_asking.is_set():
            time.sleep(0.5)
        if done() < count:
            log(f"flood: the {name} (pid {pid}) has sent {done()} {kind} since it started; its growth may be its own")

    # -- the end

    def _drain(self, askers: list[TextAsker]) -> float:
        """Stop asking; let every turn asked so far finish (voice: those finalized by now)."""
        self.stop_asking.set()
        cut = time.monotonic()
        log("draining: no new text questions; waiting for the answers in flight")
        deadline = cut + self.args.drain_s
        for asker in askers:
            asker.join(max(0.1, deadline - time.monotonic()))
        while time.monotonic() < deadline:
            open_turns = self._open_voice_turns(cut)
            if not open_turns:
                break
            time.sleep(0.5)
        else:
            log(f"voice turns still open at the end: {self._open_voice_turns(cut)}")
        return cut

    def _open_voice_turns(self, cut: float) -> list[int]:
        finals = {env.turn for at, env in self.recorder.timed() if env.kind == "asr.final" and at <= cut}
        if not finals:
            return []
        status = read_turns(self.db_path)
        finished = {env.turn for env in self.recorder.select(lambda e: e.kind == "metrics.turn")}
        zero = {env.turn for env in self.recorder.select(lambda e: e.kind == "llm.done" and e.body.sentences == 0
                                                         and e.body.finish_reason != "revoked")}
        return sorted(t for t in finals if status.get(t, ("", ""))[0] != "done" or (t not in finished and t not in zero))


# --- judging ----------------------------------------------------------------------------------


def read_turns(db_path: Path) -> dict[int, tuple[str, str]]:
    """turn → (status, finish), read-only (the thinker may be writing)."""
    if not db_path.exists():
        return {}
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
    try:
        return {t: (s, f) for t, s, f in db.execute("SELECT turn, status, finish FROM turns")}
    except sqlite3.Error:
        return {}
    finally:
        db.close()


def read_history(db_path: Path) -> tuple[dict, dict, dict]:
    """(turns: turn → (channel, status, finish, reason), messages: (turn, role) → text, sentences: turn → [text])"""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
    try:
        turns = {t: rest for t, *rest in db.execute("SELECT turn, channel, status, finish, reason FROM turns")}
        messages = {(t, r): x for t, r, x in db.execute("SELECT turn, role, text FROM messages")}
        sentences: dict[int, list[tuple[str, str]]] = defaultdict(list)
        for t, text, raw in db.execute("SELECT turn, text, raw FROM sentences ORDER BY turn, idx"):
            sentences[t].append((text, raw))
    finally:
        db.close()
    return turns, messages, sentences


def percentiles(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return {"n": len(values), "median": round(statistics.median(ordered), 2), "p90": round(p90, 2),
            "max": round(ordered[-1], 2)}


def analyse(c: Campaign) -> dict:
    from voicebus.workers.thinker import APOLOGY, spoken_part

    turns, messages, sentences = read_history(c.db_path)
    timed = c.recorder.timed()
    by_turn: dict[int, list[Envelope]] = defaultdict(list)
    for _, env in timed:
        by_turn[env.turn].append(env)
    speaker_kills = [k for k in c.kills if k.target == "speaker"]
    problems: dict[str, list[str]] = defaultdict(list)

    def dones(turn: int) -> list[LlmDone]:
        return [e.body for e in by_turn[turn] if e.kind == "llm.done" and e.body.finish_reason != "revoked"]

    def plays(turn: int) -> tuple[int, int]:
        """(sentences played twice, sentences replayed after a speaker kill cut them)"""
        starts: dict[int, list[str]] = defaultdict(list)
        ends: Counter[int] = Counter()
        for e in by_turn[turn]:
            if e.kind == "play.start":
                starts[e.body.index].append(e.src)
            elif e.kind == "play.done":
                ends[e.body.index] += 1
        twice = sum(1 for n in ends.values() if n > 1)
        killed = {f":{k.pid}" for k in speaker_kills}
        cut = sum(1 for index, srcs in starts.items() if len(set(srcs)) > 1 and ends[index] <= 1
                  and any(s.endswith(p) for s in srcs for p in killed))
        return twice, cut

    # -- text
    text = Counter()
    for asked in c.asked:
        if asked.code is None:
            continue  # still running when the campaign ended (it was stopped)
        text["asked"] += 1
        ids = {e.turn for e in c.recorder.select(lambda e, q=asked.text: e.kind == "ctl.ask" and e.body.text == q)}
        if asked.turn:
            ids.add(asked.turn)
        if len(ids) > 1:
            answered_ids = [t for t in ids if turns.get(t, ("", "", ""))[2] in ("stop", "length")]
            if len(answered_ids) > 1:
                text["duplicated"] += 1
                problems["duplicated"].append(f"text {asked.text!r} answered under turns {sorted(answered_ids)}")
        turn = asked.turn or (min(ids) if ids else 0)
        record = turns.get(turn)
        original = [d for d in dones(turn) if not d.replay]
        if len(original) > 1:
            text["duplicated"] += 1
            problems["duplicated"].append(f"text turn {turn}: {len(original)} non-replay llm.done")
        if asked.code != 0 or record is None or record[1] != "done":
            text["lost"] += 1
            problems["lost"].append(f"text turn {turn} ({asked.kind}) exit {asked.code}: "
                                    f"{asked.stderr.strip()[-160:]!r}; record {record}")
            continue
        text["answered"] += 1
        if not original:
            text["end seen only as a replay"] += 1
        if messages.get((turn, "user")) != asked.text:
            text["another question's answer"] += 1
            problems["collided"].append(f"text turn {turn}: asked {asked.text!r}, remembered "
                                        f"{messages.get((turn, 'user'))!r}")
        row = messages.get((turn, "assistant"))
        if not row and not asked.printed and row is not None:
            text["answer empty (the model said nothing)"] += 1
        elif not row:
            text["empty in memory"] += 1
            problems["memory"].append(f"text turn {turn}: assistant row {row!r}, printed {asked.printed}")
        elif row != " ".join(asked.printed):
            text["differs in memory"] += 1
            problems["memory"].append(f"text turn {turn}: row {row!r} != printed {' '.join(asked.printed)!r}")

    # -- voice
    voice = Counter()
    finals = {}
    for at, env in timed:
        if env.kind == "asr.final" and env.turn not in finals:
            finals[env.turn] = (at, env.body.text)
    nomatch = {e.turn for e in c.recorder.select(lambda e: e.kind == "asr.nomatch")}
    voice["no speech recognized"] = len(nomatch)
    where: dict[int, list[int]] = defaultdict(list)
    for turn, (at, heard) in sorted(finals.items()):
        if at > c.cut:
            continue
        voice["asked"] += 1
        offset = next((e.body.offset_ms for e in by_turn[turn] if e.kind == "vad.start"), None)
        if offset is not None:
            nearest = min(range(len(c.spoken)), key=lambda i: abs(c.spoken[i].start_ms - offset))
            if abs(c.spoken[nearest].start_ms - offset) < 1500:
                where[nearest].append(turn)
        record = turns.get(turn)
        original = [d for d in dones(turn) if not d.replay]
        if len(original) > 1:
            voice["duplicated"] += 1
            problems["duplicated"].append(f"voice turn {turn}: {len(original)} non-replay llm.done")
        twice, cut = plays(turn)
        voice["replayed after speaker kill"] += cut
        if twice:
            voice["duplicated"] += 1
            problems["duplicated"].append(f"voice turn {turn}: {twice} sentence(s) played twice")
        metrics = [e.body for e in by_turn[turn] if e.kind == "metrics.turn"]
        stopped = [e.body for e in by_turn[turn] if e.kind == "play.stopped"]
        said = [t for t, raw in sentences.get(turn, []) if raw or t != APOLOGY]
        finished = record is not None and record[1] == "done" and (metrics or stopped or not said)
        if not finished:
            voice["lost"] += 1
            problems["lost"].append(f"voice turn {turn} {heard!r}: record {record}, metrics {len(metrics)}")
            continue
        if not original:
            voice["end seen only as a replay"] += 1
        if record[2] in ("stop", "length") and any(m.outcome == "done" for m in metrics):
            voice["answered"] += 1
            expected = " ".join(said)
        else:
            voice["interrupted (barge-in)" if stopped or record[2] == "cancelled" else f"ended {record[2]}"] += 1
            # What was heard: every sentence played to its end (play.done), and the part of the next one
            # that play.stopped reports.
            done_indexes = {e.body.index for e in by_turn[turn] if e.kind == "play.done"}
            heard_upto = 0
            while heard_upto in done_indexes:
                heard_upto += 1
            last = stopped[-1] if stopped else None
            upto = max(heard_upto, last.index if last else 0)
            partial = (last.spoken_ms, last.total_ms) if last and last.index == upto else (0, 0)
            expected = spoken_part(said, upto, *partial) if (last or record[2] == "cancelled") else " ".join(said)
        row = messages.get((turn, "assistant"), None)
        if row is None or row != expected:
            voice["differs in memory"] += 1
            problems["memory"].append(f"voice turn {turn}: row {row!r} != heard {expected!r}")
    for index, ids in where.items():
        heard = [finals[t][1] for t in ids]
        if len(ids) > 1 and len(set(heard)) < len(heard):
            voice["duplicated"] += 1
            problems["duplicated"].append(f"question {index} ({c.spoken[index].text!r}) answered as turns {ids}")

    # -- restarts, guesses, errors
    restarts = {name: percentiles([k.recovered_s for k in c.kills if k.target == name and k.recovered_s is not None])
                for name in TARGETS}
    moments = Counter(f"{k.target} {k.moment}" for k in c.kills)
    revoked = {
        "asr.revoke": len(c.recorder.select(lambda e: e.kind == "asr.revoke")),
        "llm.done revoked": len(c.recorder.select(lambda e: e.kind == "llm.done" and e.body.finish_reason == "revoked"
                                                  and not e.body.replay)),
        "guesses": len(c.recorder.select(lambda e: e.kind == "asr.guess")),
        "confirmed": len({e.turn for e in c.recorder.select(lambda e: e.kind == "asr.final" and e.body.guess)}),
    }
    errors = Counter()
    for env in c.recorder.select(lambda e: e.kind == "sys.error"):
        code = getattr(env.body, "code", "?")
        errors["bad frames (fuzz, flood)" if str(code).startswith("bad_frame") else f"{env.src.split('@')[0]}: "
               f"{getattr(env.body, 'where', '')}: {code}: {str(getattr(env.body, 'message', ''))[:80]}"] += 1
    gave_up = [e.body.worker for e in c.recorder.select(lambda e: e.kind == "sup.gave_up")]
    failures = {
        "lost": text["lost"] + voice["lost"],
        "duplicated": text["duplicated"] + voice["duplicated"],
        "memory": text["empty in memory"] + text["differs in memory"] + voice["differs in memory"]
                  + text["another question's answer"],
        "flood harm": sum(1 for f in c.floods if not f.harmless),
    }
    return {
        "llm": c.args.llm, "model": c.args.model if c.args.llm == "scripted" else "local", "seed": c.args.seed,
        "kills": len(c.kills), "kills_planned": c.args.kills * len(TARGETS), "minutes": round(c.elapsed_s / 60, 1),
        "ready_s": c.ready_s, "up_exit": c.code, "text": dict(text), "voice": dict(voice),
        "text_by_kind": dict(Counter(f"{a.kind} exit {a.code}" for a in c.asked if a.code is not None)),
        "restart_s": restarts, "moments": dict(moments),
        "untriggered_kills": sum(1 for k in c.kills if not k.triggered),
        "floods": [{"sent": f.sent, "seconds": f.seconds, "growth_mb": f.growth_mb, "restarts": f.restarts,
                    "same_pids": f.pids_before == f.pids_after, "pids": [f.pids_before, f.pids_after],
                    "settled_s": f.settled_s} for f in c.floods],
        "fuzzed_frames": c.fuzzed, "revoked": revoked, "errors": dict(errors.most_common()), "gave_up": gave_up,
        "failures": failures, "ok": not any(failures.values()) and not gave_up,
        "problems": {k: v[:20] for k, v in problems.items()}, "notes": c.notes, "workdir": str(c.work),
    }


def print_table(r: dict) -> None:
    out = sys.stderr
    print(f"\nchaos: {r['kills']}/{r['kills_planned']} kills in {r['minutes']} min, llm {r['model']}, "
          f"seed {r['seed']}, ready in {r['ready_s']} s, voicebus up exit {r['up_exit']}", file=out)
    rows = ["asked", "answered", "interrupted (barge-in)", "lost", "duplicated", "empty in memory",
            "differs in memory", "another question's answer", "end seen only as a replay",
            "replayed after speaker kill", "no speech recognized"]
    print(f"  {'':30} {'voice':>7} {'text':>7}", file=out)
    for row in rows:
        v, t = r["voice"].get(row, 0), r["text"].get(row, 0)
        print(f"  {row:30} {v:>7} {t:>7}", file=out)
    extra = {k: v for k, v in r["voice"].items() if k not in rows}
    if extra:
        print(f"  voice also: {extra}", file=out)
    print(f"  text askers: {r['text_by_kind']}", file=out)
    print(f"  {'restart (kill → back), s':30} {'n':>4} {'median':>7} {'p90':>6} {'max':>6}", file=out)
    for name, p in r["restart_s"].items():
        print(f"  {name:30} {p['n']:>4} {p.get('median', '-'):>7} {p.get('p90', '-'):>6} {p.get('max', '-'):>6}",
              file=out)
    print(f"  kill moments: {r['moments']} (untriggered: {r['untriggered_kills']})", file=out)
    for i, f in enumerate(r["floods"], 1):
        print(f"  flood {i}: {f['sent']} msgs in {f['seconds']} s; growth MB {f['growth_mb']}; restarts "
              f"{f['restarts'] or 'none'}; same pids {f['same_pids']}", file=out)
    print(f"  fuzz: {r['fuzzed_frames']} malformed frames; revoked guesses: {r['revoked']}", file=out)
    print(f"  errors seen: {r['errors'] or 'none'}", file=out)
    if r["gave_up"]:
        print(f"  GAVE UP: {r['gave_up']}", file=out)
    for kind, items in r["problems"].items():
        for item in items:
            print(f"  ! {kind}: {item}", file=out)
    for note in r["notes"]:
        print(f"  note: {note}", file=out)
    print(f"  verdict: {'OK' if r['ok'] else 'FAILED'} {r['failures']}", file=out)


def pair(text: str) -> tuple[float, float]:
    low, _, high = text.partition(",")
    return float(low), float(high or low)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=50, help="SIGKILLs of each process (listener, thinker, speaker, bus)")
    parser.add_argument("--llm", choices=("local", "scripted"), default="local",
                        help="the embedded local model, or the tests' scripted OpenAI-compatible server (fast)")
    parser.add_argument("--model", default="count-chaos-3", help="scripted: the model (count-TAG-N, echo-TAG)")
    parser.add_argument("--max-minutes", type=float, default=120, help="the campaign's time bound (kills stop then)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--text-askers", type=int, default=3)
    parser.add_argument("--cli-askers", type=int, default=2, help="how many of the text askers run 'voicebus ask'")
    parser.add_argument("--ask-pause", type=pair, default=(4.0, 10.0), metavar="MIN,MAX",
                        help="seconds a text asker waits after an answer")
    parser.add_argument("--ask-timeout", type=float, default=120)
    parser.add_argument("--gap", type=pair, default=(2.0, 4.0), metavar="MIN,MAX",
                        help="seconds of silence after each spoken question")
    parser.add_argument("--spacing", type=float, default=15.0,
                        help="at least this long between two kills of one process (the supervisor gives a worker "
                             "up after 5 restarts in 60 s)")
    parser.add_argument("--between", dest="between_s", type=pair, default=(0.5, 3.0), metavar="MIN,MAX",
                        help="seconds between a recovery and the next kill")
    parser.add_argument("--moment-wait", dest="moment_wait_s", type=float, default=20.0,
                        help="how long to wait for a kill's moment before killing anyway")
    parser.add_argument("--recover", dest="recover_s", type=float, default=120.0,
                        help="how long a killed process may take to be back")
    parser.add_argument("--floods", type=int, default=3, help="floods during the campaign")
    parser.add_argument("--flood-seconds", dest="flood_s", type=float, default=8.0)
    parser.add_argument("--flood-rate", type=int, default=150_000, help="messages per second")
    parser.add_argument("--settle", dest="settle_s", type=float, default=20.0,
                        help="seconds after the last kill before a flood (its memory figures need settled processes)")
    parser.add_argument("--fuzz", type=int, default=3, help="fuzzing rounds during the campaign")
    parser.add_argument("--fuzz-frames", type=int, default=2000, help="random frames per fuzzing round")
    parser.add_argument("--drain", dest="drain_s", type=float, default=150.0,
                        help="at the end, how long the answers in flight may take")
    parser.add_argument("--workdir", help="where the state, logs and input go (default: a new temporary folder)")
    parser.add_argument("--cache", default="~/.cache/voicebus/chaos", help="synthesized questions, kept across runs")
    parser.add_argument("--models", default="~/.local/share/voicebus/models",
                        help="an assembled whisper model folder to reuse (else each run assembles its own)")
    args = parser.parse_args(argv)
    try:
        result = Campaign(args).run()
    except CampaignError as exc:
        log(f"campaign aborted: {exc}")
        print(json.dumps({"ok": False, "aborted": str(exc).splitlines()[0]}))
        return 2
    except KeyboardInterrupt:
        log("interrupted")
        return 2
    print_table(result)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
