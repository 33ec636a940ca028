"""Salt's side of a job's exchange: one call, what a minion returned, and reading that return.

A `Reply` is read into the host's output and outcome (`HostRun`); a reply that ends the host's run
raises `StepFailed` with the exit code it is reported with. The job that publishes the calls and
feeds the replies is salt_job.py's `SaltJob`.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

from ombot.masters.backends import ansible_snippets as snippets
from ombot.masters.backends import put_file
from ombot.masters.backends.base import CappedText, HostStatus

_STATE_WORDS = {True: "ok", None: "would change", False: "failed"}


class StepFailed(Exception):
    """A step that ended the host's run, with the exit code the host is reported with."""

    def __init__(self, message: str, rc: int | None = None) -> None:
        super().__init__(message)
        self.rc = rc


@dataclass(frozen=True)
class Call:
    """One Salt function call on a minion; every argument a keyword argument."""

    fun: str
    kwarg: dict[str, Any]

    @functools.cached_property
    def key(self) -> str:
        """What hosts ready for the same call share one publish by (made once: a call may be large and shared)."""
        return self.fun + json.dumps(self.kwarg, sort_keys=True, default=str)


@dataclass
class Reply:
    """What a minion returned for one call."""

    ret: Any
    retcode: int | None


@dataclass
class HostRun:
    """One host's progress through its plan."""

    name: str
    out: CappedText
    err: CappedText
    program: Generator[Call, Reply, None] | None = None
    started: float = field(default_factory=time.time)
    call: Call | None = None  # waiting to be published
    jid: str | None = None  # the published call it waits for
    waiting_since: float = 0.0  # when it was last published to or heard from (monotonic)
    asked: str | None = None  # the jid of a find_job it has not answered yet
    asked_at: float = 0.0
    idle_answers: int = 0  # find_job answers saying it runs nothing
    tmp: str = ""  # its temporary directory, if the plan needs one
    heard: bool = False  # it returned or answered something in this job
    status: HostStatus = HostStatus.OK
    rc: int | None = None
    error: str | None = None
    jids: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    reported: bool = False


# -- reading replies -------------------------------------------------------------------------


def ok_or_fail(reply: Reply, what: str) -> None:
    """StepFailed naming `what` unless the minion answered True."""
    if reply.ret is not True:
        raise StepFailed(f"{what} failed: {_short(reply.ret)}")


def ran(reply: Reply, host: HostRun, program: str, quiet: bool = False) -> str:
    """A cmd.run_all reply: its output into the host's (unless quiet), a non-zero exit fails the host."""
    ret = reply.ret
    if not isinstance(ret, dict) or "retcode" not in ret:  # Salt could not start it, or the function raised
        text = _short(ret)
        if "[Errno 2]" in text:
            raise StepFailed(f"command not found: {program}", rc=127)
        raise StepFailed(f"{program}: {text}")
    stdout, stderr, rc = str(ret.get("stdout") or ""), str(ret.get("stderr") or ""), ret.get("retcode")
    if not quiet:
        host.out.write(stdout.encode())
        if stderr:
            host.err.write(stderr.encode())
        host.rc = rc if isinstance(rc, int) else None
    if rc != 0:
        lines = [line for line in stderr.split(snippets.TAIL_TOTAL_MARK)[0].splitlines() if line]
        raise StepFailed(lines[-1] if quiet and lines else f"{program} exited with {rc}", rc=rc)
    return stdout


def tail_reply(reply: Reply, host: HostRun) -> None:
    """A log tail's lines into the host's output (or why it could not be read)."""
    ret = reply.ret
    if isinstance(ret, dict) and snippets.TAIL_TOTAL_MARK in str(ret.get("stderr") or ""):
        stderr, _, total = str(ret["stderr"]).rpartition(snippets.TAIL_TOTAL_MARK)
        stdout = str(ret.get("stdout") or "")
        host.out.write(stdout.encode())
        host.out.total += max(0, int(total) - len(stdout.encode()))  # the snippet sent at most the cap
        if stderr:
            host.err.write(stderr.encode())
        host.rc = ret.get("retcode") if isinstance(ret.get("retcode"), int) else None
        return
    ran(reply, host, "the file check", quiet=True)


def _states(reply: Reply) -> list[dict[str, Any]]:
    """A state run's results in the order they ran; a list or text reply is Salt refusing the run."""
    ret = reply.ret
    if not isinstance(ret, dict) or not all(isinstance(v, dict) for v in ret.values()):
        raise StepFailed(f"salt: {_short(ret)}", rc=reply.retcode)
    return sorted(ret.values(), key=lambda r: r.get("__run_num__", 0))


def put_reply(reply: Reply, host: HostRun, dest: str, check: bool) -> None:
    """put_file's answer; a check run shows what would change."""
    changed, diff = put_file.reply(ran(reply, host, "the file write", quiet=True))
    if check and changed:
        host.out.write(f"would change {dest}:\n{diff}".encode())


def state_run(reply: Reply, host: HostRun, check: bool) -> None:
    """A state run's outcome per state, counted into the host's summary; any failed state fails the host."""
    counts = {"ok": 0, "changed": 0, "would_change": 0, "failed": 0}
    for result in _states(reply):
        outcome, changes = result.get("result"), result.get("changes") or {}
        word = "changed" if outcome is True and changes else _STATE_WORDS.get(outcome, "failed")
        counts[word.replace(" ", "_")] += 1
        host.out.write(f"{result.get('__id__', result.get('name'))}: {word}: {result.get('comment', '')}\n".encode())
        if changes:
            host.out.write(_changes(changes).encode())
    host.data["states"] = counts
    if counts["failed"] or (reply.retcode not in (0, None) and not check):
        raise StepFailed(f"{counts['failed']} of {sum(counts.values())} states failed", rc=reply.retcode or 1)


def _changes(changes: dict[str, Any]) -> str:
    """A state's changes as text: a diff as it is, anything else as JSON."""
    diff = changes.get("diff")
    if isinstance(diff, str) and len(changes) == 1:
        return diff if diff.endswith("\n") else diff + "\n"
    return json.dumps(changes, indent=2, sort_keys=True, default=str) + "\n"


def _short(value: Any) -> str:
    text = "; ".join(map(str, value)) if isinstance(value, list) else str(value)
    return text.strip()[:500]
