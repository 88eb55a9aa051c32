"""The `voicebus` command: help, errors as one line, keys, bus, tap, ask, the console's colours."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import zmq.auth
from click.testing import CliRunner

from voicebus.cli.console import ConsoleView
from voicebus.cli.main import cli
from voicebus.engine import __version__
from voicebus.engine.bus import Bus, Endpoints
from voicebus.engine.endpoints import free_port_pair
from voicebus.engine.client import BusClient
from voicebus.engine.messages import Envelope, Error, Heartbeat, Interrupt, new_turn_id
from voicebus.engine.security import Security
from voicebus.workers.kinds import Ask, AudioIn, LlmSentence, PlayStart
from voicebus.workers.thinker import Thinker

from conftest import wait_for
from support.procs import bus_folder, poll  # noqa: F401  (bus_folder is a fixture)

ENV = {**os.environ, "VOICEBUS_STATE_DIR": "/nonexistent-unused"}
COLOUR = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture
def bus(bus_folder):
    """The CLI's kind of bus: a private ipc folder (a TCP one would need keys or --insecure)."""
    with Bus(Endpoints.ipc(bus_folder), Security()) as running:
        yield running


def run(*args: str, timeout: float = 30, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "voicebus.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env={**ENV, **(extra or {})})


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


@pytest.mark.parametrize("setting, said", [
    ("VOICEBUS_VAD_ENGINE=foo", "unknown VAD engine 'foo'; choose from silero, webrtc"),
    ("VOICEBUS_ASR_LANGUAGE=klingon", "whisper does not know language 'klingon'"),
    ("VOICEBUS_VAD_MESSAGE_END_BELOW=0.01", "vad.message_end_below is a natural log, below 0"),
])
def test_listener_settings_are_checked_before_anything_starts(setting, said):
    """Found trying voicebus as a new user: these failed only once the listener had loaded its models, five
    times over, with tracebacks (its own _fail shadowed the actor's)."""
    name, value = setting.split("=")
    result = run("up", "--input", "none", "--output", "none", extra={name: value})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert said in line


def test_a_second_up_on_a_running_bus_stops_before_anything_starts(bus):
    """Found trying voicebus as a new user: a second `voicebus up` on the default bus failed to start its own,
    its workers joined the running one, and its end ("input ended") stopped the first run too."""
    result = run("up", "--input", "none", "--output", "none", "--bus", bus.endpoints.url)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert f"a bus is already running at {bus.endpoints.url} (another voicebus up?)" in line
    with Bus(Endpoints.parse(f"tcp://127.0.0.1:{free_port_pair()}"), Security(explicitly_insecure=True)) as tcp:
        result = run("up", "--input", "none", "--output", "none", "--bus", tcp.endpoints.url, "--insecure")
    assert result.returncode == 1 and f"a bus is already running at {tcp.endpoints.url}" in result.stderr


def test_up_never_overwrites_a_recording_and_says_so(tmp_path):
    existing = tmp_path / "s.vbrec"
    existing.write_bytes(b"an earlier session")
    result = run("up", "--input", "none", "--output", "none", "--record", str(existing))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "exists: choose another name" in line and "--force" not in line  # up has no --append or --force
    assert existing.read_bytes() == b"an earlier session"


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
    assert records[0]["body"]["text"] == "Hello there." and records[0]["body"]["index"] == 0
    assert records[0]["turn"] == 7
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


def test_ask_prints_a_first_clause_with_the_rest_of_its_sentence(bus, make_client, run_actor, scripted):
    url, _ = scripted
    watcher = make_client("watcher", subscribe=("llm.sentence", "sys.ready"))
    run_actor(Thinker, **{"llm.backend": "openai", "llm.base_url": f"{url}/v1", "llm.api_key": "k",
                          "llm.model": "echo-clause", "llm.timeout_s": 10.0})
    wait_for(watcher, lambda e: e.kind == "sys.ready" and e.body.name == "thinker", timeout=30)
    result = run("ask", "The planet closest to the Sun, which orbits it fast", "--bus", bus.endpoints.url,
                 "--timeout", "20")
    assert result.returncode == 0, result.stderr
    pieces = [e.body.text for e in [wait_for(watcher, lambda e: e.kind == "llm.sentence", timeout=10)
                                    for _ in range(2)]]
    assert pieces == ["You said: The planet closest to the Sun,", "which orbits it fast."]  # sent as two
    assert result.stdout.splitlines() == ["You said: The planet closest to the Sun, which orbits it fast."]


# --- bad input is one line, at once ------------------------------------------------------------

BAD_BUSES = ["tcp://127.0.0.1:99999", "tcp://127.0.0.1:abc", "tcp://127.0.0.1:-1", "tcp://[::1:7700",
             "tcp://127.0.0.1:65535", "ipc://relative/folder", "ipc://@abstract", "ipc:///tmp/" + "x" * 100]


@pytest.mark.parametrize("url", BAD_BUSES)
@pytest.mark.parametrize("command", [["tap", "--timeout", "1"], ["up", "--input", "none", "--output", "none"]])
def test_bad_bus_values_are_one_line_in_tap_and_up(command, url):
    result = CliRunner().invoke(cli, [*command, "--bus", url])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ConfigError: "), result.output
    assert url.partition("://")[2][:12] in lines[0], result.output  # it names what was given


def test_bad_bus_value_in_a_real_up_is_one_line_and_starts_nothing():
    result = run("up", "--bus", "tcp://127.0.0.1:65535", "--input", "none", "--output", "none")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "ConfigError: bus address 'tcp://127.0.0.1:65535': port 65535 is out of range; the bus takes PORT and "
        "PORT+1, so PORT is 1 to 65534"]


def test_tap_timeout_bounds_the_wait_for_a_missing_bus(bus_folder):
    started = time.monotonic()
    result = run("tap", "--bus", f"ipc://{bus_folder}", "--timeout", "1")
    took = time.monotonic() - started
    assert result.returncode == 1 and result.stderr.startswith("ConnectionError: no answer from the bus"), result.stderr
    assert "within 1 s (is voicebus up running?" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert took < 8, f"tap --timeout 1 took {took:.1f} s"  # it waited 10 s for the bus before


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_ask_and_say_refuse_empty_text_at_once(text, bus_folder):
    for command in ("ask", "say"):
        started = time.monotonic()
        result = CliRunner().invoke(cli, [command, text, "--bus", f"ipc://{bus_folder}", "--timeout", "30"])
        assert result.exit_code == 1 and result.output == "Error: the text is empty: nothing to send\n"
        assert time.monotonic() - started < 2


def test_ask_with_bytes_that_are_not_utf8_is_one_line(bus_folder):
    result = subprocess.run([sys.executable, "-m", "voicebus.cli.main", "ask", b"caf\xe9 au lait",
                             "--bus", f"ipc://{bus_folder}", "--timeout", "30"],
                            capture_output=True, text=True, timeout=30, env=ENV)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["Error: the text is not valid UTF-8 (is the terminal's encoding UTF-8?)"]


def test_mistyped_model_and_voice_paths_stop_up_before_anything_starts(tmp_path, bus_folder):
    result = run("up", "--bus", f"ipc://{bus_folder}", "--input", "none", "--output", "none",
                 "--llm", "local", timeout=30, extra={"VOICEBUS_LLM_MODEL_PATH": str(tmp_path / "smollm.gguff")})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"ModelError: LLM model file not found: {tmp_path / 'smollm.gguff'} (llm.model_path, VOICEBUS_LLM_MODEL_PATH)"]
    voice = tmp_path / "joe.onnx"
    voice.write_bytes(b"")  # its .onnx.json is missing
    result = run("up", "--bus", f"ipc://{bus_folder}", "--input", "none", "--output", "none",
                 timeout=30, extra={"VOICEBUS_TTS_VOICE": str(voice)})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"ModelError: piper voice file not found: {voice}.json (tts.voice, VOICEBUS_TTS_VOICE)"]


def test_unusable_state_dir_stops_up_with_one_line(tmp_path, bus_folder):
    a_file = tmp_path / "state"
    a_file.write_text("not a folder")
    result = run("up", "--bus", f"ipc://{bus_folder}", "--input", "none", "--output", "none",
                 extra={"VOICEBUS_STATE_DIR": str(a_file)})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"ConfigError: state dir {a_file} is a file, not a folder: set state.dir (VOICEBUS_STATE_DIR)"]


def test_unwritable_state_dir_stops_up_with_one_line(bus_folder):
    try:
        with tempfile.TemporaryFile(dir="/sys"):
            pytest.skip("/sys is writable here: no unwritable folder at hand (we run as root)")
    except OSError:
        pass
    result = run("up", "--bus", f"ipc://{bus_folder}", "--input", "none", "--output", "none",
                 extra={"VOICEBUS_STATE_DIR": "/sys"})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ConfigError: state dir /sys is not writable ("), lines


# --- bus, keys ----------------------------------------------------------------------------------


def test_bus_command_listens_where_bus_says(bus_folder):
    url = f"ipc://{bus_folder}"
    proc = subprocess.Popen([sys.executable, "-m", "voicebus.cli.main", "bus", "--bus", url],
                            stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        assert proc.stderr is not None
        assert proc.stderr.readline().strip() == f"bus on {url}/pub (publish) and {url}/sub (subscribe)"
        with BusClient(Endpoints.parse(url), name="probe") as client:
            client.announce(timeout=10)
        again = run("bus", "--bus", url)  # a second bus in the same folder is refused, the first keeps it
        assert again.returncode == 1 and again.stderr.strip() == f"ConfigError: a bus is already running at {url}"
    finally:
        proc.terminate()
        proc.wait(10)
    disagree = run("bus", "--bus", url, "--bind", f"ipc://{bus_folder}-other")
    assert disagree.returncode == 2 and "disagree" in disagree.stderr


def test_keys_allow_names_keys_safely_and_keeps_both_of_a_name(tmp_path):
    """Z85 uses '/', so a key's text cannot name a file; and a second laptop.key must not replace the first."""
    runner = CliRunner()
    keys = tmp_path / "keys"
    assert runner.invoke(cli, ["keys", "init", "--keys", str(keys)]).exit_code == 0
    slashed = None
    for attempt in range(500):  # about 9 % of keys have a '/' among their first 8 characters
        public, _ = zmq.auth.create_certificates(str(tmp_path), f"k{attempt}")
        if "/" in zmq.auth.load_certificate(public)[0].decode()[:8]:
            slashed = Path(public)
            break
    assert slashed is not None, "no key with a '/' in 500 tries"
    other, _ = zmq.auth.create_certificates(str(tmp_path), "other")
    for host, key in (("one", slashed), ("two", Path(other))):  # two hosts, each with a laptop.key
        (tmp_path / host).mkdir()
        key.rename(tmp_path / host / "laptop.key")
    written = []
    for host in ("one", "two"):
        result = runner.invoke(cli, ["keys", "allow", str(tmp_path / host / "laptop.key"), "--keys", str(keys)])
        assert result.exit_code == 0, result.output
        written.append(Path(result.output.split()[-1]))
    assert written[0] == keys / "allowed" / "laptop.key"
    assert written[1].parent == keys / "allowed" and re.fullmatch(r"laptop-[0-9a-f]{12}\.key", written[1].name)
    allowed = {zmq.auth.load_certificate(p)[0] for p in (keys / "allowed").glob("*.key")}
    assert {zmq.auth.load_certificate(tmp_path / h / "laptop.key")[0] for h in ("one", "two")} <= allowed
    # allowing the same key again changes nothing
    again = runner.invoke(cli, ["keys", "allow", str(tmp_path / "one" / "laptop.key"), "--keys", str(keys)])
    assert again.exit_code == 0 and Path(again.output.split()[-1]) == written[0]
    assert len(list((keys / "allowed").glob("*.key"))) == 3  # client.key, laptop.key, laptop-<hash>.key


# --- tap: heartbeats hidden, loss reported truly under filters ----------------------------------


def test_tap_hides_heartbeats_unless_asked(bus, make_client):
    sender = make_client("sender")
    shown = []
    for args in ([], ["--heartbeats"], ["--kinds", "sys."]):
        tap = start_tap(bus, "--json", "--count", "1" if not args else "2", "--timeout", "20", *args)
        sender.publish(Heartbeat(name="x", pid=1, uptime=1.0, state="ready"))
        sender.publish(Error(where="here", code="c", message="shown"))
        out, err = tap.communicate(timeout=20)
        assert tap.returncode == 0, err
        shown.append([json.loads(line)["kind"] for line in out.splitlines()])
    assert shown == [["sys.error"], ["sys.heartbeat", "sys.error"], ["sys.heartbeat", "sys.error"]]


def test_tap_filtered_reports_no_loss_during_real_turns_and_true_loss_after(bus, make_client, run_actor, scripted):
    """The issue's reproduction: two filters while a real thinker answers two questions.

    The thinker numbers its tokens, sentences, heartbeats… in one sequence; the tap shows
    only sentences and ends, and must not call the tokens in between lost.
    """
    url, _ = scripted
    client = make_client("asker", subscribe=("llm.done", "sys.ready"))
    run_actor(Thinker, **{"llm.backend": "openai", "llm.base_url": f"{url}/v1", "llm.api_key": "k",
                          "llm.model": "count-tap-4", "llm.timeout_s": 10.0})
    wait_for(client, lambda e: e.kind == "sys.ready" and e.body.name == "thinker", timeout=30)
    tap = start_tap(bus, "--json", "--kinds", "llm.sentence", "--kinds", "llm.done", "--count", "11", "--timeout", "60")
    for question in ("Count for me.", "Count again."):
        turn = new_turn_id()
        client.publish(Ask(text=question), turn=turn)
        wait_for(client, lambda e, t=turn: e.kind == "llm.done" and e.turn == t, timeout=30)
    gap_maker = make_client("gappy")
    gap_maker._seq += 3  # three of its messages never reach the bus: a real loss
    gap_maker.publish(LlmSentence(text="After a gap.", index=0))
    out, err = tap.communicate(timeout=60)
    assert tap.returncode == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds == ["llm.sentence"] * 4 + ["llm.done"] + ["llm.sentence"] * 4 + ["llm.done", "llm.sentence"], kinds
    lost_lines = [line for line in err.splitlines() if "lost" in line]
    assert len(lost_lines) == 2, err  # the gap, and the summary: nothing from the thinker
    assert lost_lines[0].startswith("!! 3 message(s) from gappy@") and "thinker" not in err


# --- the console's colours ----------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_console_colours_only_on_a_terminal():
    error = Envelope(kind="sys.error", src="thinker@h:1", seq=1, body=Error(where="thinker", code="c", message="boom"))
    out, err = io.StringIO(), io.StringIO()
    view = ConsoleView(out=out, err=err)
    view.event("thinker killed by SIGKILL; restarting in 0.2 s")
    view.message(error)
    assert err.getvalue() == "supervisor: thinker killed by SIGKILL; restarting in 0.2 s\nthinker@h:1: thinker: boom\n"
    assert not COLOUR.search(out.getvalue())
    tty = _Terminal()
    ConsoleView(out=tty, err=tty).event("restarting")
    assert COLOUR.search(tty.getvalue())


def test_an_answer_s_first_clause_has_its_sentence_go_on_below_it():
    out = io.StringIO()
    view = ConsoleView(out=out, err=io.StringIO())
    for turn, text in [(1, "The planet closest to the Sun is Mercury,"), (1, "which orbits it fast."),
                       (1, "It is small."), (2, "Four wheels, or so:"), (3, "Hello.")]:
        view.message(Envelope(kind="play.start", src="speaker@h:1", seq=turn, turn=turn,
                              body=PlayStart(index=0, text=text)))
    assert out.getvalue().splitlines() == [
        "Assistant: The planet closest to the Sun is Mercury,",
        "           which orbits it fast.",
        "Assistant: It is small.",
        "Assistant: Four wheels, or so:",
        "Assistant: Hello.",  # another turn: its own line
    ]


def test_supervisor_lines_in_a_log_file_carry_no_colour(launcher):
    up = launcher.up("--input", "none", "--output", "none", "--bus", launcher.bus_url(), "--only", "speaker",
                     "--start-bus")
    poll(lambda: "speaker" in up.stderr(), 30, "a status line")
    assert up.interrupt() == 0, up.stderr()[-2000:]
    stderr = up.stderr()
    assert "supervisor: stopping: SIGINT" in stderr and not COLOUR.search(stderr), stderr[-2000:]
