"""One scheduler per process: every periodic job and later retry of a bot's or a master's process is a
job on one APScheduler `BackgroundScheduler` in UTC, through this wrapper.

Whoever composes the process makes the one `Timers` (bot.service.BotService, masters.core.MasterCore),
hands it to what keeps time (the approval gate's expiries, the job lifecycle, the audit feed and its
alerts' retries, the schedules' lease and fire times; the master's housekeeping and its server's deadlines), starts it, and closes it last.
Each user names its jobs, so it can cancel its own without stopping the others'. tests/test_timers.py
checks that nothing else in those processes keeps time for itself.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler


class Timers:
    """The process's one scheduler, in UTC. Jobs may be added before `start`: they wait for it."""

    def __init__(self) -> None:
        self.scheduler = BackgroundScheduler(timezone=timezone.utc)

    def start(self) -> None:
        """Start keeping time (again is no error)."""
        if not self.scheduler.running:
            self.scheduler.start()

    def close(self, wait: bool = False) -> None:
        """Stop: no job runs any more; with `wait`, the runs under way finish first."""
        if self.scheduler.running:
            self.scheduler.shutdown(wait=wait)

    def every(self, job_id: str, seconds: float, work: Callable[[], None]) -> None:
        """`work` now, then every `seconds`. Its job is paused while it runs: a run longer than the
        interval delays the next, which is neither stacked nor skipped (and logged as skipped)."""
        def run() -> None:
            self._on(job_id, self.scheduler.pause_job)
            try:
                work()
            finally:
                self._on(job_id, self.scheduler.resume_job)  # the interval's next beat from now

        self.scheduler.add_job(run, "interval", seconds=seconds, id=job_id, next_run_time=datetime.now(timezone.utc),
                               max_instances=1, coalesce=True)

    def interval(self, job_id: str, seconds: float, work: Callable[[], None], first_now: bool = False) -> None:
        """`work` on a fixed beat of `seconds` (and at once, with `first_now`), never two at once; a beat
        missed while the process was busy runs late, once."""
        first = {"next_run_time": datetime.now(timezone.utc)} if first_now else {}
        self.scheduler.add_job(work, "interval", seconds=seconds, id=job_id, coalesce=True, max_instances=1,
                               misfire_grace_time=None, **first)

    def trigger(self, job_id: str, trigger: Any, work: Callable[..., None], *args: Any) -> None:
        """`work(*args)` at each time APScheduler's `trigger` computes (cron or interval), replacing what
        `job_id` was set to run; never two at once, and a fire time missed while busy runs late, once."""
        self.scheduler.add_job(work, trigger, args=args, id=job_id, replace_existing=True, misfire_grace_time=None,
                               coalesce=True, max_instances=1)

    def once(self, seconds: float, work: Callable[..., None], *args: Any) -> None:
        """`work(*args)` once, `seconds` from now (however late the scheduler gets to it)."""
        self.scheduler.add_job(work, "date", run_date=datetime.now(timezone.utc) + timedelta(seconds=seconds),
                               args=args, misfire_grace_time=None)

    def at(self, job_id: str, deadline: float, work: Callable[..., None], *args: Any) -> None:
        """`work(*args)` once at `deadline` (time.monotonic()), replacing what `job_id` was set to run.
        Two may run at once: a run may set the next one only just ahead."""
        run_at = datetime.now(timezone.utc) + timedelta(seconds=max(0.0, deadline - time.monotonic()))
        self.scheduler.add_job(work, "date", run_date=run_at, id=job_id, args=args, replace_existing=True,
                               misfire_grace_time=None, max_instances=2)

    def cancel(self, job_id: str) -> None:
        """Drop the job `job_id`; one already gone (or never set) is no error."""
        self._on(job_id, self.scheduler.remove_job)

    @staticmethod
    def _on(job_id: str, change: Callable[[str], Any]) -> None:
        with contextlib.suppress(JobLookupError):  # cancelled meanwhile
            change(job_id)
