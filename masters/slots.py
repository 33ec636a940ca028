"""A master's job slots, shared fairly: one requester never holds them all.

At most `max_jobs` jobs run at once, and at most `per_requester` of them for any one requester.
A job past either limit waits (without a thread) in its requester's queue; when a slot frees up,
requesters take turns, so a burst from one person cannot make everyone else wait behind it.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("ombot.master")


class JobSlots:
    """The master's job threads, shared fairly between requesters (see the module docstring)."""

    def __init__(self, max_jobs: int, per_requester: int) -> None:
        self.max_jobs, self.per_requester = max_jobs, min(per_requester, max_jobs)
        self._pool = ThreadPoolExecutor(max_workers=max_jobs, thread_name_prefix="job")
        self._lock = threading.Lock()
        self._waiting: OrderedDict[str, deque[Callable[[], None]]] = OrderedDict()  # in turn order
        self._running: dict[str, int] = {}
        self._closed = False

    def submit(self, requester: str, work: Callable[[], None]) -> None:
        with self._lock:
            self._waiting.setdefault(requester, deque()).append(work)
            self._start_what_fits()

    def counts(self) -> tuple[int, int]:
        """(running, waiting) jobs."""
        with self._lock:
            return sum(self._running.values()), sum(len(q) for q in self._waiting.values())

    def _start_what_fits(self) -> None:
        """Under the lock: start waiting jobs, requesters in turn, while slots and shares allow."""
        while not self._closed and sum(self._running.values()) < self.max_jobs:
            requester = next((r for r in self._waiting if self._running.get(r, 0) < self.per_requester), None)
            if requester is None:
                return
            queue = self._waiting.pop(requester)
            work = queue.popleft()
            if queue:  # back of the line: the others take their turn first
                self._waiting[requester] = queue
            self._running[requester] = self._running.get(requester, 0) + 1
            self._pool.submit(self._run, requester, work)

    def _run(self, requester: str, work: Callable[[], None]) -> None:
        try:
            work()
        except Exception:
            log.exception("a job of %s failed outside its own error handling", requester)
        finally:
            with self._lock:
                self._running[requester] -= 1
                if not self._running[requester]:
                    del self._running[requester]
                self._start_what_fits()

    def close(self) -> None:
        """Start nothing more; wait for the running jobs."""
        with self._lock:
            self._closed = True
            self._waiting.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)
