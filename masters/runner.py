"""The life of a job once the master has recorded it: run it through the backend within the job
slots, report each host, finish it, cancel it, let clients long-poll it, and close the jobs a
previous run of this master left behind.

While a job runs, its `LiveJob` is where events are announced (a condition) and its cancel is
signalled; everything durable goes through the `JobStore`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from masters.backends.base import Backend, HostResult, HostStatus, RunContext
from masters.envelope import Request
from masters.inventory import Inventory
from masters.jobspec import JobSpec
from masters.jobstore import Event, JobStore
from masters.slots import JobSlots
from masters.states import FINAL_STATES, JobState
from ombot.config import MasterSettings

log = logging.getLogger("ombot.master")

MAX_WAIT_SECONDS = 20.0  # below rpyc's 30 s sync timeout
MAX_SUBMIT_WAIT_SECONDS = 2.0
COALESCE_SECONDS = 0.01  # once events exist, wait this long for more so a quick job ends in one reply
INTERRUPTED = "the master stopped while the job ran; hosts may or may not have finished"


@dataclass
class LiveJob:
    """A job this process is running: where its events are announced and its cancel is signalled."""

    id: str
    sender: str
    host_count: int
    next_seq: int
    state: JobState = JobState.QUEUED
    finished: bool = False  # set once the final state and "finished" event are committed
    cancelled: threading.Event = field(default_factory=threading.Event)
    changed: threading.Condition = field(default_factory=lambda: threading.Condition(threading.RLock()))
    results: list[HostResult] = field(default_factory=list)
    held: HostResult | None = None  # the last host's result, written together with the final state

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


class JobRunner:
    """Runs recorded jobs through the backend, at most as many at once as the job slots allow, and
    answers for them while they run (events, cancel); the store answers once they are done."""

    def __init__(self, settings: MasterSettings, backend: Backend, inventory: Inventory | None,
                 jobs: JobStore) -> None:
        self.settings, self.backend, self.inventory, self.jobs = settings, backend, inventory, jobs
        self.live: dict[str, LiveJob] = {}
        self.lock = threading.Lock()
        self.slots = JobSlots(settings.limits.max_jobs, settings.limits.max_jobs_per_requester)

    # -- starting ------------------------------------------------------------------------------

    def submit(self, request: Request, spec: JobSpec, keep_nonce_until: int, wait: float) -> dict[str, Any] | None:
        """Record the job and queue it; None if the request id is already a job. With `wait` > 0 the
        reply is held (at most MAX_SUBMIT_WAIT_SECONDS) for the job to end, and carries its events."""
        job = self.jobs.record(request, spec, self.settings.idc, keep_nonce_until)
        if job is None:
            return None
        live = LiveJob(request.id, request.sender, len(spec.hosts), next_seq=2)  # seq 1: "accepted", recorded
        with self.lock:
            self.live[request.id] = live
        self.slots.submit(request.requester, lambda: self._run(live, spec))
        reply: dict[str, Any] = {"job": job, "duplicate": False}
        if wait > 0:  # a quick job comes back whole, in this one reply
            live.await_finished(min(wait, MAX_SUBMIT_WAIT_SECONDS))
            reply["events"] = self.jobs.read_events(request.id, 0)
        return reply

    # -- running -------------------------------------------------------------------------------

    def _run(self, live: LiveJob, spec: JobSpec) -> None:
        started = time.time()
        live.state = JobState.RUNNING  # in memory only: one write less per job; a restart reports it unknown anyway
        limits = self.settings.limits
        ctx = RunContext(
            job_id=live.id, plan=spec.plan, hosts=spec.hosts, host_vars=self._host_vars,
            report=lambda r: self._report(live, r), output_cap=limits.output_cap_bytes,
            deadline=time.monotonic() + spec.timeout, cancelled=live.cancelled,
            max_parallel=limits.max_parallel_hosts, file_store=self.settings.state_dir / "files",
        )
        try:
            self.backend.run(ctx)
        except Exception:
            log.exception("backend %s failed on job %s", self.backend.name, live.id)
        try:
            self._finish(live, spec.hosts, started)
        except Exception:
            # The final record could not be written: say so, and never leave a follower waiting forever.
            log.exception("could not record the end of job %s", live.id)
            with live.changed:
                live.state, live.finished = JobState.UNKNOWN, True
                live.changed.notify_all()
            self._forget(live)

    def _host_vars(self, host: str) -> dict[str, Any]:
        return self.inventory.host_vars(host) if self.inventory else {}

    def _report(self, live: LiveJob, result: HostResult) -> None:
        with live.changed:  # backends may report from several threads
            live.results.append(result)
            last = len(live.results) == live.host_count
        if last:
            live.held = result  # saves a commit: written with the final state, right after
        else:
            self._append(live, [("host", result.as_dict())])

    def _finish(self, live: LiveJob, hosts: list[str], started: float) -> None:
        done = {r.host for r in live.results}
        # A backend bug must not leave a host unreported.
        missing = [HostResult(h, HostStatus.FAILED, error="the backend reported no result") for h in hosts if h not in done]
        live.results.extend(missing)
        state = final_state([r.status for r in live.results], live.cancelled.is_set())
        counts: dict[str, int] = {}
        for r in live.results:
            counts[str(r.status)] = counts.get(str(r.status), 0) + 1
        last = ([live.held] if live.held else []) + missing
        events: list[Event] = [("host", r.as_dict()) for r in last]
        events.append(("finished", {"state": state, "counts": counts, "duration": round(time.time() - started, 3)}))
        with live.changed:  # final state and "finished" event become visible together
            live.next_seq += self.jobs.finish(live.id, state, live.next_seq, events)
            live.state, live.finished = state, True
            live.changed.notify_all()
        self._forget(live)

    def _append(self, live: LiveJob, events: list[Event]) -> None:
        """Numbered in order under the job's lock, then announced to its long-polls."""
        with live.changed:
            live.next_seq += self.jobs.append(live.id, live.next_seq, events)
            live.changed.notify_all()

    def _forget(self, live: LiveJob) -> None:
        with self.lock:
            self.live.pop(live.id, None)

    # -- following -----------------------------------------------------------------------------

    def events(self, job_id: object, sender: str, after: int, wait: float,
               state_only: bool = False) -> dict[str, Any] | None:
        """The `events` reply for `sender`'s job; None if it has no such job. `state_only` answers at
        once with the state alone: no waiting, no events read."""
        live = self.live.get(job_id) if isinstance(job_id, str) else None
        if live is not None and live.sender == sender:
            if not state_only:
                live.await_events(after, max(0.0, min(wait, MAX_WAIT_SECONDS)))
            job, state = live.id, str(live.state)  # final only once committed, together with its "finished" event
        else:
            stored = self.jobs.state_of(job_id, sender)
            if stored is None:
                return None
            job, state = str(job_id), stored
        reply: dict[str, Any] = {"job": job, "state": state, "done": state in FINAL_STATES}
        if not state_only:  # state first, then events: never a final state without them
            reply["events"] = self.jobs.read_events(job, after)
        return reply

    def cancel(self, job_id: object, sender: str, requester: str) -> dict[str, Any] | None:
        """Signal `sender`'s job to stop, if it still runs; None if it has no such job."""
        state = self.jobs.state_of(job_id, sender)
        if state is None:
            return None
        job = str(job_id)
        live = self.live.get(job)
        if live is None:
            return {"job": job, "cancelled": False, "state": state}
        with live.changed:  # decided under the job's lock: a job that just finished stays finished
            if live.finished:
                return {"job": job, "cancelled": False, "state": live.state}
            live.cancelled.set()
            self._append(live, [("cancel_requested", {"by": requester})])
            return {"job": job, "cancelled": True, "state": live.state}

    def counts(self) -> tuple[int, int]:
        """(running, waiting) jobs."""
        return self.slots.counts()

    # -- start and stop ------------------------------------------------------------------------

    def recover_interrupted(self) -> None:
        """Jobs that were running when this master stopped: their outcome on the hosts is unknown."""
        for job in self.jobs.interrupted():
            self.jobs.finish(job.id, JobState.UNKNOWN, job.last_seq + 1,
                             [("finished", {"state": JobState.UNKNOWN, "counts": {}, "reason": INTERRUPTED})])

    def close(self) -> None:
        for live in list(self.live.values()):
            live.cancelled.set()
        self.slots.close()


def final_state(statuses: list[HostStatus], cancelled: bool) -> JobState:
    """A job's state from its hosts' statuses, and whether a cancel was requested."""
    if cancelled and any(s is HostStatus.CANCELLED for s in statuses):
        return JobState.CANCELLED
    if statuses and all(s is HostStatus.OK for s in statuses):
        return JobState.OK
    if any(s is HostStatus.TIMED_OUT for s in statuses) and not any(s is HostStatus.OK for s in statuses):
        return JobState.TIMED_OUT
    if any(s is HostStatus.OK for s in statuses):
        return JobState.PARTIAL
    return JobState.FAILED
