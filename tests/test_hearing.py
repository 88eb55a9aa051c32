"""The listener's front end: utterances, guesses at pauses, finals, with real voice activity detection.

Speech is the embedded piper voice; the recognizer is a stand-in whose words and
decoding time the test controls, so the race between decoding and the silence
window can be set either way. The real recognizers are tested in test_asr.py and
test_eval_asr.py.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from voicebus.engine.errors import BackendError, ConfigError
from voicebus.workers.asr.base import Transcript
from voicebus.workers.audio import FRAME_BYTES, RATE, Resampler
from voicebus.workers.hearing import Ended, Final, Guess, Hearing, NoMatch, Revoked, SpeechStarted
from voicebus.workers.turn_end import EndOfTurn, completeness
from voicebus.workers.vad import Endpointer

from support.voices import steady_piper

pytestmark = pytest.mark.slow  # piper synthesis


@pytest.fixture(scope="module")
def message_end():
    from voicebus.workers.llm.message_end import MessageEnd

    model = MessageEnd()
    yield model
    model.close()


@pytest.fixture(scope="module")
def say():
    voice = steady_piper()
    resampler = Resampler(voice.sample_rate, RATE)

    def speak(text: str) -> bytes:
        pcm = b"".join(resampler.process(chunk) for chunk in voice.synthesize(text)) + resampler.flush()
        return pcm[: len(pcm) - len(pcm) % 2]

    yield speak
    voice.close()


def silence(ms: int) -> bytes:
    return bytes(RATE * 2 * ms // 1000)


class Scripted:
    """A batch recognizer: answers ``words[n]`` for its n-th decode, taking ``decode_s`` each time."""

    def __init__(self, words: list[str], decode_s: float = 0.05, confidence: float = 0.9) -> None:
        self.words = words
        self.decode_s = decode_s
        self.confidence = confidence
        self.calls: list[int] = []

    def transcribe(self, pcm: bytes) -> Transcript:
        self.calls.append(len(pcm))
        time.sleep(self.decode_s)
        return Transcript(self.words[min(len(self.calls), len(self.words)) - 1], self.confidence)


def run(recognizer, pcm: bytes, *, realtime: bool = True, hold_ms: int = 0, answered=None,
        ready_after_s: float | None = None, message_end=None, rejoin_ms: int = 0, rejoinable=None,
        read_alone=None, **end_of_turn) -> list[tuple[float, object]]:
    """Feed ``pcm`` frame by frame (at real time: decoding overlaps the audio); (seconds, event) pairs.

    With ``ready_after_s``, the answer to each guess is ready that long after the guess (as the speaker's
    play.ready would say)."""
    events: list[tuple[float, object]] = []
    start = time.monotonic()

    def emit(event: object) -> None:
        events.append((time.monotonic() - start, event))
        if isinstance(event, Guess) and ready_after_s is not None:
            threading.Timer(ready_after_s, hearing.answer_ready, (event.utterance, event.rev)).start()

    hearing = Hearing(recognizer, Endpointer(silence_ms=end_of_turn.get("base_ms", 500)), emit,
                      end_of_turn=EndOfTurn(**end_of_turn) if end_of_turn else None, hold_ms=hold_ms,
                      answered=answered, message_end=message_end, rejoin_ms=rejoin_ms,
                      rejoinable=rejoinable, read_alone=read_alone)
    for i in range(0, len(pcm) - FRAME_BYTES + 1, FRAME_BYTES):
        hearing.feed(pcm[i : i + FRAME_BYTES])
        if realtime:
            time.sleep(max(0.0, start + (i + FRAME_BYTES) / (RATE * 2) - time.monotonic()))
    hearing.drain()
    hearing.close()
    return events


def of(events, kind) -> list:
    return [e for _, e in events if isinstance(e, kind)]


def test_the_final_is_ready_when_the_silence_window_closes(say):
    question = say("What is the capital of France?")
    events = run(Scripted(["What is the capital of France?"]), silence(500) + question + silence(1500))
    [guess], [ended], [final] = of(events, Guess), of(events, Ended), of(events, Final)
    assert final.text == guess.text == "What is the capital of France?" and final.guess == guess.rev
    at = {type(e): t for t, e in events}
    assert at[Guess] < at[Ended] <= at[Final] < at[Ended] + 0.05  # decoded during the window
    assert final.decode_s == 0.0
    assert ended.silence_ms == 300  # a complete question: the short window


def test_complete_looking_words_the_recognizer_doubts_get_the_base_window(say):
    # whisper's reading of a cut-off "What is the capital of": a whole question, said with less confidence
    pcm = silence(500) + say("What is the capital of") + silence(1500)
    [ended] = of(run(Scripted(["What is the capital?"], confidence=0.4), pcm), Ended)
    assert ended.silence_ms == 500
    [ended] = of(run(Scripted(["What is the capital?"], confidence=0.4), pcm, complete_confidence=0.0), Ended)
    assert ended.silence_ms == 300  # the check turned off


def test_a_decode_slower_than_the_window_finishes_after_it(say):
    question = say("What is the capital of France?")
    events = run(Scripted(["Hello there"], decode_s=0.8), silence(500) + question + silence(2000), base_ms=400,
                 adaptive=False)
    [final] = of(events, Final)
    at = {type(e): t for t, e in events}
    assert 0.2 < at[Final] - at[Ended] < 0.9
    assert final.guess >= 1 and not of(events, Guess)  # it ended before the guess was ready: no guess went out


def test_speech_resuming_after_a_pause_revokes_the_guess(say):
    pcm = silence(500) + say("Set a timer for") + silence(700) + say("ten minutes.") + silence(1500)
    recognizer = Scripted(["Set a timer for", "Set a timer for ten minutes."])
    events = run(recognizer, pcm)
    names = [type(e).__name__ for _, e in events if not isinstance(e, SpeechStarted)]
    assert names.count("Ended") == 1, names  # one utterance: the pause did not end it
    guesses, [revoked], [final] = of(events, Guess), of(events, Revoked), of(events, Final)
    assert guesses[0].text == "Set a timer for" and revoked.rev == guesses[0].rev
    assert final.text == "Set a timer for ten minutes." and final.guess > revoked.rev


def test_a_guess_holds_the_turn_open_until_its_answer_is_ready(say):
    pcm = silence(500) + say("What is the capital of France?") + silence(2500)
    events = run(Scripted(["What is the capital of France?"]), pcm, hold_ms=1400, ready_after_s=0.6)
    [guess], [ended], [final] = of(events, Guess), of(events, Ended), of(events, Final)
    at = {type(e): t for t, e in events}
    assert 0.55 < at[Ended] - at[Guess] < 0.8  # not at the words' 300 ms window: when the answer was ready
    assert final.guess == guess.rev and not ended.held_in_vain
    assert ended.silence_ms == 300  # the words' window is back once the answer is ready


def test_an_answer_ready_at_once_ends_the_turn_at_the_words_window(say):
    pcm = silence(500) + say("What is the capital of France?") + silence(2000)
    held = run(Scripted(["What is the capital of France?"]), pcm, hold_ms=1400, ready_after_s=0.0)
    plain = run(Scripted(["What is the capital of France?"]), pcm)
    [held_end], [plain_end] = of(held, Ended), of(plain, Ended)
    waited = {name: {type(e): t for t, e in events}[Ended] - end.offset_ms / 1000
              for name, events, end in (("held", held, held_end), ("plain", plain, plain_end))}
    assert waited["held"] < waited["plain"] + 0.1, waited  # the hold never adds to the words' own window
    assert waited["held"] >= 0.3 - 0.05 and not held_end.held_in_vain
    # Ready before the chat model had weighed the words (the guess goes out first): not held for either.
    slow_judge = lambda text: time.sleep(0.3) or -5.0  # noqa: E731
    held = run(Scripted(["What is the capital of France?"]), pcm, hold_ms=1400, ready_after_s=0.0,
               message_end=slow_judge)
    [held_end] = of(held, Ended)
    waited_for_the_model = {type(e): t for t, e in held}[Ended] - held_end.offset_ms / 1000
    assert waited_for_the_model < waited["plain"] + 0.4 and not held_end.held_in_vain, waited_for_the_model


def test_an_answer_that_never_comes_is_waited_for_up_to_hold_ms(say):
    pcm = silence(500) + say("What is the capital of France?") + silence(2500)
    events = run(Scripted(["What is the capital of France?"]), pcm, hold_ms=1000)
    [ended] = of(events, Ended)
    at = {type(e): t for t, e in events}
    assert 0.85 < at[Ended] - ended.offset_ms / 1000 < 1.25 and ended.held_in_vain  # (the VAD ends a window 90 % silent)
    # words nobody will answer (a stop phrase, no speaker) are not held for
    events = run(Scripted(["Goodbye."]), silence(500) + say("Goodbye.") + silence(2000), hold_ms=1000,
                 answered=lambda text: text != "Goodbye.")
    [ended] = of(events, Ended)
    assert not ended.held_in_vain and {type(e): t for t, e in events}[Ended] - ended.offset_ms / 1000 < 0.8


def test_going_on_while_the_answer_is_prepared_revokes_the_guess_instead_of_cutting_in(say):
    pcm = silence(500) + say("What is the capital of France?") + silence(700) + say("And of Spain?") + silence(2500)
    words = ["What is the capital of France?", "What is the capital of France? And of Spain?"]
    held = run(Scripted(words), pcm, hold_ms=1400, ready_after_s=0.9)
    assert len(of(held, Ended)) == 1 and len(of(held, Revoked)) == 1
    assert of(held, Final)[0].text == words[1]
    # with the words' window alone, the 700 ms pause after a whole question ended the turn
    assert len(of(run(Scripted(words), pcm), Ended)) == 2


def test_hold_ms_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError, match="hold_ms"):
        Hearing(Scripted([""]), Endpointer(), lambda e: None, hold_ms=-1)
    with pytest.raises(ConfigError, match="rejoin_ms"):
        Hearing(Scripted([""]), Endpointer(), lambda e: None, rejoin_ms=-1)


@pytest.mark.parametrize("rejoin_ms", [1500, 0])
def test_speech_soon_after_a_turn_ended_is_transcribed_with_it(say, rejoin_ms):
    first, second = say("What is the capital"), say("of Peru?")
    pcm = silence(500) + first + silence(900) + second + silence(1500)
    # The first half reads as a whole question: its 300 ms window ends the turn inside the 900 ms pause.
    recognizer = Scripted(["What is the capital?", "What is the capital of Peru?"])
    events = run(recognizer, pcm, rejoin_ms=rejoin_ms)
    starts, ends, finals = of(events, SpeechStarted), of(events, Ended), of(events, Final)
    assert len(starts) == len(ends) == len(finals) == 2 and starts[0].rejoins == 0
    if rejoin_ms:
        assert starts[1].rejoins == starts[0].utterance
        # Each decode of the second utterance reads the first one's audio (and the pause) in front of its own.
        assert recognizer.calls[-1] >= len(first) + len(second) + 32 * 300, recognizer.calls
    else:
        assert starts[1].rejoins == 0 and recognizer.calls[-1] < len(first), recognizer.calls
    assert finals[1].text == "What is the capital of Peru?"  # (the stand-in says what it is told)


def test_a_rejoining_final_is_read_alone_too_when_its_words_ask_for_it(say):
    pcm = silence(500) + say("What is the capital of France?") + silence(900) + say("Stop.") + silence(1500)
    words = ["What is the capital of France?", "What is the capital of France? Stop.", "Stop."]
    recognizer = Scripted(words)
    asked: list[str] = []
    events = run(recognizer, pcm, rejoin_ms=1500, read_alone=lambda text: asked.append(text) or "Stop" in text)
    starts, finals = of(events, SpeechStarted), of(events, Final)
    assert starts[1].rejoins == starts[0].utterance and asked == [words[1]]  # asked of rejoining finals only
    assert finals[0].alone is None and (finals[1].text, finals[1].alone) == (words[1], "Stop.")
    assert recognizer.calls[-1] < recognizer.calls[-2] - 32 * 1000  # the last decode: the new audio alone
    # words it does not pick are not read again
    recognizer = Scripted(words)
    finals = of(run(recognizer, pcm, rejoin_ms=1500, read_alone=lambda text: False), Final)
    assert finals[1].alone is None and len(recognizer.calls) == 2


def test_a_turn_that_is_over_is_not_rejoined(say):
    pcm = silence(500) + say("What is the capital") + silence(900) + say("of Peru?") + silence(1500)
    asked: list[int] = []
    starts = of(run(Scripted(["What is the capital?", "Of Peru?"]), pcm, rejoin_ms=1500,
                    rejoinable=lambda number: asked.append(number) or False), SpeechStarted)
    assert starts[1].rejoins == 0 and asked == [starts[0].utterance]


def test_a_rejoining_utterance_too_long_for_whisper_gives_up_the_front_of_what_it_took_over():
    from voicebus.workers.hearing import MAX_DECODE_BYTES, _Utterance

    before, own = b"a" * (10 * 32000), b"b" * (25 * 32000)
    utterance = _Utterance(2, 0, audio=bytearray(before + own), own_from=len(before))
    audio = utterance.decode_audio()
    assert len(audio) == MAX_DECODE_BYTES and audio.endswith(own)
    utterance.own_from = 0  # its own audio is never cut (whisper reads its first 30 s, as before)
    assert utterance.decode_audio() == before + own


def test_speech_after_rejoin_ms_is_a_request_of_its_own(say):
    pcm = silence(500) + say("What is the capital") + silence(900) + say("of Peru?") + silence(1500)
    recognizer = Scripted(["What is the capital?", "Of Peru?"])
    starts = of(run(recognizer, pcm, rejoin_ms=400), SpeechStarted)
    assert len(starts) == 2 and starts[1].rejoins == 0
    # nor does speech go on from an utterance in which nothing was heard (a cough, a door)
    recognizer = Scripted(["", "Of Peru?"])
    events = run(recognizer, pcm, rejoin_ms=1500)
    starts, [no_match] = of(events, SpeechStarted), of(events, NoMatch)
    assert len(starts) == 2 and no_match.utterance == starts[0].utterance and starts[1].rejoins == 0


def test_words_that_end_mid_phrase_lengthen_the_window(say):
    pcm = silence(500) + say("What is the capital of") + silence(1000) + say("Peru?") + silence(1500)
    fixed = run(Scripted(["What is the capital of", "Peru?"]), pcm, base_ms=500, adaptive=False)
    adaptive = run(Scripted(["What is the capital of", "What is the capital of Peru?"]), pcm, base_ms=500)
    assert len(of(fixed, Ended)) == 2  # a fixed 500 ms window cuts the person off
    assert len(of(adaptive, Ended)) == 1 and of(adaptive, Final)[0].text == "What is the capital of Peru?"


def test_words_a_message_seldom_ends_with_get_the_long_window(say, message_end):
    """whisper reads a cut-off "What is the capital of" as "What is the capital?", confidently: the words'
    rules call it complete, the chat model finds a message seldom ends there."""
    pcm = silence(500) + say("What is the capital of") + silence(1000) + say("Peru?") + silence(1500)
    asked = []

    def judge(text: str) -> float:
        asked.append(text)
        return message_end.logprob(text)

    words = ["What is the capital?", "What is the capital of Peru?"]
    alone = run(Scripted(words), pcm, base_ms=500)
    weighed = run(Scripted(words), pcm, base_ms=500, message_end=judge)
    assert len(of(alone, Ended)) == 2  # cut off
    assert len(of(weighed, Ended)) == 1 and of(weighed, Final)[0].text == "What is the capital of Peru?"
    assert asked == ["What is the capital?", "What is the capital of Peru?"]
    assert [g.text for g in of(weighed, Guess)] == words  # the guess went out all the same
    # A whole question keeps the short window.
    [ended] = of(run(Scripted(["What is the capital of France?"]), silence(500) + say("What is the capital of France?")
                     + silence(1500), message_end=judge), Ended)
    assert ended.silence_ms == 300


def test_a_failing_chat_model_costs_the_check_not_the_transcripts(say, capfd):
    def broken(text: str) -> float:
        raise RuntimeError("llama_decode returned -1")

    question = silence(500) + say("What is the capital of France?") + silence(1500)
    events = run(Scripted(["What is the capital of France?"] * 2), question + question, message_end=broken)
    assert [f.text for f in of(events, Final)] == ["What is the capital of France?"] * 2
    assert [e.silence_ms for e in of(events, Ended)] == [300, 300]  # the words alone decided
    err = capfd.readouterr().err
    assert err.count("the chat model failed, the words alone decide") == 1 and "llama_decode returned -1" in err


class FailingAt(Scripted):
    """``Scripted``, but its decodes numbered in ``failing`` (1 = the first) raise ``error``."""

    def __init__(self, words: list[str], failing: set[int], error: Exception) -> None:
        super().__init__(words)
        self.failing, self.error = failing, error

    def transcribe(self, pcm: bytes) -> Transcript:
        result = super().transcribe(pcm)
        if len(self.calls) in self.failing:
            raise self.error
        return result


@pytest.mark.parametrize("error", [BackendError("whisper failed to transcribe: out of memory"),
                                   RuntimeError("CTranslate2 says no")], ids=["backend-error", "any-exception"])
@pytest.mark.parametrize("realtime", [True, False], ids=["failed-before-the-end", "failed-after-the-end"])
def test_a_failed_decode_at_a_pause_is_decoded_again_at_the_end(say, error, realtime):
    """Found in review: the pause's decode failed, the end took it for still running, and the utterance
    never got a final or a no-match (with --fast the run then waited for it for ever); an exception other
    than the recognizer's own ended the decode thread, and every transcript after it. (Fed faster than
    real time, the end comes while the pause's decode runs, as with --fast.)"""
    question = silence(500) + say("What is the capital of France?") + silence(1500)
    recognizer = FailingAt(["", "What is the capital of France?"], {1}, error)
    events = run(recognizer, question + question, realtime=realtime)
    assert 1 not in [g.utterance for g in of(events, Guess)] and not of(events, NoMatch)  # none of a failure
    assert [f.text for f in of(events, Final)] == ["What is the capital of France?"] * 2  # the thread lives on
    assert len(recognizer.calls) == 3  # the first utterance twice: at its pause, again at its end


def test_a_retried_decode_keeps_its_final_ahead_of_the_next_utterances(say):
    """Found in review: the retry of a failed pause decode was queued behind the next utterance's decode, so
    the next utterance's final came first (and the thinker's history with it)."""

    class SlowFirst(FailingAt):
        def transcribe(self, pcm: bytes) -> Transcript:
            if not self.calls:
                time.sleep(1.0)  # fed faster than real time (as --fast): both utterances end meanwhile
            return super().transcribe(pcm)

    pcm = silence(500) + say("Tell me a joke.") + silence(1600) + say("Hello there.") + silence(2000)
    recognizer = SlowFirst(["", "Tell me a joke.", "Hello there.", "Hello there."], {1}, RuntimeError("no"))
    events = run(recognizer, pcm, realtime=False)
    finals = [e for e in (e for _, e in events) if isinstance(e, (Final, NoMatch))]
    assert [f.utterance for f in finals] == [1, 2], finals
    assert finals[0].text == "Tell me a joke.", finals


def test_a_decode_that_fails_again_at_the_end_is_a_no_match_that_says_why(say):
    question = silence(500) + say("What is the capital of France?") + silence(1500)
    events = run(FailingAt(["What is the capital of France?"], {1, 2}, RuntimeError("CTranslate2 says no")), question)
    [no_match] = of(events, NoMatch)
    assert not of(events, Final) and isinstance(no_match.error, BackendError)
    assert "speech recognition failed: RuntimeError: CTranslate2 says no" in no_match.reason


def test_the_end_of_speech_is_where_the_silence_began_however_long_the_wait(say):
    question = say("What is the capital of France?")
    events = run(Scripted(["What is the capital of France?"], decode_s=0.9), silence(500) + question + silence(2500))
    [start], [ended] = of(events, SpeechStarted), of(events, Ended)
    samples = np.frombuffer(question, dtype="<i2")
    true_end_ms = 500 + (np.nonzero(np.abs(samples) > 327)[0][-1] + 1) * 1000 // RATE  # last sound above -40 dBFS
    assert abs(ended.offset_ms - true_end_ms) <= 120, (ended, true_end_ms)  # not where the short window began
    assert ended.speech_ms == ended.offset_ms - start.offset_ms


def test_a_slow_recognizer_does_not_cut_a_hesitation_short(say):
    """On a busy machine the words of a pause can take longer than the base window: the turn waits for them."""
    pcm = silence(500) + say("Set a timer for") + silence(800) + say("ten minutes.") + silence(2500)
    recognizer = Scripted(["Set a timer for", "Set a timer for ten minutes."], decode_s=0.9)
    events = run(recognizer, pcm, base_ms=500)
    assert len(of(events, Ended)) == 1 and of(events, Final)[0].text == "Set a timer for ten minutes."


def test_nothing_recognized_is_a_no_match(say):
    # Speech the recognizer makes nothing of. (A lone "Hmm." is too short for the VAD on some of piper's
    # renderings, which vary from call to call: then there is no utterance at all.)
    events = run(Scripted([""]), silence(300) + say("Hmm, well, let me see.") + silence(1500), realtime=False)
    assert [type(e) for e in of(events, NoMatch)] == [NoMatch] and not of(events, Final)


def test_an_ignored_utterance_gives_no_transcript(say):
    events: list = []
    hearing = Hearing(Scripted(["words"]), Endpointer(), events.append)
    pcm = silence(300) + say("Some words the assistant itself said.") + silence(1500)
    for i in range(0, len(pcm) - FRAME_BYTES + 1, FRAME_BYTES):
        hearing.feed(pcm[i : i + FRAME_BYTES])
        if any(isinstance(e, SpeechStarted) for e in events) and not hearing._ignoring:
            hearing.ignore_current()
    hearing.drain()
    hearing.close()
    assert not [e for e in events if isinstance(e, (Final, NoMatch, Ended, Guess))]


def test_completeness_of_what_was_said():
    assert completeness("What is the capital of France?") == "complete"
    assert completeness("Turn off the lights.") == "complete"
    for text in ("Set a timer for", "What is the capital of.", "Remind me to call my", "Twenty", "and then,",
                 "I want to...", "Add eggs and", "Set a timer for 20.", "What is 300?"):
        assert completeness(text) == "incomplete", text
    assert completeness("What is 2 plus 24?") == completeness("Wake me at 7.") == "complete"  # digits that end it
    assert completeness("") == completeness("Hello") == "unknown"
    # a question's last auxiliary ends it only after one was put before the subject; "please" ends a request
    for text in ("How many legs does a spider have?", "Do you know where it is?", "Play some music please."):
        assert completeness(text) == "complete", text
    for text in ("How many legs does?", "How many legs does.", "What is?", "Please.", "Could you please"):
        assert completeness(text) == "incomplete", text
    windows = EndOfTurn(base_ms=500, complete_ms=300, incomplete_ms=1400)
    assert windows.window_ms("Where is Peru?") == 300
    assert windows.window_ms("Where is the") == 1400 and windows.window_ms(None) == 500
    assert EndOfTurn(adaptive=False).window_ms("Where is the") == 500
    assert windows.window_ms("Where is Peru?", 0.9) == 300 and windows.window_ms("Where is Peru?", 0.5) == 500
    assert windows.window_ms("Where is the", 0.2) == 1400  # doubt never shortens a window
    # The chat model's view (the log-probability that a message ends there) weighs words that read complete.
    assert windows.window_ms("Where is Peru?", 0.9, end_logprob=-25.0) == 1400
    assert windows.window_ms("Where is Peru?", 0.9, end_logprob=-5.0) == 300
    assert windows.asks_the_model("Where is Peru?") and not windows.asks_the_model("Where is the")
    assert not windows.asks_the_model("Hello") and not windows.asks_the_model("")
    assert not EndOfTurn(message_end_below=None).asks_the_model("Where is Peru?")
    assert not EndOfTurn(adaptive=False).asks_the_model("Where is Peru?")
    with pytest.raises(ConfigError, match="complete_confidence"):
        EndOfTurn(complete_confidence=1.5)
    with pytest.raises(ConfigError, match=r"vad.message_end_below is a natural log, below 0 .* got 0.01"):
        EndOfTurn(message_end_below=0.01)  # a probability, where a log is wanted
