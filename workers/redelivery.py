"""At-least-once delivery of user utterances over PUB/SUB, from the asker's side.

PUB/SUB keeps nothing for a subscriber that is down, and a bus that dies takes
the messages in flight with it. So the asker (the listener, ``voicebus ask``)
keeps each utterance until its turn is *finished*, and offers it again (same
turn id) when it has reason to think something was lost:

    offered  ──llm.accepted──▶  accepted  ──finished──▶  (forgotten)
      │ no acceptance for interval_s      │ nothing heard of the turn for quiet_s
      └──▶ offer again                    └──▶ offer again

The thinker answers a repeat by acknowledging again (the turn is queued or
being answered) or by sending the stored answer again (it is done), so a repeat
is always harmless; what counts as *finished* is the asker's business (the
text asker: ``llm.done``; the listener: the answer was played).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from voicebus.engine.messages import Body

ANSWER_KINDS = ("llm.accepted", "llm.token", "llm.sentence", "llm.done", "llm.error")
"""Messages from the thinker about a turn: each shows the turn is alive."""


@dataclass
class _Pending:
    body: Body
    first: float
    sent: float
    heard: float
    accepted: bool = False


@dataclass
class Redelivery:
    interval_s: float = 1.0
    """offer again this often until the thinker accepts"""
    quiet_s: float = 5.0
    """once accepted, offer again after this long without any news of the turn"""
    give_up_s: float = 300.0
    _pending: dict[int, _Pending] = field(default_factory=dict)

    def sent(self, turn: int, body: Body, now: float) -> None:
        self._pending[turn] = _Pending(body, now, now, now)

    def heard(self, turn: int, kind: str, now: float) -> None:
        """News of ``turn`` (any llm.* or play.* message); ``llm.accepted`` ends the fast repeats."""
        pending = self._pending.get(turn)
        if pending is not None:
            pending.heard = now
            pending.accepted |= kind == "llm.accepted"

    def finished(self, turn: int) -> None:
        self._pending.pop(turn, None)

    def due(self, now: float) -> list[tuple[int, Body]]:
        """Utterances to offer again now (and forget those too old to matter)."""
        out = []
        for turn, p in list(self._pending.items()):
            if now - p.first > self.give_up_s:
                del self._pending[turn]
                continue
            wait = self.quiet_s if p.accepted else self.interval_s
            if now - max(p.sent, p.heard) >= wait:
                p.sent = now
                out.append((turn, p.body))
        return out

    def quiet_for(self, now: float) -> float:
        """How long the liveliest pending turn has gone without news (0 when none is pending)."""
        return min((now - max(p.heard, p.first) for p in self._pending.values()), default=0.0)

    def pending(self) -> dict[int, Body]:
        return {turn: p.body for turn, p in self._pending.items()}

    def __contains__(self, turn: int) -> bool:
        return turn in self._pending

    def __len__(self) -> int:
        return len(self._pending)
