"""The contract every backend (local, Ansible, Salt) fulfils.

A backend receives one job's plan and host list and reports each host exactly once through
`RunContext.report`, as soon as that host is done: results stream back per host. It honours
`ctx.cancelled` and `ctx.deadline`, and caps captured output at `ctx.output_cap` bytes per stream,
reporting the full size so a cut is never silent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from ombot.modules import Plan, RunPlaybook, SaltState
from ombot.errors import OmbotError


class HostStatus(StrEnum):
    """How one host's part of a job ended."""

    OK = "ok"
    FAILED = "failed"
    UNREACHABLE = "unreachable"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"  # the backend lost sight of the run (the host may have done the work): never "failed"


@dataclass
class CappedText:
    """Keeps the first `cap` bytes written and counts the rest."""

    cap: int
    kept: bytearray = field(default_factory=bytearray)
    total: int = 0

    def write(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.cap - len(self.kept)
        if room > 0:
            self.kept += chunk[:room]

    @property
    def truncated(self) -> bool:
        return self.total > len(self.kept)

    def text(self) -> str:
        return self.kept.decode("utf-8", errors="replace")


@dataclass
class HostResult:
    """One host's outcome, reported once: status, exit code, capped output with full sizes, timing."""

    host: str
    status: HostStatus
    rc: int | None = None
    stdout: str = ""
    stderr: str = ""
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    truncated: bool = False
    started: float = 0.0
    ended: float = 0.0
    error: str | None = None
    data: dict[str, Any] | None = None

    @classmethod
    def from_output(cls, host: str, status: HostStatus, out: CappedText, err: CappedText, **kw: Any) -> HostResult:
        return cls(host=host, status=status, stdout=out.text(), stderr=err.text(), stdout_bytes=out.total,
                   stderr_bytes=err.total, truncated=out.truncated or err.truncated, **kw)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": str(self.status)}


@dataclass
class RunContext:
    """What a backend gets for one job: the plan, its hosts, where to report, and its limits."""

    job_id: str
    plan: Plan
    hosts: list[str]
    host_vars: Callable[[str], dict[str, Any]]
    report: Callable[[HostResult], None]
    output_cap: int
    deadline: float  # time.monotonic() value
    cancelled: threading.Event
    max_parallel: int = 16
    file_store: Path | None = None
    check: bool = False  # a check run: report what would change, change nothing (Ansible --check --diff)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


class Backend(Protocol):
    """What runs a job's plan on its hosts (local, Ansible, Salt)."""

    name: str

    def run(self, ctx: RunContext) -> None:
        """Carry out ctx.plan on every host, calling ctx.report once per host."""


class Unsupported(OmbotError):
    """A job this backend cannot run (a check run on the local backend, a playbook without Ansible):
    the master refuses it at submit, before anything is recorded."""


def vet(backend: Backend, plan: Plan, check: bool) -> Plan:
    """A job's plan as `backend` will run it, checked at submit (and by the preview operation).

    A backend may define `vet(plan, check) -> Plan`: raise `Unsupported` (or modules.ParamError)
    for what it cannot run, and return the plan with what it resolved (a playbook's typed vars).
    Without one, a backend takes every plan but a playbook."""
    if backend.name != "salt" and any(isinstance(step, SaltState) for step in plan.steps):
        raise Unsupported(f"salt.state needs the Salt backend; this master's backend is {backend.name}")
    own: Callable[[Plan, bool], Plan] | None = getattr(backend, "vet", None)
    if own is not None:
        return own(plan, check)
    if any(isinstance(step, RunPlaybook) for step in plan.steps):
        raise Unsupported(f"the {backend.name} backend cannot run Ansible playbooks")
    return plan


def preview(backend: Backend, plan: Plan, hosts: list[str], check: bool) -> dict[str, Any]:
    """What a dry run shows of a vetted plan: its steps as text, and what the backend generates from
    it when it can show that (`preview(plan, hosts, check) -> dict`, e.g. the Ansible playbook)."""
    shown: dict[str, Any] = {"steps": plan.describe()}
    own: Callable[[Plan, list[str], bool], dict[str, Any]] | None = getattr(backend, "preview", None)
    if own is not None:
        shown.update(own(plan, hosts, check))
    return shown


def close(backend: Backend) -> None:
    """When the master stops: a backend may define `close()` to let go of what it keeps between jobs."""
    own: Callable[[], None] | None = getattr(backend, "close", None)
    if own is not None:
        own()
