"""The master's counters (docs/monitoring.md), counted where the thing happens (masters.runner,
masters.livejob, masters.audit). Figures that describe a state (jobs under way, connections,
agents) are read at each scrape instead: masters.ops. Labels stay bounded: modules, states,
statuses, backends, outcomes.
"""

from __future__ import annotations

from ombot.opsweb import Counter, Histogram, Info

# From a quick check to the longest job_timeout_seconds one would set.
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

JOBS = Counter("ombot_master_jobs_total", "Jobs that entered each state: queued when accepted, running when "
               "the backend took them, then their final state.", ["module", "state"])
JOB_DURATION = Histogram("ombot_master_job_duration_seconds", "A job's time from the backend taking it (after any "
                         "wait for its hosts or a slot) to its end.", ["module"], buckets=DURATION_BUCKETS)
HOST_RESULTS = Counter("ombot_master_host_results_total", "Each host's result in the jobs that ended.",
                       ["module", "status"])
BACKEND_RUNS = Counter("ombot_master_backend_runs_total", "Jobs handed to the backend, by how its run returned: "
                       "completed, or error (it raised; the hosts it did not report are failed).",
                       ["backend", "outcome"])
AUDIT_EVENTS = Counter("ombot_master_audit_events_total", "Audit events agents sent: ingested (stored), deduped "
                       "(held already), dropped (malformed, refused with a reason), deferred (past the ingest "
                       "limit: the agent sends them again).", ["outcome"])
MASTER = Info("ombot_master", "This master: its id, IDC, backend and OMBot version.")


def job_entered(module: str, state: str) -> None:
    JOBS.labels(module, state).inc()


def job_ended(module: str, state: str, seconds: float | None, statuses: list[str]) -> None:
    """A job's final state, its hosts' results, and (if the backend ever took it) how long it ran."""
    JOBS.labels(module, state).inc()
    if seconds is not None:
        JOB_DURATION.labels(module).observe(seconds)
    for status in statuses:
        HOST_RESULTS.labels(module, status).inc()


def backend_ran(backend: str, completed: bool) -> None:
    BACKEND_RUNS.labels(backend, "completed" if completed else "error").inc()


def audit_batch(ingested: int, deduped: int, dropped: int, deferred: int) -> None:
    for outcome, count in (("ingested", ingested), ("deduped", deduped), ("dropped", dropped), ("deferred", deferred)):
        if count:
            AUDIT_EVENTS.labels(outcome).inc(count)
