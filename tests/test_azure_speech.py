"""Azure Speech recognizer and synthesizer, up to the network boundary.

Azure cannot be reached from the test machines (DNS fails), which makes the
error path real: with a fake key the SDK tries to connect and cancels with
``ConnectionFailure``. What the SDK would have sent — the push stream's audio
format, the voice, the output format — is read from the SDK's own in-memory
trace log, the same lines Microsoft support asks for.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest

speechsdk = pytest.importorskip(
    "azure.cognitiveservices.speech", reason="the Azure Speech SDK cannot be imported on this platform"
)
from azure.cognitiveservices.speech.diagnostics.logging import MemoryLogger  # noqa: E402

from voicebus.engine.errors import BackendError, ConfigError  # noqa: E402
from voicebus.workers.asr.azure import AzureRecognizer, _Utterance, cancellation_error  # noqa: E402
from voicebus.workers.tts.azure import AzureSynthesizer  # noqa: E402

FAKE = {"key": "0123456789abcdef0123456789abcdef", "region": "westeurope"}
FRAME = bytes(640)  # 20 ms of 16 kHz int16 silence
BOUND_S = 8.0
"""The SDK gives up on an unresolvable host in ~1 s here; anything near this bound is a hang."""


@pytest.fixture
def recognizer() -> Iterator[AzureRecognizer]:
    rec = AzureRecognizer(**FAKE)
    yield rec
    rec.close()


@pytest.fixture
def synthesizer() -> Iterator[AzureSynthesizer]:
    synth = AzureSynthesizer(**FAKE)
    yield synth
    synth.close()


@pytest.fixture
def sdk_log() -> Iterator[Callable[[], list[str]]]:
    """Trace the SDK into memory for the test; call the result for the lines so far."""
    MemoryLogger.start()
    try:
        yield MemoryLogger.dump_to_list
    finally:
        MemoryLogger.stop()


def logged_json(lines: list[str], marker: str) -> dict:
    """The JSON the SDK logged right after ``marker`` (e.g. the speech.config message)."""
    for line in lines:
        if marker in line:
            text = line.split(marker, 1)[1].strip().strip("'")
            return json.loads(text)
    raise AssertionError(f"{marker!r} not in the SDK log ({len(lines)} lines)")


# -- settings ------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [AzureRecognizer, AzureSynthesizer])
def test_missing_key_names_speech_key(cls) -> None:
    with pytest.raises(ConfigError, match="SPEECH_KEY"):
        cls(key=None, region="westeurope")


@pytest.mark.parametrize("cls", [AzureRecognizer, AzureSynthesizer])
def test_missing_region_and_endpoint_names_speech_region(cls) -> None:
    with pytest.raises(ConfigError, match="SPEECH_REGION"):
        cls(key="k", region=None)


def test_an_endpoint_replaces_the_region() -> None:
    rec = AzureRecognizer(key="k", region=None, endpoint="wss://speech.example.invalid/stt")
    try:
        endpoint = rec.speech_config.get_property(speechsdk.PropertyId.SpeechServiceConnection_Endpoint)
        assert endpoint == "wss://speech.example.invalid/stt"
    finally:
        rec.close()


# -- recognizer --------------------------------------------------------------------------


def test_recognizer_configuration(recognizer: AzureRecognizer) -> None:
    rec = AzureRecognizer(**FAKE, language="de-DE")
    try:
        assert rec.speech_config.speech_recognition_language == "de-DE"
        assert rec.speech_config.region == "westeurope"
        assert rec.speech_config.output_format == speechsdk.OutputFormat.Detailed
        rec.begin()
        reco_language = rec.recognizer.properties.get_property(
            speechsdk.PropertyId.SpeechServiceConnection_RecoLanguage
        )
        assert reco_language == "de-DE"
    finally:
        rec.close()
    assert rec.recognizer is None
    assert recognizer.speech_config.speech_recognition_language == "en-US"  # the default


def test_the_push_stream_sends_16khz_16bit_mono(
    recognizer: AzureRecognizer, sdk_log: Callable[[], list[str]]
) -> None:
    recognizer.begin()
    recognizer.feed(FRAME * 5)
    with pytest.raises(BackendError):
        recognizer.end()
    source = logged_json(sdk_log(), "speech.config ")["context"]["audio"]["source"]
    assert source["type"] == "Stream"
    assert (source["samplerate"], source["bitspersample"], source["channelcount"]) == ("16000", "16", "1")


def test_end_raises_connection_failure_within_a_bound(recognizer: AzureRecognizer) -> None:
    recognizer.begin()
    for _ in range(10):
        assert recognizer.feed(FRAME) is None  # no service, no partials
    started = time.monotonic()
    with pytest.raises(BackendError) as info:
        recognizer.end()
    assert time.monotonic() - started < BOUND_S
    error = info.value
    assert (error.code, error.transient) == ("connection", True)
    assert "ConnectionFailure" in error.message and "DNS" in error.message


def test_feed_raises_once_the_sdk_has_canceled(recognizer: AzureRecognizer) -> None:
    recognizer.begin()
    pace = threading.Event()  # never set: paces frames at real time, like a microphone
    deadline = time.monotonic() + BOUND_S
    with pytest.raises(BackendError) as info:
        while time.monotonic() < deadline:
            recognizer.feed(FRAME)
            pace.wait(0.02)
    assert info.value.code == "connection"
    with pytest.raises(BackendError):  # the utterance stays failed until the next begin()
        recognizer.end()


def test_a_new_utterance_after_a_failure_fails_again_cleanly(recognizer: AzureRecognizer) -> None:
    for _ in range(2):
        recognizer.begin()
        recognizer.feed(FRAME)
        with pytest.raises(BackendError, match="ConnectionFailure"):
            recognizer.end()
    assert recognizer.recognizer is None


def test_begin_abandons_an_unfinished_utterance(recognizer: AzureRecognizer) -> None:
    recognizer.begin()
    first = recognizer.recognizer
    recognizer.begin()
    assert recognizer.recognizer is not first


def test_end_before_begin_is_a_programming_error(recognizer: AzureRecognizer) -> None:
    with pytest.raises(RuntimeError, match="begin"):
        recognizer.end()


def _event(reason, text: str = "", result_json: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(result=SimpleNamespace(reason=reason, text=text, json=result_json))


def test_callbacks_make_partials_and_a_joined_final(recognizer: AzureRecognizer) -> None:
    # The SDK's callbacks driven by hand: the service cannot be reached to send them.
    reason = speechsdk.ResultReason
    utterance = _Utterance(speechsdk, recognizer.speech_config)
    try:
        utterance._on_recognizing(_event(reason.RecognizingSpeech, "what is"))
        assert utterance.new_partial() == "what is"
        assert utterance.new_partial() is None  # unchanged
        utterance._on_recognizing(_event(reason.RecognizingSpeech, "what is the time"))
        detailed = json.dumps({"NBest": [{"Confidence": 0.81, "Display": "What is the time?"}]})
        utterance._on_recognized(_event(reason.RecognizedSpeech, "What is the time?", detailed))
        utterance._on_recognized(_event(reason.NoMatch))  # a silent segment adds nothing
        utterance._on_recognizing(_event(reason.RecognizingSpeech, "in paris"))
        assert utterance.new_partial() == "What is the time? in paris"
        utterance._on_recognized(_event(reason.RecognizedSpeech, "In Paris.", json.dumps({"NBest": [{"Confidence": 0.9}]})))
        transcript = utterance.transcript()
        assert transcript.text == "What is the time? In Paris."
        assert transcript.confidence == pytest.approx(0.81)
        end_of_stream = SimpleNamespace(cancellation_details=SimpleNamespace(
            reason=speechsdk.CancellationReason.EndOfStream, code=None, error_details=""))
        utterance._on_canceled(end_of_stream)
        assert utterance.done.is_set() and utterance.error is None
    finally:
        utterance.release()


def test_nothing_recognized_is_an_empty_transcript(recognizer: AzureRecognizer) -> None:
    utterance = _Utterance(speechsdk, recognizer.speech_config)
    try:
        utterance._on_recognized(_event(speechsdk.ResultReason.NoMatch))
        assert utterance.transcript().text == "" and utterance.transcript().confidence is None
    finally:
        utterance.release()


@pytest.mark.parametrize(
    ("sdk_code", "code", "transient"),
    [
        ("AuthenticationFailure", "auth", False),
        ("TooManyRequests", "rate_limited", True),
        ("ServiceTimeout", "timeout", True),
        ("BadRequest", "bad_request", False),
    ],
)
def test_cancellation_codes_map_to_voicebus_codes(sdk_code: str, code: str, transient: bool) -> None:
    error = cancellation_error("recognition", getattr(speechsdk.CancellationErrorCode, sdk_code), "why\nwhere")
    assert (error.code, error.transient) == (code, transient)
    assert sdk_code in error.message and "why; where" in error.message
    if code == "auth":
        assert "SPEECH_KEY" in error.message


# -- synthesizer ------------------------------------------------------------------------


def test_synthesizer_configuration() -> None:
    synth = AzureSynthesizer(**FAKE, voice="en-GB-RyanNeural")
    try:
        props = synth.synthesizer.properties
        assert props.get_property(speechsdk.PropertyId.SpeechServiceConnection_SynthVoice) == "en-GB-RyanNeural"
        output = props.get_property(speechsdk.PropertyId.SpeechServiceConnection_SynthOutputFormat)
        assert output == "raw-24khz-16bit-mono-pcm"
        assert synth.sample_rate == 24000
    finally:
        synth.close()
    assert synth.synthesizer is None


def test_default_voice_is_jenny_multilingual(synthesizer: AzureSynthesizer) -> None:
    voice = synthesizer.synthesizer.properties.get_property(speechsdk.PropertyId.SpeechServiceConnection_SynthVoice)
    assert voice == "en-US-JennyMultilingualNeural"


def test_synthesize_raises_connection_failure_within_a_bound(
    synthesizer: AzureSynthesizer, sdk_log: Callable[[], list[str]]
) -> None:
    started = time.monotonic()
    chunks: list[bytes] = []
    with pytest.raises(BackendError) as info:
        for chunk in synthesizer.synthesize("Hello there."):
            chunks.append(chunk)
    assert time.monotonic() - started < BOUND_S
    assert chunks == []
    error = info.value
    assert (error.code, error.transient) == ("connection", True)
    assert "ConnectionFailure" in error.message
    # What it would have sent: our voice in the SSML and raw 24 kHz PCM asked for.
    lines = sdk_log()
    context = logged_json(lines, "synthesis.context=")
    assert context["synthesis"]["audio"]["outputFormat"] == "raw-24khz-16bit-mono-pcm"
    assert any("<voice name='en-US-JennyMultilingualNeural'>Hello there.</voice>" in line for line in lines)


def test_synthesize_after_close_is_a_programming_error() -> None:
    synth = AzureSynthesizer(**FAKE)
    synth.close()
    with pytest.raises(RuntimeError, match="closed"):
        next(synth.synthesize("Hello."))


def test_objects_left_open_do_not_abort_the_interpreter_at_exit() -> None:
    # Without the finalizers the SDK's native threads abort the process at exit
    # ("FATAL: exception not rethrown", exit 134) when it leaves while a failed
    # session is being canceled: about half the runs of this script here. Two
    # runs catch a regression most of the time; a clean exit is never a fluke.
    script = textwrap.dedent(f"""
        import threading
        from voicebus.engine.errors import BackendError
        from voicebus.workers.asr.azure import AzureRecognizer
        from voicebus.workers.tts.azure import AzureSynthesizer
        synth = AzureSynthesizer(**{FAKE!r})
        try:
            list(synth.synthesize("Hello."))
        except BackendError:
            pass
        rec = AzureRecognizer(**{FAKE!r})
        canceled = threading.Event()
        rec.begin()
        rec.recognizer.canceled.connect(lambda evt: canceled.set())
        rec.feed(bytes(6400))
        canceled.wait(10)
        print("leaving", flush=True)
    """)
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert done.stdout == "leaving\n"
        assert done.returncode == 0, done.stderr[-2000:]
