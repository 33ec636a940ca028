"""Following jobs on OMBot's own worker pool: progress on the card, results in its thread.

Each unfinished job is owned through a lease in the bot's database (`job:<job id>`, ombot.lease), taken
before the job is even stored: with several bot processes on one database exactly one follows a
job and finishes its card. The owner renews its leases every few seconds; a bot that dies stops
renewing, and another (or itself, restarted) adopts its jobs once the lease has run out. Each job's
card is finished once: the owner checks it still holds the lease before it posts the results.
"""

from __future__ import annotations

import contextvars
import itertools
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import peewee

from ombot.approvals import Viewer, forget_trail_before
from ombot.audit import forget_events_before
from ombot.bot import multi, store
from ombot.bot.messages import CardState, results_message
from ombot.bot.schedules import schedule_label
from ombot.bot.transport import ChatRequest, Transport
from ombot.masters import FINAL_STATES, ConnectFailed, JobRef, JobState, MasterLost, Refused, Router
from ombot import context, lease
from ombot.errors import CommandError
from ombot.message import escape
from ombot.since import MS_PER_DAY, parse_since
from ombot.timers import Timers

log = logging.getLogger("ombot.bot.jobs")

UPDATE_INTERVAL = 2.0  # at most one card update per 2 s per card; the final state is always written
IDLE_WAIT = 15.0
LEASE_TTL_MS = 15_000  # a dead bot's jobs are adopted within this plus one tick
TICK_SECONDS = 5.0  # how often leases are renewed and orphaned jobs adopted
PRUNE_SECONDS = 3600.0  # how often old jobs and trail rows are deleted (and once at start)
TICK_JOB, PRUNE_JOB = "job-leases", "job-retention"  # their jobs on the process's scheduler

TransportFor = Callable[[str], Transport | None]


class LeaseLost(Exception):
    """Another bot process owns the job now: this one stops following it and posts nothing more."""


def lease_name(job_id: str) -> str:
    return f"job:{job_id}"


class JobFollower:
    """Follows each job this process owns at its master and keeps its card and thread up to date."""

    def __init__(self, router: Router, pool: ThreadPoolExecutor, holder: str | None = None) -> None:
        self.router, self.pool = router, pool
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._held: set[str] = set()  # job ids whose lease this process holds
        self._closed = False  # stopping: take no lease any more (followers still running post nothing)
        self._lock = threading.Lock()  # renewals and releases never interleave (no lease re-taken after release)

    # -- ownership -------------------------------------------------------------------------------

    def claim(self, job_id: str) -> bool:
        """Take (or renew) the job's lease: True when this process owns the job now."""
        with self._lock:
            if self._closed or not lease.acquire(lease_name(job_id), self.holder, LEASE_TTL_MS):
                self._held.discard(job_id)
                return False
            self._held.add(job_id)
            return True

    def owns(self, job_id: str) -> bool:
        return job_id in self._held

    def let_go(self, job_id: str) -> None:
        with self._lock:
            self._held.discard(job_id)
            lease.release(lease_name(job_id), self.holder)

    def renew(self) -> None:
        """Renew every lease held; a job whose lease another bot took is dropped (its follower stops)."""
        with self._lock:
            for job_id in list(self._held):
                try:
                    if not lease.acquire(lease_name(job_id), self.holder, LEASE_TTL_MS):
                        log.warning("job %s was taken over by another bot process", job_id)
                        self._held.discard(job_id)
                except Exception:  # a database hiccup: try again next tick; the follower re-checks before posting
                    log.exception("could not renew the lease of job %s", job_id)

    def release_all(self) -> None:
        """On a clean stop: let others adopt at once the jobs this process follows."""
        self._closed = True
        for job_id in list(self._held):
            try:
                self.let_go(job_id)
            except Exception:
                log.exception("could not release the lease of job %s", job_id)

    def _check(self, job: store.BotJob) -> None:
        if not self.owns(job.job_id):
            raise LeaseLost(job.job_id)

    # -- following -------------------------------------------------------------------------------

    def start(self, job: store.BotJob, transport: Transport, first: Sequence[dict[str, Any]] = ()) -> None:
        """Follow a job this process owns; `first` are events already in hand (from the submit reply)."""
        try:
            # with the ids of the work that started it (ombot.context): its end is logged with its rid
            self.pool.submit(contextvars.copy_context().run, self._guarded, self._follow, job, transport, list(first))
        except RuntimeError:  # shutting down: the job's lease lapses and the next bot follows it
            log.info("not following job %s: the bot is stopping", job.job_id)

    def adopt(self, transport_for: TransportFor) -> int:
        """Follow every unfinished job that no live bot owns: after a restart, or when a peer died.
        A job caught before any master answered its submit is looked for at every master of its IDC."""
        count = 0
        for candidate in store.BotJob.select().where(~store.BotJob.reported):
            transport = transport_for(candidate.origin)
            if transport is None or self.owns(candidate.job_id) or not self.claim(candidate.job_id):
                continue
            job = store.BotJob.get_or_none(store.BotJob.number == candidate.number)  # as its last owner left it
            if job is None or job.reported:
                self.let_go(candidate.job_id)
                continue
            if job.master_id is None and job.state in FINAL_STATES:
                self.pool.submit(self._guarded, self._post_ending, job, transport)
            elif job.master_id is None:
                self.pool.submit(self._guarded, self._resume_submitted, job, transport)
            else:
                self.start(job, transport)
            count += 1
        return count

    def _guarded(self, work: Callable[..., None], job: store.BotJob, *args: Any) -> None:
        try:
            with context.scope(job=job.job_id, idc=job.idc, master=job.master_id):
                work(job, *args)
        except LeaseLost:
            log.info("job %s is followed by another bot process now", job.job_id)
        except Exception:
            log.exception("following job %s failed; it will be picked up again", job.job_id)
            self.let_go(job.job_id)  # adopted again on a later tick, by this bot or another

    def _follow(self, job: store.BotJob, transport: Transport, first: Sequence[dict[str, Any]]) -> None:
        card = card_of(job)
        results: dict[str, dict[str, Any]] = {}
        last_update, dirty = 0.0, False

        def on_event(event: dict[str, Any]) -> None:
            nonlocal dirty
            apply_event(card, results, event)
            dirty = True

        def next_wait() -> float:
            self._check(job)  # stop following a job another bot took over
            return max(0.0, last_update + UPDATE_INTERVAL - time.monotonic()) if dirty else IDLE_WAIT

        def flush(force: bool = False) -> None:
            nonlocal last_update, dirty
            if dirty and (force or time.monotonic() - last_update >= UPDATE_INTERVAL) and job.card_ts:
                self._check(job)
                multi.show_card(transport, job, card)  # a part of several IDCs: its request's card
                last_update, dirty = time.monotonic(), False

        assert job.master_id is not None  # followed only once a master has it
        ref = JobRef(job.job_id, job.idc, job.master_id)
        self.router.follow(ref, on_event, next_wait, flush, first)
        if not self.claim(job.job_id):  # still ours, for the lease's whole length: post the end once
            raise LeaseLost(job.job_id)
        store.update_job(job, state=card.state, finished_at=card.finished_at or store.now(), note=card.note or None,
                         hosts_ok=card.ok, hosts_failed=card.failed)
        log.info("job #%d ended: %s", job.number, card.state)
        req = _request_of(job)
        if job.card_ts:
            dirty = True
            flush(force=True)
        else:
            transport.post(job.channel, multi.card_message(job, card), req=req)
        transport.post(job.channel, results_message(job.number, list(results.values())), thread_ts=job.card_ts, req=req)
        store.update_job(job, reported=True)
        self.let_go(job.job_id)

    def _resume_submitted(self, job: store.BotJob, transport: Transport) -> None:
        """A job its bot stopped with while submitting: follow it at the master that has it, if one
        does; else it never ran. Never re-sent: the bot cannot know it was not, only ask."""
        master_id, unasked = self._master_having(job)
        if master_id is not None:
            log.info("job %s, caught while submitting, is at master %s", job.job_id, master_id)
            store.update_job(job, master_id=master_id, state=JobState.QUEUED)
            self._follow(job, transport, ())
            return
        if unasked:
            reason = (f"The bot stopped while submitting this job. No master of IDC {job.idc} that answered has it, "
                      f"and {'; '.join(unasked)} could not be asked: check there before running it again. "
                      f"It was not re-sent.")
        else:
            reason = (f"The bot stopped while submitting this job, and no master of IDC {job.idc} has it: "
                      f"it never reached a master. It was not re-sent.")
        self.end_early(job, transport, JobState.UNKNOWN, reason)

    def _master_having(self, job: store.BotJob) -> tuple[str | None, list[str]]:
        """The master of the job's IDC that knows the job (by its request id), and those that could not be asked."""
        unasked: list[str] = []
        for master_id in self.router.masters_of(job.idc):
            try:
                self.router.job_state(JobRef(job.job_id, job.idc, master_id))
                return master_id, []
            except Refused as exc:
                if exc.code != "unknown_job":
                    unasked.append(f"{master_id} ({exc.message})")
            except (ConnectFailed, MasterLost) as exc:
                unasked.append(f"{master_id} ({exc})")
        return None, unasked

    def end_early(self, job: store.BotJob, transport: Transport, state: JobState, reason: str) -> None:
        """End a job that no master follows (refused, never arrived): the card says why (`reason` is
        plain text, often a master's words: escaped here, since the note is mrkdwn)."""
        store.update_job(job, state=state, finished_at=store.now(), note=escape(reason))
        self._post_ending(job, transport)

    def _post_ending(self, job: store.BotJob, transport: Transport) -> None:
        try:
            card = card_of(job)
            if job.card_ts:
                multi.show_card(transport, job, card)
            else:
                transport.post(job.channel, multi.card_message(job, card), req=_request_of(job))
            store.update_job(job, reported=True)
        finally:
            self.let_go(job.job_id)  # if posting failed, the card is retried when the job is adopted again


def _request_of(job: store.BotJob) -> ChatRequest:
    return ChatRequest(job.requester, job.channel, origin=job.origin, response_url=job.reply_url)


class Lifecycle:
    """The timers of the job lifecycle, on the process's scheduler (`timers`): renewing this process's
    leases and adopting orphaned jobs every TICK_SECONDS, and deleting history past `[bot] retention_days`."""

    def __init__(self, follower: JobFollower, transport_for: TransportFor, retention_days: float,
                 timers: Timers) -> None:
        self.follower, self.transport_for, self.retention_days = follower, transport_for, retention_days
        self.timers = timers

    def start(self) -> int:
        """Adopt what a previous run left unfinished (now), then keep ticking; returns how many were adopted."""
        adopted = self.follower.adopt(self.transport_for)
        self.timers.interval(TICK_JOB, TICK_SECONDS, self.tick)
        self.timers.interval(PRUNE_JOB, PRUNE_SECONDS, self.prune, first_now=True)
        return adopted

    def tick(self) -> None:
        try:
            self.follower.renew()
            adopted = self.follower.adopt(self.transport_for)
            if adopted:
                log.info("adopted %d unfinished job(s) no live bot was following", adopted)
        except Exception:
            log.exception("the job lifecycle tick failed; it runs again in %s s", TICK_SECONDS)

    def prune(self) -> None:
        """Delete finished jobs and trail entries older than the retention; unfinished jobs stay."""
        cutoff = store.now() - int(self.retention_days * MS_PER_DAY)
        try:
            jobs, trail = store.forget_jobs_before(cutoff), forget_trail_before(cutoff)
            multi.forget_before(cutoff)  # the split of requests whose parts are gone
            audit = forget_events_before(cutoff)  # audit events are kept as long as jobs
        except Exception:
            log.exception("could not delete old jobs and trail entries")
            return
        if jobs or trail or audit:
            log.info("retention: deleted %d job(s), %d trail entries and %d audit events older than %s days", jobs,
                     trail, audit, self.retention_days)

    def close(self) -> None:
        """Stop ticking, and let other bots adopt at once the jobs this process follows."""
        self.timers.cancel(TICK_JOB)
        self.timers.cancel(PRUNE_JOB)
        self.follower.release_all()


def card_of(job: store.BotJob) -> CardState:
    return replace(multi.stored_card(job), schedule=schedule_label(job.job_id))


WAITING = "waiting for "  # the card's note while the master holds the job for busy hosts


def apply_event(card: CardState, results: dict[str, dict[str, Any]], event: dict[str, Any]) -> None:
    kind, data = event["kind"], event["data"]
    if kind == "accepted" and not card.final:
        card.state = JobState.RUNNING
    elif kind == "host":
        if card.note.startswith(WAITING):  # hosts are reporting: the wait is over
            card.note = ""
        results[data["host"]] = data
        card.done = len(results)
        card.ok = sum(1 for r in results.values() if r["status"] == "ok")
        card.failed = card.done - card.ok
    elif kind == "cancel_requested":
        card.note = f"cancel requested by <@{data.get('by')}>"
    elif kind == "waiting":  # the master holds the job until another job leaves these hosts
        card.note = f"{WAITING}{', '.join(data.get('hosts', []))} (busy with job {', '.join(data.get('behind', []))})"
    elif kind == "finished":
        card.state, card.finished_at = data["state"], event["at"]  # epoch ms, as the master stores it
        if data.get("reason"):
            card.note = escape(data["reason"])  # the master's words may quote a module's output


# -- history: /om jobs filters -------------------------------------------------------------------

JOBS_USAGE = "[mine] [module=NAME] [host=HOST] [since=2h|3d|2026-11-20]"


@dataclass(frozen=True)
class JobFilter:
    """What `/om jobs` lists: everyone's or the asker's jobs, of a module, touching a host, since when."""

    mine: bool = False
    module: str | None = None
    host: str | None = None
    since_ms: int | None = None  # epoch ms, UTC


def parse_job_filter(words: list[str]) -> dict[str, Any]:
    """`jobs`' arguments: `mine` and key=value filters, each at most once."""
    found: dict[str, str] = {}
    mine = False
    for word in words:
        key, sep, value = word.partition("=")
        if not sep and word.lower() == "mine" and not mine:
            mine = True
        elif sep and key in ("module", "host", "since") and key not in found and value:
            found[key] = value
        else:
            raise CommandError(f"cannot read {word!r}: filters are mine, module=, host= and since=, each once.\n"
                               f"usage: /om jobs {JOBS_USAGE}")
    since = parse_since(found["since"]) if "since" in found else None
    return {"filters": JobFilter(mine, found.get("module"), found.get("host"), since)}


def history(filters: JobFilter, requester: str, limit: int, viewer: Viewer | None = None) -> list[store.BotJob]:
    """The newest jobs that match and `viewer` may see (None: every one), newest first, from the bot's database."""
    job = store.BotJob
    query = job.select().order_by(job.number.desc())
    if filters.mine:
        query = query.where(job.requester == requester)
    if viewer is not None and not viewer.everything:  # narrowed in SQL; Viewer.sees below is the rule
        query = query.where(_may_see(viewer))
    if filters.module:
        query = query.where(job.module == filters.module)
    if filters.since_ms is not None:
        query = query.where(job.created_at >= filters.since_ms)
    if filters.host:  # a coarse text match in SQL (`_` and `%` are wildcards there), then the exact one
        pattern = peewee.Value(f'%"{filters.host}"%', converter=False)  # as stored, not JSON-encoded again
        query = query.where(peewee.Expression(job.hosts, peewee.OP.ILIKE, pattern))  # LIKE on SQLite
    matches = (j for j in query.iterator() if (filters.host is None or filters.host in (j.hosts or ()))
               and (viewer is None or viewer.sees(j.requester, j.approvers, j.cancel_roles)))
    return list(itertools.islice(matches, limit))


def _may_see(viewer: Viewer) -> peewee.ColumnBase:
    """A coarse SQL match for what `viewer` may see: their id as the requester or among the approvers,
    one of their roles among the cancel roles (as JSON text), so a scan never reads everyone's jobs."""
    job = store.BotJob
    found: peewee.ColumnBase = job.requester == viewer.user
    for column, value in [(job.approvers, viewer.user), *((job.cancel_roles, r) for r in sorted(viewer.roles))]:
        found |= _contains(column, json.dumps(value, ensure_ascii=False))
    return found


def _contains(column: peewee.Field, text: str) -> peewee.Expression:
    """`column` LIKE %text% with text taken literally, never JSON-encoded again by the column."""
    escaped = text.replace("\\", "\\\\").replace("_", "\\_").replace("%", "\\%")
    pattern = peewee.NodeList((peewee.Value(f"%{escaped}%", converter=False), peewee.SQL("ESCAPE"),
                               peewee.Value("\\", converter=False)))
    return peewee.Expression(column, peewee.OP.ILIKE, pattern)
