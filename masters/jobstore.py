"""Every query the master core makes on its own tables (masters.store): jobs, their events, nonces,
host locks.

The core, the runner and the submit path never write SQL or peewee queries themselves; whatever a
backend change needs (Ansible, Salt) comes through here, with the same transactions.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import peewee

from ombot.masters import store
from ombot.envelope import Refused, Request
from ombot.masters.jobspec import JobSpec
from ombot.masters.states import FINAL_STATES, JobState
from ombot.clock import MS_PER_SECOND, now_ms

MAX_EVENTS_PER_REPLY = 500
PURGE_BATCH = 500  # jobs deleted per transaction by retention
MAX_REPLY_OUTPUT = 1024 * 1024  # captured output per events reply, at least one event
REPLAYED = "this request was already received (replayed nonce)"
LAPSED = ("master {holder} stopped renewing its lease on the job's hosts, and master {taker} took them over; "
          "the hosts may or may not have finished")

Event = tuple[str, dict[str, Any]]  # (kind, data) of an event about to be written


@dataclass(frozen=True)
class InterruptedJob:
    """A job the store still shows as queued or running: what restart recovery needs to close it."""

    id: str
    sender: str
    host_count: int
    last_seq: int  # 0 if it has no event


@dataclass(frozen=True)
class Busy:
    """Hosts a job could not lock, and the jobs holding them (empty if they were freed meanwhile)."""

    hosts: list[str]
    holders: list[str]

    def as_event(self) -> dict[str, Any]:
        return {"hosts": self.hosts, "behind": self.holders}


def summary(job: store.Job) -> dict[str, Any]:
    """A job as the submit reply shows it."""
    return {"id": job.id, "module": job.module, "hosts": job.hosts, "idc": job.idc, "state": job.state,
            "requester": job.requester, "created_at": job.created_at}


class JobStore:
    """The master's jobs, events, seen nonces and host locks, behind named operations.

    The database may be shared with the other masters of the IDC: `master_id` is this master's, and
    whatever acts on jobs in bulk (restart recovery, retention) acts only on its own. Host locks it
    takes carry a lease of `lease_seconds` by the database's clock (masters.leases renews them)."""

    def __init__(self, master_id: str, lease_seconds: float = 60.0) -> None:
        self.master_id, self.lease_ms = master_id, round(lease_seconds * MS_PER_SECOND)

    @staticmethod
    def remember(nonce: str, keep_until: int) -> None:
        """Record a nonce until `keep_until` (epoch ms); refuse it if it was already seen (a replay)."""
        if not store.remember_nonce(nonce, keep_until):
            raise Refused("replay", REPLAYED)

    @staticmethod
    def forget_old_nonces() -> int:
        return store.forget_old_nonces()

    def record(self, request: Request, spec: JobSpec, idc: str, keep_nonce_until: int,
               lock_hosts: bool = False) -> dict[str, Any] | None:
        """The nonce, the job and its "accepted" event (seq 1): all or nothing, in one transaction.
        Returns the job's summary; None if the request id is already a job (it never runs twice).
        With `lock_hosts` the job's host locks are taken in the same transaction, or the submit is
        refused (`host_busy`) and nothing is recorded."""
        try:
            with store.db.atomic():
                self.remember(request.nonce, keep_nonce_until)
                job = store.Job.create(
                    id=request.id, sender=request.sender, requester=request.requester, origin=request.origin,
                    approvers=spec.approvers, module=spec.module.name, params=spec.values,
                    hosts=spec.hosts, idc=idc, timeout=spec.timeout, state=JobState.QUEUED,
                    created_at=now_ms(), signed_request=request.signed, master_id=self.master_id,
                )
                self.append(request.id, 1, [("accepted", {"hosts": spec.hosts, "module": spec.module.name,
                                                          "timeout": spec.timeout, "check": spec.check})])
                busy = self.take_hosts(request.id, idc, spec.hosts) if lock_hosts else None
                if busy is not None:  # raised inside the transaction: the job is not recorded either
                    raise Refused("host_busy", f"{spec.module.name} refuses to wait, and another job is changing "
                                               f"{', '.join(busy.hosts[:10])}", **busy.as_event())
        except peewee.IntegrityError:
            return None
        return summary(job)

    # -- host locks ----------------------------------------------------------------------------

    def take_hosts(self, job_id: str, idc: str, hosts: Sequence[str]) -> Busy | None:
        """Lock every host for the job in one INSERT, or none of them: None when taken, else who holds them.
        Locks whose lease lapsed are taken over on the way (`take_over_lapsed`)."""
        wanted = (store.HostLock.idc == idc) & store.HostLock.host.in_(list(hosts))
        held: list[tuple[str, str]] = []
        for _ in range(3):  # a holder that ended (or lapsed) between the INSERT and the SELECT: try again
            expires_at = store.database_now_ms() + self.lease_ms
            rows = [{"idc": idc, "host": host, "job": job_id, "master_id": self.master_id, "taken_at": now_ms(),
                     "expires_at": expires_at}
                    for host in sorted(hosts)]  # one order for everyone: two inserts never wait on each other crosswise
            try:
                with store.db.atomic():  # a savepoint inside a submit's transaction
                    store.HostLock.insert_many(rows).execute()
                return None
            except peewee.IntegrityError:
                if self.take_over_lapsed(wanted):
                    continue
                query = store.HostLock.select(store.HostLock.host, store.HostLock.job).where(wanted).tuples()
                held = list(cast("Iterable[tuple[str, str]]", query))  # .tuples(): tuples, not models
                if held:
                    break
        return Busy(sorted(host for host, _ in held), sorted({job for _, job in held}))

    @staticmethod
    def release_hosts(job_id: str) -> None:
        store.HostLock.delete().where(store.HostLock.job == job_id).execute()

    def renew_locks(self, job_ids: Sequence[str]) -> dict[str, int]:
        """Extend this master's leases on the jobs' host locks to the lease from the database's now. A
        lease that lapsed is never renewed (another master may be taking it over). Returns how many
        locks each job holds now; a job holding none is absent."""
        with store.db.atomic():
            now = store.database_now_ms()
            ours = ((store.HostLock.master_id == self.master_id) & store.HostLock.job.in_(list(job_ids))
                    & (store.HostLock.expires_at >= now))
            store.HostLock.update(expires_at=now + self.lease_ms).where(ours).execute()
            counts = (store.HostLock.select(store.HostLock.job, peewee.fn.COUNT(store.HostLock.host))
                      .where(ours).group_by(store.HostLock.job).tuples())
            return dict(cast("Iterable[tuple[str, int]]", counts))

    def take_over_lapsed(self, where: peewee.Expression | None = None) -> list[str]:
        """Free the host locks whose lease lapsed (those `where` selects, or all), and end each job that
        held them, if still open, as unknown: its master stopped renewing, so what it did is unknown.
        Returns the jobs whose locks were freed; a lock without a lease (NULL) never lapses."""
        now = store.database_now_ms()
        lapsed = store.HostLock.expires_at < now
        query = (store.HostLock.select(store.HostLock.job, store.HostLock.master_id)
                 .where(lapsed if where is None else lapsed & where).distinct().tuples())
        freed: list[str] = []
        for job_id, holder in list(cast("Iterable[tuple[str, str]]", query)):
            try:
                with store.db.atomic():  # conditional: a lock renewed meanwhile stays; one master wins each
                    if store.HostLock.delete().where((store.HostLock.job == job_id) & lapsed).execute():
                        self._end_lapsed(job_id, holder)
                        freed.append(job_id)
            except peewee.IntegrityError:  # its master wrote an event meanwhile: the next pass tries again
                continue
        return freed

    def _end_lapsed(self, job_id: str, holder: str) -> None:
        if self._close(job_id, JobState.UNKNOWN):
            reason = LAPSED.format(holder=holder, taker=self.master_id)
            self.append(job_id, self._last_seq(job_id) + 1,
                        [("finished", {"state": JobState.UNKNOWN, "counts": {}, "reason": reason})])

    def free_own_locks(self) -> int:
        """At start: every lock this master holds belongs to a job of a run that has ended."""
        return store.HostLock.delete().where(store.HostLock.master_id == self.master_id).execute()

    @staticmethod
    def known(job_id: str) -> bool:
        return bool(store.Job.select(store.Job.id).where(store.Job.id == job_id).exists())

    @staticmethod
    def stored(job_id: str) -> store.Job:
        return store.Job.get_by_id(job_id)

    @staticmethod
    def append(job_id: str, first_seq: int, events: Sequence[Event]) -> int:
        """Write events numbered from `first_seq`, in order, in one INSERT; returns how many."""
        at = now_ms()  # stored and sent to clients as epoch ms
        rows = [{"job": job_id, "seq": first_seq + i, "kind": kind, "at": at, "data": data}
                for i, (kind, data) in enumerate(events)]
        store.JobEvent.insert_many(rows).execute()
        return len(rows)

    def finish(self, job_id: str, state: JobState, first_seq: int, events: Sequence[Event]) -> int:
        """The final state and the last events (ending with "finished") become visible together, and
        the job's host locks are released with them. Returns how many events it wrote: none if the job
        had ended already (another master took its hosts over when its lease lapsed: that end stands)."""
        with store.db.atomic():
            self.release_hosts(job_id)
            if not self._close(job_id, state):
                return 0
            return self.append(job_id, first_seq, events)

    @staticmethod
    def _close(job_id: str, state: JobState) -> bool:
        """Give an open job its final state; False if it had one already (a final state is never changed)."""
        return bool(store.Job.update({store.Job.state: state, store.Job.finished_at: now_ms()})
                    .where((store.Job.id == job_id) & store.Job.state.not_in(list(FINAL_STATES))).execute())

    @staticmethod
    def state_of(job_id: object, sender: str) -> str | None:
        """The state of `sender`'s job; None if there is no such job or it is another client's."""
        if not isinstance(job_id, str):
            return None
        row = cast("tuple[str, str] | None", store.Job.select(store.Job.sender, store.Job.state)
                   .where(store.Job.id == job_id).tuples().first())
        if row is None or row[0] != sender:
            return None
        return row[1]

    @staticmethod
    def recent(sender: str, requester: str, limit: int) -> list[dict[str, Any]]:
        """The `jobs` reply: the newest `limit` jobs `sender` submitted as `requester`, newest first,
        each with where it ran and when it ended (every master sharing this database sees the same)."""
        query = (store.Job.select().where((store.Job.sender == sender) & (store.Job.requester == requester))
                 .order_by(store.Job.created_at.desc(), store.Job.id).limit(limit))
        return [{**summary(job), "master_id": job.master_id, "finished_at": job.finished_at} for job in query]

    @staticmethod
    def read_events(job_id: str, after: int) -> list[dict[str, Any]]:
        """Events after `after`, in order, at most MAX_EVENTS_PER_REPLY and about MAX_REPLY_OUTPUT of output."""
        query = (store.JobEvent.select(store.JobEvent.seq, store.JobEvent.kind, store.JobEvent.at, store.JobEvent.data)
                 .where((store.JobEvent.job == job_id) & (store.JobEvent.seq > after))
                 .order_by(store.JobEvent.seq).limit(MAX_EVENTS_PER_REPLY).tuples())
        rows = cast("Iterable[tuple[int, str, int, dict[str, Any]]]", query)  # .tuples(): tuples, not models
        events: list[dict[str, Any]] = []
        size = 0
        for seq, kind, at, data in rows:
            events.append({"seq": seq, "kind": kind, "at": at, "data": data})
            size += len(data.get("stdout", "")) + len(data.get("stderr", "")) + 512
            if size >= MAX_REPLY_OUTPUT:  # the rest comes with the next poll
                break
        return events

    def _own(self) -> peewee.Expression:
        """This master's jobs; NULL marks jobs written before databases were shared (then one per master)."""
        return (store.Job.master_id == self.master_id) | store.Job.master_id.is_null()

    def interrupted(self) -> list[InterruptedJob]:
        """This master's jobs left queued or running, by a run of it that stopped while they ran.
        Another master's jobs in a shared database are its own business, running or not."""
        jobs = list(store.Job.select().where(store.Job.state.in_([JobState.QUEUED, JobState.RUNNING]) & self._own()))
        return [InterruptedJob(job.id, job.sender, len(job.hosts), JobStore._last_seq(job.id)) for job in jobs]

    def purge_finished_before(self, cutoff: int) -> int:
        """Delete this master's jobs that ended before `cutoff` (epoch ms), with their events; how many jobs."""
        old = store.Job.select(store.Job.id).where(store.Job.finished_at.is_null(False)
                                                   & (store.Job.finished_at < cutoff) & self._own())
        ids = [str(job.id) for job in old]
        for start in range(0, len(ids), PURGE_BATCH):
            batch = ids[start:start + PURGE_BATCH]
            with store.db.atomic():  # events first: no job row is ever left without its events, or the reverse
                store.JobEvent.delete().where(store.JobEvent.job.in_(batch)).execute()
                store.Job.delete().where(store.Job.id.in_(batch)).execute()
        return len(ids)

    @staticmethod
    def _last_seq(job_id: str) -> int:
        last = store.JobEvent.select(peewee.fn.MAX(store.JobEvent.seq)).where(store.JobEvent.job == job_id).scalar()
        return int(last or 0)
