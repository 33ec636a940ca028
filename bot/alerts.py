"""Shell-audit alerts in their channels: one message per burst, updated in place, paced per channel.

The audit feed hands over every rule match of a newly stored event. Matches with one dedupe key
close together are one *group*: the first that the rule's threshold lets through posts a message,
and the rest (held back by the cooldown, or a burst of a rule without one) count on that message,
updated in place (chat.update) with the count and the latest command. Each channel has a token
bucket (Slack allows about one message per second per channel); a backlog of updates to one
group collapses into one update with the latest count. A 429 is honoured by the transport (its
client sleeps for Retry-After, and tries again), and a post that still fails is tried again
later, a one-shot job on the bot's scheduler: an alert is not dropped for a rate limit.

Every field a user controls is escaped (`<!channel>` typed in a command pings nobody), the command
and its directory go in a code block, and secrets are redacted (bot.audit_rules.redact).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from bot.audit_fields import clock_note, login_status
from bot.audit_rules import Match
from bot.messages import Message, clip, code, escape, section, slack_date
from bot.transport import Transport

log = logging.getLogger("ombot.bot.alerts")

RATE_PER_SECOND = 1.0  # Slack: about one message per second per channel
BURST = 3  # messages a quiet channel may take at once
BURST_MS = 60_000  # matches with one key within this of the group's last one join it, whatever the cooldown
MAX_GROUP_MS = 3_600_000  # a group older than this starts a new message, however busy
MAX_GROUPS = 10_000
POST_ATTEMPTS = 6  # a post the transport could not deliver (after its own 429 retries) is tried this often
RETRY_SECONDS = 2.0
SEVERITY_ICONS = {"info": ":information_source:", "warning": ":warning:", "critical": ":rotating_light:"}
# Limits on the escaped text (escaping can grow it fivefold), so every section stays under Slack's
# 3,000 characters with its code block closed, and the message far below its ~13k.
FIELD_LIMIT = 200
CWD_LIMIT = 300
CODE_LIMIT = 1500
DOT = " \u00b7 "


class Timers(Protocol):
    """The bot's scheduler as the alerts and the audit feed use it (bot.jobs.Timers)."""

    def every(self, job_id: str, seconds: float, work: Callable[[], None]) -> None: ...

    def once(self, seconds: float, work: Callable[..., None], *args: Any) -> None: ...

    def cancel(self, job_id: str) -> None: ...


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up. Not thread-safe: one per channel worker."""

    def __init__(self, rate: float = RATE_PER_SECOND, burst: int = BURST,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens = float(burst)
        self.updated = clock()

    def take(self) -> float:
        """0 when a token was taken now; else the seconds until one is there (nothing taken)."""
        now = self.clock()
        self.tokens = min(float(self.burst), self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate

    def finished(self) -> None:
        """The message taken for went out just now: the time it spent on its way (a 429's Retry-After)
        saves up nothing, so what waited behind it does not follow in one rush."""
        self.updated = self.clock()


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
    where = f"`{_field(first.get('host'))}` in `{_field(first.get('idc'))}`"
    count = f" \u2014 *{group.count} matching commands*" if group.count > 1 else ""
    headline = f"{icon} *{match.severity}* \u00b7 audit rule *{_field(match.rule)}* on {where}{count}"
    blocks: list[dict[str, Any]] = [section(headline), section(_who(first) + "\n" + _command(first, redact))]
    if group.count > 1:
        last = group.last
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": clip(
            f"first {slack_date(group.opened_at)}, latest {slack_date(group.last_at)} by "
            f"{_field(last.get('user'))} on {_field(last.get('host'))}", 2000)}]})
        if last is not first and last.get("id") != first.get("id"):
            blocks.append(section("latest:\n" + _command(last, redact)))
    text = (f"[audit {match.severity}] {match.rule} on {first.get('host')} ({first.get('idc')}) by "
            f"{first.get('user')}" + (f", {group.count} matching commands" if group.count > 1 else "")
            + f": {redact(str(first.get('command') or ''))}")
    return Message(clip(escape(text), 3000), blocks)


def _who(event: Mapping[str, Any]) -> str:
    """Who and when, in two parts: what the kernel and the agent vouch for, then what only the
    user's shell claims (docs/audit.md, "Fields and where they come from")."""
    uid, status, login = event.get("uid"), event.get("exit_status"), _field(event.get("login_user")) or "none"
    when = slack_date(int(event["at"]))
    note = clock_note(int(event["at"]), event.get("claimed_at"))
    if note:
        when += f" ({_field(note)}: the shell's clock)"
    user = f"*user* {_field(event.get('user')) or '?'}" + (f" (uid {uid})" if uid is not None else "")
    if event.get("kind") not in (None, "command"):
        return f"{user}{DOT}{when}" if uid is not None else when
    if event.get("source") == "auditd":
        tty = _field(event.get("tty")) or "-"
        return f"{user}{DOT}*login* {login}{DOT}*tty* {tty}{DOT}{when} (auditd: the kernel's record)"
    checked = login_status(event)
    vouched = [user]
    if checked == "kernel":
        vouched.append(f"*login* {login} (checked with the kernel)")
    kernel = _field(event.get("kernel_login_user")) or "no login session"
    if checked == "mismatch":
        vouched.append(f"*login* {kernel} (the kernel's)")
    origin = f"from {_field(event.get('ssh_client'))}" if event.get("ssh_client") else "local"
    claimed = [f"login {login} {origin}" if checked == "claimed" else origin,
               f"tty {_field(event.get('tty')) or '-'}", f"exit {'?' if status is None else status}"]
    flag = f"\n:warning: *the shell claims login {login}, the kernel says {kernel}*" if checked == "mismatch" else ""
    return f"{DOT.join(vouched)}{DOT}{when}\n_claimed by the shell:_ {DOT.join(claimed)}{flag}"


def _command(event: Mapping[str, Any], redact: Callable[[str], str]) -> str:
    if event.get("kind") not in (None, "command"):  # an agent's notice or drop: what it says, as it says it
        return code(redact(str(event.get("command") or "")), CODE_LIMIT)
    cwd = redact(str(event.get("cwd") or "?"))
    return code(f"{clip(cwd, CWD_LIMIT)}\n$ {redact(str(event.get('command') or ''))}", CODE_LIMIT)


def _field(value: Any) -> str:
    """A user-controlled value in mrkdwn: nothing in it can ping, link or end our formatting."""
    text = escape(clip("" if value is None else str(value), FIELD_LIMIT)).replace("`", "'").replace("*", "\u2217")
    return clip(text, FIELD_LIMIT)


# --- delivery ---------------------------------------------------------------------------------------

MAX_PENDING = 50  # items waiting per channel; past it the least severe go to the channel's overflow summary
SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}  # most severe posted first
OVERFLOW_SEVERITY = "warning"  # a summary's least rank: it tells of a flood, so it does not wait behind one
OVERFLOW_HOSTS = 3  # host names a summary shows per rule; the rest are counted
OVERFLOW_TRACKED = 1_000  # distinct hosts per rule, and notice texts, a summary remembers; past it, counts only
OVERFLOW_LINE = 800  # characters per line of a summary
OVERFLOW_BODY = 2_400  # characters of lines in its section (Slack: 3,000), the rest counted in one line
MAX_DEFERRED = MAX_GROUPS  # per channel: posted alerts whose update waits for room in the queue


def _rank(severity: str) -> int:
    return SEVERITY_RANK.get(severity, SEVERITY_RANK[OVERFLOW_SEVERITY])


@dataclass
class _Notice:
    message: Message
    severity: str = "warning"
    attempts: int = 0


@dataclass
class _Spill:
    """What one rule lost to a channel's overflow: its matches, and the hosts they came from."""

    matches: int = 0
    hosts: dict[str, None] = field(default_factory=dict)  # first seen first, at most OVERFLOW_TRACKED
    untracked: bool = False  # and more hosts than those

    def add_host(self, host: str) -> None:
        if host not in self.hosts:
            if len(self.hosts) < OVERFLOW_TRACKED:
                self.hosts[host] = None
            else:
                self.untracked = True


@dataclass
class _Overflow:
    """A channel's summary of what did not fit its queue: one message, queued once there is room, and
    filled until it is taken to be posted (what overflows later goes in the next one)."""

    rules: dict[tuple[str, str], _Spill] = field(default_factory=dict)  # (rule, severity) -> what it lost
    notices: dict[tuple[str, str], int] = field(default_factory=dict)  # (first line, severity) -> how many
    other_notices: int = 0  # notices past OVERFLOW_TRACKED texts
    severity: str = OVERFLOW_SEVERITY  # where it queues: the highest severity it holds, at least OVERFLOW_SEVERITY
    attempts: int = 0

    def add_matches(self, group: AlertGroup, matches: int) -> None:
        spill = self.rules.setdefault((group.match.rule, group.match.severity), _Spill())
        spill.matches += matches
        for event in (group.first, group.last):
            spill.add_host(str(event.get("host") or "?"))
        self._raise(group.match.severity)

    def add_notice(self, notice: _Notice) -> None:
        self._count_notice((notice.message.text.split("\n", 1)[0], notice.severity), 1)
        self._raise(notice.severity)

    def merge(self, other: _Overflow) -> None:
        """Another summary's content (one whose post failed and found no room when tried again)."""
        for key, spill in other.rules.items():
            mine = self.rules.setdefault(key, _Spill())
            mine.matches += spill.matches
            for host in spill.hosts:
                mine.add_host(host)
            mine.untracked = mine.untracked or spill.untracked
        for key, count in other.notices.items():
            self._count_notice(key, count)
        self.other_notices += other.other_notices
        self._raise(other.severity)

    def matches(self) -> int:
        return sum(spill.matches for spill in self.rules.values())

    def notice_count(self) -> int:
        return sum(self.notices.values()) + self.other_notices

    def _count_notice(self, key: tuple[str, str], count: int) -> None:
        if key in self.notices or len(self.notices) < OVERFLOW_TRACKED:
            self.notices[key] = self.notices.get(key, 0) + count
        else:
            self.other_notices += count

    def _raise(self, severity: str) -> None:
        if _rank(severity) > _rank(self.severity):
            self.severity = severity


_Item = AlertGroup | _Notice | _Overflow


def _severity(item: _Item) -> str:
    return item.match.severity if isinstance(item, AlertGroup) else item.severity


def overflow_message(summary: _Overflow, queue: int) -> Message:
    """The summary as the channel shows it: per rule, how many matches on which hosts, and the notices,
    the most severe first; what does not fit its section is counted in its last line."""
    lines: list[tuple[int, int, str, str, int, int]] = []  # (rank, count, mrkdwn, plain text, matches, notices)
    for (rule, severity), spill in summary.rules.items():
        what = f"{_more(spill.matches, 'match')} of rule"
        lines.append((_rank(severity), spill.matches,
                      f"\u2026 and {what} *{_field(rule)}* ({_field(severity)}) on {_hosts(spill, True)}",
                      f"{what} {clip(rule, FIELD_LIMIT)} ({severity}) on {_hosts(spill, False)}", spill.matches, 0))
    for (text, severity), count in summary.notices.items():
        what = _more(count, "notice")
        text = text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")  # escaped once below, not twice
        lines.append((_rank(severity), count, f"\u2026 and {what}: {_field(text)}",
                      f"{what}: {clip(text, FIELD_LIMIT)}", 0, count))
    if summary.other_notices:
        lines.append((-1, 0, f"\u2026 and {_more(summary.other_notices, 'notice')}",
                      _more(summary.other_notices, "notice"), 0, summary.other_notices))
    lines.sort(key=lambda line: (-line[0], -line[1]))
    body: list[str] = []
    plain: list[str] = []
    size = 0
    for n, (_, _, markup, text, _, _) in enumerate(lines):
        markup = clip(markup, OVERFLOW_LINE)
        if size + len(markup) > OVERFLOW_BODY:
            rest = lines[n:]
            matches, notices = sum(line[4] for line in rest), sum(line[5] for line in rest)
            rules = sum(1 for line in rest if line[4])
            counted = [f"{_more(matches, 'match')} of {rules} other rule{'' if rules == 1 else 's'}"] if matches else []
            counted += [_more(notices, "notice")] if notices else []
            body.append(f"\u2026 and {' and '.join(counted)}")
            plain.append(" and ".join(counted))
            break
        body.append(markup)
        plain.append(text)
        size += len(markup) + 1
    icon = SEVERITY_ICONS.get(summary.severity, "")
    headline = (f"{icon} *audit alerts overflowed this channel's queue* (at most {queue} wait to be posted, "
                f"the most severe first)")
    tail = "were not posted one by one; search them with `/om audit`."
    text = f"[audit overflow] {'; '.join(plain)} were not posted one by one; search them with /om audit"
    return Message(clip(escape(text), 3000), [section(headline), section("\n".join(body) + "\n" + tail)])


def _more(count: int, noun: str) -> str:
    return f"{count} more {noun if count == 1 else noun + ('es' if noun.endswith('ch') else 's')}"


def _hosts(spill: _Spill, markup: bool) -> str:
    names = [f"`{_field(host)}`" if markup else clip(host, FIELD_LIMIT) for host in list(spill.hosts)[:OVERFLOW_HOSTS]]
    rest = len(spill.hosts) - len(names)
    if rest or spill.untracked:
        more = f"{rest}{'+' if spill.untracked else ''} more host{'' if rest == 1 and not spill.untracked else 's'}"
        return ", ".join(names) + " and " + more
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


@dataclass
class _Channel:
    bucket: TokenBucket
    # by id(): each once, at most AlertPoster.max_pending; taken most severe first, in order within a severity
    pending: OrderedDict[int, _Item] = field(default_factory=OrderedDict)
    deferred: OrderedDict[int, AlertGroup] = field(default_factory=OrderedDict)  # posted: their update waits for room
    summarised: dict[int, tuple[AlertGroup, int]] = field(default_factory=dict)  # unposted groups -> matches summarised
    overflow: _Overflow | None = None  # the summary being filled (in `pending` once there was room)
    sending: _Item | None = None  # the item on its way
    thread: threading.Thread | None = None


class AlertPoster:
    """Posts alert groups and notices through the transport, one worker thread per channel; the
    retries of failed posts are one-shot jobs on `timers` (the bot's scheduler).

    Each channel's queue holds at most `max_pending` items, the most severe posted first (in order
    within a severity). When it is full, a newcomer takes the place of the newest of the least severe
    items below it, or, with none below it, does not get in: what is left out goes in the channel's
    overflow summary, one message that counts the matches per rule and the notices. An update of an
    alert already posted is not summarised (its message is there, with an older count): it waits
    for room, and then shows the whole count."""

    def __init__(self, transport: Transport, redact: Callable[[str], str], timers: Timers,
                 rate: float = RATE_PER_SECOND, burst: int = BURST, max_pending: int = MAX_PENDING) -> None:
        self.transport, self.redact, self.timers = transport, redact, timers
        self.rate, self.burst, self.max_pending = rate, burst, max_pending
        self.grouper = Grouper()
        self._channels: dict[str, _Channel] = {}
        self._changed = threading.Condition()
        self._closed = False

    def alert(self, match: Match, event: Mapping[str, Any], fired: bool, channel: str) -> None:
        """One match of a newly stored event; `fired`: its threshold and cooldown let it alert."""
        with self._changed:
            group = self.grouper.add(match, event, fired, channel)
            if group is not None:
                self._queue(group.channel, group)

    def notice(self, channel: str, message: Message, severity: str = "warning") -> None:
        """A message of its own (a silent agent, its return), queued with the channel's alerts at `severity`."""
        with self._changed:
            self._queue(channel, _Notice(message, severity))

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def _queue(self, channel: str, item: _Item) -> None:
        state = self._channels.get(channel)
        if state is None:
            state = self._channels[channel] = _Channel(TokenBucket(self.rate, self.burst))
        self._admit(channel, state, item)
        if state.thread is None:
            state.thread = threading.Thread(target=self._drain, args=(channel, state), daemon=True,
                                            name=f"om-alerts-{channel}")
            state.thread.start()
        self._changed.notify_all()

    def _admit(self, channel: str, state: _Channel, item: _Item) -> None:
        """Into the channel's queue, or (it full) into the overflow: the item, or the one it displaces."""
        if id(item) in state.pending or item is state.sending:
            return  # queued: the update joins it; on its way: _after_send queues what changed meanwhile
        if isinstance(item, AlertGroup):
            state.deferred.pop(id(item), None)
        if isinstance(item, _Overflow) and len(state.pending) >= self.max_pending:
            self._spill(channel, state, item)  # a summary tried again: into the one being filled
            return
        if len(state.pending) >= self.max_pending:
            victim = self._victim(state, _rank(_severity(item)))
            if victim is None:
                self._spill(channel, state, item)
                return
            del state.pending[id(victim)]
            self._spill(channel, state, victim)
        if isinstance(item, AlertGroup):
            state.summarised.pop(id(item), None)  # in the queue now: posted with its whole count
        state.pending[id(item)] = item
        self._refill(state)

    @staticmethod
    def _victim(state: _Channel, rank: int) -> AlertGroup | _Notice | None:
        """The newest of the least severe pending items below `rank`; never a summary (it is the overflow)."""
        victim, lowest = None, rank
        for item in reversed(state.pending.values()):
            if not isinstance(item, _Overflow) and _rank(_severity(item)) < lowest:
                victim, lowest = item, _rank(_severity(item))
        return victim

    def _spill(self, channel: str, state: _Channel, item: _Item) -> None:
        """An item that is not queued for want of room: a posted alert's update waits for room (its
        message is there, with an older count); anything else goes in the channel's overflow summary."""
        if isinstance(item, AlertGroup) and item.ts is not None:
            state.deferred[id(item)] = item
            if len(state.deferred) > MAX_DEFERRED:
                _, old = state.deferred.popitem(last=False)
                log.warning("audit alert %r in %s keeps its count of %d: more than %d posted alerts wait for "
                            "room to be updated", old.match.rule, channel, old.count, MAX_DEFERRED)
            return
        matches = 0
        if isinstance(item, AlertGroup):
            matches = item.count - state.summarised.pop(id(item), (item, 0))[1]  # a summarised group's new ones
            state.summarised[id(item)] = (item, item.count)
            self._forget_summarised(state)
            if matches <= 0:
                return
        summary = state.overflow
        if summary is None:
            summary = state.overflow = _Overflow()
            log.warning("audit alerts to %s overflow its queue of %d: the least severe are counted in one summary "
                        "message, posted once there is room", channel, self.max_pending)
        if isinstance(item, AlertGroup):
            summary.add_matches(item, matches)
        elif isinstance(item, _Notice):
            summary.add_notice(item)
        else:
            summary.merge(item)

    def _forget_summarised(self, state: _Channel) -> None:
        """Only groups the grouper may still count on need remembering (each summarised group holds
        its events): past 2 x MAX_GROUPS the others go, and then the oldest."""
        if len(state.summarised) <= 2 * MAX_GROUPS:
            return
        state.summarised = {key: entry for key, entry in state.summarised.items()
                            if self.grouper.groups.get(entry[0].key) is entry[0]}
        while len(state.summarised) > MAX_GROUPS:
            del state.summarised[next(iter(state.summarised))]

    def _refill(self, state: _Channel) -> None:
        """Room in the queue: the overflow summary first, then the posted alerts whose update waited."""
        summary = state.overflow
        if summary is not None and id(summary) not in state.pending and len(state.pending) < self.max_pending:
            state.pending[id(summary)] = summary
        while state.deferred and len(state.pending) < self.max_pending:
            group = max(state.deferred.values(), key=lambda g: _rank(g.match.severity))
            del state.deferred[id(group)]
            state.pending[id(group)] = group

    def _drain(self, channel: str, state: _Channel) -> None:
        while True:
            with self._changed:
                while not state.pending and not self._closed:
                    self._changed.wait()
                if self._closed:
                    return
                wait = state.bucket.take()
                if wait > 0:
                    self._changed.wait(wait)
                    continue
                item = max(state.pending.values(), key=lambda i: _rank(_severity(i)))  # the first of the most severe
                del state.pending[id(item)]
                if item is state.overflow:  # on its way: what overflows from now on goes in the next summary
                    state.overflow = None
                    log.info("posting the audit alert overflow of %s: %d matches of %d rules, %d notices", channel,
                             item.matches(), len(item.rules), item.notice_count())
                state.sending = item
                self._refill(state)
                message, version = self._render(item)
            delivered = self._send(channel, item, message)  # outside the lock: the transport may sleep on a 429
            with self._changed:
                state.sending = None
                state.bucket.finished()
                self._after_send(channel, state, item, version, delivered)

    def _render(self, item: _Item) -> tuple[Message, int]:
        if isinstance(item, _Notice):
            return item.message, 0
        if isinstance(item, _Overflow):
            return overflow_message(item, self.max_pending), 0
        return alert_message(item, self.redact), item.version

    def _send(self, channel: str, item: _Item, message: Message) -> bool:
        try:
            if isinstance(item, AlertGroup) and item.ts is not None:
                self.transport.update(channel, item.ts, message)
                return True
            ts = self.transport.post(channel, message)
        except Exception:  # a transport bug must not end the channel's worker
            log.exception("could not post an audit alert to %s", channel)
            return False
        if ts is None:
            return False
        if isinstance(item, AlertGroup):
            item.ts = ts
        return True

    def _after_send(self, channel: str, state: _Channel, item: _Item, version: int, delivered: bool) -> None:
        if isinstance(item, AlertGroup) and delivered:
            item.sent = max(item.sent, version)
            if item.version > item.sent:  # counted on while it was being sent: show the new count too
                self._admit(channel, state, item)
            return
        if delivered:
            return
        item.attempts += 1
        if item.attempts >= POST_ATTEMPTS:
            log.error("gave up posting an audit alert to %s after %d attempts", channel, item.attempts)
            return
        self.timers.once(RETRY_SECONDS * item.attempts, self._requeue, channel, item)

    def _requeue(self, channel: str, item: _Item) -> None:
        with self._changed:
            if not self._closed:
                self._queue(channel, item)
