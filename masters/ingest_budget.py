"""How fast one server's agent may fill this master's audit table.

A stolen or runaway agent key could otherwise store events as fast as the master can write them
(an attack session stored 115,000 events, 77 MB, in 8 s). Each host has two token buckets, events
and bytes, refilled at `ingest_events_per_second` / `ingest_bytes_per_second` up to their bursts
(a backlog after an outage ships at once). A batch is taken up to what the buckets hold; the rest is
not acknowledged, so it waits in the agent's own bounded queue, and the reply says when to come back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ombot.config import Limits

MAX_RETRY_AFTER = 30.0


@dataclass
class _Buckets:
    events: float
    bytes: float
    updated: float


class IngestBudget:
    """Per-host event and byte buckets (in memory: a restart refills them, at most one burst more)."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits, self.clock = limits, clock
        self._hosts: dict[str, _Buckets] = {}
        self._lock = threading.Lock()

    def take(self, host: str, sizes: Sequence[int]) -> tuple[int, float]:
        """How many of these events (their sizes in bytes, in order) may be stored now, and, when not
        all, the seconds after which the rest may come."""
        limits = self.limits
        with self._lock:
            now = self.clock()
            b = self._hosts.get(host) or _Buckets(limits.ingest_burst_events, limits.ingest_burst_bytes, now)
            elapsed = now - b.updated
            b.events = min(limits.ingest_burst_events, b.events + elapsed * limits.ingest_events_per_second)
            b.bytes = min(limits.ingest_burst_bytes, b.bytes + elapsed * limits.ingest_bytes_per_second)
            b.updated = now
            self._hosts[host] = b
            taken = 0
            for size in sizes:
                if b.events < 1 or b.bytes < size:
                    break
                b.events -= 1
                b.bytes -= size
                taken += 1
            if taken == len(sizes):
                return taken, 0.0
            rest = sizes[taken:]
            wait = max((1 - b.events) / limits.ingest_events_per_second, (rest[0] - b.bytes) / limits.ingest_bytes_per_second)
            return taken, min(MAX_RETRY_AFTER, max(0.5, wait))

    def forget(self, host: str) -> None:
        """A revoked host's buckets go."""
        with self._lock:
            self._hosts.pop(host, None)
