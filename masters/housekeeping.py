"""The master's periodic work, as jobs on the process's one scheduler (ombot.timers.Timers, which the
master's core makes and also hands to its server: closing connections at their authentication
deadline, reporting suppressed stranger lines). No other periodic work in the master keeps time for
itself; what still waits in a loop waits inside one call (a backend watching its process up to the
job's deadline), and tests/test_timers.py lists each such place.

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

import logging
from collections.abc import Callable

from ombot.masters.jobstore import JobStore
from ombot.masters.leases import HostLeases
from ombot.clock import MS_PER_SECOND, now_ms
from ombot.timers import Timers

log = logging.getLogger("ombot.master")

RETRY_SECONDS = 1.0  # how soon a job notices hosts another master freed
NONCE_PURGE_SECONDS = 300
RETENTION_PURGE_SECONDS = 3600  # hourly, or more often for a retention shorter than four hours
SECONDS_PER_DAY = 86400


def purge_interval(retention_seconds: float) -> float:
    """Often enough that nothing outlives its retention by more than a quarter of it (at most an hour)."""
    return max(1.0, min(RETENTION_PURGE_SECONDS, retention_seconds / 4))


class Housekeeping:
    """The master's periodic work, set on `timers` (the process's scheduler, which its owner starts and
    stops: a job under way finishes first)."""

    def __init__(self, timers: Timers, jobs: JobStore, retention_days: float, retry_waiting: Callable[[], None],
                 leases: HostLeases) -> None:
        self.jobs, self.retention_seconds = jobs, retention_days * SECONDS_PER_DAY
        timers.interval("retention", purge_interval(self.retention_seconds), self.purge_old_jobs)
        timers.interval("nonces", NONCE_PURGE_SECONDS, self.purge_old_nonces)
        timers.interval("host-locks", RETRY_SECONDS, retry_waiting)
        # Two jobs: a renewal stuck on an unreachable database must not hold up the watch.
        timers.interval("lock-leases", leases.renew_seconds, leases.renew)
        timers.interval("lock-lease-watch", leases.watch_seconds, leases.watch)

    def start(self) -> None:
        """The first purge now: a master that was down a long time does not keep old jobs another hour."""
        self.purge_old_jobs()

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
