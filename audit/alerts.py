"""When audit rule matches become alerts, and what an alert says: thresholds and cooldown per dedupe
key (`Thresholds`), one message per burst (`Grouper`: matches with one dedupe key close together are
one *group*, counted on one message updated in place), and the message itself (`alert_message`).

The feed hands over every rule match of a newly stored event. The first match that the rule's
threshold lets through opens a group; the rest (held back by the cooldown, or a burst of a rule
without one) count on its message, updated with the count and the latest command. Every field a
user controls is escaped (`<!channel>` typed in a command pings nobody), the command and its
directory go in a code block, and secrets are redacted (audit.rules.redact). The queue that orders
and bounds what waits to be sent is audit.queue; the pacing per channel is the chat surface's.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ombot.audit.fields import clock_note, login_status
from ombot.audit.rules import Match
from ombot.message import Message, clip, code, escape, section, slack_date

BURST_MS = 60_000  # matches with one key within this of the group's last one join it, whatever the cooldown
MAX_GROUP_MS = 3_600_000  # a group older than this starts a new message, however busy
MAX_GROUPS = 10_000
SEVERITY_ICONS = {"info": ":information_source:", "warning": ":warning:", "critical": ":rotating_light:"}
# Limits on the escaped text (escaping can grow it fivefold), so every section stays under Slack's
# 3,000 characters with its code block closed, and the message far below its ~13k.
FIELD_LIMIT = 200
CWD_LIMIT = 300
CODE_LIMIT = 1500
DOT = " \u00b7 "


class Thresholds:
    """Whether a match raises an alert now: its threshold's count reached within the window, and its
    cooldown since the last alert with the same dedupe key passed.

    In memory, keyed by dedupe key: the bot's store runs in one process, and that process keeps the
    one instance (counts restart with it). At most `max_keys` keys are kept, the least recent dropped.
    """

    def __init__(self, max_keys: int = 100_000) -> None:
        self.max_keys = max_keys
        self._recent: dict[str, deque[int]] = {}  # dedupe key -> the last `count` match times (ms)
        self._fired: dict[str, int] = {}  # dedupe key -> when it last alerted (ms)

    def fire(self, match: Match, at: int) -> bool:
        key = match.dedupe_key
        times = self._recent.pop(key, None)
        if times is None or times.maxlen != match.threshold.count:  # a key shared by rules of other counts
            times = deque(times or (), maxlen=match.threshold.count)
        self._recent[key] = times  # re-inserted: the dict's order is least recently seen first
        times.append(at)
        self._evict()
        window_ms = match.threshold.window_seconds * 1000
        if len(times) < match.threshold.count or (match.threshold.count > 1 and at - times[0] > window_ms):
            return False
        last = self._fired.get(key)
        if last is not None and at - last < match.cooldown_seconds * 1000:
            return False
        self._fired[key] = at
        times.clear()  # the next alert needs `count` new matches
        return True

    def _evict(self) -> None:
        while len(self._recent) > self.max_keys:
            oldest = next(iter(self._recent))
            del self._recent[oldest]
            self._fired.pop(oldest, None)


@dataclass
class AlertGroup:
    """One alert message: the matches of one dedupe key in one burst."""

    key: str
    channel: str
    match: Match
    first: dict[str, Any]  # the event that opened it (fields as in AuditRecord)
    last: dict[str, Any]
    opened_at: int  # event times (ms, the server's clock)
    last_at: int
    count: int = 1
    ts: str | None = None  # the Slack message, once posted
    version: int = 1  # bumped on every change; `sent` is the version the channel shows
    sent: int = 0
    attempts: int = 0


class Grouper:
    """Which matches open a new alert message and which count on an open one. Pure: no I/O."""

    def __init__(self, burst_ms: int = BURST_MS, max_group_ms: int = MAX_GROUP_MS, max_groups: int = MAX_GROUPS) -> None:
        self.burst_ms, self.max_group_ms, self.max_groups = burst_ms, max_group_ms, max_groups
        self.groups: OrderedDict[str, AlertGroup] = OrderedDict()

    def add(self, match: Match, event: Mapping[str, Any], fired: bool, channel: str) -> AlertGroup | None:
        """The group this match changed (new, or its count grown), or None when it raises nothing:
        its threshold is not reached and no message with its key is open."""
        at = int(event["at"])
        group = self.groups.get(match.dedupe_key)
        if group is not None and self._open(group, at):
            group.count += 1
            if at >= group.last_at:
                group.last, group.last_at = dict(event), at
            group.version += 1
            self.groups.move_to_end(match.dedupe_key)
            return group
        if not fired:
            return None
        group = AlertGroup(match.dedupe_key, channel, match, dict(event), dict(event), at, at,
                           count=match.threshold.count)  # a threshold fires on its count-th match
        self.groups[match.dedupe_key] = group
        self.groups.move_to_end(match.dedupe_key)
        while len(self.groups) > self.max_groups:
            self.groups.popitem(last=False)
        return group

    def _open(self, group: AlertGroup, at: int) -> bool:
        if at - group.opened_at >= self.max_group_ms:
            return False
        return at - group.opened_at < group.match.cooldown_seconds * 1000 or at - group.last_at < self.burst_ms


def alert_message(group: AlertGroup, redact: Callable[[str], str]) -> Message:
    """The alert as the channel shows it: who, where, from where, and the command in a code block."""
    first, match = group.first, group.match
    icon = SEVERITY_ICONS.get(match.severity, "")
    where = f"`{field_text(first.get('host'))}` in `{field_text(first.get('idc'))}`"
    count = f" \u2014 *{group.count} matching commands*" if group.count > 1 else ""
    headline = f"{icon} *{match.severity}* \u00b7 audit rule *{field_text(match.rule)}* on {where}{count}"
    blocks: list[dict[str, Any]] = [section(headline), section(_who(first) + "\n" + _command(first, redact))]
    if group.count > 1:
        last = group.last
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": clip(
            f"first {slack_date(group.opened_at)}, latest {slack_date(group.last_at)} by "
            f"{field_text(last.get('user'))} on {field_text(last.get('host'))}", 2000)}]})
        if last is not first and last.get("id") != first.get("id"):
            blocks.append(section("latest:\n" + _command(last, redact)))
    text = (f"[audit {match.severity}] {match.rule} on {first.get('host')} ({first.get('idc')}) by "
            f"{first.get('user')}" + (f", {group.count} matching commands" if group.count > 1 else "")
            + f": {redact(str(first.get('command') or ''))}")
    return Message(clip(escape(text), 3000), blocks)


def _who(event: Mapping[str, Any]) -> str:
    """Who and when, in two parts: what the kernel and the agent vouch for, then what only the
    user's shell claims (docs/audit.md, "Fields and where they come from")."""
    uid, status, login = event.get("uid"), event.get("exit_status"), field_text(event.get("login_user")) or "none"
    when = slack_date(int(event["at"]))
    note = clock_note(int(event["at"]), event.get("claimed_at"))
    if note:
        when += f" ({field_text(note)}: the shell's clock)"
    user = f"*user* {field_text(event.get('user')) or '?'}" + (f" (uid {uid})" if uid is not None else "")
    if event.get("kind") not in (None, "command"):
        return f"{user}{DOT}{when}" if uid is not None else when
    if event.get("source") == "auditd":
        tty = field_text(event.get("tty")) or "-"
        return f"{user}{DOT}*login* {login}{DOT}*tty* {tty}{DOT}{when} (auditd: the kernel's record)"
    checked = login_status(event)
    vouched = [user]
    if checked == "kernel":
        vouched.append(f"*login* {login} (checked with the kernel)")
    kernel = field_text(event.get("kernel_login_user")) or "no login session"
    if checked == "mismatch":
        vouched.append(f"*login* {kernel} (the kernel's)")
    origin = f"from {field_text(event.get('ssh_client'))}" if event.get("ssh_client") else "local"
    claimed = [f"login {login} {origin}" if checked == "claimed" else origin,
               f"tty {field_text(event.get('tty')) or '-'}", f"exit {'?' if status is None else status}"]
    flag = f"\n:warning: *the shell claims login {login}, the kernel says {kernel}*" if checked == "mismatch" else ""
    return f"{DOT.join(vouched)}{DOT}{when}\n_claimed by the shell:_ {DOT.join(claimed)}{flag}"


def _command(event: Mapping[str, Any], redact: Callable[[str], str]) -> str:
    if event.get("kind") not in (None, "command"):  # an agent's notice or drop: what it says, as it says it
        return code(redact(str(event.get("command") or "")), CODE_LIMIT)
    cwd = redact(str(event.get("cwd") or "?"))
    return code(f"{clip(cwd, CWD_LIMIT)}\n$ {redact(str(event.get('command') or ''))}", CODE_LIMIT)


def field_text(value: Any) -> str:
    """A user-controlled value in mrkdwn: nothing in it can ping, link or end our formatting."""
    text = escape(clip("" if value is None else str(value), FIELD_LIMIT)).replace("`", "'").replace("*", "\u2217")
    return clip(text, FIELD_LIMIT)
