"""The leases on the host locks this master holds: renewed, watched, and taken over from others.

Every lock row carries a lease that ends `lease_seconds` after its master last renewed it, by the
database's clock (masters.jobstore). Every `renew_seconds` the master renews the leases of the jobs
holding locks here and takes over the locks whose lease lapsed (their master died or stalled: its
jobs end `unknown`). A job whose lease could not be renewed is stopped one renewal period before
the lease could lapse, so a master that lost the database never works on a host another master may
have taken; a job whose locks were taken over (it stalled past its lease) is stopped at once.

Lapse is judged by the database's clock; this master's side by its own monotonic clock, from the
moment before the statement that set the lease: the lease cannot lapse earlier than that.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ombot.masters.jobstore import JobStore

log = logging.getLogger("ombot.master")

WATCH_SECONDS = 1.0  # at most this long between checks that every held lease is still safe
UNRENEWED = ("master {master} could not renew its lease on the job's hosts for {seconds:.0f} s, so it stopped "
             "the job before another master could take the hosts over")
LOST = ("master {master} lost its lease on the job's hosts (it lapsed and another master took them over), "
        "so it stopped the job")


@dataclass
class _Held:
    hosts: int  # how many lock rows the job holds
    safe_until: float  # time.monotonic(): the lease lasts at least until then
    renewed_at: float  # time.monotonic() before the statement that last set the lease
    stopping: bool = False


class HostLeases:
    """The jobs holding host locks at this master, and their leases (see the module docstring).

    `stop(job_id, reason)` stops a job's run on its hosts (the runner's cancel)."""

    def __init__(self, jobs: JobStore, master_id: str, lease_seconds: float, renew_seconds: float,
                 stop: Callable[[str, str], None]) -> None:
        self.jobs, self.master_id, self.stop = jobs, master_id, stop
        self.lease_seconds, self.renew_seconds = lease_seconds, renew_seconds
        self._held: dict[str, _Held] = {}
        self._lock = threading.Lock()

    @property
    def watch_seconds(self) -> float:
        """Checks come often enough to leave most of the last renewal period for stopping the runs."""
        return min(WATCH_SECONDS, self.renew_seconds / 4)

    def taken(self, job_id: str, hosts: int, since: float) -> None:
        """The job holds `hosts` locks, taken by a statement that began after `since` (time.monotonic())."""
        with self._lock:
            self._held[job_id] = _Held(hosts, since + self.lease_seconds, since)

    def released(self, job_id: str) -> None:
        """The job lets its locks go (or lost them): no more renewing."""
        with self._lock:
            self._held.pop(job_id, None)

    def renew(self) -> None:
        """Renew every held lease, stop the jobs whose locks were taken over, then take over lapsed locks."""
        started = time.monotonic()
        with self._lock:
            wanted = {job: held.hosts for job, held in self._held.items()}
        try:
            counts = self.jobs.renew_locks(list(wanted)) if wanted else {}
        except Exception:  # the database may be away: the watch stops the jobs before their leases lapse
            log.warning("could not renew the leases on the host locks of %d job(s)", len(wanted), exc_info=True)
        else:
            self._renewed(wanted, counts, started)
        try:
            for job in self.jobs.take_over_lapsed():
                log.warning("took over the host locks of job %s: its master stopped renewing their lease", job)
        except Exception:
            log.warning("could not take over lapsed host locks", exc_info=True)

    def _renewed(self, wanted: dict[str, int], counts: dict[str, int], started: float) -> None:
        lost: list[str] = []
        with self._lock:
            for job, hosts in wanted.items():
                held = self._held.get(job)
                if held is None or held.stopping:  # released meanwhile, or already being stopped
                    continue
                if counts.get(job, 0) < hosts:
                    held.stopping = True
                    lost.append(job)
                else:
                    held.safe_until = max(held.safe_until, started + self.lease_seconds)
                    held.renewed_at = max(held.renewed_at, started)
        for job in lost:
            log.warning("job %s lost its host locks to another master; stopping it", job)
            self.stop(job, LOST.format(master=self.master_id))

    def watch(self) -> None:
        """Stop the jobs whose lease could lapse within one renewal period: this master cannot renew it."""
        now = time.monotonic()
        due: list[tuple[str, float]] = []
        with self._lock:
            for job, held in self._held.items():
                if not held.stopping and now >= held.safe_until - self.renew_seconds:
                    held.stopping = True
                    due.append((job, now - held.renewed_at))
        for job, unrenewed in due:
            log.warning("could not renew the lease of job %s for %.0f s; stopping it", job, unrenewed)
            self.stop(job, UNRENEWED.format(master=self.master_id, seconds=unrenewed))
