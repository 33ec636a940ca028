"""The `ombot` command's exit codes, one meaning each, so a script can branch on them (README, "Exit codes")."""

from __future__ import annotations

from ombot.masters import JobState

OK = 0
FAILED = 1  # the job ended, but not ok on every host (failed, partial, cancelled, timed out)
REFUSED = 2  # refused or invalid (policy, parameters, targets, config; `status`: no such job): nothing ran
UNKNOWN = 3  # a master was lost after the job was sent: check with `ombot status JOB` before sending it again
NOT_SENT = 4  # no master could be reached, so nothing was sent: safe to try again
RUNNING = 5  # `ombot status`: the job is queued or running; ask again later

_BY_STATE: dict[str, int] = {JobState.OK: OK, JobState.UNKNOWN: UNKNOWN, JobState.QUEUED: RUNNING, JobState.RUNNING: RUNNING}


def of_state(state: str) -> int:
    """The exit code that reports a job in `state`: every final state but ok and unknown is FAILED."""
    return _BY_STATE.get(state, FAILED)
