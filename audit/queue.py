"""Each alert channel's queue: bounded, the most severe first, what does not fit summarised, failed posts
tried again. The chat surface sends what it holds, at the pace its channels allow.

The queue decides what is said and in which order; the surface decides when (Slack: about one
message a second per channel) and how (a post, or an update in place). It is a `Courier`: told once
per channel to serve it, it runs a worker that takes the channel's next message with `take`, at its
own pace, sends it, and reports with `settle` (bot.alerts.AlertPoster for Slack, the way jobs go out
through bot.transport.Transport). A backlog of updates to one group collapses into one update with
the latest count, since a group waits in the queue once. A post the surface could not deliver (after
its own 429 retries) is tried again later, a one-shot job on the process's scheduler: an alert is
not dropped for a rate limit.

Each channel holds at most `max_pending` items. When it is full, a newcomer takes the place of the
newest of the least severe items below it, or, with none below it, does not get in: what is left out
goes in the channel's overflow summary (audit.overflow). An update of an alert already posted is
not summarised (its message is there, with an older count): it waits for room, and then shows the
whole count.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ombot.audit import metrics
from ombot.audit.alerts import MAX_GROUPS, AlertGroup, Grouper, alert_message
from ombot.audit.overflow import Overflow, overflow_message, rank
from ombot.audit.rules import Match
from ombot.message import Message
from ombot.timers import Timers

log = logging.getLogger("ombot.bot.alerts")  # its name from before the audit room: operators' filters keep working

MAX_PENDING = 50  # items waiting per channel; past it the least severe go to the channel's overflow summary
MAX_DEFERRED = MAX_GROUPS  # per channel: posted alerts whose update waits for room in the queue
POST_ATTEMPTS = 6  # a post the surface could not deliver (after its own 429 retries) is tried this often
RETRY_SECONDS = 2.0


@dataclass
class _Notice:
    message: Message
    severity: str = "warning"
    attempts: int = 0


_Item = AlertGroup | _Notice | Overflow


def _severity(item: _Item) -> str:
    return item.match.severity if isinstance(item, AlertGroup) else item.severity


@dataclass
class _Channel:
    # by id(): each once, at most AlertQueue.max_pending; taken most severe first, in order within a severity
    pending: OrderedDict[int, _Item] = field(default_factory=OrderedDict)
    deferred: OrderedDict[int, AlertGroup] = field(default_factory=OrderedDict)  # posted: their update waits for room
    summarised: dict[int, tuple[AlertGroup, int]] = field(default_factory=dict)  # unposted groups -> matches summarised
    overflow: Overflow | None = None  # the summary being filled (in `pending` once there was room)
    sending: _Item | None = None  # the item on its way


@dataclass(frozen=True)
class Outgoing:
    """One message for a channel, taken from its queue: a post, or (`ts` set) an update of the
    message `ts` in place. The surface sends it, then settles it."""

    channel: str
    message: Message
    ts: str | None
    item: _Item
    version: int


class Courier(Protocol):
    """What carries alerts to the chat surface, at the pace its channels allow (bot.alerts.AlertPoster)."""

    def serve(self, queue: AlertQueue, channel: str) -> None:
        """Deliver `channel`'s alerts from now on: a worker that takes each from `queue.take` and
        reports it with `queue.settle`. Called once per channel, when its first alert is queued."""


class Alerts(Protocol):
    """Where the audit feed hands its alerts: an `AlertQueue` and the courier that serves it."""

    def alert(self, match: Match, event: Mapping[str, Any], fired: bool, channel: str) -> None: ...

    def notice(self, channel: str, message: Message, severity: str = "warning") -> None: ...

    def close(self) -> None: ...


class AlertQueue:
    """Every channel's queue of alert groups and notices, served by `courier`; the retries of failed
    posts are one-shot jobs on `timers` (the process's scheduler). Thread-safe."""

    def __init__(self, courier: Courier, redact: Callable[[str], str], timers: Timers,
                 max_pending: int = MAX_PENDING) -> None:
        self.courier, self.redact, self.timers, self.max_pending = courier, redact, timers, max_pending
        self.grouper = Grouper()
        self.channels: dict[str, _Channel] = {}
        self._changed = threading.Condition()
        self._closed = False
        metrics.watch_queue(self.depth)

    def depth(self) -> int:
        """Items waiting in every channel's queue (not the one on its way)."""
        with self._changed:
            return sum(len(state.pending) for state in self.channels.values())

    def alert(self, match: Match, event: Mapping[str, Any], fired: bool, channel: str) -> None:
        """One match of a newly stored event; `fired`: its threshold and cooldown let it alert."""
        if fired:
            metrics.alerted(match)
        with self._changed:
            group = self.grouper.add(match, event, fired, channel)
            if group is not None:
                self._queue(group.channel, group)

    def notice(self, channel: str, message: Message, severity: str = "warning") -> None:
        """A message of its own (a silent agent, its return), queued with the channel's alerts at `severity`."""
        with self._changed:
            self._queue(channel, _Notice(message, severity))

    def close(self) -> None:
        """Queue nothing more; the workers' `take` returns None from now on."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    # -- the surface's side -----------------------------------------------------------------------------

    def take(self, channel: str, pace: Callable[[], float]) -> Outgoing | None:
        """The channel's next message, the first of the most severe, once there is one and `pace()`
        lets it go (0: now; else the seconds until it may, waited out unless something changes);
        None once the queue is closed. One worker per channel takes, and settles what it took."""
        with self._changed:
            state = self.channels[channel]
            while True:
                while not state.pending and not self._closed:
                    self._changed.wait()
                if self._closed:
                    return None
                wait = pace()
                if wait <= 0:
                    break
                self._changed.wait(wait)
            item = max(state.pending.values(), key=lambda i: rank(_severity(i)))  # the first of the most severe
            del state.pending[id(item)]
            if item is state.overflow:  # on its way: what overflows from now on goes in the next summary
                state.overflow = None
                log.info("posting the audit alert overflow of %s: %d matches of %d rules, %d notices", channel,
                         item.matches(), len(item.rules), item.notice_count())
            state.sending = item
            self._refill(state)
            message, version = self._render(item)
            ts = item.ts if isinstance(item, AlertGroup) else None
            return Outgoing(channel, message, ts, item, version)

    def settle(self, sent: Outgoing, ts: str | None) -> None:
        """What became of a message `take` gave: delivered (`ts`, the message's id), or not (None)."""
        with self._changed:
            state = self.channels[sent.channel]
            state.sending = None
            item = sent.item
            if isinstance(item, AlertGroup) and ts is not None and item.ts is None:
                item.ts = ts  # posted: its next change is an update in place
            self._after_send(sent.channel, state, item, sent.version, ts is not None)

    # -- inside, under the lock ---------------------------------------------------------------------------

    def _queue(self, channel: str, item: _Item) -> None:
        state = self.channels.get(channel)
        new = state is None
        if state is None:
            state = self.channels[channel] = _Channel()
        self._admit(channel, state, item)
        if new:
            self.courier.serve(self, channel)
        self._changed.notify_all()

    def _admit(self, channel: str, state: _Channel, item: _Item) -> None:
        """Into the channel's queue, or (it full) into the overflow: the item, or the one it displaces."""
        if id(item) in state.pending or item is state.sending:
            return  # queued: the update joins it; on its way: _after_send queues what changed meanwhile
        if isinstance(item, AlertGroup):
            state.deferred.pop(id(item), None)
        if isinstance(item, Overflow) and len(state.pending) >= self.max_pending:
            self._spill(channel, state, item)  # a summary tried again: into the one being filled
            return
        if len(state.pending) >= self.max_pending:
            victim = self._victim(state, rank(_severity(item)))
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
    def _victim(state: _Channel, below: int) -> AlertGroup | _Notice | None:
        """The newest of the least severe pending items below rank `below`; never a summary (it is the overflow)."""
        victim, lowest = None, below
        for item in reversed(state.pending.values()):
            if not isinstance(item, Overflow) and rank(_severity(item)) < lowest:
                victim, lowest = item, rank(_severity(item))
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
            summary = state.overflow = Overflow()
            log.warning("audit alerts to %s overflow its queue of %d: the least severe are counted in one summary "
                        "message, posted once there is room", channel, self.max_pending)
        if isinstance(item, AlertGroup):
            summary.add_matches(item, matches)
        elif isinstance(item, _Notice):
            summary.add_notice(item.message, item.severity)
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
            group = max(state.deferred.values(), key=lambda g: rank(g.match.severity))
            del state.deferred[id(group)]
            state.pending[id(group)] = group

    def _render(self, item: _Item) -> tuple[Message, int]:
        if isinstance(item, _Notice):
            return item.message, 0
        if isinstance(item, Overflow):
            return overflow_message(item, self.max_pending), 0
        return alert_message(item, self.redact), item.version

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
