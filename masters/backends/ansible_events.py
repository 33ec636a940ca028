"""Reading ansible-runner's events for one job into per-host results (masters/backends/ansible.py runs it).

Each event names a task of the generated playbook (masters/backends/ansible_play.py), which maps it to
a plan step and its role there; a host's output, counts and status build up from them, and the host is
reported once, as soon as its last task is done (or the run ended without it).
"""

from __future__ import annotations

import difflib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ombot.masters.backends import ansible_play as play
from ombot.masters.backends import agent_setup, put_file
from ombot.masters.backends.ansible_snippets import TAIL_TOTAL_MARK
from ombot.masters.backends.base import CappedText, HostResult, HostStatus, RunContext
from ombot.modules import Command, Emit, FirstAvailable, Ping, Plan, Shell, Step

log = logging.getLogger("ombot.master.ansible")  # the backend's logger: one name for the whole backend

LOST_RUN = ("the warm ansible-playbook server died during the run: whether this host did the work is not known; "
            "check the host before running the job again")


@dataclass
class HostProgress:
    """What the events said so far about one host."""

    name: str
    out: CappedText
    err: CappedText
    started: float = field(default_factory=time.time)
    next_emit: int = 0  # plan steps before this one have had their Emit text written
    status: HostStatus = HostStatus.OK
    rc: int | None = None
    error: str | None = None
    counts: dict[str, int] = field(default_factory=lambda: {"ok": 0, "changed": 0, "failed": 0})
    reported: bool = False
    picks: dict[int, str] = field(default_factory=dict)  # FirstAvailable step -> the choice its probe printed


class Events:
    """Turns runner events into per-host results, reporting each host once, as soon as it is done."""

    def __init__(self, ctx: RunContext, hosts: dict[str, HostProgress]) -> None:
        self.ctx, self.hosts = ctx, hosts
        self.book: play.Playbook | None = None
        self.runner_said = ""
        self.lost = False  # the warm start's server died during the run: what the hosts did is unknown

    def handle(self, event: dict[str, Any]) -> bool:
        """ansible-runner's event handler: one event applied to its host; False, so runner keeps none on disk."""
        kind, data = event.get("event", ""), event.get("event_data") or {}
        host = self.hosts.get(data.get("host", ""))
        meaning = self._meaning(data.get("task", ""))
        if host is None or host.reported or meaning is None:
            if data.get("host") and data.get("host") not in self.hosts:
                log.error("job %s: ansible ran on %s, which is not one of the job's hosts", self.ctx.job_id,
                          data.get("host"))
            return False  # nothing kept on disk: results live in the job, not in artifacts
        try:
            self._apply(kind, host, meaning, data.get("res") or {}, bool(data.get("ignore_errors")),
                        str(data.get("task", "")))
            if self._done(kind, host, str(data.get("task", "")), bool(data.get("ignore_errors"))):
                self._report(host)
        except Exception:  # a surprise in one event must cost that host, not the job's bookkeeping
            log.exception("job %s: could not read an event for %s", self.ctx.job_id, host.name)
            self.fail(host.name, "backend error: unreadable Ansible result")
        return False

    def _done(self, kind: str, host: HostProgress, task: str, ignored: bool) -> bool:
        """Whether a playbook without an end marker is done with this host: its last task has run
        (ok, failed or skipped), or a task failed and the rest of the plan will not run there."""
        if host.reported or self.book is None or self.book.done_after is None:
            return False
        if kind == "runner_on_failed" and not ignored:
            return True
        return task == self.book.done_after and kind in ("runner_on_ok", "runner_on_failed", "runner_on_skipped")

    def _meaning(self, task: str) -> tuple[int, str] | None:
        """(step index, role) of a task; a site playbook's own tasks are its step's, role `play`."""
        if self.book is None:
            return None
        known = self.book.task_steps.get(task)
        if known is None and self.book.playbook and task:
            return self.book.task_steps[""]
        return known

    def _apply(self, kind: str, host: HostProgress, meaning: tuple[int, str], res: dict[str, Any], ignored: bool,
               task: str = "") -> None:
        index, role = meaning
        if role == "play" and kind != "runner_on_unreachable":
            self._play_task(kind, host, index, task, res, ignored)
        elif kind == "runner_on_skipped" and role.startswith("run") and self.ctx.check:
            if role == "run" or host.picks.get(index) == role[3:]:  # not a FirstAvailable choice passed over
                self._emit_until(host, index)
                host.out.write(f"check: not run (Ansible cannot tell what it would do): "
                               f"{self._describe(index, role)}\n".encode())
        elif kind == "runner_on_unreachable":
            host.status, host.error = HostStatus.UNREACHABLE, _text(res.get("msg")) or "unreachable"
            self._report(host)
        elif kind == "runner_on_ok":
            if role == "end":  # the marker that the host is done is not one of the job's tasks
                self._report(host)
                return
            host.counts["ok"] += 1
            host.counts["changed"] += _changed(role, res)
            if role == "probe":  # FirstAvailable's probe prints the index of the command it chose
                host.picks[index] = _text(res.get("stdout")).strip()
            if role != "probe" and index >= 0:
                self._output(host, index, role, res)
        elif kind == "runner_on_failed" and not ignored:
            host.counts["failed"] += 1
            if index >= 0 and role != "probe":
                self._output(host, index, role, res)
            if host.status is HostStatus.OK:  # the first failure is the host's; cleanup after it is not
                host.status, host.rc, host.error = HostStatus.FAILED, _rc(res), self._error(index, role, res)

    def _output(self, host: HostProgress, index: int, role: str, res: dict[str, Any]) -> None:
        self._emit_until(host, index)
        stdout, stderr = _text(res.get("stdout")), _text(res.get("stderr"))
        total = None
        if role == "tail" and TAIL_TOTAL_MARK in stderr:
            stderr, _, total_text = stderr.rpartition(TAIL_TOTAL_MARK)
            total = int(total_text)
        if role == "put" and stdout:  # put_file's JSON answer: only its diff (a check run) is shown
            stdout = put_file.reply(stdout)[1]
        data = b"pong\n" if isinstance(self._step(index), Ping) else stdout.encode()
        host.out.write(data)
        if res.get("diff"):  # a check run (--diff): what this step would change
            host.out.write(diff_text(res["diff"]).encode())
        if total is not None:
            host.out.total += max(0, total - len(data))  # the snippet sent at most the cap
        if stderr:
            host.err.write(stderr.encode() + (b"" if stderr.endswith("\n") else b"\n"))
        if role.startswith("run") or role in ("tail", "agent"):
            host.rc = _rc(res)
        host.next_emit = index + 1

    def _emit_until(self, host: HostProgress, index: int) -> None:
        assert self.book is not None
        for step in self.ctx.plan.steps[host.next_emit:index]:
            if isinstance(step, Emit):
                host.out.write(step.text.encode() + b"\n")
        host.next_emit = max(host.next_emit, index)

    def _play_task(self, kind: str, host: HostProgress, index: int, task: str, res: dict[str, Any],
                   ignored: bool) -> None:
        """One task of a site playbook: a line saying how it went, its diff and its output."""
        word = {"runner_on_ok": "changed" if res.get("changed") else "ok", "runner_on_skipped": "skipped",
                "runner_on_failed": "failed (ignored)" if ignored else "failed"}.get(kind)
        if word is None:
            return
        self._emit_until(host, index)
        host.counts["ok"] += kind == "runner_on_ok"
        host.counts["changed"] += kind == "runner_on_ok" and bool(res.get("changed"))
        msg = _text(res.get("msg"))
        lines = [f"{word}: {task}" + (f": {msg}" if msg and kind == "runner_on_failed" else "")]
        if res.get("diff"):
            lines.append(diff_text(res["diff"]).rstrip("\n"))
        if _text(res.get("stdout")):
            lines.append(_text(res.get("stdout")).rstrip("\n"))
        elif msg and kind == "runner_on_ok":  # debug tasks say what they have to say in msg
            lines.append(msg)
        host.out.write(("\n".join(lines) + "\n").encode())
        if _text(res.get("stderr")):
            host.err.write(_text(res.get("stderr")).rstrip("\n").encode() + b"\n")
        if kind == "runner_on_failed" and not ignored:
            host.counts["failed"] += 1
            if host.status is HostStatus.OK:
                host.status, host.rc, host.error = HostStatus.FAILED, _rc(res), f"{task}: {msg or 'failed'}"

    def _describe(self, index: int, role: str) -> str:
        step = self._step(index)
        if isinstance(step, FirstAvailable) and role[3:].isdigit() and int(role[3:]) < len(step.commands):
            step = step.commands[int(role[3:])]
        return Plan(step).describe()[0] if step is not None else "a step"

    def _step(self, index: int) -> Step | None:
        return self.ctx.plan.steps[index] if 0 <= index < len(self.ctx.plan.steps) else None

    def _error(self, index: int, role: str, res: dict[str, Any]) -> str:
        step, rc, msg = self._step(index), _rc(res), _text(res.get("msg"))
        if role.startswith("run") and (isinstance(step, Command | Shell) or rc is not None):
            program = "/bin/sh" if isinstance(step, Shell) else _program(res, step)
            if msg.startswith("[Errno 2]"):
                return f"command not found: {program}"
            if rc is not None:
                return f"{program} exited with {rc}"
        if role == "agent":  # agent_setup.py says why in one message, which may quote a log's last lines
            return " / ".join(line for line in _text(res.get("stderr")).splitlines() if line)[:1000] or msg or "failed"
        if role in ("probe", "tail", "put"):  # our snippets say why on their last stderr line
            lines = [line for line in _text(res.get("stderr")).split(TAIL_TOTAL_MARK)[0].splitlines() if line]
            if lines:
                return lines[-1]
        return msg or "failed"

    def fail(self, name: str, error: str) -> None:
        """The host fails with `error` and is reported now (before or instead of running it)."""
        host = self.hosts[name]
        host.status, host.error = HostStatus.FAILED, error
        self._report(host)

    def finish_rest(self) -> None:
        """Hosts the run ended without finishing: stopped ones, or ones Ansible said nothing about."""
        ctx = self.ctx
        for host in self.hosts.values():
            if host.reported:
                continue
            if self.book is not None and not self.book.has_tasks:
                pass  # nothing to run: the Emit text is the whole result
            elif self.lost and host.status is HostStatus.OK:  # it may still be at work: never "failed"
                host.status, host.error = HostStatus.UNKNOWN, LOST_RUN
            elif ctx.cancelled.is_set() and host.status is HostStatus.OK:
                host.status, host.error = HostStatus.CANCELLED, "cancelled"
            elif ctx.remaining() <= 0 and host.status is HostStatus.OK:
                host.status, host.error = HostStatus.TIMED_OUT, "timed out"
            elif host.status is HostStatus.OK:
                host.status = HostStatus.FAILED
                host.error = "Ansible reported no result for this host" + (f": {self.runner_said}"
                                                                          if self.runner_said else "")
            self._report(host)

    def _report(self, host: HostProgress) -> None:
        if host.reported:
            return
        if host.status is HostStatus.OK:
            self._emit_until(host, len(self.ctx.plan.steps))
        host.reported = True
        result = HostResult.from_output(host.name, host.status, host.out, host.err, rc=host.rc, started=host.started,
                                        ended=time.time(), error=host.error)
        result.data = {"ansible": dict(host.counts)}
        if host.status is HostStatus.OK and self.ctx.plan.parse is not None:
            try:
                result.data = {**self.ctx.plan.parse(result.stdout), **result.data}
            except Exception as exc:  # a module's parser failing is that host's failure, not the job's
                result.status, result.error = HostStatus.FAILED, f"could not parse output: {type(exc).__name__}: {exc}"
        self.ctx.report(result)


def diff_text(diff: Any) -> str:
    """Ansible's --diff result as a unified diff: a dict or a list of them, each with before/after
    (and their headers) or text already `prepared`."""
    out: list[str] = []
    for part in diff if isinstance(diff, list) else [diff]:
        if not isinstance(part, dict):
            continue
        if isinstance(part.get("prepared"), str):
            out.append(part["prepared"].rstrip("\n") + "\n")
            continue
        before, after = part.get("before"), part.get("after")
        if not isinstance(before, str) or not isinstance(after, str) or before == after:
            continue
        out.extend(difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                        f"before: {_text(part.get('before_header')) or 'before'}",
                                        f"after: {_text(part.get('after_header')) or 'after'}"))
        if out and not out[-1].endswith("\n"):
            out[-1] += "\n"
    return "".join(out)


def _changed(role: str, res: dict[str, Any]) -> bool:
    """Whether a task changed something; put_file says so itself (a command task is always `changed`)."""
    if role == "put":
        return put_file.reply(_text(res.get("stdout")))[0]
    if role == "agent":  # agent_setup.py lists what it changed (in a check run: what it would)
        return bool(agent_setup.reply(_text(res.get("stdout"))).get("changes"))
    return bool(res.get("changed"))


def _text(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else str(value)


def _rc(res: dict[str, Any]) -> int | None:
    rc = res.get("rc")
    return rc if isinstance(rc, int) and not isinstance(rc, bool) else None


def _program(res: dict[str, Any], step: Step | None) -> str:
    cmd = res.get("cmd")
    if isinstance(cmd, list) and cmd:
        return str(cmd[0])
    return str(step.argv[0]) if isinstance(step, Command) else "command"
