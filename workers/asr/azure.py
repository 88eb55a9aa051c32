"""Speech recognition with Azure AI Speech (``azure-cognitiveservices-speech``).

Each utterance gets its own push stream and continuous recognizer: ``begin``
starts recognition, ``feed`` writes 16 kHz int16 mono PCM into the stream and
returns the newest partial the SDK reported, ``end`` closes the stream and waits
(bounded) for the final result. The SDK reports through callbacks on its own
threads; ``_Utterance`` collects them behind a lock.

The SDK objects must be stopped and released before the interpreter exits:
left alive, the SDK's native threads abort the process at exit ("FATAL:
exception not rethrown", seen with 1.53 on Linux). ``close`` does it, and a
``weakref.finalize`` does it for a recognizer nobody closed.

This module also holds the two helpers the Azure synthesizer shares:
``speech_config`` (settings → SpeechConfig) and ``cancellation_error`` (SDK
cancellation → BackendError).
"""

from __future__ import annotations

import json
import threading
import weakref
from types import ModuleType
from typing import Any

from voicebus.engine.errors import BackendError, ConfigError, require_module
from voicebus.workers.asr.base import SAMPLE_RATE, Transcript

# SDK CancellationErrorCode name -> (voicebus code, transient).
_CANCEL_CODES: dict[str, tuple[str, bool]] = {
    "AuthenticationFailure": ("auth", False),
    "Forbidden": ("auth", False),
    "BadRequest": ("bad_request", False),
    "TooManyRequests": ("rate_limited", True),
    "ConnectionFailure": ("connection", True),
    "ServiceTimeout": ("timeout", True),
    "ServiceError": ("server", True),
    "ServiceUnavailable": ("server", True),
    "ServiceRedirectTemporary": ("server", True),
    "ServiceRedirectPermanent": ("server", False),
    "RuntimeError": ("sdk", False),
}


def load_speech_sdk(purpose: str) -> ModuleType:
    """Import ``azure.cognitiveservices.speech`` or raise MissingExtraError (extra ``azure``)."""
    return require_module(
        "azure.cognitiveservices.speech",
        package="azure-cognitiveservices-speech",
        extra="azure",
        purpose=purpose,
    )


def speech_config(
    speechsdk: ModuleType, *, key: str | None, region: str | None, endpoint: str | None
) -> Any:
    """Build a SpeechConfig from the classic settings, naming whichever is missing.

    ``endpoint`` (a custom or private endpoint URL) wins over ``region``.
    """
    if not key:
        raise ConfigError("Azure Speech needs a key: set SPEECH_KEY")
    if endpoint:
        return speechsdk.SpeechConfig(subscription=key, endpoint=endpoint)
    if not region:
        raise ConfigError(
            "Azure Speech needs a region: set SPEECH_REGION (e.g. westeurope), or an endpoint"
        )
    return speechsdk.SpeechConfig(subscription=key, region=region)


def cancellation_error(what: str, code: Any, details: str) -> BackendError:
    """Turn an SDK cancellation (``code`` is a CancellationErrorCode) into a BackendError.

    The SDK's own code name and details stay in the message: they are what
    Azure's troubleshooting pages are indexed by.
    """
    sdk_code = getattr(code, "name", str(code))
    ours, transient = _CANCEL_CODES.get(sdk_code, ("server", True))
    hint = " (check SPEECH_KEY and SPEECH_REGION)" if ours == "auth" else ""
    # The SDK's details run over several lines (error, URL, connection id); keep them, on one.
    flat = "; ".join(line.strip() for line in details.splitlines() if line.strip())
    return BackendError(f"{what} canceled: {sdk_code}{hint}: {flat}", code=ours, transient=transient)


def _confidence(result_json: str | None) -> float | None:
    """The top hypothesis' confidence from a detailed-format result, if present."""
    try:
        return float(json.loads(result_json or "")["NBest"][0]["Confidence"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


class _Utterance:
    """One utterance's push stream, recognizer and what its callbacks reported."""

    def __init__(self, speechsdk: ModuleType, config: Any) -> None:
        self._sdk = speechsdk
        fmt = speechsdk.audio.AudioStreamFormat(
            samples_per_second=SAMPLE_RATE, bits_per_sample=16, channels=1
        )
        self.stream = speechsdk.audio.PushAudioInputStream(stream_format=fmt)
        self.recognizer = speechsdk.SpeechRecognizer(
            speech_config=config, audio_config=speechsdk.audio.AudioConfig(stream=self.stream)
        )
        self._lock = threading.Lock()
        self._finals: list[str] = []
        self._confidences: list[float] = []
        self._hypothesis = ""
        self._returned_partial = ""
        self.error: BackendError | None = None
        self.done = threading.Event()
        """Set when the session stopped or was canceled: no more results will come."""
        self._stream_open = True
        self._released = False
        self.recognizer.recognizing.connect(self._on_recognizing)
        self.recognizer.recognized.connect(self._on_recognized)
        self.recognizer.canceled.connect(self._on_canceled)
        self.recognizer.session_stopped.connect(lambda _evt: self.done.set())

    # -- SDK callback threads -------------------------------------------------

    def _on_recognizing(self, evt: Any) -> None:
        with self._lock:
            self._hypothesis = evt.result.text

    def _on_recognized(self, evt: Any) -> None:
        result = evt.result
        if result.reason != self._sdk.ResultReason.RecognizedSpeech or not result.text:
            return  # a no-match segment (silence, noise) adds nothing
        with self._lock:
            self._finals.append(result.text)
            self._hypothesis = ""
            conf = _confidence(result.json)
            if conf is not None:
                self._confidences.append(conf)

    def _on_canceled(self, evt: Any) -> None:
        details = evt.cancellation_details
        # EndOfStream is the normal end of a closed push stream, not a failure.
        if details.reason == self._sdk.CancellationReason.Error:
            with self._lock:
                # Recognizer details expose `.code` (synthesis ones `.error_code`).
                self.error = cancellation_error(
                    "Azure speech recognition", details.code, details.error_details or ""
                )
        self.done.set()

    # -- caller thread --------------------------------------------------------

    def start(self) -> None:
        self.recognizer.start_continuous_recognition_async().get()

    def write(self, pcm: bytes) -> None:
        if self._stream_open:
            self.stream.write(pcm)

    def close_stream(self) -> None:
        if self._stream_open:
            self._stream_open = False
            self.stream.close()

    def running_text(self) -> str:
        """Finals so far + the current hypothesis."""
        with self._lock:
            return " ".join([*self._finals, self._hypothesis]).strip()

    def new_partial(self) -> str | None:
        """The running text if it changed since last asked."""
        text = self.running_text()
        with self._lock:
            if not text or text == self._returned_partial:
                return None
            self._returned_partial = text
            return text

    def transcript(self) -> Transcript:
        with self._lock:
            text = " ".join(self._finals).strip()
            # The weakest segment bounds how far the whole utterance can be trusted.
            conf = min(self._confidences) if self._confidences else None
        return Transcript(text=text, confidence=conf if text else None)

    def release(self) -> None:
        """Stop recognition and drop the SDK objects (idempotent)."""
        if self._released:
            return
        self._released = True
        # Order matters with SDK 1.53 (measured): stopping a running session takes
        # ~0.5 s, but ~10 s once its stream is closed (it waits for a final result
        # that will not come), so stop first. A session that is already over
        # needs no stop, and one after a stream closed before a connection
        # failure would cost 1 s there plus 10 s in the release below.
        if not self.done.is_set():
            self.recognizer.stop_continuous_recognition_async().get()
        self.close_stream()
        for signal in (
            self.recognizer.recognizing,
            self.recognizer.recognized,
            self.recognizer.canceled,
            self.recognizer.session_stopped,
        ):
            signal.disconnect_all()
        del self.recognizer
        del self.stream


class AzureRecognizer:
    """Streaming recognition through Azure AI Speech."""

    name = "azure"

    def __init__(
        self,
        *,
        key: str | None,
        region: str | None,
        endpoint: str | None = None,
        language: str = "en-US",
        end_timeout_s: float = 10.0,
    ) -> None:
        """Configure recognition; no connection is made until ``begin``.

        Raises ConfigError naming SPEECH_KEY / SPEECH_REGION when missing, and
        MissingExtraError when the Speech SDK is not installed.
        """
        self._sdk = load_speech_sdk("Azure speech recognition")
        self.speech_config = speech_config(self._sdk, key=key, region=region, endpoint=endpoint)
        """The SDK configuration every utterance's recognizer is built from."""
        self.speech_config.speech_recognition_language = language
        # Detailed results carry a confidence per hypothesis; the simple format has none.
        self.speech_config.output_format = self._sdk.OutputFormat.Detailed
        self.end_timeout_s = end_timeout_s
        self._live: list[_Utterance] = []  # shared with the finalizer, which must not hold self
        self._finalizer = weakref.finalize(self, _release_all, self._live)

    @property
    def recognizer(self) -> Any:
        """The current utterance's SDK SpeechRecognizer (None between utterances)."""
        return self._live[0].recognizer if self._live else None

    def begin(self) -> None:
        """Start recognizing a new utterance, abandoning any unfinished one."""
        _release_all(self._live)
        utterance = _Utterance(self._sdk, self.speech_config)
        self._live.append(utterance)
        utterance.start()

    def feed(self, pcm: bytes) -> str | None:
        """Push 16 kHz int16 mono PCM; return the newest partial if it changed.

        Raises the utterance's BackendError as soon as the SDK canceled it.
        """
        utterance = self._current()
        if utterance.error is not None:
            raise utterance.error
        utterance.write(pcm)
        return utterance.new_partial()

    def hypothesis(self) -> str:
        """What the service has recognized of this utterance so far (a guess at a pause)."""
        return self._live[0].running_text() if self._live else ""

    def end(self) -> Transcript:
        """Close the audio stream and wait (at most ``end_timeout_s``) for the final result.

        An utterance that failed raises its BackendError; one whose result does
        not arrive in time raises BackendError(code="timeout").
        """
        utterance = self._current()
        utterance.close_stream()
        finished = utterance.done.wait(self.end_timeout_s)
        _release_all(self._live)
        if utterance.error is not None:
            raise utterance.error
        if not finished:
            raise BackendError(
                f"Azure speech recognition gave no final result within {self.end_timeout_s:g} s",
                code="timeout",
                transient=True,
            )
        return utterance.transcript()

    def close(self) -> None:
        """Stop any running recognition and release the SDK objects."""
        self._finalizer()

    def _current(self) -> _Utterance:
        if not self._live:
            raise RuntimeError("AzureRecognizer: begin() must come before feed()/end()")
        return self._live[0]


def _release_all(live: list[_Utterance]) -> None:
    while live:
        live.pop().release()
