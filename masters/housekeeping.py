"""The master's timers, all on one APScheduler `BackgroundScheduler` (UTC): the jobs below, and the
server's (masters.server: closing connections at their authentication deadline, reporting suppressed
stranger lines). No other periodic work in the master keeps time for itself; what still waits in a
loop waits inside one call (a backend watching its process up to the job's deadline), and
tests/test_timers.py lists each such place.

- retention: jobs that ended more than `retention_days` ago are deleted with their events (this
  master's own, in a database shared with others);
- nonces: replay-cache entries past their window (they can never pass the time checks again);
- host locks: jobs waiting for hosts try again, for locks another master sharing the database
  freed (this master's own jobs retry at once when one of its jobs ends);
- host-lock leases (masters.leases): renewing this master's and taking over lapsed ones every
  `lock_renew_seconds`, and watching, several times a renewal period, that no job works on under a
  lease that could lapse.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler

from masters.jobstore import JobStore
from masters.leases import HostLeases
from ombot.clock import MS_PER_SECOND, now_ms

log = logging.getLogger("ombot.master")

RETRY_SECONDS = 1.0  # how soon a job notices hosts another master freed
NONCE_PURGE_SECONDS = 300
RETENTION_PURGE_SECONDS = 3600  # hourly, or more often for a retention shorter than four hours
SECONDS_PER_DAY = 86400


def purge_interval(retention_seconds: float) -> float:
    """Often enough that nothing outlives its retention by more than a quarter of it (at most an hour)."""
    return max(1.0, min(RETENTION_PURGE_SECONDS, retention_seconds / 4))


class Housekeeping:
    """Starts the master's periodic work; `close` stops it (a job under way finishes first)."""

    def __init__(self, jobs: JobStore, retention_days: float, retry_waiting: Callable[[], None],
                 leases: HostLeases) -> None:
        self.jobs, self.retention_seconds = jobs, retention_days * SECONDS_PER_DAY
        self.scheduler = BackgroundScheduler(timezone=timezone.utc)
        every = {"coalesce": True, "max_instances": 1, "misfire_grace_time": None}
        self.scheduler.add_job(self.purge_old_jobs, "interval", seconds=purge_interval(self.retention_seconds),
                               id="retention", **every)
        self.scheduler.add_job(self.purge_old_nonces, "interval", seconds=NONCE_PURGE_SECONDS, id="nonces", **every)
        self.scheduler.add_job(retry_waiting, "interval", seconds=RETRY_SECONDS, id="host-locks", **every)
        # Two jobs: a renewal stuck on an unreachable database must not hold up the watch.
        self.scheduler.add_job(leases.renew, "interval", seconds=leases.renew_seconds, id="lock-leases", **every)
        self.scheduler.add_job(leases.watch, "interval", seconds=leases.watch_seconds, id="lock-lease-watch",
                               **every)

    def start(self) -> None:
        self.purge_old_jobs()  # a master that was down a long time does not keep old jobs another hour
        self.scheduler.start()

    # -- for the rest of the master (masters.server) ----------------------------------------------

    def every(self, job_id: str, seconds: float, work: Callable[[], None]) -> None:
        """`work` every `seconds`, never two at once."""
        self.scheduler.add_job(work, "interval", seconds=seconds, id=job_id, coalesce=True, max_instances=1,
                               misfire_grace_time=None)

    def at(self, job_id: str, deadline: float, work: Callable[[], None]) -> None:
        """`work` once at `deadline` (time.monotonic()), replacing what `job_id` was set to run. Two
        may run at once: a run may set the next one only just ahead."""
        run_at = datetime.now(timezone.utc) + timedelta(seconds=max(0.0, deadline - time.monotonic()))
        self.scheduler.add_job(work, "date", run_date=run_at, id=job_id, replace_existing=True,
                               misfire_grace_time=None, max_instances=2)

    def cancel(self, job_id: str) -> None:
        with contextlib.suppress(JobLookupError):
            self.scheduler.remove_job(job_id)

    def purge_old_jobs(self) -> None:
        try:
            deleted = self.jobs.purge_finished_before(now_ms() - int(self.retention_seconds * MS_PER_SECOND))
        except Exception:  # the database may be away a moment: the next run tries again
            log.exception("could not delete jobs past their retention")
            return
        if deleted:
            log.info("deleted %d job(s) that ended more than %g day(s) ago", deleted,
                     self.retention_seconds / SECONDS_PER_DAY)

    def purge_old_nonces(self) -> None:
        try:
            self.jobs.forget_old_nonces()
        except Exception:
            log.exception("could not forget old nonces")

    def close(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
