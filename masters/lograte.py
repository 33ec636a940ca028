"""Log lines that an unauthenticated peer can cause, under a budget: a flood of strangers must not
fill the disk or bury the lines that matter. Lines from authenticated peers never come through here."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

MAX_ARGUMENT_CHARS = 200  # a stranger's text in a line (a type name, a reason) is cut to this


class LogBudget:
    """A token bucket for log lines: up to `burst` at once, then `per_second` on average. Lines over
    budget are counted, and the count is said with the next line that gets through (or by flush())."""

    def __init__(self, logger: logging.Logger, burst: int = 10, per_second: float = 0.2,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.burst, self.per_second, self.clock = logger, burst, per_second, clock
        self._tokens = float(burst)
        self._last = clock()
        self._suppressed = 0
        self._lock = threading.Lock()

    def warning(self, message: str, *args: object) -> None:
        self.log(logging.WARNING, message, *args)

    def info(self, message: str, *args: object) -> None:
        self.log(logging.INFO, message, *args)

    def log(self, level: int, message: str, *args: object) -> None:
        if not self.logger.isEnabledFor(level):
            return
        suppressed = self._take()
        if suppressed is None:
            return
        text = message % tuple(_short(a) for a in args)
        if suppressed:
            text += f" (suppressed {suppressed} similar lines before this one)"
        self.logger.log(level, "%s", text)

    def flush(self) -> None:
        """Say how many lines were suppressed, if any were and the budget allows a line now."""
        with self._lock:
            if not self._suppressed or not self._refill_and_take():
                return
            suppressed, self._suppressed = self._suppressed, 0
        self.logger.warning("suppressed %d lines about unauthenticated peers", suppressed)

    def _take(self) -> int | None:
        """None if this line is over budget (and counted), else how many were suppressed before it."""
        with self._lock:
            if not self._refill_and_take():
                self._suppressed += 1
                return None
            suppressed, self._suppressed = self._suppressed, 0
            return suppressed

    def _refill_and_take(self) -> bool:
        now = self.clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.per_second)
        self._last = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


def _short(value: object) -> object:
    if isinstance(value, (int, float)):
        return value
    text = str(value)
    return text if len(text) <= MAX_ARGUMENT_CHARS else text[:MAX_ARGUMENT_CHARS] + "..."
