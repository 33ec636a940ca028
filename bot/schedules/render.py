"""How schedules read: the listing's rows, a run's card label, and what the schedules say in chat.

Written in OMBot's markup (ombot.message): chat renders it with mentions and dates, the terminal plain.
"""

from __future__ import annotations

import time

from ombot.approvals import Viewer
from ombot.bot.messages import params_text
from ombot.bot.schedules.models import ACTIVE, DELETED, Schedule, ScheduleRun
from ombot.bot.schedules.timing import next_fire
from ombot.bot.transport import ChatRequest, Transport
from ombot.clock import MS_PER_SECOND
from ombot.message import escape, plain, slack_date, text_message


def schedule_label(job_id: str) -> str:
    """What a job card says about the schedule that started the job ("" for other jobs)."""
    run = ScheduleRun.get_or_none(ScheduleRun.job_id == job_id)
    return run.label if run is not None else ""


def schedule_rows(origin: str | None = None, mention: bool = True, viewer: Viewer | None = None) -> list[str]:
    """One line per schedule not deleted that `viewer` may see (None: every one): chat (mentions,
    dates) or plain (the CLI)."""
    query = Schedule.select().where(Schedule.state != DELETED).order_by(Schedule.number)
    if origin is not None:
        query = query.where(Schedule.origin == origin)
    rows = []
    for s in (s for s in query if viewer is None or viewer.sees(s.requester, s.approvers, s.cancel_roles)):
        # Written in OMBot's markup (what people typed escaped; the reason is stored as markup), and
        # rendered plain for the CLI.
        who = f"<@{s.requester}>" if mention else s.requester
        params = params_text(s.params)
        line = (f"#{s.number} {s.state:<8} {escape(s.timing)} (UTC): `{s.module}` on {escape(s.targets)} "
                f"({len(s.hosts)} host(s)) in {s.idc}{' ' + escape(params) if params else ''} by {who} in {s.channel}")
        if s.state == ACTIVE:
            upcoming = next_fire(s)
            line += f", next {when(upcoming) if mention else plain_when(upcoming)}"
        elif s.reason:
            line += f": {s.reason}"
        rows.append(line if mention else plain(line))
    return rows


def run_label(schedule: Schedule, fire_at: int, missed: int, busy: int, too_old: int) -> str:
    """What the card of the run due at `fire_at` says about its schedule and the runs it missed or skipped."""
    notes = [f"schedule #{schedule.number} ({schedule.timing}, UTC), run due {plain_when(fire_at)}"]
    if missed:
        notes.append(f"{missed} missed run(s) coalesced into this one")
    if busy:
        notes.append(f"{busy} run(s) skipped while the previous one was still running")
    if too_old:
        notes.append(f"{too_old} missed run(s) older than misfire_grace skipped")
    return " \u00b7 ".join(notes)


def when(epoch_ms: int | None) -> str:
    """A time for chat: Slack shows it in each reader's time zone."""
    return slack_date(epoch_ms) if epoch_ms is not None else "never"


def plain_when(epoch_ms: int | None) -> str:
    """A time for the terminal and the cards' labels (stored text): UTC."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch_ms / MS_PER_SECOND)) if epoch_ms else "never"


def describe(schedule: Schedule) -> str:
    """What it runs, where and when, as its replies and notices say it."""
    return (f"`{schedule.module}` on {escape(schedule.targets)} ({len(schedule.hosts)} host(s)) in "
            f"{schedule.idc}, {schedule.timing} (UTC)")


def post_notice(schedule: Schedule, text: str, transport: Transport) -> None:
    """Post a notice about the schedule in the channel it was made in, as its requester's request."""
    req = ChatRequest(schedule.requester, schedule.channel, origin=schedule.origin)
    transport.post(schedule.channel, text_message(text), req=req)
