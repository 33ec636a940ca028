"""What OMBot says: messages with Slack blocks and a plain-text twin (the console shows the text).

One message model, rendered per surface. A message is written once, in OMBot's markup: Slack mrkdwn
in which every piece of user-controlled text (parameters, targets, module output, reasons, the
words of an error) went through `escape` or `code`, and only OMBot's own words carry markup
(`<@U…>` mentions, `<!date…>` dates, `*bold*`, `` `code` ``). Each surface renders that text:
Slack takes it as it is (`for_slack` also disarms any `<!channel>`-like broadcast a builder let
through), a terminal takes `plain(text)`, and a web view would turn `plain(text)` into HTML. An
exception's message is plain text unless raised as `Markup` (`error_message`).

Every builder keeps within Slack's documented limits: a section's text at most 3,000 characters,
at most 50 blocks, and far below the ~13k characters where Slack starts refusing a message
(tests/fakeslack.py checks every message against them).
"""

from __future__ import annotations

import html
import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

from masters import FINAL_STATES, JobState, host_log, host_rows
from ombot.clock import MS_PER_SECOND

log = logging.getLogger("ombot.bot")

SECTION_LIMIT = 3000
TEXT_LIMIT = 3500  # the plain-text twin: what notifications and the console show
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


@dataclass(frozen=True)
class Message:
    """What the bot says once: Slack blocks, their plain-text twin, and files to attach."""

    text: str
    blocks: list[dict[str, Any]] | None = None
    files: list[tuple[str, str]] = field(default_factory=list)  # (filename, content) to attach


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": clip(text, SECTION_LIMIT)}}


FENCE = "```"
_BROKEN_FENCE = "``\u200b`"  # a fence in user text, split by a zero-width space: neither markup nor lost
_DATE = re.compile(r"<!date\^\d+\^[^|>]*\|([^>]*)>")
_MENTION = re.compile(r"<@([^>|]+)(?:\|[^>]*)?>")
_LOOSE_FENCE = re.compile(r"[ \t]*\n?```\n?")  # a fence becomes a line break
_BROADCAST = re.compile(r"<!(?!date\^)")  # <!channel>, <!here>, <!everyone>, <!subteam^…>: OMBot sends none


class Markup(str):
    """A tag only: text already in OMBot's markup (user words escaped, mentions meant). An exception
    raised with one (`PolicyRefusal(Markup(f"... <@{user}> ..."))`) is shown as written in chat."""


def escape(text: str) -> str:
    """User-supplied text in mrkdwn: `<!channel>` or `<@U1>` typed by someone must not ping anyone,
    and a typed ``` must not open a code block (nor vanish from the terminal's `plain` text)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace(FENCE, _BROKEN_FENCE)


def code(text: str, limit: int = SECTION_LIMIT - 8) -> str:
    # escape() splits the triple backticks inside the text, which would end the block early.
    return FENCE + clip(escape(text), limit) + FENCE


def plain(text: str) -> str:
    """OMBot's markup as a terminal shows it: dates in UTC, mentions as @user, no ``` fences, and
    every escaped character as typed (`plain(escape(x)) == x`)."""
    text = _LOOSE_FENCE.sub("\n", _MENTION.sub(r"@\1", _DATE.sub(r"\1", text)))
    return html.unescape(text.replace(_BROKEN_FENCE, FENCE))


def error_message(exc: BaseException, lead: str = "") -> Message:
    """An error's message for chat: plain text, escaped (it often echoes what the user typed, which
    the grammar had unescaped), unless it was raised as `Markup`."""
    said = exc.args[0] if len(exc.args) == 1 else None
    return text_message(lead + (said if isinstance(said, Markup) else escape(str(exc))))


def for_slack(message: Message) -> Message:
    """The message as Slack gets it: as written, with any broadcast (`<!channel>`, `<!here>`, ...) in
    its text or its blocks' mrkdwn disarmed. Builders escape user text; this is the boundary's net."""
    text, blocks = _disarm(message.text), _disarm_blocks(message.blocks)
    if text == message.text and blocks == message.blocks:
        return message
    log.warning("disarmed a broadcast mention in a message (its builder did not escape user text): %.200r",
                message.text)
    return Message(text, blocks, message.files)


def _disarm(text: str) -> str:
    return _BROADCAST.sub("&lt;!", text)


def _disarm_blocks(value: Any) -> Any:
    """Every mrkdwn text object, at any depth of the blocks (sections, fields, context, confirm dialogs)."""
    if isinstance(value, list):
        return [_disarm_blocks(v) for v in value]
    if not isinstance(value, dict):
        return value
    if value.get("type") == "mrkdwn" and isinstance(value.get("text"), str):
        return {**value, "text": _disarm(value["text"])}
    return {k: _disarm_blocks(v) for k, v in value.items()}


def slack_date(epoch_ms: int, fallback_format: str = "%Y-%m-%d %H:%M UTC") -> str:
    """A stored time (epoch ms) each reader sees in their own time zone (Slack date formatting), UTC as fallback."""
    epoch = int(epoch_ms // MS_PER_SECOND)  # Slack's <!date^...> takes whole epoch seconds
    fallback = time.strftime(fallback_format, time.gmtime(epoch))
    return f"<!date^{epoch}^{{date_short_pretty}} {{time}}|{fallback}>"


def text_message(text: str) -> Message:
    return Message(clip(text, TEXT_LIMIT), [section(text)])


def duration(seconds: float) -> str:
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
