"""Cloud backends inside the workers: unreachable services end in clear errors and the worker goes on.

Azure cannot be reached from here (DNS fails), which makes the failure paths real.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from voicebus.engine.messages import new_turn_id
from voicebus.workers.kinds import LlmDone, LlmSentence
from voicebus.workers.listener import Listener
from voicebus.workers.speaker import Speaker

from conftest import wait_for
from support.voices import steady_piper

pytest.importorskip("azure.cognitiveservices.speech")
pytestmark = pytest.mark.slow

AZURE = {"asr.speech_key": "0" * 32, "asr.speech_region": "westeurope"}


@pytest.fixture(scope="module")
def two_questions(tmp_path_factory):
    from voicebus.workers.audio import write_wav
    voice = steady_piper()
    pcm = bytes(voice.sample_rate)
    for text in ("What time is it?", "Is anybody there?"):
        pcm += b"".join(voice.synthesize(text)) + bytes(voice.sample_rate * 4)
    voice.close()
    path = tmp_path_factory.mktemp("audio") / "q.wav"
    write_wav(path, pcm, voice.sample_rate)
    return path


def test_azure_recognition_failure_is_reported_and_the_next_turn_handled(run_actor, make_client, two_questions):
    client = make_client("test", subscribe=("sys.error", "asr.", "audio.end"))
    run_actor(Listener, **AZURE, **{"asr.backend": "azure", "audio.input": str(two_questions), "audio.fast": True})
    seen = []
    wait_for(client, lambda e: seen.append(e) or e.kind == "audio.end", timeout=90)
    errors = [e.body for e in seen if e.kind == "sys.error"]
    nomatches = [e for e in seen if e.kind == "asr.nomatch"]
    assert len(nomatches) == 2, [(e.kind, e.body) for e in seen]
    assert len(errors) == 2 and all(err.code == "connection" and "ConnectionFailure" in err.message for err in errors)


def test_azure_voice_failure_is_reported_and_the_turn_still_ends(run_actor, make_client):
    client = make_client("test", subscribe=("sys.error", "sys.ready", "play.", "metrics.turn"))
    run_actor(Speaker, **AZURE, **{"tts.backend": "azure", "audio.output": "none"})
    wait_for(client, lambda e: e.kind == "sys.ready", timeout=30)
    for _ in range(2):
        turn = new_turn_id()
        client.publish(LlmSentence(text="Hello there.", index=0), turn=turn)
        client.publish(LlmDone(finish_reason="stop", sentences=1), turn=turn)
        seen = []
        wait_for(client, lambda e: seen.append(e) or (e.kind == "metrics.turn" and e.turn == turn), timeout=60)
        error = next(e.body for e in seen if e.kind == "sys.error")
        assert error.where == "speaker.synthesize" and error.code == "connection"


def test_doctor_reports_missing_and_present_parts(tmp_path):
    env = {"PATH": "", "HOME": str(tmp_path), "VOICEBUS_STATE_DIR": str(tmp_path)}
    ok = subprocess.run([sys.executable, "-m", "voicebus.cli.main", "doctor"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "SmolLM2" in ok.stdout and "en_US-joe-medium.onnx" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "voicebus.cli.main", "doctor", "--asr", "azure", "--llm", "openai"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 1
    assert "FAIL asr   settings   azure: missing SPEECH_KEY, SPEECH_REGION" in bad.stdout
    assert "OPENAI_API_KEY" in bad.stdout
    unreachable = subprocess.run([sys.executable, "-m", "voicebus.cli.main", "doctor", "--llm", "openai"],
                                 capture_output=True, text=True, timeout=60,
                                 env={**env, "OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "VOICEBUS_LLM_MODEL": "m"})
    assert unreachable.returncode == 1 and "FAIL llm   service" in unreachable.stdout
