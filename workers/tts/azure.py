"""Text-to-speech with Azure AI Speech neural voices.

Audio comes back as raw 24 kHz int16 mono PCM (``Raw24Khz16BitMonoPcm``), so
no container has to be parsed. ``synthesize`` starts speaking with
``start_speaking_text_async`` — which returns as soon as the first audio is
on its way — and reads an ``AudioDataStream`` over the result, yielding each
chunk as it arrives. Stopping early (the generator is closed on barge-in) stops
the service's synthesis too.

A stalled service needs no timer of ours: the SDK cancels a synthesis whose
frames stop for its hard frame timeout (at least 10 s), and that cancellation
surfaces here as a BackendError like any other.

Text streaming input (``SpeechSynthesisRequest`` with ``TextStream``) is not
used: ``Synthesizer.synthesize`` receives whole sentences, which the thinker has
already cut, so there is nothing to stream in; it would also need the separate
``wss://<region>.tts.speech.microsoft.com/cognitiveservices/websocket/v2``
endpoint.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

from voicebus.engine.errors import BackendError
from voicebus.workers.asr.azure import cancellation_error, load_speech_sdk, speech_config

SAMPLE_RATE = 24000
CHUNK_BYTES = 4800
"""100 ms of 24 kHz int16 audio: small enough for prompt playback, few Python calls."""


class AzureSynthesizer:
    """Synthesize speech with an Azure neural voice, chunk by chunk."""

    name = "azure"
    sample_rate = SAMPLE_RATE

    def __init__(
        self,
        *,
        key: str | None,
        region: str | None,
        endpoint: str | None = None,
        voice: str = "en-US-JennyMultilingualNeural",
    ) -> None:
        """Configure the voice; no connection is made until the first ``synthesize``.

        Raises ConfigError naming SPEECH_KEY / SPEECH_REGION when missing, and
        MissingExtraError when the Speech SDK is not installed.
        """
        self._sdk = load_speech_sdk("Azure text-to-speech")
        config = speech_config(self._sdk, key=key, region=region, endpoint=endpoint)
        config.speech_synthesis_voice_name = voice
        config.set_speech_synthesis_output_format(
            self._sdk.SpeechSynthesisOutputFormat.Raw24Khz16BitMonoPcm
        )
        self.voice = voice
        # audio_config=None: audio comes to us, never to a default speaker.
        # The holder is the only reference: the SDK aborts the interpreter at
        # exit if its objects are still alive (see asr/azure.py), so the
        # finalizer must be able to drop the last one, closed or not.
        self._holder = [self._sdk.SpeechSynthesizer(speech_config=config, audio_config=None)]
        self._finalizer = weakref.finalize(self, self._holder.clear)

    @property
    def synthesizer(self) -> Any:
        """The SDK SpeechSynthesizer (None once closed); exposed for inspection."""
        return self._holder[0] if self._holder else None

    def synthesize(self, text: str) -> Iterator[bytes]:
        """Yield 24 kHz int16 mono PCM chunks for ``text`` as they arrive.

        Raises BackendError (with the SDK's cancellation code and details) when
        the service cancels the synthesis.
        """
        sdk = self._sdk
        synthesizer = self.synthesizer
        if synthesizer is None:
            raise RuntimeError("AzureSynthesizer is closed")
        result = synthesizer.start_speaking_text_async(text).get()
        if result.reason == sdk.ResultReason.Canceled:
            raise _error(result.cancellation_details)
        stream = sdk.AudioDataStream(result)
        buffer = bytes(CHUNK_BYTES)  # the SDK fills this bytes object in place
        finished = False
        try:
            while n := stream.read_data(buffer):
                yield buffer[:n]
            finished = True
        finally:
            if not finished:
                # Closed early (barge-in) or failed: stop the service generating
                # audio nobody will play, so the next sentence is not queued behind it.
                synthesizer.stop_speaking_async().get()
        if stream.status == sdk.StreamStatus.Canceled:
            details = stream.cancellation_details
            if details.reason == sdk.CancellationReason.Error:
                raise _error(details)

    def close(self) -> None:
        """Release the SDK synthesizer."""
        self._finalizer()


def _error(details: Any) -> BackendError:
    # Synthesis details expose `.error_code` (recognition ones `.code`).
    return cancellation_error("Azure text-to-speech", details.error_code, details.error_details or "")
