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

from modules import Plan


class HostStatus(StrEnum):
    """How one host's part of a job ended."""

    OK = "ok"
    FAILED = "failed"
    UNREACHABLE = "unreachable"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"


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

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


class Backend(Protocol):
    """What runs a job's plan on its hosts (local, Ansible, Salt)."""

    name: str

    def run(self, ctx: RunContext) -> None:
        """Carry out ctx.plan on every host, calling ctx.report once per host."""
