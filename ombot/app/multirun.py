"""`ombot run MODULE TARGETS --idc bj,sh` (or `idc=*`): one job per IDC, each through that IDC's
masters and failover, followed together; the policy decides per IDC and `max_hosts` counts the whole
request. A part whose masters cannot be reached is reported failed while the others run.

Exit status (ombot.app.exits): 0 when every part ended ok; 3 when a part's outcome is unknown (a master
was lost after it accepted the job: check there before running it again); 4 when no part could reach
a master (nothing was sent anywhere); otherwise 1 once anything was sent, and 2 when the request was
refused or invalid (nothing ran).
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import typer

from ombot.approvals import Gate, PolicyRefusal, authorize_parts
from ombot.masters import ConnectFailed, JobRef, JobState, MasterLost, NoMasterAvailable, Refused, Router, host_log, host_rows
from ombot.modules import ParamError
from ombot.app import exits
from ombot.errors import OmbotError

UNREACHABLE = (NoMasterAvailable, ConnectFailed, MasterLost)


@dataclass
class CliPart:
    """One IDC's share of the request, and how it went."""

    idc: str
    hosts: list[str] = field(default_factory=list)
    reason: str = ""  # why it did not run, or why it ended as it did
    error: OmbotError | None = None  # what made it unreachable, re-raised when no part can run
    unsent: bool = False  # no master of its IDC could be reached: nothing was sent there
    ref: JobRef | None = None
    first: list[dict[str, Any]] = field(default_factory=list)
    state: str = ""
    results: list[dict[str, Any]] = field(default_factory=list)


def run_parts(router: Router, gate: Gate | None, requester: str, idcs: list[str], module: str, targets: str,
              params: dict[str, str], dry_run: bool, timeout: int | None, as_json: bool, check: bool = False) -> int:
    parts = [_expand(router, idc, module, targets, params) for idc in idcs]
    for part in parts:
        typer.echo(f"{module} on {len(part.hosts)} host(s) in {part.idc}: {', '.join(part.hosts)}" if not part.reason
                   else f"{part.idc}: cannot run: {part.reason}", err=as_json)
    ready = [p for p in parts if not p.reason]
    if not ready:
        error = parts[0].error
        raise error if error is not None else OmbotError("no IDC can run it")
    if gate is not None:
        _authorize(gate, requester, module, ready)
    if dry_run:
        return exits.OK
    for part in ready:
        _submit(router, part, module, params, timeout, as_json, check)
    _follow_all(router, [p for p in ready if p.ref is not None], as_json)
    for part in parts:
        if not part.state:
            part.state = JobState.FAILED
    if not as_json:
        for part in parts:
            if part.results:
                typer.echo(f"\n== {part.idc}")
                typer.echo("\n".join(host_rows(part.results)) + "\n")
                typer.echo(host_log(part.results).rstrip("\n"))
        typer.echo("")
        for part in parts:
            typer.echo(f"{part.idc}: {part.state}" + (f": {part.reason}" if part.reason else ""))
    if any(p.state == JobState.UNKNOWN for p in parts):  # never blindly retry: a part may have run
        return exits.UNKNOWN
    if all(p.unsent for p in parts):  # safe to send again: no master anywhere got it
        return exits.NOT_SENT
    return exits.OK if all(p.state == JobState.OK for p in parts) else exits.FAILED


def _expand(router: Router, idc: str, module: str, targets: str, params: dict[str, str]) -> CliPart:
    """The part's hosts; an IDC whose masters do not answer becomes a failed part, while a refusal
    (unknown module, bad parameters or targets) refuses the whole request."""
    try:
        spec = router.catalog(idc).modules.get(module)
        if spec is None:
            raise OmbotError(f"no module {module!r} in IDC {idc}")
        try:
            spec.validate(params)
        except ParamError as exc:
            raise OmbotError(f"{exc} (in {idc})\nusage: ombot run {spec.usage()}") from None
        hosts = router.expand(idc, targets)
    except UNREACHABLE as exc:
        return CliPart(idc, reason=str(exc), error=exc, unsent=True)
    except Refused as exc:
        raise Refused(exc.code, f"in {idc}: {exc.message}") from None
    return CliPart(idc, hosts) if hosts else CliPart(idc, reason=f"no hosts match in {idc}")


def _authorize(gate: Gate, requester: str, module: str, parts: list[CliPart]) -> None:
    try:
        decision = authorize_parts(gate, requester, module, [(p.idc, p.hosts) for p in parts])
    except PolicyRefusal as exc:
        raise OmbotError(f"refused by policy: {exc}") from None
    if decision.needs_approval:
        raise OmbotError(f"{module} needs approval ({decision.reason}); approval-gated modules cannot be "
                         "started from the CLI: ask in Slack or the console")


def _submit(router: Router, part: CliPart, module: str, params: dict[str, str], timeout: int | None,
            as_json: bool, check: bool) -> None:
    try:
        part.ref, reply = router.submit(part.idc, module, params, part.hosts, timeout=timeout, check=check)
        part.first = list(reply.get("events", []))
    except MasterLost as exc:  # sent, then the link broke: follow it where it went, never re-send
        part.ref, part.reason = exc.ref, str(exc)
        if exc.ref is None:
            part.state = JobState.UNKNOWN
        return
    except (Refused, NoMasterAvailable) as exc:
        part.state, part.reason = JobState.FAILED, getattr(exc, "message", str(exc))
        part.unsent = isinstance(exc, NoMasterAvailable)
        typer.echo(f"{part.idc}: not submitted: {part.reason}", err=True)
        return
    typer.echo(f"{part.idc}: job {part.ref.job_id} on master {part.ref.master_id}", err=as_json)


def _follow_all(router: Router, parts: list[CliPart], as_json: bool) -> None:
    """Follow every part at once; the first Ctrl-C asks every part's master to cancel, and we keep following."""
    printing = threading.Lock()
    asked = threading.Event()

    def follow(part: CliPart) -> None:
        assert part.ref is not None
        try:
            part.state = router.follow(part.ref, lambda event: _on_event(part, event, as_json, printing),
                                       first=part.first)
        except OmbotError as exc:
            part.state, part.reason = JobState.UNKNOWN, str(exc)

    def interrupt(signum: int, frame: Any) -> None:
        if asked.is_set():
            raise KeyboardInterrupt
        asked.set()
        typer.echo("\ncancelling every part (Ctrl-C again to stop waiting)...", err=True)
        threading.Thread(target=lambda: _cancel_all(router, parts), daemon=True).start()

    threads = [threading.Thread(target=follow, args=(p,), daemon=True, name=f"follow-{p.idc}") for p in parts]
    previous = signal.signal(signal.SIGINT, interrupt) if threading.current_thread() is threading.main_thread() else None
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.5)  # short joins: the signal handler runs in between
    except KeyboardInterrupt:
        running = ", ".join(f"{p.ref.job_id} on {p.ref.master_id}" for p in parts if p.ref and not p.state)
        raise OmbotError(f"stopped waiting; these jobs may still be running: {running}") from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _cancel_all(router: Router, parts: list[CliPart]) -> None:
    for part in parts:
        if part.ref is not None and not part.state:
            try:
                router.cancel(part.ref)
            except OmbotError as exc:
                typer.echo(f"{part.idc}: cancel failed: {exc}", err=True)


def _on_event(part: CliPart, event: dict[str, Any], as_json: bool, printing: threading.Lock) -> None:
    with printing:
        if as_json:
            sys.stdout.write(json.dumps({**event, "idc": part.idc}, ensure_ascii=False, sort_keys=True) + "\n")
            sys.stdout.flush()
        if event["kind"] == "host":
            part.results.append(event["data"])
            if not as_json:
                typer.echo(f"  {part.idc} {event['data']['host']}: {event['data']['status']}", err=True)
        elif event["kind"] == "finished" and event["data"].get("reason"):
            part.reason = str(event["data"]["reason"])
