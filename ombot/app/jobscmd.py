"""`ombot jobs` and `ombot status JOB`: what the masters know of this client's jobs, so a script that
got exit 3 (outcome unknown) can find out whether the job ran before it sends it again."""

from __future__ import annotations

import json
import time
from typing import Any

import typer

from ombot.masters import FINAL_STATES, JobLookup, Router, host_log, host_rows
from ombot.app import exits
from ombot.errors import OmbotError


def list_jobs(router: Router, idcs: list[str], limit: int, as_json: bool) -> int:
    """This client's newest jobs at the masters of each IDC; NOT_SENT if a master could not be asked
    (the list may then miss its jobs)."""
    rows: list[dict[str, Any]] = []
    unasked: dict[str, OmbotError] = {}
    for idc in idcs:
        jobs, errors = router.jobs(idc, limit)
        rows += jobs
        unasked.update(errors)
    for master_id, exc in unasked.items():
        typer.echo(f"{master_id}: could not be asked: {exc}", err=True)
    rows.sort(key=lambda job: job["created_at"], reverse=True)
    if as_json:
        for job in rows:
            typer.echo(json.dumps(job, ensure_ascii=False, sort_keys=True))
    elif rows:
        typer.echo("\n".join(_table(rows)))
    elif not unasked:
        typer.echo("No jobs.")
    return exits.NOT_SENT if unasked else exits.OK


def _table(jobs: list[dict[str, Any]]) -> list[str]:
    lines = [f"{'JOB':<36}  {'STATE':<9}  {'IDC':<8}  {'MASTER':<12}  {'CREATED (UTC)':<19}  HOSTS  MODULE"]
    for job in jobs:
        lines.append(f"{job['id']:<36}  {job['state']:<9}  {job['idc']:<8}  {job['master_id']:<12}  "
                     f"{_when(job['created_at']):<19}  {len(job['hosts']):>5}  {job['module']}")
    return lines


def _when(ms: int | None) -> str:
    return "" if ms is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000))


def show_status(router: Router, job_id: str, masters: list[str], as_json: bool) -> int:
    """One job's state and per-host results, from the first of `masters` that has it; the exit code
    follows its state (exits.of_state). No master has it: REFUSED (it never reached one of those
    asked, so it did not run there), or NOT_SENT when some master could not be asked."""
    found = router.lookup(job_id, masters)
    for master_id, exc in found.errors.items():
        typer.echo(f"{master_id}: could not be asked: {exc}", err=True)
    if found.master_id is None:
        answered = [m for m in masters if m not in found.errors]
        if answered:
            typer.echo(f"no job {job_id} at {', '.join(answered)}", err=True)
        return exits.NOT_SENT if found.errors else exits.REFUSED
    if as_json:
        typer.echo(json.dumps(_summary(job_id, found), ensure_ascii=False, sort_keys=True))
    else:
        _print_status(job_id, found)
    return exits.of_state(found.state)


def _summary(job_id: str, found: JobLookup) -> dict[str, Any]:
    """The job as one JSON object: where, what, its state, each host's result, why it ended so."""
    accepted: dict[str, Any] = next((e["data"] for e in found.events if e["kind"] == "accepted"), {})
    finished: dict[str, Any] = next((e["data"] for e in found.events if e["kind"] == "finished"), {})
    return {"job": job_id, "master": found.master_id, "state": found.state, "final": found.state in FINAL_STATES,
            "module": accepted.get("module"), "hosts": accepted.get("hosts", []),
            "results": [e["data"] for e in found.events if e["kind"] == "host"],
            "reason": finished.get("reason")}


def _print_status(job_id: str, found: JobLookup) -> None:
    job = _summary(job_id, found)
    typer.echo(f"job {job_id} on master {found.master_id}: {found.state}"
               + ("" if job["final"] else " (not finished: ask again later)"))
    if job["module"]:
        typer.echo(f"{job['module']} on {len(job['hosts'])} host(s): {', '.join(job['hosts'])}")
    if job["results"]:
        typer.echo("\n" + "\n".join(host_rows(job["results"])) + "\n")
        typer.echo(host_log(job["results"]).rstrip("\n"))
    if job["reason"]:
        typer.echo(f"reason: {job['reason']}")
