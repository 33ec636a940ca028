"""Run plans on Salt minions through the salt-master on this machine, with Salt's LocalClient.

Each plan step becomes one Salt call published to exactly the job's minions (`tgt_type="list"`);
hosts that are ready for the same call at the same moment share one publish. Each host walks its
own steps at its own pace (a generator per host, fed the minion's returns from the master's event
bus as they arrive) and is reported as soon as it is done. Every request value travels as a keyword
argument (`kwarg`), never as a positional string: Salt turns a positional `runas=root` into a
keyword argument, a value in `kwarg` stays data. A minion silent for `answer_seconds` is asked
whether it still runs the job (`saltutil.find_job`); one that does not answer that either is
unreachable. An install of the audit agent first sends the master's wheelhouse, each chunk published
once to a batch of hosts (salt_copy.py). docs/backends.md describes the set-up, what each step
becomes, and the limits.

Here the backend and its set-up; a job's run is salt_job.py's, the reading of minions' replies
salt_replies.py's. Only this file imports Salt.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

import salt.client
import salt.config

from ombot.masters.backends.base import RunContext, Unsupported
from ombot.masters.backends.salt_job import contacts, SaltJob, preview_lines
from ombot.modules import Plan, RunPlaybook, SaltState
from ombot.config import MasterSettings
from ombot.errors import OmbotError


def accepted_minions(config: Path) -> list[str]:
    """The ids of the minions whose keys the salt-master at `config` has accepted."""
    directory = _key_dir(config)
    if not directory.is_dir():
        raise OmbotError(f"salt: {directory} (accepted minion keys) does not exist; is {config} the "
                         "salt-master's config?")
    return sorted(p.name for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))


@functools.lru_cache(maxsize=8)
def _key_dir(config: Path) -> Path:
    """Where the salt-master keeps accepted minion keys (its config is read once: it is YAML with includes)."""
    return Path(salt.config.client_config(str(config))["pki_dir"]) / "minions"


class SaltBackend:
    """Runs each job's plan on minions through the local salt-master (see the module docstring)."""

    name = "salt"

    def __init__(self, settings: MasterSettings) -> None:
        self.master_id, self.tuning = settings.id, settings.salt
        if not self.tuning.config.is_file():
            raise OmbotError(f"masters.{settings.id}.salt.config: {self.tuning.config} is not a salt-master "
                             "config file")
        self._idle: list[salt.client.LocalClient] = []  # made ~0.1-0.2 s each: kept between jobs
        self._lock = threading.Lock()
        self._release(self._client())  # a config or key problem shows at start, not at the first job

    def vet(self, plan: Plan, check: bool) -> Plan:
        """At submit: no playbooks, and only the states this master allows."""
        for step in plan.steps:
            if isinstance(step, RunPlaybook):
                raise Unsupported("the salt backend cannot run Ansible playbooks")
            if isinstance(step, SaltState) and step.name not in self.tuning.states:
                allowed = ", ".join(self.tuning.states) or "none"
                raise Unsupported(f"state {step.name!r} is not allowed on this master (allowed: {allowed}; "
                                  f"[masters.{self.master_id}.salt] states)")
        return plan

    def preview(self, plan: Plan, hosts: list[str], check: bool) -> dict[str, Any]:
        """The Salt calls a job of this plan would publish to the hosts (a dry run shows them)."""
        steps = plan.steps
        calls = [] if any(contacts(s) for s in steps) else ["test.ping"]
        tmp = plan.uses_temp_path()
        if tmp:
            calls.append("cmd.run_all: make the temporary directory /tmp/ombot-JOB-RANDOM-HOST")
        calls += [line for step in steps for line in preview_lines(step, check)]
        if tmp:
            calls.append("file.remove: the temporary directory")
        return {"salt": {"tgt": hosts, "tgt_type": "list", "calls": calls}}

    def run(self, ctx: RunContext) -> None:
        client = self._client()
        try:
            SaltJob(ctx, client, self.tuning).run()
        finally:
            self._release(client)

    def _client(self) -> salt.client.LocalClient:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        try:
            return salt.client.LocalClient(c_path=str(self.tuning.config))
        except Exception as exc:
            raise OmbotError(f"salt: cannot use the salt-master config {self.tuning.config}: {exc}") from None

    def _release(self, client: salt.client.LocalClient) -> None:
        client.event.close_pub()  # no events pile up for an idle client
        with self._lock:
            self._idle.append(client)
