"""A token bucket: the pacing the Slack alert workers and a master's refusal of strangers' binds share."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up. Not thread-safe: one per channel worker."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens = float(burst)
        self.updated = clock()

    def take(self) -> float:
        """0 when a token was taken now; else the seconds until one is there (nothing taken)."""
        now = self.clock()
        self.tokens = min(float(self.burst), self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate

    def finished(self) -> None:
        """The message taken for went out just now: the time it spent on its way (a 429's Retry-After)
        saves up nothing, so what waited behind it does not follow in one rush."""
        self.updated = self.clock()
