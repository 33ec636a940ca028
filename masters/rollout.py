"""The master's side of rolling the audit agent out (`audit.rollout`) and removing it (`audit.remove`).

A module only says "install" or "remove" (the AgentSetup step); the master fills in what the host gets
when the job runs: the agent's wheels from the wheelhouse it carries, and the IDC's agent.toml (its
masters in failover order with their public keys; `@HOST@` becomes each host's name there). The host
makes its own key; its reply carries only the public key. Once a host reports success, the master
binds that key to the host's pending enrolment (masters/enrolment.py, where an admin's
`ombot audit enroll` put it) and waits for the agent's first heartbeat here: the host's result says
whether it came. The agent fetches its binding certificate from this master and presents it to the
IDC's other masters itself, so no master has to reach another.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ombot.clock import MS_PER_SECOND
from ombot.masters.backends import agent_setup
from ombot.masters.backends.base import HostResult, HostStatus
from ombot.audit_agent.settings import render
from ombot.modules import AgentSetup, Plan

log = logging.getLogger("ombot.master.rollout")

WHEELHOUSE = "wheelhouse"  # under the master's state dir: `ombot audit wheelhouse DIR` fills it
HEARTBEAT_WAIT_SECONDS = 120.0
MAX_WHEELHOUSE_BYTES = 64 << 20  # what one job sends each host; a real wheelhouse is a few MB
_AGENT_WHEEL = re.compile(r"^ombot_agent-([0-9][0-9A-Za-z.+]*)-py3-none-any\.whl$")


class RolloutError(Exception):
    """The master cannot fill in an AgentSetup (no wheelhouse, no agent wheel in it): every host fails with it."""


@dataclass(frozen=True)
class IdcMaster:
    """A master of this IDC as an agent.toml names it."""

    id: str
    host: str
    port: int
    public_key: str


Bind = Callable[[str, str, str], Any]  # (host, public key, by) -> the binding; raises with the reason
WaitHeartbeat = Callable[[str, int, float], "int | None"]  # (host, since ms, timeout) -> when this master heard it


class AgentRollout:
    """Fills AgentSetup steps in and, for an install, binds each host's key and waits for its heartbeat."""

    def __init__(self, state_dir: Path, idc: str, masters: list[IdcMaster], bind: Bind,
                 wait_heartbeat: WaitHeartbeat, wait_seconds: float = HEARTBEAT_WAIT_SECONDS) -> None:
        self.wheelhouse, self.idc, self.masters = state_dir / WHEELHOUSE, idc, masters
        self.bind, self.wait_heartbeat, self.wait_seconds = bind, wait_heartbeat, wait_seconds
        self._digests: dict[tuple[str, int, int], str] = {}  # (name, size, mtime_ns) -> sha256

    def fill(self, plan: Plan, check: bool) -> Plan:
        """The plan with each AgentSetup's payload filled in (each wheel hashed when it changed)."""
        if not any(isinstance(step, AgentSetup) for step in plan.steps):
            return plan
        wheels, version = self._wheels()
        install = any(isinstance(s, AgentSetup) and s.action == "install" for s in plan.steps)
        digests = self._hashed(wheels) if install else {}  # a removal sends no wheels
        toml = render("@HOST@", self.idc, "agent.key", [(m.id, m.host, m.port, m.public_key) for m in self.masters])
        steps = [replace(step, payload=agent_setup.request(step.action, check, digests if step.action == "install" else {},
                                                           toml, version, step.auditd),
                         wheelhouse=str(self.wheelhouse) if step.action == "install" else None)
                 if isinstance(step, AgentSetup) else step for step in plan.steps]
        return Plan(*steps, parse=plan.parse or agent_setup.reply)  # the host's reply becomes the result's data

    def describe(self, install: bool) -> list[str]:
        """For a preview: the agent version and wheels a rollout would install, and the masters its
        agent.toml names (or why this master cannot roll out)."""
        where = ", ".join(f"{m.id}@{m.host}:{m.port}" for m in self.masters)
        if not install:
            return ["on each host: stop the agent, remove its hook lines, unit, rules, key, spool and /opt/ombot-agent"]
        try:
            wheels, version = self._wheels()
        except RolloutError as exc:
            return [f"cannot roll out from this master: {exc}"]
        return [f"on each host: ombot-agent {version} into /opt/ombot-agent from {len(wheels)} wheels in {self.wheelhouse}",
                f"on each host: /etc/ombot/agent.toml naming {where}; a key made there; the hook; the service",
                "then: each host's key bound here, and its first heartbeat awaited"]

    def after_hosts(self, plan: Plan, job_id: str, check: bool,
                    report: Callable[[HostResult], None]) -> Enrolment | None:
        """What takes each host's result of an install (not a check run) before `report` does."""
        installs = [s for s in plan.steps if isinstance(s, AgentSetup) and s.action == "install"]
        return None if check or not installs else Enrolment(self, job_id, report)

    def _wheels(self) -> tuple[dict[str, os.stat_result], str]:
        """The wheelhouse's wheels (name -> stat) and the agent's version in it."""
        try:
            files = {p.name: p.stat() for p in sorted(self.wheelhouse.iterdir())
                     if p.name.endswith(".whl") and p.is_file()}
        except OSError:
            files = {}
        versions = [m[1] for name in files if (m := _AGENT_WHEEL.fullmatch(name))]
        if len(versions) != 1:
            raise RolloutError(f"the wheelhouse {self.wheelhouse} must hold exactly one ombot-agent wheel (it has "
                               f"{len(versions)}): fill it with `ombot audit wheelhouse {self.wheelhouse}`")
        if sum(st.st_size for st in files.values()) > MAX_WHEELHOUSE_BYTES:
            raise RolloutError(f"the wheelhouse {self.wheelhouse} is over {MAX_WHEELHOUSE_BYTES >> 20} MiB")
        return files, versions[0]

    def _hashed(self, wheels: dict[str, os.stat_result]) -> dict[str, str]:
        """Each wheel's sha256, read again only if its size or mtime changed (the cache is replaced
        whole, never changed in place: jobs and previews may fill at once)."""
        fresh = {}
        for name, st in wheels.items():
            key = (name, st.st_size, st.st_mtime_ns)
            fresh[key] = self._digests.get(key) or self._digest(name)
        self._digests = fresh
        return {name: digest for (name, _, _), digest in fresh.items()}

    def _digest(self, name: str) -> str:
        try:
            with open(self.wheelhouse / name, "rb") as wheel:
                return hashlib.file_digest(wheel, "sha256").hexdigest()
        except OSError as exc:
            raise RolloutError(f"cannot read {self.wheelhouse / name}: {exc}") from None


class Enrolment:
    """Binds each installed host's key and waits for its first heartbeat, several hosts at once, off
    the backend's threads (a backend reports from its own: it must not wait on an agent)."""

    def __init__(self, rollout: AgentRollout, job_id: str, report: Callable[[HostResult], None]) -> None:
        self.rollout, self.job_id, self.report = rollout, job_id, report
        self.started_ms = int(time.time() * MS_PER_SECOND)
        self.pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="ombot-rollout")

    def take(self, result: HostResult) -> None:
        """A host's result from the backend: an installed host goes on to be bound, the others as they are."""
        if result.status is not HostStatus.OK:
            self.report(result)
        else:
            self.pool.submit(self._enrol, result)

    def finish(self) -> None:
        """After the backend is done: wait until every installed host is bound and heard (or not)."""
        self.pool.shutdown(wait=True)

    def _enrol(self, result: HostResult) -> None:
        try:
            self.report(self._bound_and_heard(result))
        except Exception:  # never lose a host's result
            log.exception("enrolling %s in job %s failed", result.host, self.job_id)
            self.report(replace(result, status=HostStatus.FAILED, error="the master could not enrol the agent's key"))

    def _bound_and_heard(self, result: HostResult) -> HostResult:
        key = (result.data or {}).get("public_key")
        if not isinstance(key, str) or not key:
            return replace(result, status=HostStatus.FAILED, error="the host reported no agent public key")
        try:
            self.rollout.bind(result.host, key, f"job:{self.job_id}")
        except Exception as exc:  # the registry's refusal says why (not enrolled, revoked, another key)
            return replace(result, status=HostStatus.FAILED, error=f"installed, but its key was not accepted: {exc}")
        heard = self.rollout.wait_heartbeat(result.host, self.started_ms, self.rollout.wait_seconds)
        if heard is not None:
            note = f"first heartbeat at {time.strftime('%H:%M:%S', time.gmtime(heard / MS_PER_SECOND))} UTC\n"
            return replace(result, stdout=result.stdout + note, data={**(result.data or {}), "heartbeat_at": heard})
        return replace(result, status=HostStatus.FAILED,
                       error=f"installed and enrolled, but no heartbeat from its agent within {self.rollout.wait_seconds:g} s "
                             "(on the host: systemctl status ombot-audit-agent, or /var/lib/ombot-audit/agent.log)")
