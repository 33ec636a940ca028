"""The Schedules service: the schedule commands, their approval hooks, and which process fires.

The tables are the truth; APScheduler only wakes a process at the fire times its triggers compute.
With several bot processes on one database, one holds the `schedules:ORIGIN` lease (ombot.lease, timed
by the database's clock) and fires (bot.schedules.firing); the others keep their triggers armed and
take over when the holder stops renewing.

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
from collections.abc import Iterator
from contextlib import contextmanager

import peewee

from ombot.approvals import (
    APPROVED, AUTHORITY_NAMES, NO_AUTHORITY, PENDING, REQUESTER, ApprovalRequest, Decision, Gate, PolicyRefusal,
    authorize, viewer_of,
)
from ombot.bot import grammar
from ombot.bot.approval_flow import ApprovalFlow
from ombot.bot.commands import CommandError
from ombot.bot.schedules.clearance import Blocked, Cleared, may_run
from ombot.bot.schedules.firing import Firing, Runner
from ombot.bot.schedules.models import ACTIVE, AWAITING, DELETED, PAUSED, Schedule, find_schedule, reload, set_fields
from ombot.bot.schedules.render import describe, post_notice, schedule_rows, when
from ombot.bot.schedules.timing import next_fire, parse_timing
from ombot.bot.settings import BotSettings
from ombot.bot.transport import ChatRequest, Transport
from ombot.masters import Router
from ombot.modules import ParamError
from ombot import lease
from ombot.clock import MS_PER_SECOND, now_ms
from ombot.errors import OmbotError
from ombot.message import Markup, Message, text_message
from ombot.timers import Timers

log = logging.getLogger("ombot.bot.schedules")  # one logger for the package, as before the split

LEASE_TTL_MS = 10_000  # a killed holder is replaced within this plus one renewal
RENEW_SECONDS = 2.0


class Schedules(Firing):
    """Schedule commands, approval hooks and firing, for the schedules made through one origin
    (the firing itself is the `Firing` half, bot.schedules.firing)."""

    def __init__(self, router: Router, gate: Gate | None, flow: ApprovalFlow, runner: Runner,
                 settings: BotSettings, origin: str, default_idc: str) -> None:
        self.router, self.gate, self.flow, self.runner = router, gate, flow, runner
        self.origin, self.default_idc = origin, default_idc
        self.approval_ms = settings.schedule_approval_days * 86_400 * MS_PER_SECOND
        self.grace_ms = settings.misfire_grace_seconds * MS_PER_SECOND
        self.min_interval = settings.schedule_min_interval_seconds
        self.lease_name = f"schedules:{origin}"
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.timers: Timers | None = None  # the process's one scheduler, from `start`
        self.transport: Transport | None = None
        self._working = threading.Condition()  # counts the ticks and firings under way, for `close`
        self._busy, self._closed = 0, False
        self._armed: dict[str, tuple[str, int]] = {}  # schedule id -> (timing, anchor) of its APScheduler job
        self._leading_until = 0.0  # monotonic: this process fires until then unless it renews
        self._lock = threading.Lock()

    # -- life ------------------------------------------------------------------------------------

    def start(self, transport: Transport, timers: Timers) -> None:
        """Restore the schedules from the table on the process's timers; fire while holding the lease."""
        self.transport, self.timers = transport, timers
        timers.every(self._job_id("lease"), RENEW_SECONDS, self._tick)

    def close(self) -> None:
        """Stop firing; a firing under way finishes its claim and hands off its start; let the lease go."""
        with self._working:
            self._closed = True
        if self.timers is not None:
            self.timers.cancel(self._job_id("lease"))
            with self._lock:
                for schedule_id in list(self._armed):
                    self._disarm(schedule_id)
        with self._working:
            self._working.wait_for(lambda: self._busy == 0)
        try:
            if self._leads():
                lease.release(self.lease_name, self.holder)  # the next process need not wait out the lease
        except peewee.PeeweeException as exc:
            log.warning("could not release the schedules lease: %s", exc)

    def _job_id(self, name: str) -> str:
        """This service's jobs on the shared timers: its origin's, apart from any other user's."""
        return f"schedules:{self.origin}:{name}"

    @contextmanager
    def _work(self) -> Iterator[bool]:
        """A tick or a firing: False once closing (do nothing), and `close` waits for those under way."""
        with self._working:
            if self._closed:
                yield False
                return
            self._busy += 1
        try:
            yield True
        finally:
            with self._working:
                self._busy -= 1
                self._working.notify_all()

    def _leads(self) -> bool:
        return time.monotonic() < self._leading_until

    def _tick(self) -> None:
        """Renew (or take) the lease, arm the triggers the table asks for, and catch up on taking over."""
        with self._work() as working:
            if working:
                self._renew_and_arm()

    def _renew_and_arm(self) -> None:
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
                if self._armed.get(schedule_id) != (timing, anchor) and self.timers is not None:
                    self.timers.trigger(self._job_id(schedule_id), parse_timing(timing).trigger(anchor), self._fire,
                                        schedule_id)
                    self._armed[schedule_id] = (timing, anchor)

    def _disarm(self, schedule_id: str) -> None:
        self._armed.pop(schedule_id, None)
        if self.timers is not None:
            self.timers.cancel(self._job_id(schedule_id))

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
        transport.respond(req, text_message(f"Schedule #{schedule.number} is active: {describe(schedule)}; "
                                            f"next run {when(next_fire(reload(schedule)))}."))

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
            set_fields(schedule, state=PAUSED, reason=reason, paused_by=req.user, paused_authority=say)
        else:  # e.g. its requester pauses it while the approval a lead's pause asked for is pending
            set_fields(schedule, state=PAUSED, reason=reason if schedule.paused_by == req.user else
                       f"{reason}; held since <@{schedule.paused_by}> paused it")
        self._arm()
        transport.respond(req, text_message(f"Paused schedule #{schedule.number}."))

    def delete(self, ref: str, req: ChatRequest, transport: Transport) -> None:
        schedule = self._mine(ref, req.user, "delete")
        set_fields(schedule, state=DELETED, reason=f"deleted by <@{req.user}>")
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
        verdict = may_run(schedule, self.router, self.gate)
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
                                            f"{when(next_fire(reload(schedule)))}."))

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
        set_fields(schedule, state=AWAITING, hosts=hosts, reason=why or "waiting for approval",
                   cancel_roles=list(decision.cancel_roles))
        request = self.flow.ask(run, spec, hosts, decision, req, transport, link=lambda r: set_fields(
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
        post_notice(schedule, f"Schedule #{schedule.number} is active: {describe(reload(schedule))}; approved "
                    f"by {', '.join(f'<@{a}>' for a in approvers) or 'its requester'} until "
                    f"{when(reload(schedule).approval_expires_at)}.", transport)
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
                post_notice(schedule, f"Schedule #{schedule.number} is paused: its approval request "
                            f"#{request.number} was {request.state}.", self.transport)

    def _activate(self, schedule: Schedule, hosts: list[str], approvers: list[str], until: int | None) -> None:
        now = now_ms()
        set_fields(schedule, state=ACTIVE, reason=None, hosts=hosts, approvers=approvers, approval_expires_at=until,
                   anchor_at=now, last_fire_at=now, busy_skipped=0, missed_old=0, paused_by=None, paused_authority=None)
        self._arm()

    # -- waking (what is due runs in bot.schedules.firing) ---------------------------------------

    def _fire(self, schedule_id: str) -> None:
        """Woken at a fire time (or on taking over): run what is due, if this process leads."""
        with self._work() as working:
            if not working or not self._leads():
                return
            try:
                self._fire_due(schedule_id)
            except Exception:
                log.exception("firing schedule %s failed", schedule_id)

    def _block(self, schedule: Schedule, verdict: Blocked) -> None:
        """Pause the schedule, and ask for approval again in its channel when that can help."""
        assert self.transport is not None
        req = ChatRequest(schedule.requester, schedule.channel, origin=schedule.origin)
        if verdict.decision is None:
            set_fields(schedule, state=PAUSED, reason=verdict.reason)
            self._arm()
            post_notice(schedule, f"Schedule #{schedule.number} is paused: {verdict.reason}. "
                        f"`/om schedule resume {schedule.number}` checks it again.", self.transport)
            return
        post_notice(schedule, f"Schedule #{schedule.number} is paused: {verdict.reason}. Asking for approval again.",
                    self.transport)
        self._ask(schedule, verdict.hosts, verdict.decision, req, self.transport, verdict.reason)
        self._arm()
