"""The life of a job once the master has recorded it: take its host locks (or wait for them),
run it through the backend within the job slots, report each host, finish it, cancel it, let
clients long-poll it, and close the jobs a previous run of this master left behind.

Host locks: a job of a `wait` module (the default) waits, without a job slot, until it holds every
one of its hosts at once; the time it waits counts against its timeout. `refuse` modules take
their locks with the submit or are refused; `parallel` (read-only) modules take none. The locks
are rows in the master's database, so masters sharing one respect each other's; waiting jobs are
retried whenever a job of this master ends, and every RETRY_SECONDS (masters.housekeeping) for
locks another master freed. Each lock carries a lease the master renews (masters.leases): a job
whose lease it cannot renew is stopped before the lease could lapse, and a dead master's locks
lapse and are taken over. One requester has at most `max_waiting_per_requester` jobs waiting (for
hosts or a job slot); more are refused at submit (`queue_full`), nothing recorded.

While a job runs, its `LiveJob` (masters.livejob, which also records its end) is where events are
announced (a condition) and its cancel is signalled; everything durable goes through the `JobStore`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ombot import context
from ombot.masters.backends.base import Backend, HostResult, HostStatus, RunContext
from ombot.envelope import Refused, Request
from ombot.masters.inventory import Inventory
from ombot.masters.jobspec import JobSpec
from ombot.masters.jobstore import Event, JobStore
from ombot.masters.leases import HostLeases
from ombot.masters.livejob import LiveJob, finish
from ombot.masters import metrics
from ombot.masters.rollout import AgentRollout, RolloutError
from ombot.masters.slots import JobSlots
from ombot.masters.states import FINAL_STATES, JobState
from ombot.modules import Concurrency
from ombot.config import MasterSettings

log = logging.getLogger("ombot.master")

MAX_WAIT_SECONDS = 20.0  # below rpyc's 30 s sync timeout
MAX_SUBMIT_WAIT_SECONDS = 2.0
INTERRUPTED = "the master stopped while the job ran; hosts may or may not have finished"


class JobRunner:
    """Runs recorded jobs through the backend, at most as many at once as the job slots allow, and
    answers for them while they run (events, cancel); the store answers once they are done."""

    def __init__(self, settings: MasterSettings, backend: Backend, inventory: Inventory | None,
                 jobs: JobStore, rollout: AgentRollout | None = None) -> None:
        self.settings, self.backend, self.inventory, self.jobs = settings, backend, inventory, jobs
        self.rollout = rollout  # fills in the agent's rollout (AgentSetup steps) and enrols the hosts
        self.live: dict[str, LiveJob] = {}
        self.waiting: dict[str, LiveJob] = {}  # jobs waiting for their hosts, oldest first
        self.lock = threading.Lock()
        self._retrying = threading.Lock()  # one pass over the waiting jobs at a time, in order
        self._entering: dict[str, int] = {}  # requester -> submits between the queue check and `live`
        limits = settings.limits
        self.slots = JobSlots(limits.max_jobs, limits.max_jobs_per_requester)
        self.leases = HostLeases(jobs, settings.id, limits.lock_lease_seconds, limits.lock_renew_seconds,
                                 self._stop_unleased)

    # -- starting ------------------------------------------------------------------------------

    def submit(self, request: Request, spec: JobSpec, keep_nonce_until: int, wait: float) -> dict[str, Any] | None:
        """Record the job and queue it; None if the request id is already a job. With `wait` > 0 the
        reply is held (at most MAX_SUBMIT_WAIT_SECONDS) for the job to end, and carries its events."""
        concurrency = spec.module.concurrency
        if not self._enter_queue(request):
            return None
        try:
            since = time.monotonic()
            job = self.jobs.record(request, spec, self.settings.idc, keep_nonce_until,
                                   lock_hosts=concurrency is Concurrency.REFUSE)  # refused now if busy
            if job is None:
                return None
            if concurrency is Concurrency.REFUSE:
                self.leases.taken(request.id, len(spec.hosts), since)
            live = LiveJob(request.id, request.sender, len(spec.hosts), next_seq=2,  # seq 1: "accepted", recorded
                           requester=request.requester, rid=request.rid, spec=spec, wait_started=time.monotonic())
            context.tie(job=request.id)
            log.info("job accepted: %s on %d host(s)%s", spec.module.name, len(spec.hosts), " (check)" * spec.check)
            with self.lock:
                self.live[request.id] = live
                if concurrency is Concurrency.WAIT:
                    self.waiting[request.id] = live
            metrics.job_entered(spec.module.name, JobState.QUEUED)
        finally:
            self._leave_entry(request.requester)
        if concurrency is Concurrency.WAIT:
            self.retry_waiting()  # in turn: behind the jobs already waiting
        else:
            self._start(live)
        reply: dict[str, Any] = {"job": job, "duplicate": False}
        if wait > 0:  # a quick job comes back whole, in this one reply
            live.await_finished(min(wait, MAX_SUBMIT_WAIT_SECONDS))
            reply["events"] = self.jobs.read_events(request.id, 0)
        return reply

    def _enter_queue(self, request: Request) -> bool:
        """Room in the requester's queue: counted from here until the job is live. False for a request id
        that is already a job (answered as a duplicate); a full queue is refused (`queue_full`)."""
        bound = self.settings.limits.max_waiting_per_requester
        with self.lock:
            queued = sum(1 for live in self.live.values()
                         if live.requester == request.requester and live.state is JobState.QUEUED)
            queued += self._entering.get(request.requester, 0)
            if queued < bound:
                self._entering[request.requester] = self._entering.get(request.requester, 0) + 1
                return True
        if self.jobs.known(request.id):  # a re-submit gets its job back, full queue or not
            return False
        raise Refused("queue_full", f"{request.requester} already has {queued} jobs waiting at master "
                                    f"{self.settings.id} for their hosts or a job slot, the most it queues for "
                                    "one requester; wait for some to start, or cancel some",
                      waiting=queued, limit=bound)

    def _leave_entry(self, requester: str) -> None:
        with self.lock:
            left = self._entering[requester] - 1
            if left:
                self._entering[requester] = left
            else:
                del self._entering[requester]

    # -- waiting for hosts -----------------------------------------------------------------------

    def retry_waiting(self) -> None:
        """Give waiting jobs their hosts, oldest first; end those cancelled or out of time meanwhile."""
        with self._retrying:
            with self.lock:
                waiting = list(self.waiting.values())
            for live in waiting:
                try:
                    self._retry(live)
                except Exception:  # the database may be away a moment: the next pass tries again
                    log.exception("could not give job %s its hosts", live.id)

    def _retry(self, live: LiveJob) -> None:
        spec = live.spec
        assert spec is not None
        waited = time.monotonic() - live.wait_started
        if live.cancelled.is_set():
            self._end_unstarted(live, HostStatus.CANCELLED, "cancelled while waiting for its hosts")
        elif waited >= spec.timeout:
            self._end_unstarted(live, HostStatus.TIMED_OUT, f"timed out after waiting {spec.timeout} s for its hosts"
                                + (f" ({', '.join(live.blocked.hosts[:10])})" if live.blocked else ""))
        else:
            since = time.monotonic()
            busy = self.jobs.take_hosts(live.id, self.settings.idc, spec.hosts)
            if busy is None:
                self.leases.taken(live.id, len(spec.hosts), since)
                live.waited = waited
                self._unwait(live)
                self._start(live)
            elif busy != live.blocked:  # said once, and again only when what it waits for changes
                live.blocked = busy
                self._append(live, [("waiting", busy.as_event())])

    def _unwait(self, live: LiveJob) -> None:
        with self.lock:
            self.waiting.pop(live.id, None)

    def _end_unstarted(self, live: LiveJob, status: HostStatus, reason: str) -> None:
        """A job that never got its hosts: every host ends with `status`, nothing ran."""
        self._unwait(live)
        assert live.spec is not None
        self._finish_or_lose(live, live.spec.hosts, time.time(), HostResult("", status, error=reason), reason)

    # -- running -------------------------------------------------------------------------------

    def _start(self, live: LiveJob) -> None:
        spec = live.spec
        assert spec is not None
        self.slots.submit(live.requester, lambda: self._run(live, spec))

    def _run(self, live: LiveJob, spec: JobSpec) -> None:
        try:
            with context.scope(**live.ids()):  # the slot's thread: the backend's lines name the job too
                self._run_backend(live, spec)
        finally:
            if self.waiting:  # hosts this job held may be what they wait for
                self.retry_waiting()

    def _run_backend(self, live: LiveJob, spec: JobSpec) -> None:
        started = time.time()
        live.state = JobState.RUNNING  # in memory only: one write less per job; a restart reports it unknown anyway
        metrics.job_entered(spec.module.name, JobState.RUNNING)
        limits = self.settings.limits
        def report(result: HostResult) -> None:
            self._report(live, result)

        plan, enrolment = spec.plan, None
        if self.rollout is not None:
            try:
                plan = self.rollout.fill(plan, spec.check)
            except RolloutError as exc:
                self._finish_or_lose(live, spec.hosts, started, HostResult("", HostStatus.FAILED, error=str(exc)))
                return
            enrolment = self.rollout.after_hosts(plan, live.id, spec.check, report)
        ctx = RunContext(
            job_id=live.id, plan=plan, hosts=spec.hosts, host_vars=self._host_vars,
            report=enrolment.take if enrolment is not None else report, output_cap=limits.output_cap_bytes,
            deadline=time.monotonic() + spec.timeout - live.waited, cancelled=live.cancelled,
            max_parallel=limits.max_parallel_hosts, file_store=self.settings.state_dir / "files", check=spec.check,
        )
        try:
            self.backend.run(ctx)
            metrics.backend_ran(self.backend.name, completed=True)
        except Exception:
            metrics.backend_ran(self.backend.name, completed=False)
            log.exception("backend %s failed on job %s", self.backend.name, live.id)
        if enrolment is not None:
            enrolment.finish()  # every installed host bound and heard from, or said why not
        self._finish_or_lose(live, spec.hosts, started)

    def _finish_or_lose(self, live: LiveJob, hosts: list[str], started: float,
                        unreported: HostResult | None = None, reason: str | None = None) -> None:
        self.leases.released(live.id)  # the run is over; locks the end cannot release lapse unrenewed
        try:
            finish(self.jobs, live, hosts, started, self._forget, unreported, reason)
        except Exception:
            # The final record could not be written: say so, and never leave a follower waiting forever.
            log.exception("could not record the end of job %s", live.id)
            with live.changed:
                live.state, live.finished = JobState.UNKNOWN, True
                live.changed.notify_all()
            self._forget(live)
            self._release_after_failure(live)

    def _release_after_failure(self, live: LiveJob) -> None:
        """Its hosts stay locked only if the database is gone too; then a restart frees them."""
        try:
            self.jobs.release_hosts(live.id)
        except Exception:
            log.exception("could not release the hosts of job %s", live.id)

    def _host_vars(self, host: str) -> dict[str, Any]:
        return self.inventory.host_vars(host) if self.inventory else {}

    def _report(self, live: LiveJob, result: HostResult) -> None:
        with context.scope(**live.ids(result.host)):  # backends report from threads of their own
            log.info("host %s: %s", result.host, result.status)
        with live.changed:  # backends may report from several threads
            live.results.append(result)
            last = len(live.results) == live.host_count
        if last:
            live.held = result  # saves a commit: written with the final state, right after
        else:
            self._append(live, [("host", result.as_dict())])

    def _append(self, live: LiveJob, events: list[Event]) -> None:
        """Numbered in order under the job's lock, then announced to its long-polls."""
        with live.changed:
            live.next_seq += self.jobs.append(live.id, live.next_seq, events)
            live.changed.notify_all()

    def _forget(self, live: LiveJob) -> None:
        with self.lock:
            self.live.pop(live.id, None)

    def _stop_unleased(self, job_id: str, reason: str) -> None:
        """Stop a job whose host locks' lease this master cannot keep: the cancel path, with a reason."""
        live = self.live.get(job_id)
        if live is None:
            return
        with live.changed:
            if live.finished:
                return
            live.stop_reason = reason
            live.cancelled.set()

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
            reply: dict[str, Any] = {"job": job, "cancelled": True, "state": live.state}
        if job in self.waiting:  # it ends now, not at the next retry
            self.retry_waiting()
        return reply

    def counts(self) -> tuple[int, int]:
        """(running, waiting) jobs; waiting for a slot or for hosts."""
        running, queued = self.slots.counts()
        return running, queued + len(self.waiting)

    # -- start and stop ------------------------------------------------------------------------

    def recover_interrupted(self) -> None:
        """This master's jobs that were running when it stopped: their outcome on the hosts is unknown,
        and the hosts they held are free again."""
        self.jobs.free_own_locks()
        for job in self.jobs.interrupted():
            self.jobs.finish(job.id, JobState.UNKNOWN, job.last_seq + 1,
                             [("finished", {"state": JobState.UNKNOWN, "counts": {}, "reason": INTERRUPTED})])

    def close(self) -> None:
        for live in list(self.live.values()):
            live.cancelled.set()
        with self._retrying:
            for live in list(self.waiting.values()):
                self._end_unstarted(live, HostStatus.CANCELLED, "the master stopped before its hosts were free")
        self.slots.close()

