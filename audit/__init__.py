"""The central shell audit: every master's audit events pulled into one store in the bot's database,
the rules run on them, alerts raised, the store searched. It runs in the bot's process but is not the
chat face, and imports no chat code: alerts go out through what the bot provides (a `Courier`, e.g.
bot.alerts.AlertPoster, serving an `AlertQueue`), the way jobs go out through bot.transport.Transport.

Inside: feed (pulling from the masters, under a lease), heartbeats (silent agents, unreachable
IDCs), store (the tables), rules (matching and redaction), examples (a rules file's checks, the
sample file), alerts (thresholds, grouping, the alert's text), queue and overflow (each channel's
bounded queue and its summary), notices (what the pipeline says about itself), fields (whose word
each field is), search (queries and who may ask), export, ecs and syslog5424 (events and alerts to
the SIEM: ECS lines to a file or RFC 5424 syslog over TCP or TLS).
"""

import peewee

from ombot.audit import store
from ombot.audit.examples import SAMPLE_RULES, check_examples
from ombot.audit.export import ExportSettings
from ombot.audit.feed import AuditFeed, FeedSettings, start_feed
from ombot.audit.fields import clock_note, login_status
from ombot.audit.queue import MAX_PENDING, Alerts, AlertQueue, Courier, Outgoing
from ombot.audit.rules import Match, load_rules, redact
from ombot.audit.search import AuditQuery, find_events, redact_patterns, require_audit_viewer, utc
from ombot.audit.store import AuditRecord, forget_events_before

# What the bot (the chat face) and ombot.app (`ombot audit test-rules`, `ombot init`) use.
__all__ = ["MAX_PENDING", "SAMPLE_RULES", "AlertQueue", "Alerts", "AuditFeed", "AuditQuery", "AuditRecord", "Courier",
           "ExportSettings", "FeedSettings", "Match", "Outgoing", "bind", "check_examples", "clock_note", "find_events",
           "forget_events_before", "load_rules", "login_status", "prepare", "redact", "redact_patterns",
           "require_audit_viewer", "start_feed", "utc"]


def bind(db: peewee.Database) -> None:
    """Keep the audit tables in the bot's database (open); `prepare` creates or upgrades them."""
    store.bind(db)


def prepare() -> None:
    """Create or upgrade the audit tables (after `bind`)."""
    store.prepare()
