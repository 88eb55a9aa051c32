"""The `voicebus` command: help, errors as one line, keys, tap, ask."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import zmq.auth
from click.testing import CliRunner

from voicebus.cli.main import cli
from voicebus.engine import __version__
from voicebus.engine.messages import Interrupt
from voicebus.workers.kinds import AudioIn, LlmSentence

ENV = {**os.environ, "VOICEBUS_STATE_DIR": "/nonexistent-unused"}


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "voicebus.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def test_version_and_help():
    runner = CliRunner()
    assert __version__ in runner.invoke(cli, ["--version"]).output
    result = runner.invoke(cli, ["--help"])
    for command in ("up", "worker", "bus", "tap", "keys", "ask", "say", "doctor"):
        assert command in result.output
    assert "--input" in runner.invoke(cli, ["up", "--help"]).output
    assert "listener, thinker, speaker" in runner.invoke(cli, ["worker", "--help"]).output


def test_keys_init_and_allow(tmp_path):
    runner = CliRunner()
    keys = tmp_path / "keys"
    result = runner.invoke(cli, ["keys", "init", "--keys", str(keys)])
    assert result.exit_code == 0, result.output
    assert (keys / "bus.key_secret").exists() and (keys / "allowed" / "client.key").exists()
    again = runner.invoke(cli, ["keys", "init", "--keys", str(keys)])
    assert again.exit_code == 1 and "already exist" in again.output
    public, _ = zmq.auth.create_certificates(str(tmp_path), "laptop")
    assert runner.invoke(cli, ["keys", "allow", public, "--keys", str(keys)]).exit_code == 0
    assert (keys / "allowed" / "laptop.key").exists()
    bogus = tmp_path / "bogus.key"
    bogus.write_text("not a key")
    result = runner.invoke(cli, ["keys", "allow", str(bogus), "--keys", str(keys)])
    assert result.exit_code == 1 and "not a CurveZMQ public key" in result.output


def test_unknown_backend_and_missing_keys_stop_up_before_anything_starts():
    result = run("up", "--asr", "vosk", "--input", "none", "--output", "none")
    assert result.returncode == 1 and "unknown asr backend 'vosk'" in result.stderr
    assert "Traceback" not in result.stderr
    env_keys = [k for k in ENV if k.startswith(("SPEECH_", "AZURE_"))]
    assert not env_keys, env_keys
    result = run("up", "--asr", "azure", "--tts", "azure", "--input", "none", "--output", "none")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "ConfigError: missing setting(s) for the chosen backends: SPEECH_KEY, SPEECH_REGION"
    ]


def test_bad_bus_address_is_one_line():
    result = run("tap", "--bus", "http://nowhere")
    assert result.returncode == 1 and "tcp://HOST:PORT" in result.stderr and "Traceback" not in result.stderr


def start_tap(bus, *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "voicebus.cli.main", "tap", "--bus", bus.endpoints.url, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    assert proc.stderr is not None
    line = proc.stderr.readline()  # printed once the tap's own hello came back: it is ready
    assert line.startswith("tapping"), line
    return proc


def test_tap_json_filters_summarises_and_reports_gaps(bus, make_client):
    tap = start_tap(bus, "--json", "--kinds", "llm.", "--kinds", "audio.", "--count", "3", "--timeout", "20")
    sender = make_client("sender")
    sender.publish(Interrupt(reason="not shown: filtered out"))
    sender.publish(LlmSentence(text="Hello there.", index=0), turn=7)
    sender.publish(AudioIn(pcm=b"\x00" * 640, rate=16000), turn=7)
    sender._seq += 4  # four messages "lost" on the way
    sender.publish(LlmSentence(text="Again.", index=1), turn=7)
    out, err = tap.communicate(timeout=20)
    assert tap.returncode == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["kind"] for r in records] == ["llm.sentence", "audio.in", "llm.sentence"]
    assert records[0]["body"] == {"text": "Hello there.", "index": 0} and records[0]["turn"] == 7
    assert records[1]["body"]["pcm"] == {"bytes": 640}
    assert "4 message(s) from sender@" in err


def test_tap_lines_are_readable(bus, make_client):
    tap = start_tap(bus, "--count", "1", "--no-color", "--kinds", "audio.")
    make_client("sender").publish(AudioIn(pcm=b"\x00" * 640, rate=16000), turn=3)
    out, _ = tap.communicate(timeout=20)
    assert "audio.in" in out and "turn=3" in out and "<20 ms audio>" in out and "\\x00" not in out


def test_ask_without_a_thinker_times_out_with_a_message(bus):
    start = time.monotonic()
    result = run("ask", "hello?", "--bus", bus.endpoints.url, "--timeout", "2")
    assert result.returncode == 1 and "is a thinker running" in result.stderr
    assert time.monotonic() - start < 15
