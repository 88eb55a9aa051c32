"""At-least-once delivery of user utterances over PUB/SUB.

PUB/SUB keeps nothing for a subscriber that is down, so a sender repeats an
utterance (same turn id) until the thinker acknowledges it — ``llm.accepted``,
or any answer message of that turn. The thinker answers each turn once, so
repeats are harmless; an utterance said while the thinker restarts is
answered when it is back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from voicebus.engine.messages import Body

ACK_KINDS = ("llm.accepted", "llm.token", "llm.sentence", "llm.done", "llm.error")


@dataclass
class Redelivery:
    interval_s: float = 1.0
    give_up_s: float = 300.0
    _pending: dict[int, tuple[Body, float, float]] = field(default_factory=dict)

    def sent(self, turn: int, body: Body, now: float) -> None:
        self._pending[turn] = (body, now, now)

    def ack(self, turn: int) -> None:
        self._pending.pop(turn, None)

    def due(self, now: float) -> list[tuple[int, Body]]:
        """Utterances to send again now (and forget those too old to matter)."""
        out = []
        for turn, (body, first, last) in list(self._pending.items()):
            if now - first > self.give_up_s:
                del self._pending[turn]
            elif now - last >= self.interval_s:
                self._pending[turn] = (body, first, now)
                out.append((turn, body))
        return out

    def __contains__(self, turn: int) -> bool:
        return turn in self._pending
