"""Benchmark a voice turn, stage by stage, through the real ``voicebus up``.

    python scripts/bench_turn.py [--turns 8] [--pauses 8] [--quick] [--configs before,after]

Part 1, voice: questions spoken by several voices (the embedded piper voice and
espeak-ng voices nobody tuned on), each followed by silence, and utterances with
a hesitation in the middle ("Set a timer for … ten minutes."), are played in real
time into ``voicebus up --input Q.wav --output none`` once per configuration, each
with a fresh state dir:

    before   the recognizer's final after a fixed 500 ms silence window, no speculation
    after    the defaults: the window adapts to the words, the answer is prepared from
             a guess during the silence (asr.guess / asr.revoke / asr.final guess=rev)

A bus client collects every turn's messages; each turn is placed in the input by
its ``vad.start`` offset, so an utterance heard as two turns is a *false cut-off*.
psutil samples the resident memory of every process under ``voicebus up``.

Part 2, chat over HTTP vs in process: questions as text (``ctl.ask``) into
``voicebus up --input none --output none``, once with ``--llm local`` and once with
``--llm openai`` against llama-cpp-python's OpenAI-compatible server on the same GGUF.

Prints tables (stages as rows, configurations as columns, median / p90), then one
JSON object with every figure on the last line of stdout. Progress goes to stderr.
Every child process is stopped on any exit.
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
    "How many minutes are in an hour?",
    "Who was the first person to walk on the moon?",
    "Which planet is closest to the sun?",
    "How many wheels does a bicycle have?",
    "What is the opposite of cold?",
    "Where do penguins live?",
    "What color are ripe bananas?",
    "What do cows drink?",
]
"""Not in the recognizer's tuning set (scripts/eval_data/tune.txt)."""
PAUSED = [
    ("Set a timer for", "ten minutes."),
    ("What is the capital of", "Peru?"),
    ("Remind me to buy", "milk and bread."),
    ("How far is it from London to", "Paris?"),
    ("Add eggs and", "butter to my list."),
    ("Tell me the weather in", "Berlin tomorrow."),
    ("Play some music by", "the Beatles."),
    ("What is twenty", "times three?"),
]
"""Said with a hesitation where the first part cannot end a request."""
VOICES = ["piper", "en-us+m2", "en-gb+f3", "en-gb-x-rp+m5", "en-us+f1", "en-us-nyc+m4"]
"""piper is the embedded voice; the rest are espeak-ng voices outside the tuning set."""
WARM_UP = "Hello there."
"""Said first and left out of the figures: the first turn of a fresh process pays one-off costs."""
CONFIGS = {
    "before": {"VOICEBUS_VAD_ADAPTIVE": "false", "VOICEBUS_VAD_SPECULATE": "false"},
    "after": {},
    # the background gate (workers/foreground.py), off by default: what it costs when the voices differ in level
    "gate": {"VOICEBUS_VAD_BACKGROUND_DB": "10"},
    # whisper on CTranslate2's own thread count (4) instead of half the cores: what the default saves
    "asr-4-threads": {"VOICEBUS_ASR_THREADS": "4"},
    # whisper on every core: nothing else runs while a pause is decoded (the answer waits for its words)
    "asr-all-cores": {"VOICEBUS_ASR_THREADS": str(os.cpu_count() or 1)},
    # the short window even for words the recognizer doubts (workers/turn_end.py): what the check costs and saves
    "trust-words": {"VOICEBUS_VAD_COMPLETE_CONFIDENCE": "0"},
    # the thinker sends whole sentences only, never a first clause (workers/sentences.py): what the clause saves
    "whole-sentences": {"VOICEBUS_LLM_FIRST_CLAUSE_WORDS": "0"},
    # the turn ends on the words' window alone, not held open until the guess's answer is ready (vad.hold_ms)
    "no-hold": {"VOICEBUS_VAD_HOLD_MS": "0"},
    # complete-reading words are not weighed by the chat model (vad.message_end): what it costs and saves
    "no-message-end": {"VOICEBUS_VAD_MESSAGE_END": "false"},
    # speech soon after a turn ended is a new request on its own, not the same one going on (vad.rejoin_ms)
    "no-rejoin": {"VOICEBUS_VAD_REJOIN_MS": "0"},
}

WORKER_ROLES = ("listener", "thinker", "speaker")
ROLES = ("bus", *WORKER_ROLES, "supervisor")
MB = 1024 * 1024

# (key, label, how to get seconds from a metrics.turn timings dict)
VOICE_STAGES: list[tuple[str, str, Callable[[dict], float | None]]] = [
    ("speech_end_to_audio", "SPEECH END → FIRST AUDIO", lambda t: t.get("speech_end_to_audio_s")),
    ("silence", "silence window (speech end → vad.end)", lambda t: t.get("silence_s")),
    ("asr", "ASR (vad.end → asr.final)", lambda t: t.get("asr_s")),
    ("final_to_audio", "asr.final → first audio", lambda t: t.get("final_to_audio_s")),
    ("first_sentence", "first sentence (asr.final → sentence)", lambda t: t.get("first_sentence_s")),
    ("first_audio", "first audio (sentence/confirm → audio)", lambda t: t.get("first_audio_s")),
    ("saved", "speculation saved", lambda t: t.get("speculation_saved_s")),
    # Where a held answer's time goes (turns whose confirmed guess was answered): the sum is the earliest the
    # turn could end, whatever the window.
    ("to_guess", "  speech end → guess (pause, decode)", lambda t: _diff(t, "speech_end", "guess")),
    ("guess_to_sentence", "  guess → its first sentence (chat)", lambda t: _diff(t, "guess", "first_sentence")),
    ("sentence_to_ready", "  first sentence → answer ready (voice)", lambda t: _diff(t, "first_sentence", "guess_ready")),
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


RATE = 16000


class Speech:
    """Speaks texts with the embedded piper voice or an espeak-ng voice, as 16 kHz int16 PCM."""

    def __init__(self) -> None:
        from voicebus.workers.audio import Resampler
        from voicebus.workers.tts.piper import PiperSynthesizer

        self._piper = PiperSynthesizer()
        self._resampler = Resampler(self._piper.sample_rate, RATE)

    def say(self, text: str, voice: str) -> bytes:
        """``text`` spoken, without the silence voices put before and after speech: a pause placed between
        two clips is then the pause the listener hears (piper and espeak-ng each add a few hundred ms)."""
        if voice == "piper":
            pcm = b"".join(self._resampler.process(c) for c in self._piper.synthesize(text)) + self._resampler.flush()
            clip = ["-t", "raw", "-r", str(RATE), "-e", "signed", "-b", "16", "-c", "1", "-"]
            spoken = pcm[: len(pcm) - len(pcm) % 2]
        else:
            clip = ["-t", "wav", "-"]
            spoken = subprocess.run(["espeak-ng", "-v", voice, "-s", "160", "--stdout", text], capture_output=True,
                                    check=True).stdout
        trim = ["silence", "1", "0.01", "-50d", "reverse", "silence", "1", "0.01", "-50d", "reverse"]
        sox = subprocess.run(["sox", "-V1", *clip, "-r", str(RATE), "-b", "16", "-c", "1", "-t", "raw", "-", *trim],
                             input=spoken, capture_output=True, check=True)
        return sox.stdout

    def close(self) -> None:
        self._piper.close()


@dataclass
class Utterance:
    """One thing said in the input file, and where."""

    text: str
    voice: str
    start_ms: int
    end_ms: int
    paused: bool = False
    warm_up: bool = False


def synthesize_input(path: Path, *, questions: list[str], paused: list[tuple[str, str]], gap_s: float,
                     pause_ms: int) -> list[Utterance]:
    """Write warm-up, questions and paused utterances (voices in turn) to ``path``; return where each is."""
    from voicebus.workers.audio import write_wav

    speech = Speech()
    pcm = bytearray(RATE * 2)  # a second of silence first
    said: list[Utterance] = []

    def add(parts: list[bytes | int], text: str, voice: str, **flags: bool) -> None:
        start = len(pcm) // 2 * 1000 // RATE
        for part in parts:
            pcm.extend(part if isinstance(part, bytes) else bytes(RATE * 2 * part // 1000))
        said.append(Utterance(text, voice, start, len(pcm) // 2 * 1000 // RATE, **flags))
        pcm.extend(bytes(int(RATE * gap_s) * 2))

    try:
        add([speech.say(WARM_UP, "piper")], WARM_UP, "piper", warm_up=True)
        for i, text in enumerate(questions):
            voice = VOICES[i % len(VOICES)]
            add([speech.say(text, voice)], text, voice)
        for i, (first, second) in enumerate(paused):
            voice = VOICES[(i + 1) % len(VOICES)]
            add([speech.say(first, voice), pause_ms, speech.say(second, voice)], f"{first} {second}", voice, paused=True)
    finally:
        speech.close()
    write_wav(path, bytes(pcm), RATE)
    return said


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
    # One sampling seed for every configuration: the same question after the same history gets the same answer,
    # so a configuration's latency is not another one's luck with the length of a first sentence.
    env.update({"VOICEBUS_STATE_DIR": str(state_dir), "PYTHONUNBUFFERED": "1", "VOICEBUS_LLM_SEED": "7"})
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


def run_voice(label: str, env_extra: dict[str, str], wav: Path, said: list[Utterance], workdir: Path, *,
              timeout_s: float) -> Run:
    """One ``voicebus up --input wav`` run; every turn's messages, placed in the input by vad.start."""
    run = Run(f"voice-{label}")
    state = workdir / f"state-{label}"
    state.mkdir()
    from voicebus.workers.asr.whisper_model import ensure_whisper_model

    ensure_whisper_model(state / "models", progress=lambda s: log(f"whisper: {s}"))  # one-time work: not timed
    up = Up(workdir, run.label, ["--input", str(wav), "--output", "none"], base_env(state, **env_extra))
    started = time.monotonic()
    try:
        client = up.connect("vad.start", "asr.", "llm.done", "metrics.turn", "sys.ready", "sys.heartbeat",
                            "sys.error", "llm.error", "sup.gave_up")
        readiness = Readiness(WORKER_ROLES)
        by_turn: dict[int, dict] = {}
        ready_wall: float | None = None
        deadline = started + timeout_s
        while time.monotonic() < deadline and up.proc.poll() is None:
            env = client.recv(timeout=0.5)
            if env is None:
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
            rec = by_turn.setdefault(env.turn, {"turn": env.turn, "guesses": 0, "revokes": 0,
                                                "revoked_answers": 0, "wasted_tokens": 0})
            body = env.body
            if env.kind == "vad.start":
                rec["start_ms"] = body.offset_ms
                rec["rejoins"] = bool(body.rejoins)
            elif env.kind == "asr.guess":
                rec["guesses"] += 1
            elif env.kind == "asr.revoke":
                rec["revokes"] += 1
            elif env.kind == "asr.final":
                rec.setdefault("heard", body.text)
                rec.setdefault("confirmed_guess", body.guess)
            elif env.kind == "asr.nomatch":
                rec["nomatch"] = body.reason
            elif env.kind == "llm.done" and not body.replay:
                if body.finish_reason == "revoked":
                    rec["revoked_answers"] += 1
                    rec["wasted_tokens"] += int(body.timings.get("tokens", 0))
                else:
                    rec["llm"] = dict(body.timings)
                    rec["answer"] = body.text
                    rec["finish"] = body.finish_reason
            elif env.kind == "metrics.turn" and "metrics" not in rec:
                rec["metrics"] = dict(body.timings)
                rec["outcome"] = body.outcome
                t = rec["metrics"]
                rec["cold"] = ready_wall is None or t.get("speech_end", t.get("vad_end", 0)) < ready_wall
                done = sum(1 for r in by_turn.values() if "metrics" in r)
                log(f"{run.label}: turn {done} heard {rec.get('heard', '?')!r}: speech end → first audio "
                    f"{fmt_s(t.get('speech_end_to_audio_s'))} (window {fmt_s(t.get('silence_s'))}, "
                    f"ASR {fmt_s(t.get('asr_s'))}, final → audio {fmt_s(t.get('final_to_audio_s'))}, "
                    f"saved {fmt_s(t.get('speculation_saved_s'))}) [{rec['outcome']}]")
        if up.proc.poll() is None:
            run.errors.append(f"not finished within {timeout_s:.0f} s")
        run.exit_code = up.proc.poll()
        run.turns = sorted(by_turn.values(), key=lambda r: r.get("start_ms", 1 << 62))
    finally:
        up.stop()
        run.memory = up.sampler.report()
        run.cpu = up.sampler.cpu
    if run.exit_code not in (0, None):
        run.errors.append(f"voicebus up exited with {run.exit_code}")
        log(f"{run.label}: voicebus up exited with {run.exit_code}; log tail:\n{up.tail()}")
    place(run.turns, said)
    return run


def place(turns: list[dict], said: list[Utterance]) -> None:
    """Tag each turn with the utterance it began in (by input time); a turn in no utterance is noise."""
    for rec in turns:
        start = rec.get("start_ms")
        for i, utterance in enumerate(said):
            # The VAD's start can lead the audio by its hangover-free estimate; allow 300 ms either side.
            if start is not None and utterance.start_ms - 300 <= start <= utterance.end_ms + 300:
                rec["utterance"] = i
                break


def voice_figures(run: Run, said: list[Utterance]) -> dict:
    """What a voice run measured: stage latencies, false cut-offs, guesses and their cost, what was heard."""
    by_utterance: dict[int, list[dict]] = {}
    for rec in run.turns:
        if "utterance" in rec:
            by_utterance.setdefault(rec["utterance"], []).append(rec)
    measured_turns = [r for r in run.turns if "metrics" in r and not r.get("cold") and "utterance" in r
                      and not said[r["utterance"]].warm_up]
    questions = [r for r in measured_turns if not said[r["utterance"]].paused]
    paused_idx = [i for i, u in enumerate(said) if u.paused]
    cut = [i for i in paused_idx if len(by_utterance.get(i, [])) > 1]
    # A cut-off whose last turn rejoined the one before: it was transcribed, and answered, with the first half.
    rejoined = [i for i in cut if by_utterance[i][-1].get("rejoins")]
    missed = [i for i, u in enumerate(said) if not u.warm_up and i not in by_utterance]
    heard = {said[i].text: " | ".join(r.get("heard", "∅") for r in recs) for i, recs in sorted(by_utterance.items())}
    return {
        "stages": stage_figures(measured_turns, VOICE_STAGES, "metrics"),
        "stages_questions": stage_figures(questions, VOICE_STAGES, "metrics"),
        "answered": len(measured_turns),
        "false_cutoffs": len(cut),
        "paused_utterances": len(paused_idx),
        "false_cutoff_texts": [said[i].text for i in cut],
        "cutoffs_rejoined": len(rejoined),
        "not_heard": [said[i].text for i in missed],
        "noise_turns": sum(1 for r in run.turns if "utterance" not in r),
        "guesses": sum(r["guesses"] for r in run.turns),
        "confirmed_guesses": sum(1 for r in run.turns if r.get("confirmed_guess")),
        "revokes": sum(r["revokes"] for r in run.turns),
        "revoked_answers": sum(r["revoked_answers"] for r in run.turns),
        "wasted_tokens": sum(r["wasted_tokens"] for r in run.turns),
        "word_accuracy": word_accuracy(said, by_utterance),
        "heard": heard,
        "memory_mb": run.memory,
        "ready_s": run.ready_s,
        "cpu_cores": run.cpu,
        "errors": run.errors,
        "exit_code": run.exit_code,
    }


def word_accuracy(said: list[Utterance], by_utterance: dict[int, list[dict]]) -> float | None:
    """1 − WER over everything said, or None without jiwer. An utterance heard as several turns counts them
    joined, less any turn that the next one rejoined and heard words in (those words hold its words)."""
    try:
        import jiwer
        from whisper_normalizer.english import EnglishTextNormalizer
    except ImportError:
        return None
    norm = EnglishTextNormalizer()
    refs, hyps = [], []
    for i, utterance in enumerate(said):
        if utterance.warm_up:
            continue
        refs.append(norm(utterance.text) or "-")
        turns = by_utterance.get(i, [])
        kept = [r for k, r in enumerate(turns)
                if k + 1 == len(turns) or not (turns[k + 1].get("rejoins") and turns[k + 1].get("heard"))]
        hyps.append(norm(" ".join(r.get("heard", "") for r in kept)) or "-")
    return round(max(0.0, 1 - jiwer.wer(refs, hyps)), 3)


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
            [sys.executable, "-m", "voicebus.workers.llm.serve", "--model", str(gguf), "--host", "127.0.0.1",
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=8, help="plain questions per configuration (default 8)")
    parser.add_argument("--pauses", type=int, default=8, help="utterances with a hesitation inside (default 8)")
    parser.add_argument("--quick", action="store_true", help="3 questions and 3 paused utterances")
    parser.add_argument("--gap", type=float, default=6.0, help="seconds of silence after each utterance")
    parser.add_argument("--pause-ms", type=int, default=800, help="the hesitation inside a paused utterance")
    parser.add_argument("--configs", default="before,after", help=f"voice configurations: {', '.join(CONFIGS)}")
    parser.add_argument("--skip-http", action="store_true", help="leave out part 2 (chat over HTTP vs in process)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, WAV, state)")
    args = parser.parse_args()
    n_questions, n_paused = (3, 3) if args.quick else (args.turns, args.pauses)
    if n_questions < 1 or n_paused < 0:
        parser.error("--turns must be at least 1 and --pauses at least 0")
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(n_questions)]
    paused = [PAUSED[i % len(PAUSED)] for i in range(n_paused)]
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")

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
    said: list[Utterance] = []
    try:
        wav = workdir / "input.wav"
        said = synthesize_input(wav, questions=questions, paused=paused, gap_s=args.gap, pause_ms=args.pause_ms)
        length = said[-1].end_ms / 1000 + args.gap
        log(f"synthesized {len(said)} utterances ({len(paused)} with a {args.pause_ms} ms hesitation), "
            f"{length:.0f} s of audio, played in real time")
        for config in configs:
            log(f"voice run '{config}'…")
            voice_runs[config] = run_voice(config, CONFIGS[config], wav, said, workdir, timeout_s=length + 120)
        if not args.skip_http:
            log("text run with --llm local…")
            text_runs["local"] = run_text("local", questions, workdir, warm_up=True, server=None,
                                          timeout_s=60 + 30 * len(questions))
            log("starting llama_cpp.server…")
            try:
                t0 = time.monotonic()
                server = LlamaServer(workdir)
                log(f"llama_cpp.server ready in {time.monotonic() - t0:.1f} s on {server.base_url} "
                    f"(model {server.model!r})")
                log("text run with --llm openai…")
                text_runs["openai"] = run_text("openai", questions, workdir, warm_up=True, server=server,
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
            shutil.rmtree(workdir, ignore_errors=True)

    if interrupted:
        return 130
    # ---- figures -----------------------------------------------------------------------------
    result: dict = {"questions": questions, "paused": [" … ".join(p) for p in paused], "voices": VOICES,
                    "gap_s": args.gap, "pause_ms": args.pause_ms, "voice": {}, "text": {},
                    "wall_s": round(time.monotonic() - t_start, 1),
                    "loadavg_start": load_start, "loadavg_end": [round(x, 2) for x in os.getloadavg()]}
    for config, run in voice_runs.items():
        result["voice"][config] = voice_figures(run, said)
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
    after = result["voice"].get("after")
    if after:
        median = after["stages"]["speech_end_to_audio"]["median"]
        p90 = after["stages"]["speech_end_to_audio"]["p90"]
        rss = after["memory_mb"].get("total_rss")
        result["aims"] = {
            "speech_end_to_audio_median_le_0.7s": None if median is None else median <= 0.7,
            "speech_end_to_audio_p90_le_0.9s": None if p90 is None else p90 <= 0.9,
            "false_cutoffs_le_5pct": (after["false_cutoffs"] <= 0.05 * after["paused_utterances"]
                                      if after["paused_utterances"] else None),
            "total_rss_lt_1536mb": None if rss is None else rss < 1536,
        }

    # ---- tables ------------------------------------------------------------------------------
    out = []
    if voice_runs:
        v = result["voice"]
        cols = [f"{c} (n={v[c]['answered']})" for c in voice_runs]
        rows = [(label, [cell(v[c]["stages"][key]) for c in voice_runs]) for key, label, _ in VOICE_STAGES]
        rows.append(("  the same, plain questions only", [cell(v[c]["stages_questions"]["speech_end_to_audio"])
                                                          for c in voice_runs]))
        rows.append(("false cut-offs (paused utterances)", [f"{v[c]['false_cutoffs']} / {v[c]['paused_utterances']}"
                                                             for c in voice_runs]))
        rows.append(("  of them, the rest rejoined the first half", [f"{v[c].get('cutoffs_rejoined', 0)}"
                                                               for c in voice_runs]))
        rows.append(("guesses: published / confirmed / revoked", [
            f"{v[c]['guesses']} / {v[c]['confirmed_guesses']} / {v[c]['revokes']}" for c in voice_runs]))
        rows.append(("answers to revoked guesses (LLM tokens)", [
            f"{v[c]['revoked_answers']} ({v[c]['wasted_tokens']})" for c in voice_runs]))
        rows.append(("word accuracy (all utterances)", [
            "–" if v[c]["word_accuracy"] is None else f"{v[c]['word_accuracy']:.2f}" for c in voice_runs]))
        rows.append(("utterances not heard / noise turns", [f"{len(v[c]['not_heard'])} / {v[c]['noise_turns']}"
                                                            for c in voice_runs]))
        out.append(table("voice turn, median / p90 (ms)", cols, rows))
        roles = [r for r in ROLES if any(r in v[c]["memory_mb"] for c in voice_runs)]
        mem_rows = [(f"max RSS {r}", [mb(v[c]["memory_mb"].get(r)) for c in voice_runs]) for r in roles]
        mem_rows.append(("peak total RSS (all processes)", [mb(v[c]["memory_mb"].get("total_rss")) for c in voice_runs]))
        mem_rows.append(("peak total PSS (shared pages once)", [mb(v[c]["memory_mb"].get("total_pss"))
                                                                 for c in voice_runs]))
        mem_rows.append(("CPU cores busy: ours / others'", [cpu_cell(v[c]["cpu_cores"]) for c in voice_runs]))
        out.append(table("resident memory (MB)", cols, mem_rows))
    if text_runs or http_failure:
        backends = list(text_runs)
        cols = [f"{b}{' (HTTP)' if b == 'openai' else ' (in process)'} (n={result['text'][b]['answered']})"
                for b in backends]
        rows = [(label, [cell(result["text"][b]["stages"][key], rate=key == "tokens_per_s") for b in backends])
                for key, label, _ in TEXT_STAGES]
        rows.append(("peak total RSS (MB)", [mb(result["text"][b]["memory_mb"].get("total_rss")) for b in backends]))
        if backends:
            out.append(table("text turn (ctl.ask), median / p90 (ms)", cols, rows))
        if http_failure:
            out.append(f"openai backend FAILED: {http_failure.splitlines()[0]}")
    problems = [f"voice-{c}: {e}" for c in voice_runs for e in result["voice"][c]["errors"]]
    problems += [f"text-{b}: {e}" for b, r in text_runs.items() for e in r.errors]
    if problems:
        out.append("problems:\n  " + "\n  ".join(problems[:20]))
    print("\n\n".join(out), flush=True)
    print(json.dumps(result, separators=(",", ":"), ensure_ascii=False), flush=True)
    return 0 if not problems and not http_failure else 1


if __name__ == "__main__":
    sys.exit(main())
