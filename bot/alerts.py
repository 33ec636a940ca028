"""Shell-audit alerts in their Slack channels: the audit room's queue (audit.AlertQueue: grouping,
cooldown, the bounded queue, retries) carried by one worker per channel, paced per channel.

Slack allows about one message per second per channel: each channel's worker takes the next message
when its token bucket has a token, and posts it (or updates the alert's message in place) through the
transport. A 429 is honoured by the transport (its client sleeps for Retry-After, and tries again);
a post that still fails goes back to the queue, which tries it again later.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from ombot.audit import MAX_PENDING, AlertQueue, Match, Outgoing
from ombot.bot.transport import Transport
from ombot.message import Message
from ombot.ratelimit import TokenBucket
from ombot.timers import Timers

log = logging.getLogger("ombot.bot.alerts")

RATE_PER_SECOND = 1.0  # Slack: about one message per second per channel
BURST = 3  # messages a quiet channel may take at once


class AlertPoster:
    """Audit alerts posted through the transport: an `AlertQueue` (the audit room's) whose courier this
    is, with one worker thread per channel paced by a token bucket. The failed posts' retries are
    one-shot jobs on `timers` (the process's scheduler)."""

    def __init__(self, transport: Transport, redact: Callable[[str], str], timers: Timers,
                 rate: float = RATE_PER_SECOND, burst: int = BURST, max_pending: int = MAX_PENDING) -> None:
        self.transport, self.rate, self.burst = transport, rate, burst
        self.queue = AlertQueue(self, redact, timers, max_pending)
        self._channels = self.queue.channels  # each channel's queue, as the audit room keeps it

    def alert(self, match: Match, event: Mapping[str, Any], fired: bool, channel: str) -> None:
        """One match of a newly stored event; `fired`: its threshold and cooldown let it alert."""
        self.queue.alert(match, event, fired, channel)

    def notice(self, channel: str, message: Message, severity: str = "warning") -> None:
        """A message of its own (a silent agent, its return), queued with the channel's alerts at `severity`."""
        self.queue.notice(channel, message, severity)

    def close(self) -> None:
        """Post nothing more: the workers end at their next take."""
        self.queue.close()

    def serve(self, queue: AlertQueue, channel: str) -> None:
        """The channel's worker, started when its first alert is queued."""
        bucket = TokenBucket(self.rate, self.burst)
        threading.Thread(target=self._drain, args=(queue, channel, bucket), daemon=True,
                         name=f"om-alerts-{channel}").start()

    def _drain(self, queue: AlertQueue, channel: str, bucket: TokenBucket) -> None:
        while (sent := queue.take(channel, bucket.take)) is not None:  # waits for a token, or for work
            ts = self._send(sent)  # outside the queue's lock: the transport may sleep on a 429
            bucket.finished()
            queue.settle(sent, ts)

    def _send(self, sent: Outgoing) -> str | None:
        """The message's ts once Slack has it, else None (the queue tries it again later)."""
        try:
            if sent.ts is not None:
                self.transport.update(sent.channel, sent.ts, sent.message)
                return sent.ts
            return self.transport.post(sent.channel, sent.message)
        except Exception:  # a transport bug must not end the channel's worker
            log.exception("could not post an audit alert to %s", sent.channel)
            return None
