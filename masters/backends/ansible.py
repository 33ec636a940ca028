"""Run plans on remote hosts with Ansible, through ansible-runner: one run per job.

The plan becomes one generated playbook (masters/backends/ansible_play.py) run with `--limit` set
to exactly the job's hosts and the `free` strategy (`linear` for one task per host), so each host
goes through its steps at its own pace. Each host is reported as soon as its last task is done,
from runner events as they arrive (masters/backends/ansible_events.py reads them). A cancel or the
job's deadline stops the run; a short second run then ends whatever the job left running on its
hosts. docs/backends.md describes the set-up, the tuned defaults and the limits.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ansible_runner import Runner, RunnerConfig

from ombot.masters.backends import ansible_play as play
from ombot.masters.backends import playbooks
from ombot.masters.backends.ansible_events import Events, HostProgress
from ombot.masters.backends.ansible_forkserver import LOST
from ombot.masters.backends.ansible_warm import WarmStart
from ombot.masters.backends.ansible_snippets import CHILD_PATH
from ombot.masters.backends.base import CappedText, HostStatus, RunContext, Unsupported
from ombot.masters.inventory import INVENTORY_SETTINGS
from ombot.modules import (
    AgentSetup, Command, Emit, FirstAvailable, Ping, Plan, PutFile, RequireWithin, RunPlaybook, Shell, TailFile,
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
_STEPS = (Emit, Ping, Command, FirstAvailable, Shell, PutFile, RequireWithin, TailFile, RunPlaybook, AgentSetup)  # what it runs


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
        """The job's plan on its hosts: one ansible-runner run, each host reported as it finishes."""
        ident = re.sub(r"[^A-Za-z0-9_.-]", "_", ctx.job_id)[:64]
        hosts = {h: HostProgress(h, CappedText(ctx.output_cap), CappedText(ctx.output_cap)) for h in ctx.hosts}
        events = Events(ctx, hosts)
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
