"""The chat face's cards: jobs (progress, results, dry runs) and approval requests, with their buttons.

Written in OMBot's markup with the base's message model (ombot.message: `Message`, `escape`, `code`,
...), so every surface renders them: Slack as they are, the console as plain text. Every builder
keeps within Slack's documented limits (tests/fakeslack.py checks every message against them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ombot.masters import FINAL_STATES, JobState, host_log, host_rows
from ombot.clock import MS_PER_SECOND
from ombot.message import SECTION_LIMIT, TEXT_LIMIT, Message, clip, code, escape, section, slack_date

INLINE_LOG_LIMIT = 2400  # longer per-host output goes into a file in the thread
CANCEL_ACTION = "om_cancel"
APPROVE_ACTION = "om_approve"
DENY_ACTION = "om_deny"
DENY_CALLBACK = "om_deny_reason"
CHECK = "check"  # a job's stored params carry it for a check run (a reserved word, no module's parameter)
PREVIEW_HOSTS = 30

STATE_ICONS: dict[str, str] = {
    JobState.SUBMITTING: ":hourglass:", JobState.QUEUED: ":hourglass:", JobState.RUNNING: ":arrows_counterclockwise:",
    JobState.OK: ":white_check_mark:", JobState.FAILED: ":x:", JobState.PARTIAL: ":warning:",
    JobState.CANCELLED: ":no_entry_sign:", JobState.TIMED_OUT: ":alarm_clock:", JobState.UNKNOWN: ":grey_question:",
}


def duration(seconds: float) -> str:
    """A card's time taken: `42s`, `3m05s`, `2h07m`."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


@dataclass
class CardState:
    """Everything a job card shows; rebuilt from the master's events after a bot restart."""

    number: int
    job_id: str
    requester: str
    module: str
    params: dict[str, Any]
    idc: str
    hosts: int
    created_at: int  # epoch ms, as stored and as the master's events carry it
    state: str = JobState.SUBMITTING
    done: int = 0
    ok: int = 0
    failed: int = 0
    finished_at: int | None = None  # epoch ms
    note: str = ""
    schedule: str = ""  # the schedule that started it, and its missed or skipped runs (bot.schedules)

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


def preview_message(lead: str, idc: str, shown: dict[str, Any]) -> Message:
    """A dry run: the hosts, then what the master's backend would run (the master's `preview`)."""
    hosts: list[str] = shown.get("hosts", [])
    listed = ", ".join(hosts[:PREVIEW_HOSTS]) + (f" \u2026 and {len(hosts) - PREVIEW_HOSTS} more"
                                                 if len(hosts) > PREVIEW_HOSTS else "")
    head = f"{lead} `{shown.get('module', '')}` on {len(hosts)} host(s) in {idc}: {listed}"
    steps = "\n".join(shown.get("steps", []))
    playbook = shown.get("playbook")
    blocks = [section(escape(head)), section("steps:\n" + code(steps or "(none)", 1200))]
    text = f"{escape(head)}\nsteps:\n{escape(steps)}"
    if playbook:
        options = " ".join(shown.get("options", []))
        blocks.append(section(f"{shown.get('backend', '')} playbook ({clip(escape(options), 200)}):\n"
                              + code(playbook, 2600)))
        text += f"\nplaybook ({escape(options)}):\n{escape(playbook)}"
    return Message(clip(text, TEXT_LIMIT), blocks)


def params_text(params: dict[str, Any]) -> str:
    """Parameters as they would be typed: key=value, values with spaces or of other types as JSON."""
    return " ".join(f"{k}={json.dumps(v) if not isinstance(v, str) or ' ' in v else v}" for k, v in params.items())


def job_card(card: CardState) -> Message:
    check = bool(card.params.get(CHECK))
    params = params_text({k: v for k, v in card.params.items() if k != CHECK}) or "(no parameters)"
    kind = " *check run*" if check else ""
    icon = STATE_ICONS.get(card.state, "")
    progress = f"{card.done}/{card.hosts} hosts \u00b7 {card.ok} ok \u00b7 {card.failed} failed"
    when = slack_date(card.created_at)
    took = f" \u00b7 took {duration((card.finished_at - card.created_at) / MS_PER_SECOND)}" if card.finished_at else ""
    headline = f"{icon} *#{card.number}* `{card.module}`{kind} on *{card.hosts} host{'s' * (card.hosts != 1)}* in `{card.idc}` \u2014 *{card.state}*"
    blocks: list[dict[str, Any]] = [
        section(headline),
        section(f"requested by <@{card.requester}> {when}\n{code(params, 1500)}"),
        {"type": "context", "elements": [{"type": "mrkdwn", "text": clip(progress + took, 2000)}]},
    ]
    if card.schedule:
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn",
                                                         "text": clip(f":calendar: {escape(card.schedule)}", 2000)}]})
    if card.note:
        blocks.append(section(card.note))
    if not card.final:
        blocks.append({"type": "actions", "block_id": f"job:{card.job_id}", "elements": [{
            "type": "button", "action_id": CANCEL_ACTION, "style": "danger", "value": card.job_id,
            "text": {"type": "plain_text", "text": "Cancel"},
            "confirm": {"title": {"type": "plain_text", "text": f"Cancel job #{card.number}?"},
                        "text": {"type": "mrkdwn", "text": f"Stop `{card.module}` on {card.hosts} hosts."},
                        "confirm": {"type": "plain_text", "text": "Cancel job"},
                        "deny": {"type": "plain_text", "text": "Keep running"}},
        }]})
    text = (f"[#{card.number} {card.state}] {card.module}{' (check run)' * check} on {card.hosts} host(s) in {card.idc} "
            f"by {card.requester}: {progress}{took}" + (f"\n{card.note}" if card.note else "")
            + (f"\n{escape(card.schedule)}" if card.schedule else ""))
    return Message(clip(text, TEXT_LIMIT), blocks)


def results_message(number: int, results: list[dict[str, Any]]) -> Message:
    """The per-host summary for the card's thread; the full log rides along as a file when long."""
    rows = host_rows(results)
    table, shown = _fit_rows(rows, SECTION_LIMIT - 80)
    log = host_log(results)
    files = [(f"job-{number}.log", log)] if shown < len(rows) or len(log) > INLINE_LOG_LIMIT else []
    more = f"\n_{len(rows) - shown} more hosts in the attached log_" if shown < len(rows) else ""
    blocks = [section(f"*Results of #{number}*{more}\n{code(table)}")]
    if not files and log.strip():
        blocks.append(section(code(log)))
    text = f"Results of #{number}\n{escape(table)}" + ("" if files else f"\n{escape(log)}")  # module output: anyone's
    return Message(clip(text, TEXT_LIMIT), blocks, files)


def _fit_rows(rows: list[str], limit: int) -> tuple[str, int]:
    kept, size = [], 0
    for row in rows:
        if size + len(row) + 1 > limit:
            break
        kept.append(row)
        size += len(row) + 1
    return "\n".join(kept), len(kept)


@dataclass
class RequestView:
    """What an approval message shows."""

    number: int
    request_id: str
    requester: str
    module: str
    params: str
    idc: str
    hosts: list[str]
    needed: int
    approver_roles: list[str]
    approvers: list[tuple[str, int]]  # (user, epoch ms)
    state: str
    expires_at: int  # epoch ms
    decided_by: str | None = None
    reason: str | None = None
    schedule: str = ""  # the schedule it covers, if any: approving it approves every run
    parts: str = ""  # a request over several IDCs: one line per IDC with its hosts (bot.multi)


def approval_card(view: RequestView) -> Message:
    shown = ", ".join(view.hosts[:30]) + (f" \u2026 and {len(view.hosts) - 30} more (list attached)" if len(view.hosts) > 30 else "")
    got = len(view.approvers)
    votes = ", ".join(f"<@{u}> {slack_date(at, '%H:%M UTC')}" for u, at in view.approvers) or "none yet"
    status = {
        "pending": f"{got}/{view.needed} approvals from {', '.join(view.approver_roles)}; "
                   f"expires {slack_date(view.expires_at)}",
        "approved": f"approved ({got}/{view.needed}); " + ("the schedule is active" if view.schedule else "the job is starting"),
        "denied": f"denied by <@{view.decided_by}>: {escape(view.reason or '')}",
        "expired": "expired before enough approvals",
        "withdrawn": f"withdrawn: {escape(view.reason or '')}",
    }.get(view.state, view.state)
    blocks: list[dict[str, Any]] = [
        section(f":lock: *Approval #{view.number}* \u2014 <@{view.requester}> asks to run `{view.module}` on "
                f"*{len(view.hosts)} host{'s' * (len(view.hosts) != 1)}* in `{view.idc}`"
                + (f" on {view.schedule}" if view.schedule else "")),
        section(f"{code(view.params or '(no parameters)', 1500)}\n"
                + (f"hosts per IDC:\n{clip(escape(view.parts), 1400)}" if view.parts else f"hosts: {clip(shown, 1200)}")),
        section(f"*{view.state}*: {status}\napproved by: {votes}"),
    ]
    if view.state == "pending":
        blocks.append({"type": "actions", "block_id": f"approval:{view.request_id}", "elements": [
            {"type": "button", "action_id": APPROVE_ACTION, "style": "primary", "value": view.request_id,
             "text": {"type": "plain_text", "text": "Approve"}},
            {"type": "button", "action_id": DENY_ACTION, "style": "danger", "value": view.request_id,
             "text": {"type": "plain_text", "text": "Deny"}},
        ]})
    text = (f"[approval #{view.number} {view.state}] {view.module} on {len(view.hosts)} host(s) in {view.idc} "
            f"requested by {view.requester}" + (f" on {view.schedule}" if view.schedule else "")
            + f": {status}; approved by: {votes}")
    if view.parts:
        text += f"\n{escape(view.parts)}"
    if view.state == "pending":
        text += f"\n(/om approve {view.number}  or  /om deny {view.number} REASON)"
    files = [(f"approval-{view.number}-hosts.txt", "\n".join(view.hosts) + "\n")] if len(view.hosts) > 30 else []
    return Message(clip(text, TEXT_LIMIT), blocks, files)


def deny_form(request_id: str, number: int) -> dict[str, Any]:
    return {
        "type": "modal", "callback_id": DENY_CALLBACK, "private_metadata": request_id,
        "title": {"type": "plain_text", "text": f"Deny request #{number}"[:24]},
        "submit": {"type": "plain_text", "text": "Deny"}, "close": {"type": "plain_text", "text": "Back"},
        "blocks": [{"type": "input", "block_id": "reason", "label": {"type": "plain_text", "text": "Reason"},
                    "element": {"type": "plain_text_input", "action_id": "v", "multiline": True, "max_length": 1000}}],
    }
