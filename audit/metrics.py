"""The central audit's metrics, in the bot's process (docs/monitoring.md): what the feed pulled, what
alerted, and what waits in the alert queues. Labels stay bounded: a rule is a name from the rules
file, and every agent's or master's notice counts as the one rule "notice" (its code is the agent's word).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from ombot.audit.rules import Match
from ombot.opsweb import REGISTRY, Collector, Counter, CounterMetricFamily, Gauge

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


class _ExportLines(Collector):
    """The SIEM export's own counts (audit.export.Export.stats), read at each scrape."""

    def __init__(self) -> None:
        self.stats: Callable[[], dict[str, int]] = dict

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("ombot_audit_export_lines", "Lines of the SIEM export ([bot.audit_export]) "
                                     "by sink (file, syslog) and outcome (written, sent, dropped).",
                                     labels=["sink", "outcome"])
        for key, count in sorted(self.stats().items()):
            sink, outcome = key.split("_", 1)
            family.add_metric([sink, outcome], count)
        yield family


EXPORT_LINES = _ExportLines()
REGISTRY.register(EXPORT_LINES)


def watch_export(stats: Callable[[], dict[str, int]]) -> None:
    """Read the export's counts at each scrape (one export per process: the latest one opened)."""
    EXPORT_LINES.stats = stats
