"""Firing: what a schedule does when it is due, claimed by one compare-and-set so it runs once.

Each run is claimed by one compare-and-set on `last_fire_at`, so two processes that both believe
they lead still fire it once; its job id is uuid5(schedule id, fire time), so a run sent twice is
answered by the master as a duplicate of the first. Firings that pass while no process fires are
caught up when one does: those within `misfire_grace` coalesce into one run (the card says how many
were missed), older ones are skipped and reported, never run late.
"""

from __future__ import annotations

import logging
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import peewee

from ombot.approvals import Gate
from ombot.bot import grammar, store
from ombot.bot.schedules.clearance import Blocked, Cleared, may_run
from ombot.bot.schedules.models import ACTIVE, Schedule, ScheduleRun, reload
from ombot.bot.schedules.render import plain_when, post_notice, run_label
from ombot.bot.schedules.timing import fire_times, timing_of
from ombot.bot.transport import ChatRequest, Transport
from ombot.masters import FINAL_STATES, JobRef, Refused, Router
from ombot.modules import ModuleSpec
from ombot.clock import now_ms
from ombot.errors import OmbotError

log = logging.getLogger("ombot.bot.schedules")  # one logger for the package, as before the split

WAKE_TOLERANCE_MS = 20  # a wake-up a hair before its fire time (rounding) still fires it
START_GRACE_MS = 60_000  # a run claimed this recently whose job is not in the table yet is in flight
RUN_NAMESPACE = uuid.UUID("6f1d7c2a-5b8e-4c1f-9a3d-2e7b0c4d8f15")


class Runner(Protocol):
    """What the schedules need from the dispatcher (which imports this module, not the reverse)."""

    def spec_of(self, idc: str, name: str) -> ModuleSpec: ...

    def start_job(self, command: grammar.Run, spec: ModuleSpec, hosts: list[str], req: ChatRequest,
                  transport: Transport, approvers: Sequence[str] = (), cancel_roles: Sequence[str] = (),
                  job_id: str | None = None, announce: bool = True) -> None: ...

    def later(self, req: ChatRequest, transport: Transport, action: str, detail: str,
              work: Callable[[], None]) -> None: ...


class Firing(ABC):
    """The firing half of the Schedules service (bot.schedules.service), which provides this state."""

    router: Router
    gate: Gate | None
    runner: Runner
    origin: str
    grace_ms: int
    transport: Transport | None

    @abstractmethod
    def _block(self, schedule: Schedule, verdict: Blocked) -> None:
        """Pause the schedule, and ask for approval again when that can help (the service's approvals)."""

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
                post_notice(schedule, f"Schedule #{schedule.number} skipped {too_old} run(s) missed while no bot "
                            f"was running them (older than misfire_grace, never run late).", self.transport)
            return
        busy = self._in_flight(schedule, now)
        if busy is not None:
            self._claim(schedule, latest, busy_skipped=recent, missed_old=too_old)
            log.info("schedule %s: run at %s skipped, %s still runs", schedule.number, latest, busy)
            return
        verdict = may_run(schedule, self.router, self.gate)
        if isinstance(verdict, Blocked):
            if self._claim(schedule, latest, missed_old=too_old):
                self._block(reload(schedule), verdict)
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
        label = run_label(schedule, fire_at, missed, schedule.busy_skipped, schedule.missed_old + too_old)
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
            verdict = may_run(schedule, self.router, self.gate)
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
            post_notice(schedule, f"Schedule #{schedule.number} skipped its run due {plain_when(run.scheduled_at)}: "
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
