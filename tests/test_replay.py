"""``voicebus replay``: the comparison (pure), and recordings replayed through real ``voicebus up`` runs.

The committed recordings (tests/data/recordings, see its README) are regression tests:
a change that breaks turn-taking, what is heard or answered, or a stage's latency beyond
a loose tolerance makes their replay diverge. The machines are shared and noisy, so
latencies are compared as ratios with an absolute slack, generously.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from voicebus.cli.replay_report import Comparison, Tolerances, compare, pair_turns, parting, same_text
from voicebus.cli.replay import (
    known_settings,
    parse_set,
    replay_config,
    toml_text,
    user_side,
)
from voicebus.cli.show import TurnStory, read_turns
from voicebus.engine.bus import Endpoints
from voicebus.engine.recording import Recording

from support.procs import clean_env

ROOT = Path(__file__).resolve().parent
VOICE = ROOT / "data" / "recordings" / "voice-capital.vbrec"
TEXT = ROOT / "data" / "recordings" / "text-two-plus-two.vbrec"
VOICEBUS = [sys.executable, "-m", "voicebus.cli.main"]
LOOSE = ["--max-latency-ratio", "4", "--latency-slack", "1.5"]
"""Shared, noisy machines: a stage may take 4× as long as when recorded, or 1.5 s longer."""


# --- the comparison (pure) --------------------------------------------------------------------


def story(turn: int, source: str = "voice", heard: str = "what time is it", answer: str = "It is noon.",
          finish: str = "stop", outcome: str = "done", **latencies: float) -> TurnStory:
    s = TurnStory(turn, source=source, heard=heard, finish=finish, outcome=outcome)
    s.sentences = {0: answer}
    s.metrics = {f"{k}_s": v for k, v in latencies.items()}
    return s


def test_a_turn_within_tolerance_has_no_differences():
    then = story(1, asr=0.5, first_audio=0.3)
    now = story(2, heard="What time is it?", asr=0.9, first_audio=0.35)
    c = compare(Comparison("voice", then, now), Tolerances())
    assert c.differences == []
    assert {row["stage"]: row["ratio"] for row in c.latencies} == {"asr": 1.8, "first audio": 1.167}


def test_an_answer_that_differs_shows_where_it_parts():
    """The table cuts both answers to a column: two long answers with the same start looked the same."""
    then = story(1, answer="The capital of France is Paris, a city of about two million people on the Seine.")
    now = story(2, answer="The capital of France is Paris, a city of about two thousand people on the Seine.")
    c = compare(Comparison("voice", then, now), Tolerances(answer_match="exact"))
    assert c.differences == ["answer differs: from word 12: '…about two million people on the Seine.' then, "
                             "'…about two thousand people on the Seine.' now"]
    c = compare(Comparison("voice", then, story(3, answer="The capital of France")), Tolerances())
    assert c.differences[0].endswith("from word 5: '…of France is Paris, a city of about…' then, "
                                     "'…of France' now")
    c = compare(Comparison("voice", story(4, answer="It is Paris."), story(5, answer="It is Paris!")),
                Tolerances(answer_match="exact"))
    assert c.differences == ["answer differs: in punctuation or case from word 3: 'It is Paris.' then, "
                             "'It is Paris!' now"]
    assert parting("Paris, the capital, is big.", "Paris the capital, is big.") == (
        "in punctuation or case 'Paris, the capital, is big.' then, 'Paris the capital, is big.' now")
    assert parting("It is  Paris.", "It is Paris.") == "in spacing only '…is Paris.' then, '…is Paris.' now"


@pytest.mark.parametrize("now, tolerances, expected", [
    (story(2, heard="what time was it"), Tolerances(), "heard differs"),
    (story(2, heard="what time was it"), Tolerances(text_match="ignore"), None),
    (story(2, answer="Noon."), Tolerances(), "answer differs"),
    (story(2, finish="cancelled", outcome="interrupted"), Tolerances(), "ended differently"),
    (story(2, asr=2.0), Tolerances(), "asr took 2000 ms, 500 ms then"),
    (story(2, asr=2.0), Tolerances(max_latency_ratio=5), None),
    (story(2, asr=0.9), Tolerances(max_latency_ratio=1, latency_slack_s=0.1), "asr took 900 ms"),
    (story(2, first_sentence=-0.4), Tolerances(), None),  # prepared from a guess: it did not wait at all
])
def test_differences_beyond_the_tolerances_are_flagged(now, tolerances, expected):
    then = story(1, asr=0.5, first_sentence=0.02)
    c = compare(Comparison("voice", then, now), tolerances)
    if expected is None:
        assert c.differences == []
    else:
        assert any(expected in d for d in c.differences), c.differences


def test_without_the_recorded_timing_only_what_was_heard_is_judged():
    then = story(1, asr=0.5)
    now = story(2, finish="cancelled", outcome="interrupted", answer="You", asr=5.0)
    now.interrupts = ["barge-in"]
    c = compare(Comparison("voice", then, now), Tolerances(timing=False))
    assert c.differences == [] and len(c.notes) == 3
    heard = compare(Comparison("voice", then, story(3, heard="what dime")), Tolerances(timing=False))
    assert heard.differences and "heard differs" in heard.differences[0]


def test_a_turn_that_fails_now_is_a_difference_even_without_the_recorded_timing():
    """Found trying voicebus as a new user: replaying a recording against a chat server that was gone gave
    the apology and "0 diverged", and never said why."""
    failed = story(2, finish="error", answer="Sorry, I could not answer that.")
    failed.errors = ["connection: cannot connect to http://127.0.0.1:18777/v1/: Connection refused"]
    c = compare(Comparison("text", story(1), failed), Tolerances(timing=False))
    assert c.differences == [f"failed now: {failed.errors[0]}"]


def test_barge_ins_count_and_revoked_guesses_are_noted():
    then, now = story(1), story(2)
    now.interrupts = ["barge-in"]
    now.guesses, now.revoked = ["what time"], [1]
    c = compare(Comparison("voice", then, now), Tolerances())
    assert c.differences == ["barge-ins: 0 then, 1 now"]
    assert c.notes == ["guesses (revoked): 0 (0) then, 1 (1) now"]


def test_a_recording_cut_mid_turn_is_judged_only_on_what_it_shows():
    then = story(1, finish="", outcome="")
    then.sentences = {}
    c = compare(Comparison("voice", then, story(2)), Tolerances())
    assert c.differences == [] and "ends before this turn" in c.notes[0]


def test_turns_pair_in_order_and_by_the_ids_replay_gave_questions():
    then = [story(1), story(2, source="text", heard="hi"), story(3)]
    now = [story(11), story(12), story(99, source="text", heard="hi")]
    pairs = pair_turns(then, now, {2: 99}, has_audio=True)
    assert [(c.then.turn if c.then else None, c.now.turn if c.now else None) for c in pairs] == [
        (1, 11), (2, 99), (3, 12)]
    pairs = pair_turns(then, now[:1], {}, has_audio=True)
    assert [(c.then.turn if c.then else None, c.now.turn if c.now else None) for c in pairs] == [
        (1, 11), (2, None), (3, None)]
    missing = compare(pairs[1], Tolerances())
    assert missing.differences == ["no turn now for 'hi'"]
    extra = compare(pair_turns([], [story(5)], {}, has_audio=True)[0], Tolerances())
    assert extra.differences == ["an extra turn now: heard 'what time is it'"]


def test_text_match_modes():
    assert same_text("What is it?", "what is it", "words") and not same_text("What is it?", "what is it", "exact")
    assert same_text("the capital of france is paris", "the capital of france is pariss", "loose")
    assert not same_text("the capital of france", "a dog barks", "loose")


def test_user_side_is_the_audio_and_questions_and_without_audio_the_transcripts():
    recording = Recording(VOICE)
    events, has_audio = user_side(recording, read_turns(recording))
    assert has_audio and {e.kind for e in events} == {"audio", "end"}
    assert sum(e.kind == "audio" for e in events) == sum(1 for _ in recording.records(kinds=("audio.in",)))

    text = Recording(TEXT)
    events, has_audio = user_side(text, read_turns(text))
    assert not has_audio and [(e.kind, e.text) for e in events] == [("ask", "What is two plus two?")]

    # A voice turn recorded without audio (--no-audio) is asked as the words heard then.
    voice_turns = [s for s in read_turns(recording) if s.source == "voice"]
    events, has_audio = user_side(text, voice_turns)
    assert [(e.kind, e.text) for e in events if e.turn == voice_turns[0].turn] == [
        ("ask", "What is the capital of France?")]


def test_the_recorded_settings_are_reused_without_secrets_and_the_users_file_goes_on_top(tmp_path):
    mine = tmp_path / "mine.toml"
    mine.write_text('[vad]\nsilence_ms = 700\n[llm]\nmax_tokens = 50\n')
    tree = replay_config(Recording(VOICE), mine)
    assert set(tree) <= {"vad", "asr", "llm", "tts"}
    assert tree["vad"]["silence_ms"] == 700 and tree["llm"]["max_tokens"] == 50
    assert tree["asr"]["backend"] == "whisper"
    assert "api_key" not in tree["llm"], "a masked secret is not replayed"
    import tomllib

    assert tomllib.loads(toml_text(tree)) == tree


def test_set_takes_known_settings_only():
    import click

    assert parse_set(("vad.silence_ms=700",)) == {"VOICEBUS_VAD_SILENCE_MS": "700"}
    assert "llm.temperature" in known_settings()
    with pytest.raises(click.BadParameter, match="vad.silence"):
        parse_set(("vad.silence=700",))


def test_replay_mistakes_are_one_line_errors(tmp_path):
    missing = subprocess.run([*VOICEBUS, "replay", str(tmp_path / "none.vbrec")], capture_output=True, text=True,
                             timeout=30)
    assert missing.returncode == 1 and missing.stderr.startswith("RecordingError: ")
    assert len(missing.stderr.strip().splitlines()) == 1
    nothing = tmp_path / "empty-run.vbrec"
    from voicebus.engine.recording import RecordingWriter

    RecordingWriter(nothing).close()
    result = subprocess.run([*VOICEBUS, "replay", str(nothing)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and result.stderr.startswith("ReplayError: ") and "nothing" in result.stderr


# --- replays through real processes -----------------------------------------------------------


@pytest.fixture(scope="module")
def shared_state(tmp_path_factory):
    """One state dir for the module: whisper's model is assembled once, replays get fresh history anyway."""
    return tmp_path_factory.mktemp("state")


@pytest.fixture
def llm_env(scripted, shared_state):
    url, _ = scripted

    def env(model: str = "echo-replay", **extra: str) -> dict[str, str]:
        return clean_env(shared_state, VOICEBUS_LLM_BASE_URL=f"{url}/v1", VOICEBUS_LLM_API_KEY="k",
                         VOICEBUS_LLM_MODEL=model, **extra)

    return env


def replay(path: Path, env: dict[str, str], *args: str, timeout: float = 240) -> tuple[int, dict, str]:
    """``voicebus replay PATH --json -``: exit code, the report, stderr."""
    result = subprocess.run([*VOICEBUS, "replay", str(path), "--json", "-", *LOOSE, *args], env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.stdout.strip(), result.stderr
    return result.returncode, json.loads(result.stdout), result.stderr


def turns_of(report: dict) -> list[tuple[str, str]]:
    return [(t["now"]["heard"], t["now"]["answer"]) for t in report["turns"] if t["now"]]


@pytest.mark.slow
def test_the_recorded_voice_turn_replays_within_tolerance(llm_env):
    code, report, err = replay(VOICE, llm_env())
    assert code == 0, (report, err)
    [turn] = report["turns"]
    assert turn["source"] == "voice" and not turn["replayed_as_text"]
    assert turn["now"]["heard"] == "What is the capital of France?"
    assert turn["now"]["answer"] == "You said: What is the capital of France."
    assert turn["now"]["outcome"] == "done" and turn["now"]["barge_ins"] == 0
    stages = {row["key"] for row in turn["latencies"]}
    assert {"asr_s", "first_audio_s", "speech_end_to_audio_s"} <= stages


@pytest.mark.slow
def test_the_recorded_text_turn_replays_within_tolerance(llm_env):
    code, report, err = replay(TEXT, llm_env())
    assert code == 0, (report, err)
    [turn] = report["turns"]
    assert turn["source"] == "text"
    assert turn["now"]["answer"] == "You said: What is two plus two."
    assert "request_to_audio_s" in turn["now"]["latencies"]


@pytest.mark.slow
def test_replaying_twice_on_the_same_backends_gives_the_same_transcripts_and_answers(llm_env):
    first = replay(VOICE, llm_env())
    second = replay(VOICE, llm_env())
    assert first[0] == second[0] == 0, (first, second)
    assert turns_of(first[1]) == turns_of(second[1])
    assert turns_of(first[1]) == [("What is the capital of France?", "You said: What is the capital of France.")]


@pytest.mark.slow
def test_a_turn_that_breaks_makes_the_replay_diverge(llm_env):
    code, report, _err = replay(TEXT, llm_env(model="auth-replay"))  # the chat model now refuses: 401
    assert code == 2
    [turn] = report["turns"]
    assert any("ended differently" in d for d in turn["differences"]), turn
    assert report["diverged"] is True


@pytest.mark.slow
def test_up_record_catches_the_session_from_its_first_message(launcher, llm_env, tmp_path):
    path = tmp_path / "s.vbrec"
    url = launcher.bus_url()
    env = llm_env()
    up = launcher.up("--bus", url, "--input", "none", "--output", "none", "--llm", "openai", "--record", str(path),
                     **{k: v for k, v in env.items() if k.startswith("VOICEBUS_")})
    watcher = launcher.watch(Endpoints.parse(url), "sys.heartbeat")
    watcher.wait_ready(("thinker", "speaker"), timeout=90)
    assert up.interrupt() == 0, up.stderr()
    assert "recorded " in up.stderr() and str(path) in up.stderr()
    recording = Recording(path)
    kinds = [(env.kind, getattr(env.body, "name", getattr(env.body, "worker", ""))) for _t, env in recording.messages()]
    for name in ("listener", "thinker", "speaker"):
        assert ("sup.started", name) in kinds and ("sys.hello", name) in kinds and ("sys.bye", name) in kinds
    assert recording.header.backends["llm"] == "openai" and recording.header.settings["llm.api_key"] == "***"


@pytest.mark.slow
def test_a_recorder_killed_mid_session_leaves_a_file_that_replays_on_another_asr(launcher, llm_env, tmp_path):
    # The question, as the committed recording holds it.
    subprocess.run([*VOICEBUS, "show", str(VOICE), "--no-messages", "--no-waterfalls", "--export-audio",
                    str(tmp_path / "wav")], check=True, capture_output=True, timeout=60)
    question = tmp_path / "wav" / "user.wav"
    path = tmp_path / "killed.vbrec"
    url = launcher.bus_url()
    env = llm_env()
    recorder = subprocess.Popen([*VOICEBUS, "record", str(path), "--bus", url, "--wait", "60"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        up = launcher.up("--bus", url, "--input", str(question), "--output", "none", "--llm", "openai",
                         VOICEBUS_AUDIO_PUBLISH_AUDIO="1", **{k: v for k, v in env.items() if k.startswith("VOICEBUS_")})
        # Connected long before the question is transcribed: the listener loads whisper first.
        watcher = launcher.watch(Endpoints.parse(url), "asr.final")
        watcher.wait(lambda e: e.kind == "asr.final", 120, "the question's transcript")
        # Killed once the transcript is on disk (the recorder writes what it hears a moment later than the
        # watcher sees it), mid-session: the answer is still to come.
        deadline = time.monotonic() + 10
        while not any(True for _ in Recording(path).messages(kinds=("asr.final",))) and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(recorder.pid, signal.SIGKILL)
        recorder.wait(10)
        assert up.wait(120) == 0, up.stderr()
    finally:
        if recorder.poll() is None:
            recorder.kill()
            recorder.wait(10)
    recording = Recording(path)
    assert list(recording.messages()) and recording.stats.damaged_at is None

    result = subprocess.run([*VOICEBUS, "replay", str(path), "--asr", "pocketsphinx", *LOOSE], env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "then: asr=whisper" in out and "now: asr=pocketsphinx" in out
    heard = next(line for line in out.splitlines() if line.strip().startswith("heard"))
    assert "What is the capital of France?" in heard and "what is the capital of france" in heard
    assert "asr" in out and "first audio" in out and " ms" in out
