"""When to restart a worker that exited, and when to give up on it.

One-for-one, OTP style: exponential backoff between restarts, and a restart
intensity (at most ``max_restarts`` in ``window_s``) beyond which the worker is
given up. A worker that ran cleanly for ``stable_after_s`` starts its backoff
afresh, so one crash after hours of service is retried quickly — but the
intensity window still counts it, which avoids supervisord's trap of
unlimited restarts once a process has been up for a while.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class RestartPolicy:
    initial_s: float = 0.2
    max_s: float = 5.0
    max_restarts: int = 5
    window_s: float = 60.0
    stable_after_s: float = 30.0
    _restarts: deque[float] = field(default_factory=deque)
    _consecutive: int = 0

    def on_exit(self, now: float, uptime_s: float) -> float | None:
        """The delay before restarting, or None to give up."""
        while self._restarts and now - self._restarts[0] > self.window_s:
            self._restarts.popleft()
        if len(self._restarts) >= self.max_restarts:
            return None
        if uptime_s >= self.stable_after_s:
            self._consecutive = 0
        delay = min(self.max_s, self.initial_s * (2**self._consecutive))
        self._consecutive += 1
        self._restarts.append(now)
        return delay

    @property
    def restarts(self) -> int:
        """Restarts within the current window."""
        return len(self._restarts)
