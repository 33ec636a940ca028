"""What the audit pipeline says about itself, as alerts: an agent's notices (a squatted spool, a
file it cannot read, its own failures, events it had to drop), a master's (an agent over its
ingest limit), an agent that reports a problem or falls silent, and an IDC the bot cannot reach.

A notice is stored like any event and alerts through the same grouping and pacing as a rule's
match: one message per host and kind of notice while they keep coming (cooldown five minutes),
with a severity by kind. A user who floods notices (junk in their own spool) makes one alert
message whose count grows, never a message each.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from ombot.audit.rules import Match, Threshold
from ombot.message import Message, escape, section, slack_date

COOLDOWN_SECONDS = 300
# kind of notice -> (severity, what it means, as the alert's title)
NOTICES: dict[str, tuple[str, str]] = {
    "spool_squatted": ("critical", "another user took a user's spool directory"),
    "dropped": ("critical", "audit events were dropped"),
    "agent_error": ("warning", "the audit agent hit an error"),
    "spool_entry": ("warning", "an unexpected entry in the spool directory"),
    "spool_file": ("warning", "a spool file the agent will not read"),
    "spool_line": ("warning", "a spool line that is not a record"),
    "spool_truncated": ("warning", "a spool file was truncated"),
    "notices_held": ("warning", "a flood of audit notices"),
    "ingest_rate": ("warning", "an agent sends faster than its master takes"),
}
UNKNOWN = ("warning", "an audit agent notice")


def notice_alert(record: Mapping[str, Any], data: Mapping[str, Any], channel: str) -> tuple[Match, dict[str, Any]]:
    """The Match and the event an alert shows for a stored `notice` or `dropped` event (`record` is
    its stored row, `data` what the agent sent)."""
    code = "dropped" if record["kind"] == "dropped" else str(data.get("code") or "notice")
    severity, title = NOTICES.get(code, UNKNOWN)
    match = Match(f"{title} ({code})", severity, channel, f"notice:{code}:{record['host']}", COOLDOWN_SECONDS,
                  Threshold())
    event = {**record, "command": describe(record["kind"], data), "exit_status": None}
    return match, event


def describe(kind: str, data: Mapping[str, Any]) -> str:
    """A notice or drop in words (unescaped: the alert escapes and redacts it)."""
    if kind == "dropped":
        return (f"{data.get('count')} event(s) dropped: {data.get('reason')}; of uid(s) "
                f"{', '.join(f'{uid} ({n})' for uid, n in sorted(dict(data.get('uids') or {}).items()))}, from "
                f"{_utc(data.get('oldest_at'))} to {_utc(data.get('newest_at'))}")
    text = str(data.get("problem") or data.get("code") or "a notice")
    if data.get("line"):
        text += f"\nthe line: {str(data['line'])[:300]}"
    return text


def silent_message(host: str, idc: str, last_seen_ms: int) -> Message:
    text = (f":zzz: *audit agent silent* on `{escape(host)}` in `{escape(idc)}`: no heartbeat since "
            f"{slack_date(last_seen_ms)}. Its commands are not reaching the audit store.")
    return Message(f"[audit] agent on {escape(host)} ({escape(idc)}) is silent", [section(text)])


def back_message(host: str, idc: str, seen_ms: int) -> Message:
    text = f":white_check_mark: *audit agent back* on `{escape(host)}` in `{escape(idc)}` (heartbeat {slack_date(seen_ms)})."
    return Message(f"[audit] agent on {escape(host)} ({escape(idc)}) is back", [section(text)])


def degraded_message(host: str, idc: str, problem: str) -> Message:
    text = (f":warning: *audit agent degraded* on `{escape(host)}` in `{escape(idc)}`: it reports "
            f"`{escape(problem[:500]).replace('`', chr(39))}`. Some of its records may not reach the audit store.")
    return Message(f"[audit] agent on {escape(host)} ({escape(idc)}) is degraded: {escape(problem[:200])}",
                   [section(text)])


def recovered_message(host: str, idc: str) -> Message:
    text = f":white_check_mark: *audit agent recovered* on `{escape(host)}` in `{escape(idc)}`: it reports no problem."
    return Message(f"[audit] agent on {escape(host)} ({escape(idc)}) recovered", [section(text)])


def unreachable_message(idc: str, since_ms: int) -> Message:
    text = (f":no_entry: *no master of `{escape(idc)}` answers the audit feed* since {slack_date(since_ms)}: its "
            "servers' commands wait on the masters (or on the servers), nothing reaches the audit store or the "
            "rules, and its agents are not judged silent until a master answers.")
    return Message(f"[audit] no master of {escape(idc)} answers the audit feed", [section(text)])


def reachable_message(idc: str, down_seconds: float) -> Message:
    text = (f":white_check_mark: *the masters of `{escape(idc)}` answer the audit feed again* (after "
            f"{int(down_seconds)} s); what waited there arrives now.")
    return Message(f"[audit] the masters of {escape(idc)} answer again", [section(text)])


def _utc(epoch_ms: Any) -> str:
    if not isinstance(epoch_ms, int):
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch_ms / 1000))
