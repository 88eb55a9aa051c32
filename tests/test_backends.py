"""Settings → backends: every name opens the right class; unknown names and missing extras are clear."""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest

from voicebus.engine.errors import ConfigError, MissingExtraError
from voicebus.engine.settings import load
from voicebus.workers import backends
from voicebus.workers.config import Settings


@pytest.fixture
def settings(tmp_path) -> Settings:
    return load(Settings, env={}, overrides={"state.dir": tmp_path})


def with_(settings: Settings, section: str, **values) -> Settings:
    return replace(settings, **{section: replace(getattr(settings, section), **values)})


def test_embedded_defaults_open(settings):
    for opener, name in ((backends.open_recognizer, "whisper"), (backends.open_chat, "local"),
                         (backends.open_synthesizer, "piper")):
        backend = opener(settings)
        try:
            assert backend.name == name
        finally:
            backend.close()


def test_settings_reach_the_backends(settings):
    chat = backends.open_chat(with_(settings, "llm", context_tokens=512, temperature=0.0, seed=7))
    try:
        assert chat.context_tokens == 512 and chat.sampling.temperature == 0.0 and chat.seed == 7
    finally:
        chat.close()
    chat = backends.open_chat(with_(settings, "llm", backend="openai", base_url="http://127.0.0.1:9/v1", model="m"))
    assert chat.seed is None  # -1: a new seed each time
    chat.close()
    with pytest.raises(ConfigError, match="fr-FR"):
        backends.open_recognizer(with_(settings, "asr", backend="pocketsphinx", language="fr-FR"))
    with pytest.raises(ConfigError, match="xx-XX"):
        backends.open_recognizer(with_(settings, "asr", language="xx-XX"))


def test_whisper_assembles_its_model_in_the_state_folder(settings, tmp_path):
    said = []
    recognizer = backends.open_recognizer(with_(settings, "asr", beam_size=2), progress=said.append)
    try:
        assert recognizer.name == "whisper" and recognizer.beam_size == 2
        assert (tmp_path / "models" / "whisper-base" / "model.bin").is_file()
        assert said, "the one-time assembly should say what it is doing"
    finally:
        recognizer.close()
    pocketsphinx = backends.open_recognizer(with_(settings, "asr", backend="pocketsphinx"))
    assert pocketsphinx.name == "pocketsphinx"
    pocketsphinx.close()


def test_cloud_backends_are_built_from_their_settings(settings):
    pytest.importorskip("openai")
    chat = backends.open_chat(with_(settings, "llm", backend="openai", base_url="http://127.0.0.1:9/v1", model="m"))
    assert chat.name == "openai"
    chat.close()
    chat = backends.open_chat(with_(settings, "llm", backend="azure", azure_endpoint="https://x.openai.azure.com",
                                    azure_deployment="d", azure_api_key="k"))
    assert chat.name.startswith("azure")
    chat.close()


@pytest.mark.parametrize("section, opener", [("asr", backends.open_recognizer), ("llm", backends.open_chat),
                                             ("tts", backends.open_synthesizer)])
def test_unknown_names_list_the_known_ones(settings, section, opener):
    with pytest.raises(ConfigError, match="choose from"):
        opener(with_(settings, section, backend="nonesuch"))


def test_a_missing_extra_names_it(settings, monkeypatch):
    monkeypatch.setitem(sys.modules, "openai", None)  # what an install without the extra looks like
    with pytest.raises(MissingExtraError, match=r"voicebus\[openai\]"):
        backends.open_chat(with_(settings, "llm", backend="openai", base_url="http://127.0.0.1:9/v1", model="m"))
