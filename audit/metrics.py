"""The central audit's metrics, in the bot's process (docs/monitoring.md): what the feed pulled, what
alerted, and what waits in the alert queues. Labels stay bounded: a rule is a name from the rules
file, and every agent's or master's notice counts as the one rule "notice" (its code is the agent's word).
"""

from __future__ import annotations

from collections.abc import Callable

from ombot.audit.rules import Match
from ombot.opsweb import Counter, Gauge

FEED_EVENTS = Counter("ombot_audit_feed_events_total", "Audit events the feed pulled from the masters: stored (new "
                      "to the bot's store) or duplicate (held already: read twice, or sent to two masters).",
                      ["outcome"])
ALERTS = Counter("ombot_audit_alerts_total", "Audit events that raised an alert (past the rule's threshold and "
                 "cooldown), by rule; agents' and masters' notices as rule \"notice\".", ["rule"])
QUEUE_DEPTH = Gauge("ombot_audit_alert_queue_depth", "Alerts and notices waiting to be posted, all channels'.")


def pulled(read: int, stored: int) -> None:
    FEED_EVENTS.labels("stored").inc(stored)
    FEED_EVENTS.labels("duplicate").inc(read - stored)


def alerted(match: Match) -> None:
    ALERTS.labels("notice" if match.dedupe_key.startswith("notice:") else match.rule).inc()


def watch_queue(depth: Callable[[], int]) -> None:
    """Read the alert queue's depth at each scrape (one queue per process: the latest one made)."""
    QUEUE_DEPTH.set_function(depth)
