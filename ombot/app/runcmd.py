"""`ombot run`: validate, expand, submit, follow, and print a per-host table."""

from __future__ import annotations

import json
import signal
import sys
import threading
from typing import Any

import typer

from ombot.approvals import Gate, PolicyRefusal, authorize
from ombot.masters import JobRef, JobState, MasterLost, Router, host_log, host_rows
from ombot.modules import ParamError
from ombot.app import exits
from ombot.config import named_idcs, several_idcs
from ombot.errors import OmbotError


def run_module(router: Router, gate: Gate | None, requester: str, idc: str, module: str, targets: str,
               pairs: list[str], dry_run: bool, timeout: int | None, as_json: bool, check: bool = False) -> int:
    """`gate` is the access policy when the config names one: the CLI then obeys it like chat does
    (the masters enforce the CLI key's registration either way)."""
    idc, pairs = _idc_pair(idc, pairs)
    if several_idcs(idc):  # --idc bj,sh or idc=*: one job per IDC (ombot.app.multirun)
        idcs = named_idcs(router.config, idc)
        if len(idcs) > 1:
            from ombot.app.multirun import run_parts

            return run_parts(router, gate, requester, idcs, module, targets, parse_pairs(pairs), dry_run, timeout,
                             as_json, check)
        idc = idcs[0]
    catalog = router.catalog(idc)
    spec = catalog.modules.get(module)
    if spec is None:
        import difflib

        close = difflib.get_close_matches(module, catalog.modules, n=3)
        raise OmbotError(f"no module {module!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    params, problems = split_pairs(pairs)
    try:
        spec.validate(params)  # friendly errors here; the master validates again and decides
    except ParamError as exc:
        problems += str(exc).splitlines()  # every problem at once, after the malformed words
    if problems:
        raise OmbotError("\n".join(problems) + f"\nusage: ombot run {spec.usage()}")
    hosts = router.expand(idc, targets)
    kind = " (check run)" if check else ""
    typer.echo(f"{module}{kind} on {len(hosts)} host(s) in {idc}: {', '.join(hosts)}", err=as_json)
    if gate is not None:
        _authorize(gate, requester, module, hosts, idc)
    if dry_run:
        _print_preview(router.preview(idc, module, params, targets, check), as_json)
        return exits.OK
    try:
        ref, reply = router.submit(idc, module, params, hosts, timeout=timeout, check=check)
    except MasterLost as exc:
        job = exc.ref.job_id if exc.ref else "JOB"
        typer.echo(f"job state unknown: {exc}; check with `ombot status {job}` before sending it again", err=True)
        return exits.UNKNOWN
    typer.echo(f"job {ref.job_id} on master {ref.master_id}", err=as_json)
    results: list[dict[str, Any]] = []
    state = _follow_cancellable(router, ref, lambda ev: _on_event(ev, results, as_json), reply.get("events", []))
    if not as_json:
        print_results(results)
        typer.echo(f"state: {state}" + (" (a check run: the diffs above show what a real run would change)"
                                        if check else ""))
    if state == JobState.UNKNOWN:  # not "failed": whether it ran is not known, so never blindly retry it
        typer.echo(f"job {ref.job_id} on master {ref.master_id}: outcome unknown; check with "
                   f"`ombot status {ref.job_id}` before sending it again", err=True)
        return exits.UNKNOWN
    return exits.OK if state == JobState.OK else exits.FAILED


def _print_preview(shown: dict[str, Any], as_json: bool) -> None:
    """A dry run: the plan's steps, and the playbook an Ansible master would run."""
    if as_json:
        sys.stdout.write(json.dumps(shown, ensure_ascii=False, sort_keys=True) + "\n")
        return
    typer.echo("steps:\n" + "\n".join(f"  {step}" for step in shown.get("steps", [])))
    if shown.get("playbook"):
        typer.echo(f"playbook ({' '.join(shown.get('options', []))}):\n{shown['playbook'].rstrip()}")


def _idc_pair(idc: str, pairs: list[str]) -> tuple[str, list[str]]:
    """`idc=X` among the key=value words is the IDC, as in chat (it wins over the default)."""
    named = [p for p in pairs if p.startswith("idc=")]
    if len(named) > 1:
        raise OmbotError("idc= given twice")
    return (named[0].partition("=")[2] or idc, [p for p in pairs if p not in named]) if named else (idc, pairs)


def parse_pairs(pairs: list[str]) -> dict[str, str]:
    """The key=value words as a dict; OmbotError naming every malformed or repeated one."""
    values, problems = split_pairs(pairs)
    if problems:
        raise OmbotError("\n".join(problems))
    return values


def split_pairs(pairs: list[str]) -> tuple[dict[str, str], list[str]]:
    """The well-formed key=value words, and a line for each word that is not one or repeats a key."""
    values: dict[str, str] = {}
    problems: list[str] = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            problems.append(f"parameters are key=value, got {pair!r}")
        elif key in values:
            problems.append(f"parameter {key!r} given twice")
        else:
            values[key] = value
    return values, problems


def _authorize(gate: Gate, requester: str, module: str, hosts: list[str], idc: str) -> None:
    try:
        decision = authorize(gate, requester, module, hosts, idc)
    except PolicyRefusal as exc:
        raise OmbotError(f"refused by policy: {exc}") from None
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
    if results:
        typer.echo("\n" + "\n".join(host_rows(results)) + "\n")
        typer.echo(host_log(results).rstrip("\n"))
