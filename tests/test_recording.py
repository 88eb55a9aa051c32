"""Recordings: the file format, ``voicebus record`` on a real bus, ``voicebus show``, and the bus audio source."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path

import msgpack
import pytest

from voicebus.engine.bus import Endpoints
from voicebus.engine.client import BusClient
from voicebus.engine.messages import encode
from voicebus.engine.recording import FORMAT_VERSION, MAGIC, Recording, RecordingError, RecordingWriter
from voicebus.workers.audio.bus_source import NAME as SOURCE_NAME
from voicebus.workers.audio.bus_source import BusSource
from voicebus.workers.kinds import AsrFinal, AudioEnd, AudioIn, LlmSentence

from conftest import wait_for
from support.procs import clean_env, private_bus_folder

ROOT = Path(__file__).resolve().parent
VOICE = ROOT / "data" / "recordings" / "voice-capital.vbrec"
TEXT = ROOT / "data" / "recordings" / "text-two-plus-two.vbrec"
VOICEBUS = [sys.executable, "-m", "voicebus.cli.main"]


def frames_of(client: BusClient, body, turn: int = 0) -> list[bytes]:
    """What ``client`` puts on the bus for ``body``: its envelope's frames, byte for byte."""
    return encode(client.publish(body, turn=turn))


def run_cli(*args: str, timeout: float = 30, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VOICEBUS, *args], capture_output=True, text=True, timeout=timeout, env=env)


# --- the format -------------------------------------------------------------------------------


def write_sample(path: Path, **header) -> list[tuple[bytes, bytes]]:
    """A recording of a few messages: a known kind, an unknown kind, bytes that are no message, audio."""
    from voicebus.engine.messages import new_envelope

    messages = [
        encode(new_envelope("asr.final", "listener@h:1", 1, 1.0, "default", 7, AsrFinal(text="hello"))),
        encode(new_envelope("x.custom", "plugin@h:2", 1, 1.5, "default", 7, {"anything": [1, 2]})),
        [b"junk", b"\xc1 not msgpack"],
        encode(new_envelope("audio.in", "listener@h:1", 2, 2.0, "default", 7, AudioIn(pcm=bytes(640), rate=16000))),
        encode(new_envelope("llm.sentence", "thinker@h:3", 1, 2.5, "default", 8, LlmSentence(text="Hi.", index=0))),
    ]
    with RecordingWriter(path, **header) as writer:
        for topic, payload in messages:
            writer.write(topic, payload)
    return [(m[0], m[1]) for m in messages]


def test_records_keep_every_frame_byte_for_byte_and_read_without_voicebus(tmp_path):
    path = tmp_path / "s.vbrec"
    sent = write_sample(path, bus="ipc:///x", backends={"asr": "whisper"}, settings={"vad.silence_ms": 500})
    rec = Recording(path)
    assert [(r.topic, r.payload) for r in rec.records()] == sent
    times = [r.t for r in rec.records()]
    assert times == sorted(times) and times[0] >= 0
    assert rec.header.bus == "ipc:///x" and rec.header.backends == {"asr": "whisper"}
    assert rec.header.settings == {"vad.silence_ms": 500}

    # Plain msgpack: a header map, then [t, topic, payload] arrays.
    with open(path, "rb") as fh:
        objects = list(msgpack.Unpacker(fh, raw=False))
    assert objects[0]["magic"] == MAGIC and objects[0]["format"] == FORMAT_VERSION
    assert [(o[1], o[2]) for o in objects[1:]] == sent
    assert path.read_bytes().startswith(b"\xa5magic\xb2voicebus-recording", 1)
    assert os.stat(path).st_mode & 0o077 == 0, "a recording may hold a voice: private by default"


def test_messages_decode_filter_by_kind_and_turn_and_count_what_is_not_a_message(tmp_path):
    path = tmp_path / "s.vbrec"
    write_sample(path)
    rec = Recording(path)
    kinds = [env.kind for _t, env in rec.messages()]
    assert kinds == ["asr.final", "x.custom", "audio.in", "llm.sentence"]
    assert rec.stats.undecodable == 1
    assert [env.body.text for _t, env in rec.messages(kinds=("asr.",))] == ["hello"]
    assert [env.kind for _t, env in rec.messages(turns=(8,))] == ["llm.sentence"]
    unknown = next(env for _t, env in rec.messages(kinds=("x.",)))
    assert unknown.body == {"anything": [1, 2]}


def test_a_cut_tail_is_ignored_at_every_byte_and_an_append_cuts_it_off(tmp_path):
    path = tmp_path / "s.vbrec"
    sent = write_sample(path)
    data = path.read_bytes()
    whole = Recording(path)
    list(whole.records())
    last_start = len(data) - len(msgpack.packb([0.0, sent[-1][0], sent[-1][1]], use_bin_type=True))
    for cut in range(last_start, len(data)):
        path.write_bytes(data[:cut])
        rec = Recording(path)
        got = [(r.topic, r.payload) for r in rec.records()]
        assert got == sent[:-1], cut
        assert rec.stats.truncated_bytes == cut - last_start
        assert (rec.stats.problems() != []) == (cut > last_start)
    path.write_bytes(data[: len(data) - 3])
    with RecordingWriter(path, append=True) as writer:
        writer.write(b"later", b"\x80")
    rec = Recording(path)
    got = list(rec.records())
    assert [(r.topic, r.payload) for r in got] == [*sent[:-1], (b"later", b"\x80")]
    assert rec.stats.segments == 2 and rec.stats.truncated_bytes == 0
    assert got[-1].segment == 1 and got[-1].t >= got[-2].t


def test_damage_in_the_middle_stops_reading_there(tmp_path):
    path = tmp_path / "s.vbrec"
    sent = write_sample(path)
    data = path.read_bytes()
    first = Recording(path)
    records = list(first.records())
    assert len(records) == len(sent)
    header_len = len(msgpack.packb(first.header.to_map(), use_bin_type=True))
    one = len(msgpack.packb([records[0].t, sent[0][0], sent[0][1]], use_bin_type=True))
    path.write_bytes(data[: header_len + one] + msgpack.packb("not a record") + data[header_len + one:])
    rec = Recording(path)
    assert [(r.topic, r.payload) for r in rec.records()] == sent[:1]
    assert rec.stats.damaged_at == header_len + one


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    (b"", "is empty"),
    (b'{"json": true}\n', "not a voicebus recording"),
    (msgpack.packb({"magic": "something-else"}), "not a voicebus recording"),
    (msgpack.packb({"magic": MAGIC, "format": 99, "created": 1.0}), "format 99"),
    (msgpack.packb({"magic": MAGIC, "format": 1, "created": 1.0})[:-4], "not a voicebus recording"),
])
def test_files_that_are_not_recordings_are_one_clear_line(tmp_path, content, message):
    path = tmp_path / "f.vbrec"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(RecordingError, match=message):
        Recording(path)
    result = run_cli("show", str(path))
    assert result.returncode == 1
    assert result.stderr.startswith("RecordingError: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_recording_is_not_overwritten_by_accident(tmp_path):
    path = tmp_path / "s.vbrec"
    write_sample(path)
    with pytest.raises(RecordingError, match="exists"):
        RecordingWriter(path)
    RecordingWriter(path, overwrite=True).close()
    assert list(Recording(path).records()) == []


# --- voicebus record on a real bus ------------------------------------------------------------


class RecordProcess:
    """``voicebus record`` as a user runs it, against a test bus; ``ready`` once it said it records."""

    def __init__(self, tmp_path: Path, url: str, path: Path, *args: str) -> None:
        self.err_path = tmp_path / "record.stderr"
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen([*VOICEBUS, "record", str(path), "--bus", url, "--insecure", *args],
                                         stdout=subprocess.DEVNULL, stderr=err, env=clean_env(tmp_path))

    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait_recording(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while "recording " not in self.stderr():
            assert self.proc.poll() is None, self.stderr()
            assert time.monotonic() < deadline, f"the recorder did not connect: {self.stderr()}"
            time.sleep(0.02)

    def wait(self, timeout: float = 20) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def recorders():
    started: list[RecordProcess] = []
    yield started
    for rec in started:
        rec.kill()


def test_record_writes_every_message_as_it_came_and_stops_at_count(bus, make_client, tmp_path, recorders):
    url = bus.endpoints.url
    path = tmp_path / "s.vbrec"
    client = make_client("sender")  # its hello before the recorder's start: only what follows is recorded
    recorders.append(rec := RecordProcess(tmp_path, url, path, "--count", "5"))
    rec.wait_recording()
    sent = [frames_of(client, AudioIn(pcm=bytes(640), rate=16000))]
    sent.append(encode(client.publish_kind("x.custom", {"a": 1}, turn=3)))
    sent.append(frames_of(client, AsrFinal(text="hello there"), turn=3))
    sent.append(frames_of(client, AudioEnd(last_turn=3, reason="end of input")))
    sent.append(frames_of(client, LlmSentence(text="Hi.", index=0), turn=3))
    assert rec.wait() == 0, rec.stderr()
    got = [[r.topic, r.payload] for r in Recording(path).records()]
    assert got == sent  # nothing re-encoded, the unknown kind included, in order
    assert "recorded 5 message(s), 0.0 s of audio in" in rec.stderr()


def test_record_no_audio_and_kinds_leave_out_what_they_say(bus, make_client, tmp_path, recorders):
    url = bus.endpoints.url
    quiet, asr_only = tmp_path / "quiet.vbrec", tmp_path / "asr.vbrec"
    client = make_client("sender")
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    b = RecordProcess(tmp_path / "b", url, asr_only, "--kinds", "asr.", "--count", "1")
    recorders.append(b)
    b.wait_recording()  # before a starts: a must not record b's hellos
    a = RecordProcess(tmp_path / "a", url, quiet, "--no-audio", "--count", "2")
    recorders.append(a)
    a.wait_recording()
    client.publish(AudioIn(pcm=bytes(640), rate=16000))
    client.publish(AsrFinal(text="hello"), turn=1)
    client.publish(AudioEnd(last_turn=1, reason="end of input"))
    assert a.wait() == 0 and b.wait() == 0, (a.stderr(), b.stderr())
    assert [r.kind for r in Recording(quiet).records()] == ["asr.final", "audio.end"]
    assert not Recording(quiet).header.audio
    assert [r.kind for r in Recording(asr_only).records()] == ["asr.final"]


def test_record_mistakes_are_one_line_errors(tmp_path):
    existing = tmp_path / "s.vbrec"
    write_sample(existing)
    folder = private_bus_folder()
    try:
        cases = [
            (["record", str(existing), "--bus", f"ipc://{folder}"], "RecordingError: ", "exists"),
            (["record", str(tmp_path / "n.vbrec"), "--kinds", "asr.finl"], "ConfigError: ", "asr.finl"),
            (["record", str(tmp_path / "m.vbrec"), "--bus", f"ipc://{folder}", "--wait", "0.5"], "ConnectionError: ",
             "no answer"),
            (["show", str(existing), "--kinds", "nope."], "ConfigError: ", "nope."),
        ]
        for args, name, words in cases:
            result = run_cli(*args, env=clean_env(tmp_path))
            assert result.returncode == 1, (args, result.stderr)
            assert result.stderr.startswith(name) and words in result.stderr, result.stderr
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not (tmp_path / "m.vbrec").exists(), "a recorder that never connected leaves no empty file"
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


def test_a_recorder_killed_with_sigkill_leaves_a_file_that_reads_to_its_last_message(bus, make_client, tmp_path,
                                                                                       recorders):
    url = bus.endpoints.url
    path = tmp_path / "s.vbrec"
    client = make_client("sender")
    recorders.append(rec := RecordProcess(tmp_path, url, path))
    rec.wait_recording()
    stop = threading.Event()
    sent: list[list[bytes]] = []

    def flood() -> None:  # audio at 10x real time, as long as the test lets it
        while not stop.is_set():
            sent.append(frames_of(client, AudioIn(pcm=os.urandom(640), rate=16000)))
            time.sleep(0.002)

    sender = threading.Thread(target=flood)
    sender.start()
    try:
        deadline = time.monotonic() + 20
        while path.stat().st_size < 200_000:
            assert time.monotonic() < deadline, "the recorder wrote too little"
            time.sleep(0.01)
        os.kill(rec.proc.pid, signal.SIGKILL)
        rec.proc.wait(10)
    finally:
        stop.set()
        sender.join(5)
    recording = Recording(path)
    got = [[r.topic, r.payload] for r in recording.records()]
    assert len(got) > 200 and got == sent[: len(got)], "a prefix of what was sent, in order, nothing damaged"
    assert recording.stats.damaged_at is None


# --- voicebus show ----------------------------------------------------------------------------


def test_show_prints_messages_like_tap_and_each_turns_waterfall():
    result = run_cli("show", str(VOICE), "--no-color")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "vad.start" in out and "asr.final" in out and "What is the capital of France?" in out
    assert "sys.heartbeat" not in out, "heartbeats stay hidden, as in tap"
    waterfall = out[out.index("\nturn "):]
    for stage in ("speech start", "speech end", "end of turn", "final", "first token", "first sentence",
                  "first audio", "turn finished", "after the end of speech"):
        assert stage in waterfall, (stage, waterfall)
    assert "voice-capital.vbrec: recorded" in result.stderr and "asr=whisper" in result.stderr

    only = run_cli("show", str(TEXT), "--no-messages")
    assert only.returncode == 0 and "ctl.ask" not in only.stdout
    assert "· text · heard 'What is two plus two?'" in only.stdout and "after the request" in only.stdout


def test_a_turn_that_goes_on_from_another_says_so_in_its_waterfall():
    from voicebus.cli.show import _Builder, waterfall
    from voicebus.engine.messages import Envelope
    from voicebus.workers.kinds import VadStart

    builder = _Builder()
    builder.add(0.0, Envelope(kind="vad.start", src="listener@h:1", seq=1, turn=11, body=VadStart(offset_ms=500)))
    builder.add(1.9, Envelope(kind="vad.start", src="listener@h:1", seq=2, turn=12, body=VadStart(offset_ms=2400, rejoins=11)))
    first, second = (waterfall(builder.turns[turn]) for turn in (11, 12))
    assert "goes on from turn 11" in "\n".join(second) and "goes on" not in "\n".join(first)


@pytest.mark.parametrize("args", [[], ["--json"]], ids=["text", "json"])
def test_show_into_a_reader_that_stops_early_says_nothing(args):
    """`voicebus show FILE | head`: "ConnectionError: [Errno 32] Broken pipe", or a silent exit 1."""
    proc = subprocess.Popen([*VOICEBUS, "show", str(VOICE), "--no-color", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout.readline()
    proc.stdout.close()  # as head does once it has its lines
    err = proc.stderr.read().decode()
    proc.wait(timeout=30)
    assert "Broken pipe" not in err and "Traceback" not in err and "Exception ignored" not in err, err


def test_show_json_lines_carry_the_recording_time(tmp_path):
    import json

    result = run_cli("show", str(TEXT), "--json", "--kinds", "llm.sentence")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 1 and lines[0]["kind"] == "llm.sentence" and lines[0]["t"] > 0


def test_show_exports_the_users_audio_and_the_assistants(tmp_path):
    from voicebus.engine.messages import new_envelope
    from voicebus.workers.audio import read_wav

    out = tmp_path / "wav"
    result = run_cli("show", str(VOICE), "--no-messages", "--no-waterfalls", "--export-audio", str(out))
    assert result.returncode == 0, result.stderr
    pcm, rate = read_wav(out / "user.wav")
    audio_in = sum(1 for r in Recording(VOICE).records(kinds=("audio.in",)))
    assert rate == 16000 and len(pcm) == audio_in * 640

    # The assistant's audio, once the speaker publishes it (audio.out, same fields as audio.in).
    path = tmp_path / "both.vbrec"
    with RecordingWriter(path) as writer:
        for turn, rate_out in ((5, 22050), (6, 22050), (6, 16000)):
            env = new_envelope("audio.out", "speaker@h:1", turn, 1.0, "default", turn,
                               {"pcm": bytes(rate_out // 50 * 2), "rate": rate_out, "index": 0})
            writer.write(*encode(env))
    result = run_cli("show", str(path), "--no-messages", "--export-audio", str(out))
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["assistant.wav", "turn-5-assistant.wav", "turn-6-assistant.wav", "user.wav"]
    with wave.open(str(out / "assistant.wav")) as wav:  # read_wav would convert it to 16 kHz
        assert wav.getframerate() == 22050
        assert abs(wav.getnframes() / 22050 - 0.06) < 0.005  # the 16 kHz block resampled to 22050


# --- the bus as an audio input ----------------------------------------------------------------


def test_bus_source_hears_other_senders_resamples_and_ends_at_audio_end(bus, make_client):
    listener = make_client("watch", subscribe=("sys.ready",))
    source = BusSource(BusClient(bus.endpoints, name=SOURCE_NAME), own="@nowhere:0")
    frames: list[bytes] = []
    reader = threading.Thread(target=lambda: frames.extend(source))
    reader.start()
    try:
        wait_for(listener, lambda e: e.kind == "sys.ready" and e.body.name == SOURCE_NAME)
        sender = make_client("mic")
        for _ in range(10):
            sender.publish(AudioIn(pcm=bytes(640), rate=16000))
        sender.publish(AudioIn(pcm=b"\x01\x00" * 441, rate=22050))  # 20 ms at 22050 Hz
        sender.publish(AudioEnd(last_turn=0, reason="end of input"))
        reader.join(10)
        assert not reader.is_alive()
    finally:
        source.close()
        reader.join(5)
    assert all(len(f) == 640 for f in frames)
    assert 10 <= len(frames) <= 12


def test_bus_source_ignores_its_own_process_and_stops_when_closed(bus, make_client):
    watcher = make_client("watch", subscribe=("sys.ready",))
    source = BusSource(BusClient(bus.endpoints, name=SOURCE_NAME))  # own: this test process
    frames: list[bytes] = []
    reader = threading.Thread(target=lambda: frames.extend(source))
    reader.start()
    wait_for(watcher, lambda e: e.kind == "sys.ready" and e.body.name == SOURCE_NAME)
    same_process = make_client("listener")
    same_process.publish(AudioIn(pcm=bytes(640), rate=16000))
    same_process.publish(AudioEnd(last_turn=0, reason="its own end"))
    started = time.monotonic()
    source.close()
    reader.join(5)
    assert not reader.is_alive() and time.monotonic() - started < 2
    assert frames == []


def test_open_source_names_the_bus_input():
    from voicebus.workers.audio import SOURCE_FORMS

    assert "'bus'" in SOURCE_FORMS


def test_bus_source_opened_before_the_bus_runs_only_connects(tmp_path):
    """``voicebus up`` opens its input once to check it, before it starts the bus."""
    folder = private_bus_folder()
    try:
        started = time.monotonic()
        source = BusSource(BusClient(Endpoints.ipc(folder), name=SOURCE_NAME))
        source.close()
        assert time.monotonic() - started < 1
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
