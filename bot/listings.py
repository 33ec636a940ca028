"""What the read-only chat commands answer: help, modules, jobs, status, masters.

The dispatcher declares the commands (bot.commands) and hands these functions what they read: the
modules a person may run, the gate, the router. They look things up and build the reply; they
start, change and cancel nothing.
"""

from __future__ import annotations

from typing import Any

from ombot.approvals import Gate, PolicyRefusal, viewer_of
from ombot.bot import store
from ombot.bot.commands import available
from ombot.bot.jobs import JobFilter, history
from ombot.masters import FINAL_STATES, ConnectFailed, JobRef, MasterLost, Refused, Router
from ombot.modules import ModuleSpec
from ombot.errors import OmbotError
from ombot.message import Message, clip, code, slack_date, text_message

PREVIEW_HOSTS = 30
JOBS_LISTED = 15


def module_help(spec: ModuleSpec) -> Message:
    """`/om help MODULE`: its usage and parameters."""
    lines = [f"*{spec.name}* ({spec.category}, risk {spec.risk}): {spec.description}",
             f"usage: `/om {spec.usage()}`"]
    for p in spec.params:
        lines.append(f"\u2022 `{p.name}` {p.kind}{'' if p.required else ' (optional)'}"
                     + (f": {p.help}" if p.help else "") + _choices(p))
    return text_message("\n".join(lines))


def commands_help(allowed: list[ModuleSpec]) -> Message:
    """`/om help`: every command, and the modules the person may run (`allowed`)."""
    usage = "\n".join(f"`{c.usage}` \u2014 {c.summary}" for c in available())
    names = ", ".join(f"`{s.name}`" for s in allowed) or "none (ask your admins for access)"
    return text_message(f"*OMBot commands*\n{usage}\nShort form: `/om MODULE TARGETS key=value ...`\n"
                        f"Modules you may run: {names}")


def modules_message(allowed: list[ModuleSpec], category: str | None) -> Message:
    """`/om modules [CATEGORY]`: the modules the person may run, in the category if one is given."""
    specs = [s for s in allowed if category is None or s.category == category]
    if not specs:
        return text_message("No modules you may run" + (f" in category {category!r}." if category else "."))
    return text_message("\n".join(f"`{s.name}` ({s.category}, risk {s.risk}) {s.description}" for s in specs))


def jobs_message(gate: Gate | None, filters: JobFilter, user: str) -> Message:
    """The newest jobs `user` may see (approvals.Viewer) that match the filters."""
    viewer = viewer_of(gate, user)
    lines = [f"#{j.number} {j.state:<9} `{j.module}` on {j.host_count} host(s) in {j.idc} by <@{j.requester}> "
             f"{slack_date(j.created_at)}" for j in history(filters, user, JOBS_LISTED, viewer)]
    some = "" if viewer.everything else " that you may see"
    empty = f"No jobs{some} match." if filters != JobFilter() else f"No jobs{some} yet."
    return text_message("\n".join(lines) or empty)


def job_status(router: Router, gate: Gate | None, ref: str, user: str) -> Message:
    """A job's whole record from the bot's database, for those who may see it; the owning master
    says where a live one stands."""
    job = find_job(ref)
    if not viewer_of(gate, user).sees(job.requester, job.approvers, job.cancel_roles):
        raise PolicyRefusal(f"job #{job.number} is not yours to see: its requester, its approvers, its rule's "
                            f"`cancel` roles and the policy's `[jobs] viewers` may")
    state, live = job.state, ""
    if job.master_id and state not in FINAL_STATES:
        try:
            state = router.job_state(JobRef(job.job_id, job.idc, job.master_id))
        except (ConnectFailed, MasterLost, Refused) as exc:
            live = f" (as last seen: master `{job.master_id}` does not answer: {clip(str(exc), 200)})"
    hosts = list(job.hosts) if job.hosts else []
    shown = few_hosts(hosts) if hosts else "(not recorded)"
    ended = f", ended {slack_date(job.finished_at)}" if job.finished_at and state in FINAL_STATES else ""
    lines = [f"#{job.number} `{job.module}` on {job.host_count} host(s) in {job.idc}: *{state}*{live}",
             f"requested by <@{job.requester}> {slack_date(job.created_at)}{ended}",
             f"hosts: {shown}",
             f"job id `{job.job_id}` on master `{job.master_id or 'none'}`"]
    if job.note and state in FINAL_STATES:
        lines.append(f"why: {clip(job.note, 1000)}")
    return text_message("\n".join(lines))


def masters_message(router: Router) -> Message:
    """`/om masters`: each master's health."""
    rows = []
    for m in router.health():
        status = f"up, {m['rtt_ms']} ms, {m['running_jobs']} running" if m["ok"] else f"DOWN: {m['error']}"
        rows.append(f"{m['master']:<16} {m['idc']:<8} {status}")
    return text_message(code("\n".join(rows) or "no masters configured"))


def find_job(ref: str) -> store.BotJob:
    """The job a person names (its number or id), or an error saying how to find one."""
    job = store.find_job(ref)
    if job is None:
        raise OmbotError(f"No job {ref!r}. `/om jobs` lists recent jobs.")
    return job


def few_hosts(hosts: list[str]) -> str:
    """The first PREVIEW_HOSTS hosts, and how many more."""
    return ", ".join(hosts[:PREVIEW_HOSTS]) + (f" \u2026 and {len(hosts) - PREVIEW_HOSTS} more"
                                               if len(hosts) > PREVIEW_HOSTS else "")


def _choices(param: Any) -> str:
    choices = getattr(param, "choices", ())
    return f" (one of: {', '.join(choices)})" if choices else ""
