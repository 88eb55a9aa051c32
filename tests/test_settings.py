"""Settings: defaults < TOML file < environment < flags, with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from voicebus.engine.errors import ConfigError
from voicebus.engine.settings import RESOLVED_ENV, describe, load, to_env
from voicebus.workers.config import Settings
from voicebus.workers.preflight import missing_settings, preflight


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "voicebus.toml"
    path.write_text(text)
    return path


def test_defaults():
    s = load(Settings, env={})
    assert (s.asr.backend, s.llm.backend, s.tts.backend) == ("whisper", "local", "piper")
    assert s.bus.url.startswith("ipc://") and s.vad.silence_ms == 500 and s.llm.max_tokens == 200
    assert s.asr.language == "en-US" and s.tts.azure_voice == "en-US-JennyMultilingualNeural"


def test_precedence_file_env_flags(tmp_path):
    cfg = write(tmp_path, '[llm]\nmax_tokens = 50\nstop_phrases = ["halt"]\n[vad]\nsilence_ms = 700\nbarge_in = false\n')
    s = load(Settings, config_file=cfg, env={})
    assert (s.llm.max_tokens, s.llm.stop_phrases, s.vad.silence_ms, s.vad.barge_in) == (50, ("halt",), 700, False)
    s = load(Settings, config_file=cfg, env={"VOICEBUS_LLM_MAX_TOKENS": "60", "VOICEBUS_VAD_BARGE_IN": "yes"})
    assert (s.llm.max_tokens, s.vad.barge_in, s.vad.silence_ms) == (60, True, 700)
    s = load(Settings, config_file=cfg, env={"VOICEBUS_LLM_MAX_TOKENS": "60"}, overrides={"llm.max_tokens": 70, "vad.silence_ms": None})
    assert (s.llm.max_tokens, s.vad.silence_ms) == (70, 700)


def test_classic_environment_names():
    s = load(Settings, env={"SPEECH_KEY": "k", "SPEECH_REGION": "westeurope", "AZURE_OPENAI_ENDPOINT": "https://x",
                            "AZURE_OPENAI_CHAT_DEPLOYMENT": "gpt", "OPENAI_BASE_URL": "http://h/v1"})
    assert (s.asr.speech_key, s.asr.speech_region) == ("k", "westeurope")
    assert (s.llm.azure_endpoint, s.llm.azure_deployment, s.llm.base_url) == ("https://x", "gpt", "http://h/v1")
    assert ("asr.speech_key", "***") in describe(s)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("[llm\nmax_tokens = 1", "not valid TOML"),
        ("[nope]\nx = 1", "unknown section"),
        ("[llm]\nmax_tokenz = 1", "llm.max_tokenz"),
        ("[llm]\nmax_tokens = 'many'", "max_tokens"),
        ("llm = 3", "must be a table"),
    ],
)
def test_bad_config_file_names_the_problem(tmp_path, text, needle):
    with pytest.raises(ConfigError, match=needle):
        load(Settings, config_file=write(tmp_path, text), env={})


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ConfigError, match="VOICEBUS_VAD_BARGE_IN"):
        load(Settings, env={"VOICEBUS_VAD_BARGE_IN": "perhaps"})


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        load(Settings, config_file=Path("/nonexistent/voicebus.toml"), env={})


def test_children_get_exactly_the_resolved_settings(tmp_path):
    s = load(Settings, env={}, overrides={"asr.backend": "whisper", "state.dir": tmp_path, "llm.stop_phrases": "a, b"})
    child = load(Settings, env={**to_env(s), "VOICEBUS_ASR_BACKEND": "ignored"})
    assert child == s and child.llm.stop_phrases == ("a", "b")
    # an explicit flag still wins in a child
    assert load(Settings, env=to_env(s), overrides={"bus.url": "tcp://h:1"}).bus.url == "tcp://h:1"
    with pytest.raises(ConfigError, match=RESOLVED_ENV):
        load(Settings, env={RESOLVED_ENV: "{not json"})


def test_missing_cloud_settings_are_named_all_at_once():
    s = load(Settings, env={}, overrides={"asr.backend": "azure", "tts.backend": "azure", "llm.backend": "azure"})
    missing = missing_settings(s, ["listener", "thinker", "speaker"])
    assert {"SPEECH_KEY", "SPEECH_REGION", "AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_CHAT_DEPLOYMENT"} <= set(missing)
    with pytest.raises(ConfigError, match="SPEECH_KEY"):
        preflight(s, ["listener", "thinker", "speaker"])
    # only the workers this host runs count
    assert missing_settings(s, ["thinker"]) == [m for m in missing if m.startswith("AZURE")]
    s = load(Settings, env={}, overrides={"llm.backend": "openai"})
    assert missing_settings(s, ["thinker"]) == ["VOICEBUS_LLM_MODEL", "OPENAI_API_KEY"]
    s = load(Settings, env={"OPENAI_BASE_URL": "http://127.0.0.1:8080/v1", "VOICEBUS_LLM_MODEL": "m"}, overrides={"llm.backend": "openai"})
    assert missing_settings(s, ["thinker"]) == []  # a local server needs no key


def test_unknown_backend_is_a_config_error():
    s = load(Settings, env={}, overrides={"asr.backend": "vosk"})
    with pytest.raises(ConfigError, match="pocketsphinx, whisper, azure"):
        preflight(s, ["listener"])
