"""Every query the master core makes on its own tables (masters.store): jobs, their events, nonces.

The core, the runner and the submit path never write SQL or peewee queries themselves; whatever a
backend change needs (Ansible, Salt) comes through here, with the same transactions.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import peewee

from masters import store
from masters.envelope import Refused, Request
from masters.jobspec import JobSpec
from masters.states import JobState
from ombot.clock import now_ms

MAX_EVENTS_PER_REPLY = 500
MAX_REPLY_OUTPUT = 1024 * 1024  # captured output per events reply, at least one event
REPLAYED = "this request was already received (replayed nonce)"

Event = tuple[str, dict[str, Any]]  # (kind, data) of an event about to be written


@dataclass(frozen=True)
class InterruptedJob:
    """A job the store still shows as queued or running: what restart recovery needs to close it."""

    id: str
    sender: str
    host_count: int
    last_seq: int  # 0 if it has no event


def summary(job: store.Job) -> dict[str, Any]:
    """A job as the submit reply shows it."""
    return {"id": job.id, "module": job.module, "hosts": job.hosts, "idc": job.idc, "state": job.state,
            "requester": job.requester, "created_at": job.created_at}


class JobStore:
    """The master's jobs, events and seen nonces, behind named operations (one database per master)."""

    @staticmethod
    def remember(nonce: str, keep_until: int) -> None:
        """Record a nonce until `keep_until` (epoch ms); refuse it if it was already seen (a replay)."""
        if not store.remember_nonce(nonce, keep_until):
            raise Refused("replay", REPLAYED)

    @staticmethod
    def forget_old_nonces() -> int:
        return store.forget_old_nonces()

    def record(self, request: Request, spec: JobSpec, idc: str, keep_nonce_until: int) -> dict[str, Any] | None:
        """The nonce, the job and its "accepted" event (seq 1): all or nothing, in one transaction.
        Returns the job's summary; None if the request id is already a job (it never runs twice)."""
        try:
            with store.db.atomic():
                self.remember(request.nonce, keep_nonce_until)
                job = store.Job.create(
                    id=request.id, sender=request.sender, requester=request.requester, origin=request.origin,
                    approvers=spec.approvers, module=spec.module.name, params=spec.values,
                    hosts=spec.hosts, idc=idc, timeout=spec.timeout, state=JobState.QUEUED,
                    created_at=now_ms(), signed_request=request.signed,
                )
                self.append(request.id, 1, [("accepted", {"hosts": spec.hosts, "module": spec.module.name,
                                                          "timeout": spec.timeout})])
        except peewee.IntegrityError:
            return None
        return summary(job)

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
        """The final state and the last events (ending with "finished") become visible together."""
        with store.db.atomic():
            self.set_state(job_id, state, finished=True)
            return self.append(job_id, first_seq, events)

    @staticmethod
    def set_state(job_id: str, state: JobState, finished: bool = False) -> None:
        fields: dict[Any, Any] = {store.Job.state: state}
        if finished:
            fields[store.Job.finished_at] = now_ms()
        store.Job.update(fields).where(store.Job.id == job_id).execute()

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

    @staticmethod
    def interrupted() -> list[InterruptedJob]:
        """Jobs left queued or running, e.g. by a master that stopped while they ran."""
        jobs = list(store.Job.select().where(store.Job.state.in_([JobState.QUEUED, JobState.RUNNING])))
        return [InterruptedJob(job.id, job.sender, len(job.hosts), JobStore._last_seq(job.id)) for job in jobs]

    @staticmethod
    def _last_seq(job_id: str) -> int:
        last = store.JobEvent.select(peewee.fn.MAX(store.JobEvent.seq)).where(store.JobEvent.job == job_id).scalar()
        return int(last or 0)
