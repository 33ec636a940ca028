"""A job this master is running, in memory, and its end.

`LiveJob` is where the job's events are announced (a condition), its long-polls wait and its cancel
is signalled; `finish` records its end (the final state its hosts' results make, `final_state`,
with the "finished" event) and announces it. masters.runner drives both; everything durable goes
through the `JobStore`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ombot import context
from ombot.masters import metrics
from ombot.masters.backends.base import HostResult, HostStatus
from ombot.masters.jobspec import JobSpec
from ombot.masters.jobstore import Busy, Event, JobStore
from ombot.masters.states import JobState

log = logging.getLogger("ombot.master")

COALESCE_SECONDS = 0.01  # once events exist, wait this long for more so a quick job ends in one reply
NO_RESULT = "the backend reported no result"


@dataclass
class LiveJob:
    """A job this process is running: where its events are announced and its cancel is signalled."""

    id: str
    sender: str
    host_count: int
    next_seq: int
    requester: str = ""
    rid: str = ""  # the request id the client gave (ombot.context): on every line of the job
    spec: JobSpec | None = None
    state: JobState = JobState.QUEUED
    wait_started: float = 0.0  # monotonic; when it began waiting for its hosts
    waited: float = 0.0  # seconds it waited for its hosts: taken from its timeout
    blocked: Busy | None = None  # what its last "waiting" event said
    stop_reason: str | None = None  # why the master itself stopped it (its host locks' lease): the end's reason
    finished: bool = False  # set once the final state and "finished" event are committed
    cancelled: threading.Event = field(default_factory=threading.Event)
    changed: threading.Condition = field(default_factory=lambda: threading.Condition(threading.RLock()))
    results: list[HostResult] = field(default_factory=list)
    held: HostResult | None = None  # the last host's result, written together with the final state

    def ids(self, host: str = "") -> dict[str, str]:
        return {"rid": self.rid, "job": self.id, "user": self.requester, "host": host}

    def await_events(self, after: int, wait: float) -> None:
        """Long-poll: until an event after `after` exists (or `wait` passes), then briefly for the rest
        of a burst, so a quick job comes back whole in one reply instead of one event per round trip."""
        deadline = time.monotonic() + wait
        with self.changed:
            if not self.changed.wait_for(lambda: self.next_seq > after + 1, timeout=wait):
                return
            self.changed.wait_for(lambda: self.finished,
                                  timeout=max(0.0, min(COALESCE_SECONDS, deadline - time.monotonic())))

    def await_finished(self, wait: float) -> None:
        with self.changed:
            self.changed.wait_for(lambda: self.finished, timeout=wait)


def finish(jobs: JobStore, live: LiveJob, hosts: list[str], started: float, forget: Callable[[LiveJob], None],
           unreported: HostResult | None = None, reason: str | None = None) -> None:
    """Record the final state; hosts without a result get `unreported`'s status and error. `forget`
    drops the job from the runner's live jobs once its end is visible."""
    unreported = unreported or HostResult("", HostStatus.FAILED, error=NO_RESULT)
    done = {r.host for r in live.results}
    # A backend bug must not leave a host unreported.
    missing = [HostResult(h, unreported.status, error=unreported.error) for h in hosts if h not in done]
    live.results.extend(missing)
    state = final_state([r.status for r in live.results], live.cancelled.is_set())
    counts: dict[str, int] = {}
    for r in live.results:
        counts[str(r.status)] = counts.get(str(r.status), 0) + 1
    last = ([live.held] if live.held else []) + missing
    events: list[Event] = [("host", r.as_dict()) for r in last]
    reason = reason or live.stop_reason
    ran = live.state is JobState.RUNNING  # a job that never got its hosts has no run to time
    finished: dict[str, Any] = {"state": state, "counts": counts, "duration": round(time.time() - started, 3)}
    events.append(("finished", finished | ({"reason": reason} if reason else {})))
    with live.changed:  # final state and "finished" event become visible together
        written = jobs.finish(live.id, state, live.next_seq, events)
        if not written:  # another master ended it when its lease lapsed: that end stands
            state = JobState(jobs.stored(live.id).state)
        live.next_seq += written
        live.state, live.finished = state, True
        live.changed.notify_all()
    forget(live)
    if live.spec is not None:
        metrics.job_ended(live.spec.module.name, state, time.time() - started if ran else None,
                          [str(r.status) for r in live.results])
    with context.scope(**live.ids()):  # the state that stands, after the hosts this master saw
        log.info("job finished: %s (%s) in %.1f s%s", state, ", ".join(f"{n} {status}" for status, n in counts.items()),
                 finished["duration"], f": {reason}" * bool(reason))


def final_state(statuses: list[HostStatus], cancelled: bool) -> JobState:
    """A job's state from its hosts' statuses, and whether a cancel was requested."""
    if any(s is HostStatus.UNKNOWN for s in statuses):  # what one host did is not known: never retry blindly
        return JobState.UNKNOWN
    if cancelled and any(s is HostStatus.CANCELLED for s in statuses):
        return JobState.CANCELLED
    if statuses and all(s is HostStatus.OK for s in statuses):
        return JobState.OK
    if any(s is HostStatus.TIMED_OUT for s in statuses) and not any(s is HostStatus.OK for s in statuses):
        return JobState.TIMED_OUT
    if any(s is HostStatus.OK for s in statuses):
        return JobState.PARTIAL
    return JobState.FAILED
