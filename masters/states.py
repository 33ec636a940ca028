"""Job states, shared by the master (which sets them) and every client (which shows them)."""

from enum import StrEnum


class JobState(StrEnum):
    """Where a job is. The master reports every member but SUBMITTING; a job in FINAL_STATES stays there."""

    SUBMITTING = "submitting"  # the bot's, before a master accepted the job: never sent by a master
    QUEUED = "queued"
    RUNNING = "running"
    OK = "ok"
    FAILED = "failed"
    PARTIAL = "partial"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    UNKNOWN = "unknown"  # the master lost track (it stopped, or the link broke): never re-run elsewhere


FINAL_STATES = frozenset({JobState.OK, JobState.FAILED, JobState.PARTIAL, JobState.CANCELLED,
                          JobState.TIMED_OUT, JobState.UNKNOWN})
