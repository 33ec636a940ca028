"""Scheduled runs: `/om schedule "CRON" run ...` or `every 15m`, kept in the bot's database.

The tables are the truth; APScheduler only wakes a process at the fire times its triggers compute
(CronTrigger, IntervalTrigger: no hand-rolled cron). With several bot processes on one database,
one holds the `schedules:ORIGIN` lease (bot.lease, timed by the database's clock) and fires; the
others keep their triggers armed and take over when the holder stops renewing.

Each run is claimed by one compare-and-set on `last_fire_at`, so two processes that both believe
they lead still fire it once; its job id is uuid5(schedule id, fire time), so a run sent twice is
answered by the master as a duplicate of the first. Firings that pass while no process fires are
caught up when one does: those within `misfire_grace` coalesce into one run (the card says how many
were missed), older ones are skipped and reported, never run late.

A pause by a person records who paused and with how much say (approvals.AUTHORITY_NAMES): only they,
or someone with at least as much say over the schedule, may resume it at once; anyone else who may
resume it gets a fresh approval request instead (or a refusal, when its rule asks no approval).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Protocol

import peewee
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from playhouse.migrate import SchemaMigrator
from playhouse.migrate import migrate as run_operations

from approvals import (
    APPROVED, AUTHORITY_NAMES, NO_AUTHORITY, PENDING, REQUESTER, ApprovalRequest, Decision, Gate, PolicyRefusal,
    Viewer, authorize, viewer_of,
)
from bot import grammar, lease, store
from bot.approval_flow import ApprovalFlow
from bot.commands import CommandError
from bot.messages import Markup, Message, escape, params_text, plain, slack_date, text_message
from bot.settings import BotSettings
from bot.transport import ChatRequest, Transport
from masters import FINAL_STATES, JobRef, Refused, Router
from modules import ModuleSpec, ParamError
from ombot.clock import MS_PER_SECOND, now_ms
from ombot.errors import OmbotError
from ombot.storage import JSONField, create_tables, find_by_number_or_id, migrate

log = logging.getLogger("ombot.bot.schedules")

ACTIVE, AWAITING, PAUSED, DELETED = "active", "awaiting", "paused", "deleted"  # awaiting: approval
LEASE_TTL_MS = 10_000  # a killed holder is replaced within this plus one renewal
RENEW_SECONDS = 2.0
WAKE_TOLERANCE_MS = 20  # a wake-up a hair before its fire time (rounding) still fires it
START_GRACE_MS = 60_000  # a run claimed this recently whose job is not in the table yet is in flight
MAX_COUNTED = 100_000  # missed firings counted one by one up to here (every 1s for a day)
RUN_NAMESPACE = uuid.UUID("6f1d7c2a-5b8e-4c1f-9a3d-2e7b0c4d8f15")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
SCHEDULE_USAGE = ('"CRON" run MODULE TARGETS [key=value ...] [idc=X]  |  every N[smhd] run MODULE TARGETS ...'
                  '  |  pause|resume|delete ID')


class Schedule(peewee.Model):
    """One schedule. Times are UTC epoch ms; `hosts` is the list its approvers saw."""

    number = peewee.AutoField()  # what people type: /om schedule pause 3
    schedule_id = peewee.CharField(max_length=36, unique=True)
    requester = peewee.CharField(max_length=64)
    origin = peewee.CharField(max_length=16, index=True)
    channel = peewee.CharField(max_length=64)  # where it was made: its cards and questions go there
    idc = peewee.CharField(max_length=64)
    module = peewee.CharField(max_length=128)
    params = JSONField()
    targets = peewee.TextField()  # as typed: expanded again at every run
    hosts = JSONField()
    timeout = peewee.IntegerField(null=True)
    timing = peewee.CharField(max_length=128)  # "every 15m" or a five-field cron line (UTC)
    state = peewee.CharField(max_length=16, index=True)
    reason = peewee.TextField(null=True)  # why it is paused or awaiting approval
    paused_by = peewee.CharField(max_length=64, null=True)  # the person whose pause holds it, until it runs again
    paused_authority = peewee.IntegerField(null=True)  # their say over it then (approvals.AUTHORITY_NAMES)
    approval_request = peewee.CharField(max_length=36, null=True, index=True)  # the request that covers it
    approvers = JSONField(default=list)
    cancel_roles = JSONField(default=list)
    approval_expires_at = peewee.BigIntegerField(null=True)  # None: no approval needed
    anchor_at = peewee.BigIntegerField()  # when it was last activated: intervals count from here
    last_fire_at = peewee.BigIntegerField()  # the latest fire time handled (run, skipped or missed)
    last_job_id = peewee.CharField(max_length=36, null=True)
    busy_skipped = peewee.IntegerField(default=0)  # firings skipped while a run was in flight, to report
    missed_old = peewee.IntegerField(default=0)  # firings too old to run, to report
    created_at = peewee.BigIntegerField()

    class Meta:
        database = store.db
        table_name = "bot_schedule"


class ScheduleRun(peewee.Model):
    """One run a schedule fired: its job id, and what its card says about the schedule."""

    job_id = peewee.CharField(max_length=36, primary_key=True)
    schedule = peewee.IntegerField(index=True)  # Schedule.number
    scheduled_at = peewee.BigIntegerField()
    fired_at = peewee.BigIntegerField()
    label = peewee.TextField()

    class Meta:
        database = store.db
        table_name = "bot_schedule_run"
        indexes = ((("schedule", "scheduled_at"), True),)


def _pausers(db: peewee.Database) -> None:
    """Version 2: who paused a schedule, and with how much say (a database made since has them)."""
    columns = {d[0] for d in db.execute_sql("SELECT * FROM bot_schedule WHERE 1 = 0").description}
    migrator = SchemaMigrator.from_database(db)
    run_operations(*[migrator.add_column("bot_schedule", name, field) for name, field in
                     (("paused_by", peewee.CharField(max_length=64, null=True)),
                      ("paused_authority", peewee.IntegerField(null=True))) if name not in columns])


# Append-only: a new step goes at the end, never edit one that has shipped.
MIGRATIONS = [create_tables(Schedule, ScheduleRun), _pausers]


def prepare() -> None:
    """Create the schedule tables in the bot's database (after bot.store is opened)."""
    migrate(store.db.obj, "schedules", MIGRATIONS)


# -- timing -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """When a schedule fires: `every N[smhd]`, or a five-field cron line in UTC."""

    text: str
    interval: int | None  # seconds, for `every`

    def trigger(self, anchor_ms: int) -> BaseTrigger:
        if self.interval is not None:
            return IntervalTrigger(seconds=self.interval, start_date=_utc(anchor_ms), timezone=timezone.utc)
        return CronTrigger.from_crontab(self.text, timezone=timezone.utc)


def parse_timing(text: str, min_interval: int = 1) -> Timing:
    """`every 15m` or `*/5 * * * *`, or CommandError saying how to write it."""
    words = text.split()
    if words and words[0].lower() == "every":
        amount = words[1] if len(words) == 2 else ""
        count, unit = amount[:-1], amount[-1:].lower()
        if not (count.isascii() and count.isdigit() and unit in UNITS and len(count) <= 6):
            raise CommandError(f"cannot read {text!r}: write `every N` with s, m, h or d, e.g. `every 15m`")
        seconds = int(count) * UNITS[unit]
        if seconds < min_interval:
            raise CommandError(f"`{text}` is too often: the shortest interval is {min_interval} s")
        return Timing(f"every {count}{unit}", seconds)
    if len(words) != 5:
        raise CommandError(f"cannot read {text!r}: a cron line has five fields (minute hour day month weekday, "
                           f"UTC), e.g. \"0 3 * * *\"; or write `every 15m`")
    try:
        CronTrigger.from_crontab(" ".join(words), timezone=timezone.utc)
    except ValueError as exc:
        raise CommandError(f"cannot read the cron line {text!r}: {exc}") from None
    return Timing(" ".join(words), None)


def fire_times(trigger: BaseTrigger, after_ms: int, until_ms: int) -> tuple[list[int], int]:
    """The fire times in (after, until], and how many there are: the list stops at MAX_COUNTED."""
    times: list[int] = []
    previous = _utc(after_ms)
    while len(times) < MAX_COUNTED:
        upcoming = trigger.get_next_fire_time(previous, previous)
        if upcoming is None or _ms(upcoming) > until_ms:
            break
        times.append(_ms(upcoming))
        previous = upcoming
    return times, len(times)


def next_fire(schedule: Schedule) -> int | None:
    upcoming = timing_of(schedule).trigger(schedule.anchor_at).get_next_fire_time(
        _utc(schedule.last_fire_at), _utc(max(schedule.last_fire_at, now_ms())))
    return None if upcoming is None else _ms(upcoming)


def timing_of(schedule: Schedule) -> Timing:
    return parse_timing(schedule.timing)


def _utc(epoch_ms: int) -> datetime:
    return datetime.fromtimestamp(epoch_ms / MS_PER_SECOND, tz=timezone.utc)


def _ms(when: datetime) -> int:
    return round(when.timestamp() * MS_PER_SECOND)


# -- the command's words ----------------------------------------------------------------------------


def schedule_words(words: list[str]) -> dict[str, Any]:
    """`schedule`'s arguments: `pause|resume|delete ID`, or TIMING `run` MODULE TARGETS key=value ..."""
    usage = f"usage: /om schedule {SCHEDULE_USAGE}"
    if not words:
        raise CommandError(usage)
    head = words[0].lower()
    if head in ("pause", "resume", "delete"):
        if len(words) != 2:
            raise CommandError(f"schedule {head} takes one schedule number.\n{usage}")
        return {"action": head, "ref": words[1], "timing": None, "run": None}
    lowered = [w.lower() for w in words]
    if "run" not in lowered:
        raise CommandError(f"a schedule says what to run: TIMING run MODULE TARGETS ...\n{usage}")
    split = lowered.index("run")
    timing, rest = " ".join(words[:split]), words[split + 1:]
    if not timing:
        raise CommandError(f"a schedule starts with its timing, a quoted cron line or `every N[smhd]`.\n{usage}")
    if not rest:
        raise CommandError(f"run needs a module name.\n{usage}")
    return {"action": "create", "ref": None, "timing": timing, "run": grammar.run_of(rest[0], rest[1:])}


# -- the scheduler ----------------------------------------------------------------------------------


class Runner(Protocol):
    """What the schedules need from the dispatcher (which imports this module, not the reverse)."""

    def spec_of(self, idc: str, name: str) -> ModuleSpec: ...

    def start_job(self, command: grammar.Run, spec: ModuleSpec, hosts: list[str], req: ChatRequest,
                  transport: Transport, approvers: Sequence[str] = (), cancel_roles: Sequence[str] = (),
                  job_id: str | None = None, announce: bool = True) -> None: ...

    def later(self, req: ChatRequest, transport: Transport, action: str, detail: str,
              work: Callable[[], None]) -> None: ...


@dataclass(frozen=True)
class Cleared:
    """A schedule may run now: on these hosts, with these approvers."""

    hosts: list[str]
    approvers: list[str]
    cancel_roles: list[str]


@dataclass(frozen=True)
class Blocked:
    """A schedule may not run as approved: pause it, and ask again when `decision` says approval helps."""

    reason: str
    hosts: list[str]
    decision: Decision | None  # None: no approval can help (the requester may not run it at all)


class Schedules:
    """Schedule commands, approval hooks and firing, for the schedules made through one origin."""

    def __init__(self, router: Router, gate: Gate | None, flow: ApprovalFlow, runner: Runner,
                 settings: BotSettings, origin: str, default_idc: str) -> None:
        self.router, self.gate, self.flow, self.runner = router, gate, flow, runner
        self.origin, self.default_idc = origin, default_idc
        self.approval_ms = settings.schedule_approval_days * 86_400 * MS_PER_SECOND
        self.grace_ms = settings.misfire_grace_seconds * MS_PER_SECOND
        self.min_interval = settings.schedule_min_interval_seconds
        self.lease_name = f"schedules:{origin}"
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.scheduler = BackgroundScheduler(timezone=timezone.utc)
        self.transport: Transport | None = None
        self._armed: dict[str, tuple[str, int]] = {}  # schedule id -> (timing, anchor) of its APScheduler job
        self._leading_until = 0.0  # monotonic: this process fires until then unless it renews
        self._lock = threading.Lock()

    # -- life ------------------------------------------------------------------------------------

    def start(self, transport: Transport) -> None:
        self.transport = transport
        self.scheduler.start()
        self.scheduler.add_job(self._tick, "interval", seconds=RENEW_SECONDS, id="lease",
                               next_run_time=datetime.now(timezone.utc), max_instances=1, coalesce=True)

    def close(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)  # a firing under way finishes its claim and hands off its start
        try:
            if self._leads():
                lease.release(self.lease_name, self.holder)  # the next process need not wait out the lease
        except peewee.PeeweeException as exc:
            log.warning("could not release the schedules lease: %s", exc)

    def _leads(self) -> bool:
        return time.monotonic() < self._leading_until

    def _tick(self) -> None:
        """Renew (or take) the lease, arm the triggers the table asks for, and catch up on taking over."""
        try:
            was_leading = self._leads()
            started = time.monotonic()
            holds = lease.acquire(self.lease_name, self.holder, LEASE_TTL_MS)
            if holds and not was_leading:
                log.info("this process fires the %s schedules now (%s)", self.origin, self.holder)
                try:  # before it fires: a trigger must not take a dead bot's claim for a live run
                    self._start_orphans()
                except Exception:  # it leads all the same: one bad schedule must not stop every other
                    log.exception("could not take over the runs a stopped bot claimed")
            self._leading_until = started + LEASE_TTL_MS / MS_PER_SECOND - RENEW_SECONDS if holds else 0.0
            self._arm()
            if self._leads():
                if not was_leading:
                    for schedule_id in list(self._armed):
                        self._fire(schedule_id)
                self._close_unapproved()
        except Exception:
            log.exception("the schedules' lease tick failed")

    def _arm(self) -> None:
        """APScheduler jobs for exactly the active schedules in the table (others may have changed it)."""
        wanted = {s.schedule_id: (s.timing, s.anchor_at) for s in
                  Schedule.select().where((Schedule.origin == self.origin) & (Schedule.state == ACTIVE))}
        with self._lock:
            for schedule_id in [s for s in self._armed if s not in wanted]:
                self._disarm(schedule_id)
            for schedule_id, (timing, anchor) in wanted.items():
                if self._armed.get(schedule_id) != (timing, anchor):
                    self.scheduler.add_job(self._fire, parse_timing(timing).trigger(anchor), args=[schedule_id],
                                           id=schedule_id, replace_existing=True, misfire_grace_time=None,
                                           coalesce=True, max_instances=1)
                    self._armed[schedule_id] = (timing, anchor)

    def _disarm(self, schedule_id: str) -> None:
        self._armed.pop(schedule_id, None)
        try:
            self.scheduler.remove_job(schedule_id)
        except JobLookupError:
            pass

    # -- commands --------------------------------------------------------------------------------

    def create(self, timing_text: str, run: grammar.Run, req: ChatRequest, transport: Transport) -> None:
        timing = parse_timing(timing_text, self.min_interval)
        idc = run.idc or self.default_idc
        spec = self.runner.spec_of(idc, run.module)
        missing = [p.name for p in spec.params if p.required and p.name not in run.params]
        if run.targets is None or missing:
            raise CommandError(f"a schedule needs its targets and every required parameter"
                               f"{' (missing: ' + ', '.join(missing) + ')' if missing else ''}.\n"
                               f"usage: /om schedule {timing.text!r} run {spec.usage()}")
        if run.dry_run:
            raise CommandError("dry_run is for one look ahead: try `/om run ... dry_run=yes`, then schedule it")
        try:
            spec.validate(run.params)
        except ParamError as exc:
            raise ParamError(exc.param, f"{exc.expected}\nusage: `/om {spec.usage()}`") from None
        hosts = self.router.expand(idc, run.targets, requester=req.user)
        decision = authorize(self.gate, req.user, spec.name, hosts, idc)
        now = now_ms()
        schedule = Schedule.create(
            schedule_id=str(uuid.uuid4()), requester=req.user, origin=req.origin, channel=req.channel, idc=idc,
            module=spec.name, params=dict(run.params), targets=run.targets, hosts=hosts, timeout=run.timeout,
            timing=timing.text, state=AWAITING, cancel_roles=list(decision.cancel_roles), anchor_at=now,
            last_fire_at=now, created_at=now)
        if decision.needs_approval:
            self._ask(schedule, hosts, decision, req, transport, "")
            return
        self._activate(schedule, hosts, [], None)
        transport.respond(req, text_message(f"Schedule #{schedule.number} is active: {self._what(schedule)}; "
                                            f"next run {_when(next_fire(_reload(schedule)))}."))

    def listing(self, user: str, mention: bool = True) -> Message:
        """The schedules `user` may see (approvals.Viewer)."""
        viewer = viewer_of(self.gate, user)
        empty = "No schedules." if viewer.everything else "No schedules that you may see."
        return text_message("\n".join(schedule_rows(self.origin, mention, viewer)) or empty)

    def pause(self, ref: str, req: ChatRequest, transport: Transport) -> None:
        """Pause it, recording who paused and with how much say: a pause by someone with more say
        than the pauser before takes it over (a lead can hold what its requester paused)."""
        schedule = self._mine(ref, req.user, "pause")
        say = self._authority(schedule, req.user)
        keeps = schedule.paused_by is not None and (schedule.paused_authority or 0) >= say  # a hold never weakens
        if schedule.state == PAUSED and (keeps or schedule.paused_by is None):
            raise OmbotError(f"Schedule #{schedule.number} is already paused.")
        reason = f"paused by <@{req.user}>, {AUTHORITY_NAMES[say]}"
        if not keeps:
            _set(schedule, state=PAUSED, reason=reason, paused_by=req.user, paused_authority=say)
        else:  # e.g. its requester pauses it while the approval a lead's pause asked for is pending
            _set(schedule, state=PAUSED, reason=reason if schedule.paused_by == req.user else
                 f"{reason}; held since <@{schedule.paused_by}> paused it")
        self._arm()
        transport.respond(req, text_message(f"Paused schedule #{schedule.number}."))

    def delete(self, ref: str, req: ChatRequest, transport: Transport) -> None:
        schedule = self._mine(ref, req.user, "delete")
        _set(schedule, state=DELETED, reason=f"deleted by <@{req.user}>")
        self._arm()
        transport.respond(req, text_message(f"Deleted schedule #{schedule.number}; it will not run again."))

    def resume(self, ref: str, req: ChatRequest, transport: Transport) -> None:
        """Check it as if it were made now: active again, or asking for approval again. A pause by
        someone with more say than the resumer holds: it needs a fresh approval, or their say."""
        schedule = self._mine(ref, req.user, "resume")
        if schedule.state == ACTIVE:
            raise OmbotError(f"Schedule #{schedule.number} is already active.")
        if schedule.state == AWAITING and self._pending_request(schedule) is not None:
            raise OmbotError(f"Schedule #{schedule.number} is waiting for approval already (`/om approvals`).")
        verdict = self._check(schedule)
        held = self._held(schedule, req.user)
        if held is not None and isinstance(verdict, Cleared):
            verdict = self._fresh_approval(schedule, verdict, held)
        if isinstance(verdict, Blocked):
            if verdict.decision is None:
                raise PolicyRefusal(verdict.reason)
            # asked in the requester's name: whoever resumes, the requester never approves their own
            asker = req if req.user == schedule.requester else ChatRequest(schedule.requester, schedule.channel,
                                                                           origin=schedule.origin)
            request = self._ask(schedule, verdict.hosts, verdict.decision, asker, transport, verdict.reason)
            if held is not None or asker is not req:
                transport.respond(req, text_message(f"Schedule #{schedule.number} needs a fresh approval before it "
                                                    f"runs again ({verdict.reason}): asked as request "
                                                    f"#{request.number}."))
            return
        self._activate(schedule, verdict.hosts, verdict.approvers, schedule.approval_expires_at)
        transport.respond(req, text_message(f"Resumed schedule #{schedule.number}; next run "
                                            f"{_when(next_fire(_reload(schedule)))}."))

    def _authority(self, schedule: Schedule, user: str) -> int:
        """How much say `user` has over the schedule under today's policy (approvals.Policy.authority)."""
        if self.gate is None:
            return REQUESTER if user == schedule.requester else NO_AUTHORITY
        decision = self.gate.decide(schedule.requester, schedule.module, list(schedule.hosts), schedule.idc)
        return self.gate.authority(user, schedule.requester, list(schedule.approvers), list(schedule.cancel_roles),
                                   decision.approval if decision.needs_approval else None)

    def _held(self, schedule: Schedule, user: str) -> str | None:
        """Why `user` may not simply resume it (a person with more say paused it), or None."""
        if schedule.paused_by is None or user == schedule.paused_by:
            return None
        if self._authority(schedule, user) >= (schedule.paused_authority or 0):
            return None
        return f"<@{schedule.paused_by}> paused it as {AUTHORITY_NAMES[schedule.paused_authority or 0]}"

    def _fresh_approval(self, schedule: Schedule, cleared: Cleared, held: str) -> Blocked:
        """A held schedule may run again after a fresh approval; with no approval in its rule, only
        the pauser or someone with as much say may resume it."""
        decision = authorize(self.gate, schedule.requester, schedule.module, cleared.hosts, schedule.idc)
        if not decision.needs_approval:
            raise PolicyRefusal(Markup(f"{held}: only they, or someone with as much say over schedule "
                                       f"#{schedule.number}, may resume it"))
        return Blocked(f"{held}; resuming it needs a fresh approval", cleared.hosts, decision)

    def _mine(self, ref: str, user: str, verb: str) -> Schedule:
        schedule = find_schedule(ref)
        if schedule is None or schedule.state == DELETED:
            raise OmbotError(f"No schedule {ref!r}. `/om schedules` lists them.")
        if schedule.origin != self.origin:
            raise OmbotError(f"Schedule #{schedule.number} was made in {schedule.origin}; change it there.")
        allowed = user == schedule.requester or (self.gate is not None and self.gate.may_cancel(
            user, schedule.requester, list(schedule.approvers), list(schedule.cancel_roles)))
        if not allowed:
            raise PolicyRefusal(Markup(f"only its requester (<@{schedule.requester}>), its approvers or the roles "
                                       f"the policy names may {verb} schedule #{schedule.number}"))
        return schedule

    # -- approvals -------------------------------------------------------------------------------

    def _ask(self, schedule: Schedule, hosts: list[str], decision: Decision, req: ChatRequest,
             transport: Transport, why: str) -> ApprovalRequest:
        run = grammar.Run(schedule.module, schedule.targets, dict(schedule.params), schedule.idc,
                          timeout=schedule.timeout)
        spec = self.runner.spec_of(schedule.idc, schedule.module)
        self._withdraw_pending(schedule, transport)
        _set(schedule, state=AWAITING, hosts=hosts, reason=why or "waiting for approval",
             cancel_roles=list(decision.cancel_roles))
        request = self.flow.ask(run, spec, hosts, decision, req, transport, link=lambda r: _set(
            schedule, approval_request=r.request_id))
        log.info("schedule %s waits for approval request %s", schedule.number, request.number)
        return request

    def _withdraw_pending(self, schedule: Schedule, transport: Transport) -> None:
        """The schedule is about to be asked again: its older pending request would no longer be linked
        to it, and approving that one would start the command once as a plain job. Nobody may."""
        old = self._pending_request(schedule)
        if old is not None and self.gate is not None and self.gate.withdraw(
                old, f"schedule #{schedule.number} was asked again; approve the newer request"):
            self.flow.show(old, transport)

    def label_of(self, request: ApprovalRequest) -> str:
        """What an approval message says about the schedule it covers ("" for a one-off job)."""
        schedule = Schedule.get_or_none(Schedule.approval_request == request.request_id)
        return f"schedule #{schedule.number} ({schedule.timing}, UTC)" if schedule is not None else ""

    def approved(self, request: ApprovalRequest, approvers: list[str], transport: Transport) -> bool:
        """An approved request that covers a schedule activates it (True); other requests start a job."""
        schedule = Schedule.get_or_none(Schedule.approval_request == request.request_id)
        if schedule is None:
            return False
        if schedule.state != AWAITING:
            log.info("schedule %s was %s before its approval came", schedule.number, schedule.state)
            return True
        self._activate(schedule, list(request.hosts), approvers, now_ms() + self.approval_ms)
        self._post(schedule, f"Schedule #{schedule.number} is active: {self._what(_reload(schedule))}; approved "
                             f"by {', '.join(f'<@{a}>' for a in approvers) or 'its requester'} until "
                             f"{_when(_reload(schedule).approval_expires_at)}.", transport)
        return True

    def _pending_request(self, schedule: Schedule) -> ApprovalRequest | None:
        if self.gate is None or schedule.approval_request is None:
            return None
        request = self.gate.find(schedule.approval_request)
        return request if request is not None and request.state == PENDING else None

    def _close_unapproved(self) -> None:
        """A schedule whose approval request was denied or expired pauses, saying so."""
        if self.gate is None:
            return
        waiting = Schedule.select().where((Schedule.origin == self.origin) & (Schedule.state == AWAITING))
        for schedule in waiting:
            request = self.gate.find(schedule.approval_request) if schedule.approval_request else None
            if request is None or request.state in (PENDING, APPROVED):
                continue
            won = (Schedule.update(state=PAUSED, reason=f"approval request #{request.number} {request.state}")
                   .where((Schedule.number == schedule.number) & (Schedule.state == AWAITING)).execute())
            if won and self.transport is not None:
                self._post(schedule, f"Schedule #{schedule.number} is paused: its approval request "
                                     f"#{request.number} was {request.state}.", self.transport)

    def _activate(self, schedule: Schedule, hosts: list[str], approvers: list[str], until: int | None) -> None:
        now = now_ms()
        _set(schedule, state=ACTIVE, reason=None, hosts=hosts, approvers=approvers, approval_expires_at=until,
             anchor_at=now, last_fire_at=now, busy_skipped=0, missed_old=0, paused_by=None, paused_authority=None)
        self._arm()

    # -- firing ----------------------------------------------------------------------------------

    def _fire(self, schedule_id: str) -> None:
        """Woken at a fire time (or on taking over): run what is due, if this process leads."""
        if not self._leads():
            return
        try:
            self._fire_due(schedule_id)
        except Exception:
            log.exception("firing schedule %s failed", schedule_id)

    def _fire_due(self, schedule_id: str) -> None:
        schedule = Schedule.get_or_none(Schedule.schedule_id == schedule_id)
        if schedule is None or schedule.state != ACTIVE or self.transport is None:
            return
        now = now_ms()
        times, total = fire_times(timing_of(schedule).trigger(schedule.anchor_at), schedule.last_fire_at,
                                  now + WAKE_TOLERANCE_MS)
        if not times:
            return
        latest = times[-1]
        recent = sum(1 for t in times if now - t <= self.grace_ms)
        too_old = total - recent
        if recent == 0:
            if self._claim(schedule, latest, missed_old=too_old):
                self._post(schedule, f"Schedule #{schedule.number} skipped {too_old} run(s) missed while no bot "
                                     f"was running them (older than misfire_grace, never run late).", self.transport)
            return
        busy = self._in_flight(schedule, now)
        if busy is not None:
            self._claim(schedule, latest, busy_skipped=recent, missed_old=too_old)
            log.info("schedule %s: run at %s skipped, %s still runs", schedule.number, latest, busy)
            return
        verdict = self._check(schedule)
        if isinstance(verdict, Blocked):
            if self._claim(schedule, latest, missed_old=too_old):
                self._block(_reload(schedule), verdict)
            return
        self._run(schedule, latest, recent - 1, too_old, verdict)

    def _claim(self, schedule: Schedule, fire_at: int, busy_skipped: int = 0, missed_old: int = 0,
               run: ScheduleRun | None = None) -> bool:
        """Take the firings up to `fire_at`: exactly one process wins them, whatever the race. A run
        reports the skipped and missed counts on its card, so they start again from zero."""
        counts: dict[str, Any] = ({"busy_skipped": 0, "missed_old": 0, "last_job_id": run.job_id} if run else
                                  {"busy_skipped": Schedule.busy_skipped + busy_skipped,
                                   "missed_old": Schedule.missed_old + missed_old})
        with store.db.atomic():
            won = (Schedule.update(last_fire_at=fire_at, **counts)
                   .where((Schedule.number == schedule.number) & (Schedule.state == ACTIVE)
                          & (Schedule.last_fire_at == schedule.last_fire_at)).execute())
            if won and run is not None:
                run.save(force_insert=True)
        return bool(won)

    def _run(self, schedule: Schedule, fire_at: int, missed: int, too_old: int, cleared: Cleared) -> None:
        job_id = str(uuid.uuid5(RUN_NAMESPACE, f"{schedule.schedule_id}@{fire_at}"))
        label = _label(schedule, fire_at, missed, schedule.busy_skipped, schedule.missed_old + too_old)
        run = ScheduleRun(job_id=job_id, schedule=schedule.number, scheduled_at=fire_at, fired_at=now_ms(),
                          label=label)
        if self._claim(schedule, fire_at, run=run):  # else another process took this run
            self._start(schedule, job_id, cleared)

    def _start(self, schedule: Schedule, job_id: str, cleared: Cleared) -> None:
        command = grammar.Run(schedule.module, schedule.targets, dict(schedule.params), schedule.idc,
                              timeout=schedule.timeout)
        req = ChatRequest(schedule.requester, schedule.channel, origin=schedule.origin)
        transport = self.transport
        assert transport is not None

        def start() -> None:
            spec = self.runner.spec_of(schedule.idc, schedule.module)
            try:
                self.runner.start_job(command, spec, cleared.hosts, req, transport, cleared.approvers,
                                      cleared.cancel_roles, job_id, announce=False)  # the card is the news
            except peewee.IntegrityError:  # a bot that lost the lease started it after all: one job, once
                log.info("schedule %s: run %s was started by another process", schedule.number, job_id)

        self.runner.later(req, transport, "schedule", f"#{schedule.number} {schedule.module} {schedule.targets}",
                          start)

    def _start_orphans(self) -> None:
        """Runs claimed by a bot that died before it stored their jobs: start them now, under the same
        job id (a master that already has one answers with that job, marked a duplicate)."""
        now = now_ms()
        active = Schedule.select().where((Schedule.origin == self.origin) & (Schedule.state == ACTIVE)
                                         & Schedule.last_job_id.is_null(False))
        for schedule in active:
            run = ScheduleRun.get_or_none(ScheduleRun.job_id == schedule.last_job_id)
            if run is None or store.BotJob.get_or_none(store.BotJob.job_id == run.job_id) is not None:
                continue  # its job is stored: the job follower finishes its card
            if now - run.scheduled_at > self.grace_ms:
                self._drop_orphan(schedule, run)
                continue
            log.info("schedule %s: starting run %s, claimed by a bot that stopped", schedule.number, run.job_id)
            verdict = self._check(schedule)
            if isinstance(verdict, Cleared):
                ScheduleRun.update(fired_at=now).where(ScheduleRun.job_id == run.job_id).execute()  # in flight
                self._start(schedule, run.job_id, verdict)

    def _drop_orphan(self, schedule: Schedule, run: ScheduleRun) -> None:
        """A claimed run past misfire_grace that never started: never run late, but said at once and
        counted on the next card like the other runs too old to run. Nothing of it is in flight, so
        the next firings must not wait for it (`_in_flight` reads last_job_id)."""
        won = (Schedule.update(last_job_id=None, missed_old=Schedule.missed_old + 1)
               .where((Schedule.number == schedule.number) & (Schedule.last_job_id == run.job_id)).execute())
        if won and self.transport is not None:
            log.info("schedule %s: run %s, claimed by a bot that stopped, is too old to start", schedule.number,
                     run.job_id)
            self._post(schedule, f"Schedule #{schedule.number} skipped its run due {_plain_when(run.scheduled_at)}: "
                                 f"the bot that claimed it stopped before starting it, and it is older than "
                                 f"misfire_grace (never run late).", self.transport)

    def _in_flight(self, schedule: Schedule, now: int) -> str | None:
        """The run of this schedule still going, if any ("job #12"), asking its master when unsure."""
        if not schedule.last_job_id:
            return None
        job = store.BotJob.get_or_none(store.BotJob.job_id == schedule.last_job_id)
        if job is None:
            run = ScheduleRun.get_or_none(ScheduleRun.job_id == schedule.last_job_id)
            return "its last run" if run is not None and now - run.fired_at < START_GRACE_MS else None
        if job.state in FINAL_STATES:
            return None
        # No master recorded: its bot may have died while submitting. A master that has it says where it stands.
        masters = [job.master_id] if job.master_id else list(self.router.masters_of(job.idc))
        unreachable = False
        for master_id in masters:
            try:
                state = self.router.job_state(JobRef(job.job_id, job.idc, master_id))
            except Refused:  # not this master's job
                continue
            except OmbotError as exc:
                log.warning("schedule %s: cannot ask %s about job %s: %s", schedule.number, master_id, job.number, exc)
                unreachable = True
                continue
            return None if state in FINAL_STATES else f"job #{job.number}"
        if job.master_id or unreachable:  # cannot tell: a new run would meet the same trouble
            return f"job #{job.number}"
        return f"job #{job.number}" if now - job.created_at < START_GRACE_MS else None  # may not have arrived yet

    def _check(self, schedule: Schedule) -> Cleared | Blocked:
        """Whether the schedule may still run as approved: same hosts, enough approvers who still may."""
        try:
            hosts = self.router.expand(schedule.idc, schedule.targets, requester=schedule.requester)
            decision = authorize(self.gate, schedule.requester, schedule.module, hosts, schedule.idc)
        except PolicyRefusal as exc:
            return Blocked(f"<@{schedule.requester}> may no longer run it: {escape(str(exc))}", list(schedule.hosts), None)
        except Refused as exc:
            return Blocked(f"its targets no longer expand: {escape(exc.message)}", list(schedule.hosts), None)
        approvers = list(schedule.approvers)  # every vote; the envelope names those other than the requester
        cleared = Cleared(hosts, [a for a in approvers if a != schedule.requester], list(decision.cancel_roles))
        if not decision.needs_approval or decision.approval is None:
            return cleared
        approval = decision.approval
        if schedule.approval_expires_at is None:
            return Blocked(f"the policy now asks {approval.count} approval(s) for it", hosts, decision)
        if sorted(hosts) != sorted(schedule.hosts):
            return Blocked(f"its targets now expand to {len(hosts)} host(s), not the {len(schedule.hosts)} "
                           f"approved", hosts, decision)
        if now_ms() >= schedule.approval_expires_at:
            return Blocked(f"its approval ran out {_when(schedule.approval_expires_at)}", hosts, decision)
        assert self.gate is not None  # authorize refuses without one
        still = [a for a in approvers if self.gate.policy.in_roles(a, self.gate.groups_of(a), approval.roles)
                 and (a != schedule.requester or approval.self_approval)]
        if len(still) < approval.count:
            lost = [a for a in approvers if a not in still]
            why = (f"approver(s) {', '.join(f'<@{a}>' for a in lost)} may no longer approve it" if lost
                   else f"the policy now asks {approval.count} approval(s), it has {len(still)}")
            return Blocked(why, hosts, decision)
        return cleared

    def _block(self, schedule: Schedule, verdict: Blocked) -> None:
        """Pause the schedule, and ask for approval again in its channel when that can help."""
        assert self.transport is not None
        req = ChatRequest(schedule.requester, schedule.channel, origin=schedule.origin)
        if verdict.decision is None:
            _set(schedule, state=PAUSED, reason=verdict.reason)
            self._arm()
            self._post(schedule, f"Schedule #{schedule.number} is paused: {verdict.reason}. "
                                 f"`/om schedule resume {schedule.number}` checks it again.", self.transport)
            return
        self._post(schedule, f"Schedule #{schedule.number} is paused: {verdict.reason}. Asking for approval again.",
                   self.transport)
        self._ask(schedule, verdict.hosts, verdict.decision, req, self.transport, verdict.reason)
        self._arm()

    # -- saying --------------------------------------------------------------------------------

    def _post(self, schedule: Schedule, text: str, transport: Transport) -> None:
        req = ChatRequest(schedule.requester, schedule.channel, origin=schedule.origin)
        transport.post(schedule.channel, text_message(text), req=req)

    def _what(self, schedule: Schedule) -> str:
        return (f"`{schedule.module}` on {escape(schedule.targets)} ({len(schedule.hosts)} host(s)) in "
                f"{schedule.idc}, {schedule.timing} (UTC)")


# -- reading ----------------------------------------------------------------------------------------


def find_schedule(ref: str) -> Schedule | None:
    found: Schedule | None = find_by_number_or_id(Schedule, Schedule.number, Schedule.schedule_id, ref)
    return found


def schedule_label(job_id: str) -> str:
    """What a job card says about the schedule that started the job ("" for other jobs)."""
    run = ScheduleRun.get_or_none(ScheduleRun.job_id == job_id)
    return run.label if run is not None else ""


def schedule_rows(origin: str | None = None, mention: bool = True, viewer: Viewer | None = None) -> list[str]:
    """One line per schedule not deleted that `viewer` may see (None: every one): chat (mentions,
    dates) or plain (the CLI)."""
    query = Schedule.select().where(Schedule.state != DELETED).order_by(Schedule.number)
    if origin is not None:
        query = query.where(Schedule.origin == origin)
    rows = []
    for s in (s for s in query if viewer is None or viewer.sees(s.requester, s.approvers, s.cancel_roles)):
        # Written in OMBot's markup (what people typed escaped; the reason is stored as markup), and
        # rendered plain for the CLI.
        who = f"<@{s.requester}>" if mention else s.requester
        params = params_text(s.params)
        line = (f"#{s.number} {s.state:<8} {escape(s.timing)} (UTC): `{s.module}` on {escape(s.targets)} "
                f"({len(s.hosts)} host(s)) in {s.idc}{' ' + escape(params) if params else ''} by {who} in {s.channel}")
        if s.state == ACTIVE:
            upcoming = next_fire(s)
            line += f", next {_when(upcoming) if mention else _plain_when(upcoming)}"
        elif s.reason:
            line += f": {s.reason}"
        rows.append(line if mention else plain(line))
    return rows


def _label(schedule: Schedule, fire_at: int, missed: int, busy: int, too_old: int) -> str:
    notes = [f"schedule #{schedule.number} ({schedule.timing}, UTC), run due {_plain_when(fire_at)}"]
    if missed:
        notes.append(f"{missed} missed run(s) coalesced into this one")
    if busy:
        notes.append(f"{busy} run(s) skipped while the previous one was still running")
    if too_old:
        notes.append(f"{too_old} missed run(s) older than misfire_grace skipped")
    return " \u00b7 ".join(notes)


def _when(epoch_ms: int | None) -> str:
    return slack_date(epoch_ms) if epoch_ms is not None else "never"


def _plain_when(epoch_ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch_ms / MS_PER_SECOND)) if epoch_ms else "never"


def _reload(schedule: Schedule) -> Schedule:
    fresh: Schedule = Schedule.get_by_id(schedule.number)
    return fresh


def _set(schedule: Schedule, **fields: Any) -> None:
    for key, value in fields.items():
        setattr(schedule, key, value)
    Schedule.update(**fields).where(Schedule.number == schedule.number).execute()
