"""The voice loop end to end: real processes, real models, WAV files in and out."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from voicebus.engine.bus import Endpoints, free_port_pair
from voicebus.engine.client import BusClient
from voicebus.workers.audio import read_wav, write_wav

from support.procs import ask
from support.voices import steady_piper

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def words(text: str) -> set[str]:
    return {w.strip(".,!?;:'\"").lower() for w in text.split() if w.strip(".,!?;:'\"")}


def overlap(expected: str, got: str) -> float:
    want = words(expected)
    return len(want & words(got)) / max(1, len(want))


@pytest.fixture(scope="session")
def voice():
    synth = steady_piper()
    yield synth
    synth.close()


@pytest.fixture(scope="session")
def recognizer(tmp_path_factory):
    """Whisper checks the replies: more accurate than the listener's own pocketsphinx."""
    from voicebus.workers.asr.whisper import WhisperRecognizer

    rec = WhisperRecognizer(cache_dir=tmp_path_factory.mktemp("models"))
    yield rec
    rec.close()


def speech_wav(voice, path: Path, parts: list[str | float]) -> Path:
    """A WAV of spoken texts and silences (floats, in seconds), in order."""
    pcm = b""
    for part in parts:
        if isinstance(part, str):
            pcm += b"".join(voice.synthesize(part))
        else:
            pcm += bytes(int(voice.sample_rate * part) * 2)
    write_wav(path, pcm, voice.sample_rate)
    return path


def recognize(recognizer, path: Path) -> str:
    pcm, _rate = read_wav(path)
    recognizer.begin()
    for start in range(0, len(pcm), 640):
        recognizer.feed(pcm[start : start + 640].ljust(640, b"\0"))
    return recognizer.end().text


def start(launcher, *args: str):
    """``voicebus up`` on a bus of its own; returns the process and the bus URL."""
    url = launcher.bus_url()
    return launcher.up("--bus", url, *args), url


def connect(url: str, *prefixes: str, timeout: float = 30) -> BusClient:
    """A bus client proven connected; ZeroMQ keeps reconnecting while the bus child starts."""
    client = BusClient(Endpoints.parse(url), name="test")
    client.subscribe(*prefixes)
    try:
        client.announce(timeout=timeout)
    except ConnectionError:
        client.close()
        raise
    return client


def collect(client: BusClient, until, timeout: float) -> list:
    """Messages until ``until(messages)`` is true; fails after ``timeout``."""
    seen = []
    deadline = time.monotonic() + timeout
    while not until(seen):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"timed out; saw {[(e.kind, e.turn) for e in seen]}"
        env = client.recv(timeout=min(remaining, 0.5))
        if env is not None:
            seen.append(env)
    return seen


def test_files_in_files_out(tmp_path, launcher, voice, recognizer):
    """Two questions 1.5 s apart, read with --fast: each is answered (the second once the first's answer
    was played; faster than real time, it used to speak over the first, and only the last was answered)."""
    question = speech_wav(voice, tmp_path / "question.wav",
                          [0.5, "What is the capital of France?", 1.5, "How many legs does a spider have?", 1.5])
    answer = tmp_path / "answer.wav"
    up, _ = start(launcher, "--input", str(question), "--output", str(answer), "--fast")
    code, out = up.wait(timeout=120), up.stdout()
    assert code == 0, f"{out}\n{up.stderr()}"
    heard = [line[len("You: "):] for line in out.splitlines() if line.startswith("You: ")]
    label = "Assistant: "  # an answer's first clause may be a line of its own, the rest under it
    answers = out.split("You: ")[1:]
    said = " ".join(line[len(label):] for line in out.splitlines()
                    if line.startswith(label) or line.startswith(" " * len(label)))
    assert len(heard) == 2 and overlap("what is the capital of france", heard[0]) >= 0.8, out
    assert overlap("how many legs does a spider have", heard[1]) >= 0.5, out
    assert len(answers) == 2 and all(label in answer for answer in answers), out
    assert out.count("speech end → first audio") == 2, out
    pcm, _ = read_wav(answer)
    samples = np.frombuffer(pcm, dtype=np.int16).astype(np.float64)
    assert len(samples) / 16000 > 0.5, "the reply is too short to hold speech"
    assert np.sqrt(np.mean(samples**2)) > 300, "the reply is silent"
    assert overlap(said, recognize(recognizer, answer)) >= 0.4, (said, recognize(recognizer, answer))


def test_missing_input_file_is_one_clear_line(tmp_path, launcher):
    up, _ = start(launcher, "--input", str(tmp_path / "nope.wav"), "--output", "none")
    code, err = up.wait(timeout=30), up.stderr()
    assert code == 1
    assert "nope.wav" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_barge_in_interrupts_the_reply_and_starts_a_new_turn(tmp_path, launcher, voice):
    # The second question starts about 2.5 s after the first ends: the first reply
    # (a story, several seconds long) is playing then.
    question = speech_wav(
        voice, tmp_path / "barge.wav",
        [0.5, "Tell me a long story about a brave knight and a dragon.", 2.5, "What is two plus two?", 3.0],
    )
    up, url = start(launcher, "--input", str(question), "--output", str(tmp_path / "answer.wav"))
    client = connect(url, "play.", "metrics.turn", "asr.final", "ctl.interrupt", "llm.done")
    try:
        seen = collect(client, lambda s: sum(e.kind == "metrics.turn" for e in s) >= 2, timeout=90)
    finally:
        client.close()
    finals = [e for e in seen if e.kind == "asr.final"]
    first_turn = finals[0].turn
    assert any(e.kind == "ctl.interrupt" and e.turn == first_turn for e in seen)
    stopped = [e for e in seen if e.kind == "play.stopped" and e.turn == first_turn]
    assert stopped, [(e.kind, e.turn) for e in seen]
    assert len({e.turn for e in finals}) == 2
    assert up.wait(timeout=60) == 0, up.stderr()
    # The history keeps only what was spoken of the interrupted answer.
    db = sqlite3.connect(tmp_path / "state-up" / "conversation.sqlite")
    rows = db.execute("SELECT turn, role, text FROM messages ORDER BY turn, role").fetchall()
    answers = {turn: text for turn, role, text in rows if role == "assistant"}
    done = next(e for e in seen if e.kind == "llm.done" and e.turn == first_turn)
    assert len(answers[first_turn]) < len(done.body.text), (answers[first_turn], done.body.text)


def test_thinker_restart_keeps_the_conversation(tmp_path, launcher):
    up, url = start(launcher, "--input", "none", "--output", "none")
    client = connect(url, "sys.ready", "sup.")
    try:
        readies = collect(client, lambda s: {e.body.name for e in s if e.kind == "sys.ready"} >= {"thinker", "speaker"}, 60)
        first = ask(url, "My name is Alice.", tmp_path)
        assert first.returncode == 0 and first.stdout.strip(), first.stderr
        thinker_pid = next(e.body.pid for e in readies if e.kind == "sys.ready" and e.body.name == "thinker")
        os.kill(thinker_pid, signal.SIGKILL)
        # Asked while the thinker is down: the question waits and is answered when it is back.
        second = ask(url, "What is my name?", tmp_path)
        assert second.returncode == 0 and second.stdout.strip(), second.stderr
        restarted = collect(client, lambda s: any(e.kind == "sys.ready" and e.body.name == "thinker" for e in s), 30)
        assert any(e.kind == "sys.ready" and e.body.pid != thinker_pid for e in restarted)
    finally:
        client.close()
    assert up.interrupt() == 0
    db = sqlite3.connect(tmp_path / "state-up" / "conversation.sqlite")
    users = [text for (text,) in db.execute("SELECT text FROM messages WHERE role='user' ORDER BY turn")]
    assert users == ["My name is Alice.", "What is my name?"]


def test_network_bus_requires_keys_end_to_end(tmp_path):
    """A bus on a network address: workers and an allowed client use CurveZMQ; a stranger is refused."""
    keys = tmp_path / "keys"
    env = {**os.environ, "VOICEBUS_STATE_DIR": str(tmp_path / "state"), "VOICEBUS_BUS_KEYS_DIR": str(keys)}
    url = f"tcp://0.0.0.0:{free_port_pair('0.0.0.0')}"
    voicebus = [sys.executable, "-m", "voicebus.cli.main"]
    refused = subprocess.run([*voicebus, "up", "--bus", url, "--input", "none", "--output", "none"],
                             env=env, capture_output=True, text=True, timeout=30)
    assert refused.returncode == 1 and "keys init" in refused.stderr
    subprocess.run([*voicebus, "keys", "init", "--keys", str(keys)], check=True, capture_output=True, env=env)
    up = subprocess.Popen([*voicebus, "up", "--bus", url, "--input", "none", "--output", "none"],
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:  # the workers may still be loading: ask until the thinker answers
            answer = subprocess.run([*voicebus, "ask", "Hello!", "--bus", url, "--timeout", "20"],
                                    env=env, capture_output=True, text=True, timeout=40)
            if answer.returncode == 0 or time.monotonic() > deadline:
                break
        assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr
        stranger = tmp_path / "stranger"
        subprocess.run([*voicebus, "keys", "init", "--keys", str(stranger)], check=True, capture_output=True)
        (stranger / "bus.key").write_bytes((keys / "bus.key").read_bytes())
        denied = subprocess.run([*voicebus, "ask", "Hello?", "--bus", url, "--keys", str(stranger), "--timeout", "3"],
                                env=env, capture_output=True, text=True, timeout=40)
        assert denied.returncode == 1 and "key allowed" in denied.stderr, denied.stderr
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(timeout=15)
