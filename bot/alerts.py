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
    login = _field(event.get("login_user")) or "?"
    origin = f"{login} from {_field(event.get('ssh_client'))}" if event.get("ssh_client") else f"{login} (local)"
    status = event.get("exit_status")
    uid = event.get("uid")
    return (f"*user* {_field(event.get('user')) or '?'}" + (f" (uid {uid})" if uid is not None else "")
            + f" \u00b7 *login* {origin} \u00b7 *tty* {_field(event.get('tty')) or '-'}"
            + f" \u00b7 *exit* {'?' if status is None else status} \u00b7 {slack_date(int(event['at']))}")


def _command(event: Mapping[str, Any], redact: Callable[[str], str]) -> str:
    cwd = redact(str(event.get("cwd") or "?"))
    return code(f"{clip(cwd, CWD_LIMIT)}\n$ {redact(str(event.get('command') or ''))}", CODE_LIMIT)


def _field(value: Any) -> str:
    """A user-controlled value in mrkdwn: nothing in it can ping, link or end our formatting."""
    text = escape(clip("" if value is None else str(value), FIELD_LIMIT)).replace("`", "'").replace("*", "\u2217")
    return clip(text, FIELD_LIMIT)


# --- delivery ---------------------------------------------------------------------------------------


@dataclass
class _Notice:
    message: Message
    attempts: int = 0


@dataclass
class _Channel:
    bucket: TokenBucket
    pending: OrderedDict[int, AlertGroup | _Notice] = field(default_factory=OrderedDict)  # by id(): each once
    thread: threading.Thread | None = None


class AlertPoster:
    """Posts alert groups and notices through the transport, one worker thread per channel; the
    retries of failed posts are one-shot jobs on `timers` (the bot's scheduler)."""

    def __init__(self, transport: Transport, redact: Callable[[str], str], timers: Timers,
                 rate: float = RATE_PER_SECOND, burst: int = BURST) -> None:
        self.transport, self.redact, self.timers = transport, redact, timers
        self.rate, self.burst = rate, burst
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

    def notice(self, channel: str, message: Message) -> None:
        """A message of its own (a silent agent, its return), paced with the channel's alerts."""
        with self._changed:
            self._queue(channel, _Notice(message))

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def _queue(self, channel: str, item: AlertGroup | _Notice) -> None:
        state = self._channels.get(channel)
        if state is None:
            state = self._channels[channel] = _Channel(TokenBucket(self.rate, self.burst))
        state.pending[id(item)] = item
        if state.thread is None:
            state.thread = threading.Thread(target=self._drain, args=(channel, state), daemon=True,
                                            name=f"om-alerts-{channel}")
            state.thread.start()
        self._changed.notify_all()

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
                _, item = state.pending.popitem(last=False)
                message, version = self._render(item)
            delivered = self._send(channel, item, message)  # outside the lock: the transport may sleep on a 429
            with self._changed:
                state.bucket.finished()
                self._after_send(channel, state, item, version, delivered)

    def _render(self, item: AlertGroup | _Notice) -> tuple[Message, int]:
        if isinstance(item, _Notice):
            return item.message, 0
        return alert_message(item, self.redact), item.version

    def _send(self, channel: str, item: AlertGroup | _Notice, message: Message) -> bool:
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

    def _after_send(self, channel: str, state: _Channel, item: AlertGroup | _Notice, version: int,
                    delivered: bool) -> None:
        if isinstance(item, AlertGroup) and delivered:
            item.sent = max(item.sent, version)
            if item.version > item.sent:  # counted on while it was being sent: show the new count too
                state.pending[id(item)] = item
            return
        if delivered:
            return
        item.attempts += 1
        if item.attempts >= POST_ATTEMPTS:
            log.error("gave up posting an audit alert to %s after %d attempts", channel, item.attempts)
            return
        self.timers.once(RETRY_SECONDS * item.attempts, self._requeue, channel, item)

    def _requeue(self, channel: str, item: AlertGroup | _Notice) -> None:
        with self._changed:
            if not self._closed:
                self._queue(channel, item)
