"""Run plans on remote hosts with Ansible, through ansible-runner: one run per job.

The plan becomes one generated playbook (masters/backends/ansible_play.py) run with `--limit` set
to exactly the job's hosts and the `free` strategy (`linear` for one task per host), so each host
goes through its steps at its own pace. Each host is reported as soon as its last task is done,
from runner events as they arrive. A cancel or the job's deadline stops the run; a short second
run then ends whatever the job left running on its hosts. docs/backends.md describes the set-up,
the tuned defaults and the limits.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ansible_runner import Runner, RunnerConfig

from ombot.masters.backends import ansible_play as play
from ombot.masters.backends import playbooks, put_file
from ombot.masters.backends.ansible_forkserver import LOST
from ombot.masters.backends.ansible_warm import WarmStart
from ombot.masters.backends.ansible_snippets import CHILD_PATH, TAIL_TOTAL_MARK
from ombot.masters.backends.base import CappedText, HostResult, HostStatus, RunContext, Unsupported
from ombot.masters.inventory import INVENTORY_SETTINGS
from ombot.modules import (
    Command, Emit, FirstAvailable, Ping, Plan, PutFile, RequireWithin, RunPlaybook, Shell, Step, TailFile,
)
from ombot.config import AnsibleSettings, MasterSettings
from ombot.errors import OmbotError

log = logging.getLogger("ombot.master.ansible")

# Names Ansible's --limit takes literally: no pattern characters (`,` `:` `*` `?` `[` `!` `&` `~` `@`).
_LIMITABLE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}$")
# What the ansible-playbook process may see of the master's environment; everything else (Slack
# tokens, database URLs, the operator's own ANSIBLE_* settings) stays out of it and of its artifacts.
ENV_ALLOWED = ("HOME", "USER", "LOGNAME", "SSH_AUTH_SOCK", "TZ")
# What ansible-runner sets for each run whatever the master's environment holds (its event callback,
# its fact cache): kept even when the master happens to hold the same value.
RUNNER_SETS = ("ANSIBLE_STDOUT_CALLBACK", "ANSIBLE_CALLBACK_PLUGINS", "AWX_ISOLATED_DATA_DIR", "ANSIBLE_CACHE_PLUGIN",
               "ANSIBLE_CACHE_PLUGIN_CONNECTION", "RUNNER_OMIT_EVENTS", "RUNNER_ONLY_FAILED_EVENTS")
PEXPECT_POLL_SECONDS = 0.2  # how often ansible-runner asks whether the job was cancelled
STOP_RUN_SECONDS = 30  # bound on the run that ends a stopped job's leftovers
_CONTROL_PATH_MAX = 60  # unix socket paths are short (108 bytes), and ssh appends a hash
_CONTROL_PREFIX = "ombot-cp-"  # a control directory made under the temp dir (a long state path)
LOST_RUN = ("the warm ansible-playbook server died during the run: whether this host did the work is not known; "
            "check the host before running the job again")
_STEPS = (Emit, Ping, Command, FirstAvailable, Shell, PutFile, RequireWithin, TailFile, RunPlaybook)  # what it runs


@dataclass
class _Host:
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


class AnsibleBackend:
    """Runs each job's plan as one ansible-runner run over the master's inventory (module docstring)."""

    name = "ansible"

    def __init__(self, settings: MasterSettings) -> None:
        if settings.inventory is None:
            raise OmbotError(f"masters.{settings.id}: backend \"ansible\" needs an inventory")
        self.inventory, self.tuning = settings.inventory, settings.ansible
        self.data_dir = settings.state_dir / "ansible"  # ansible-runner's private data dir, this master's alone
        for sub in ("project", "home", "tmp"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.data_dir / "ansible.cfg").touch(mode=0o600)  # never an ansible.cfg from the working directory
        self.control_dir = _control_dir(self.data_dir / "cp", self.data_dir / "cp.path")
        real = os.path.join(os.path.dirname(sys.executable), "ansible-playbook")
        self.warm = WarmStart(self.data_dir, self.control_dir, real) if self.tuning.warm_start else None

    def close(self) -> None:
        """The warm start's server stops; a control directory made under the temp dir (the state dir's path
        was too long for a socket) goes with the master; ssh control masters end on their own after ControlPersist."""
        if self.warm is not None:
            self.warm.close()
        if self.control_dir != self.data_dir / "cp":
            shutil.rmtree(self.control_dir, ignore_errors=True)
            (self.data_dir / "cp.path").unlink(missing_ok=True)

    # -- at submit, and for previews -------------------------------------------------------------

    def vet(self, plan: Plan, check: bool) -> Plan:
        """A playbook step checked against the allow-listed directory, its vars typed (playbooks.py);
        a step of another backend (a Salt state) refused at submit rather than on every host."""
        foreign = next((step for step in plan.steps if not isinstance(step, _STEPS)), None)
        if foreign is not None:
            raise Unsupported(f"the ansible backend cannot run {type(foreign).__name__} steps")
        if not any(isinstance(step, RunPlaybook) for step in plan.steps):
            return plan
        steps = [playbooks.resolve(self.tuning.playbooks, step) if isinstance(step, RunPlaybook) else step
                 for step in plan.steps]
        return Plan(*steps, parse=plan.parse)

    def preview(self, plan: Plan, hosts: list[str], check: bool) -> dict[str, Any]:
        """The playbook a job of this plan would run (with `--check --diff` for a check run)."""
        try:
            book = play.build(plan, "preview", "preview", self.tuning.python, None, 0, check)
        except play.PlanError as exc:
            return {"playbook": None, "error": str(exc)}
        options = ["--limit", ",".join(hosts) + ","] + (["--check", "--diff"] if check else [])
        return {"playbook": book.text, "options": options}

    # -- one job -------------------------------------------------------------------------------

    def run(self, ctx: RunContext) -> None:
        ident = re.sub(r"[^A-Za-z0-9_.-]", "_", ctx.job_id)[:64]
        hosts = {h: _Host(h, CappedText(ctx.output_cap), CappedText(ctx.output_cap)) for h in ctx.hosts}
        events = _Events(ctx, hosts)
        for name in [h for h in ctx.hosts if not _LIMITABLE.fullmatch(h)]:
            events.fail(name, f"host name {name!r} cannot be passed to Ansible exactly")
        runnable = [h for h in ctx.hosts if not hosts[h].reported]
        try:
            book = play.build(ctx.plan, ctx.job_id, ident, self.tuning.python, ctx.file_store, ctx.output_cap,
                              ctx.check)
        except play.PlanError as exc:
            for name in runnable:
                events.fail(name, str(exc))
            return
        events.book = book
        if runnable and book.has_tasks:
            runner = self._run(ident, book.text, runnable, ctx, events.handle,
                               lambda: ctx.cancelled.is_set() or ctx.remaining() <= 0)
            events.runner_said = _tail_of_stdout(runner)
            events.lost = self.warm is not None and runner.rc == LOST  # only the launcher exits with it
            if events.lost:
                log.warning("job %s: the warm ansible-playbook server died during the run; its hosts' outcome "
                            "is unknown", ctx.job_id)
        stopped = ctx.cancelled.is_set() or ctx.remaining() <= 0
        leftovers = [h for h in runnable if not hosts[h].reported and hosts[h].status is not HostStatus.UNREACHABLE]
        events.finish_rest()
        if stopped and leftovers and book.has_tasks:
            self._stop_leftovers(ctx, ident, leftovers)

    def _stop_leftovers(self, ctx: RunContext, ident: str, hosts: list[str]) -> None:
        """A killed ansible-playbook leaves remote commands running: end them, and the job's temp dirs."""
        deadline = time.monotonic() + STOP_RUN_SECONDS
        try:
            self._run(f"{ident}-stop", play.stop_playbook(ctx.job_id, ident, self.tuning.python), hosts, ctx,
                      lambda event: False, lambda: time.monotonic() > deadline)
        except Exception:
            log.exception("could not end what job %s left running", ctx.job_id)

    def _run(self, ident: str, text: str, hosts: list[str], ctx: RunContext, on_event: Any, stop: Any) -> Runner:
        playbook = self.data_dir / "project" / f"{ident}.yml"
        fd = os.open(playbook, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        try:
            config = RunnerConfig(
                private_data_dir=str(self.data_dir), playbook=playbook.name, inventory=str(self.inventory),
                limit=",".join(hosts) + ",", forks=job_forks(len(hosts), self.tuning.forks, ctx.max_parallel),
                ident=ident, quiet=True, rotate_artifacts=self.tuning.rotate_artifacts, envvars=self._envvars(),
                cmdline="--check --diff" if ctx.check else None,
                settings={"pexpect_timeout": PEXPECT_POLL_SECONDS, "suppress_ansible_output": True},
            )
            config.prepare()
            config.env = _allowed_env(config.env, self._envvars())  # before the run writes it into the artifacts
            if self.warm is not None:
                config.env = self.warm.environment(config.env)
            runner = Runner(config, event_handler=on_event, cancel_callback=stop)
            runner.run()
            return runner
        finally:
            playbook.unlink(missing_ok=True)  # it holds request data (scripts, file contents)

    def _envvars(self) -> dict[str, str]:
        t: AnsibleSettings = self.tuning
        bindir = os.path.dirname(sys.executable)  # ansible-playbook sits beside the master's Python
        return {
            "PATH": f"{bindir}:{CHILD_PATH}", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "ANSIBLE_CONFIG": str(self.data_dir / "ansible.cfg"),
            "ANSIBLE_HOME": str(self.data_dir / "home"), "ANSIBLE_LOCAL_TEMP": str(self.data_dir / "tmp"),
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(self.control_dir),
            "ANSIBLE_SSH_ARGS": f"-C -o ControlMaster=auto -o ControlPersist={t.control_persist_seconds}s",
            "ANSIBLE_PIPELINING": str(t.pipelining), "ANSIBLE_TIMEOUT": str(t.connect_timeout_seconds),
            "ANSIBLE_HOST_KEY_CHECKING": str(t.host_key_checking), "ANSIBLE_PYTHON_INTERPRETER": t.python,
            **INVENTORY_SETTINGS,  # the run reads the inventory as the master does
            "ANSIBLE_RETRY_FILES_ENABLED": "False", "ANSIBLE_GATHERING": "explicit", "ANSIBLE_NOCOLOR": "True",
            "ANSIBLE_DEPRECATION_WARNINGS": "False", "ANSIBLE_LOCALHOST_WARNING": "False",
        }


def job_forks(hosts: int, forks: int, max_parallel: int) -> int:
    """Forks for a job on `hosts` hosts: no idle workers, at most `forks` and limits.max_parallel_hosts."""
    return max(1, min(hosts, forks, max_parallel))


def _allowed_env(env: dict[str, str], ours: dict[str, str]) -> dict[str, str]:
    """The run's environment: a few harmless names of the master's, the backend's settings (`ours`:
    always, even where the master's environment holds the same value), and what ansible-runner set.
    Anything else `env` took from the master's environment stays out."""
    runner = {k: v for k, v in env.items() if k in RUNNER_SETS or os.environ.get(k) != v}
    return {**{k: os.environ[k] for k in ENV_ALLOWED if k in os.environ}, **ours, **runner}


def _control_dir(preferred: Path, record: Path) -> Path:
    """Where ssh keeps its ControlPersist sockets (and the warm start its socket): under the state dir,
    or, when that path is too long for a socket, a new private directory under the temp dir: random
    name, mode 0700, made by mkdtemp, so no other user can make it first. `record` names it, so a
    master that died without removing it removes it at its next start."""
    if len(str(preferred)) <= _CONTROL_PATH_MAX:
        preferred.mkdir(mode=0o700, exist_ok=True)
        if preferred.lstat().st_uid != os.getuid() or preferred.is_symlink():
            raise OmbotError(f"ssh control directory {preferred} is not this user's own")
        os.chmod(preferred, 0o700)
        return preferred
    _remove_stale_control_dir(record)
    path = Path(tempfile.mkdtemp(prefix=_CONTROL_PREFIX))
    if len(str(path)) > _CONTROL_PATH_MAX:
        path.rmdir()
        raise OmbotError(f"ssh control directory {path}: too long for a socket; give the master a shorter "
                         "state_dir, or a shorter TMPDIR")
    record.write_text(str(path))
    return path


def _remove_stale_control_dir(record: Path) -> None:
    """The control directory a master before this one made and never removed (it was killed)."""
    try:
        stale = Path(record.read_text().strip())
        info = stale.lstat()
    except (OSError, ValueError):
        return
    if stale.name.startswith(_CONTROL_PREFIX) and stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid():
        shutil.rmtree(stale, ignore_errors=True)


def _tail_of_stdout(runner: Runner) -> str:
    try:
        text = Path(runner.config.artifact_dir, "stdout").read_text(errors="replace").strip()
    except OSError:
        return ""
    return " ".join(text.splitlines()[-3:])[-500:]


class _Events:
    """Turns runner events into per-host results, reporting each host once, as soon as it is done."""

    def __init__(self, ctx: RunContext, hosts: dict[str, _Host]) -> None:
        self.ctx, self.hosts = ctx, hosts
        self.book: play.Playbook | None = None
        self.runner_said = ""
        self.lost = False  # the warm start's server died during the run: what the hosts did is unknown

    def handle(self, event: dict[str, Any]) -> bool:
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

    def _done(self, kind: str, host: _Host, task: str, ignored: bool) -> bool:
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

    def _apply(self, kind: str, host: _Host, meaning: tuple[int, str], res: dict[str, Any], ignored: bool,
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

    def _output(self, host: _Host, index: int, role: str, res: dict[str, Any]) -> None:
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
        if role.startswith("run") or role == "tail":
            host.rc = _rc(res)
        host.next_emit = index + 1

    def _emit_until(self, host: _Host, index: int) -> None:
        assert self.book is not None
        for step in self.ctx.plan.steps[host.next_emit:index]:
            if isinstance(step, Emit):
                host.out.write(step.text.encode() + b"\n")
        host.next_emit = max(host.next_emit, index)

    def _play_task(self, kind: str, host: _Host, index: int, task: str, res: dict[str, Any], ignored: bool) -> None:
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
        if role in ("probe", "tail", "put"):  # our snippets say why on their last stderr line
            lines = [line for line in _text(res.get("stderr")).split(TAIL_TOTAL_MARK)[0].splitlines() if line]
            if lines:
                return lines[-1]
        return msg or "failed"

    def fail(self, name: str, error: str) -> None:
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

    def _report(self, host: _Host) -> None:
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
