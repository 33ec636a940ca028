"""`ombot run`: validate, expand, submit, follow, and print a per-host table."""

from __future__ import annotations

import json
import signal
import sys
import threading
from typing import Any

import typer

from approvals import Gate
from masters import JobRef, MasterLost, Router
from modules import ParamError
from ombot.errors import OmbotError


def run_module(router: Router, gate: Gate | None, idc: str, module: str, targets: str, pairs: list[str],
               dry_run: bool, timeout: int | None, as_json: bool) -> int:
    """`gate` is the access policy when the config names one: the CLI then obeys it like chat does."""
    catalog = router.catalog(idc)
    spec = catalog.modules.get(module)
    if spec is None:
        import difflib

        close = difflib.get_close_matches(module, catalog.modules, n=3)
        raise OmbotError(f"no module {module!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    try:
        params = parse_pairs(pairs)
        spec.validate(params)  # friendly errors here; the master validates again and decides
    except (ParamError, OmbotError) as exc:
        raise OmbotError(f"{exc}\nusage: ombot run {spec.usage()}") from None
    hosts = router.expand(idc, targets)
    typer.echo(f"{module} on {len(hosts)} host(s) in {idc}: {', '.join(hosts)}", err=as_json)
    if gate is not None:
        _authorize(gate, router.links[router.masters_of(idc)[0]].requester, module, hosts, idc)
    if dry_run:
        return 0
    try:
        ref, reply = router.submit(idc, module, params, hosts, timeout=timeout)
    except MasterLost as exc:
        typer.echo(f"job state unknown: {exc}", err=True)
        return 3
    typer.echo(f"job {ref.job_id} on master {ref.master_id}", err=as_json)
    results: list[dict[str, Any]] = []
    state = _follow_cancellable(router, ref, lambda ev: _on_event(ev, results, as_json), reply.get("events", []))
    if not as_json:
        print_results(results)
        typer.echo(f"state: {state}")
    if state == "unknown":  # not "failed": whether it ran is not known, so never blindly retry it
        typer.echo(f"job {ref.job_id} on master {ref.master_id}: outcome unknown", err=True)
        return 3
    return 0 if state == "ok" else 1


def parse_pairs(pairs: list[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise OmbotError(f"parameters are key=value, got {pair!r}")
        if key in values:
            raise OmbotError(f"parameter {key!r} given twice")
        values[key] = value
    return values


def _authorize(gate: Gate, requester: str, module: str, hosts: list[str], idc: str) -> None:
    decision = gate.decide(requester, module, hosts, idc)
    if not decision.allowed:
        raise OmbotError(f"refused by policy: {decision.reason}")
    if decision.needs_approval:
        raise OmbotError(f"{module} needs approval ({decision.reason}); approval-gated modules cannot be "
                         "started from the CLI: ask in Slack or the console")


def _follow_cancellable(router: Router, ref: JobRef, on_event: Any, first: list[dict[str, Any]]) -> str:
    """Follow the job; the first Ctrl-C asks its master to cancel it, and we keep following."""
    asked = threading.Event()

    def interrupt(signum: int, frame: Any) -> None:
        if asked.is_set():
            raise KeyboardInterrupt
        asked.set()
        typer.echo("\ncancelling (Ctrl-C again to stop waiting)...", err=True)
        threading.Thread(target=lambda: _cancel_quietly(router, ref), daemon=True).start()

    previous = signal.signal(signal.SIGINT, interrupt) if threading.current_thread() is threading.main_thread() else None
    try:
        return router.follow(ref, on_event, first=first)
    except KeyboardInterrupt:
        raise OmbotError(f"stopped waiting; job {ref.job_id} on master {ref.master_id} may still be running") from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _cancel_quietly(router: Router, ref: JobRef) -> None:
    try:
        router.cancel(ref)
    except OmbotError as exc:
        typer.echo(f"cancel failed: {exc}", err=True)


def _on_event(event: dict[str, Any], results: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(event, ensure_ascii=False, sort_keys=True) + "\n")
        sys.stdout.flush()
    if event["kind"] == "host":
        results.append(event["data"])
        if not as_json:
            r = event["data"]
            typer.echo(f"  {r['host']}: {r['status']}", err=True)
    elif event["kind"] == "finished" and event["data"].get("reason") and not as_json:
        typer.echo(event["data"]["reason"], err=True)


def print_results(results: list[dict[str, Any]]) -> None:
    if not results:
        return
    width = max(len(r["host"]) for r in results)
    typer.echo(f"\n{'HOST':<{width}}  {'STATUS':<11} {'RC':>4} {'TIME':>8}")
    for r in sorted(results, key=lambda r: r["host"]):
        rc = "" if r["rc"] is None else str(r["rc"])
        typer.echo(f"{r['host']:<{width}}  {r['status']:<11} {rc:>4} {r['ended'] - r['started']:>7.2f}s")
    for r in sorted(results, key=lambda r: r["host"]):
        typer.echo(f"\n--- {r['host']} ({r['status']})")
        if r.get("error"):
            typer.echo(f"error: {r['error']}")
        if r.get("data"):
            typer.echo(json.dumps(r["data"], indent=2, sort_keys=True))
        elif r["stdout"]:
            typer.echo(r["stdout"].rstrip("\n"))
        if r["stderr"]:
            typer.echo("stderr:\n" + r["stderr"].rstrip("\n"))
        if r["truncated"]:
            typer.echo(f"[output cut: kept {len(r['stdout'].encode())} of {r['stdout_bytes']} stdout bytes, "
                       f"{len(r['stderr'].encode())} of {r['stderr_bytes']} stderr bytes]")
