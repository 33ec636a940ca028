"""Signed Slack requests are taken once: a replay of the same bytes is dropped.

Slack signs "v0:{timestamp}:{body}", and a signature verifies for as long as its timestamp is within
five minutes of now, so whoever captures a request (a proxy log, a leaked capture) can send it again
and run the command again. The first use of each (timestamp, signature) pair is recorded in the bot's
database, so the record holds across restarts and for every bot process sharing that database. The
digest is the primary key: the check is one INSERT, and of two processes racing with the same request
exactly one wins (SQLite, MariaDB/MySQL and Postgres all enforce the key atomically).
"""

from __future__ import annotations

import hashlib
import threading

import peewee

from ombot.bot import store
from ombot.clock import now_ms
from ombot.storage import create_tables, migrate

# slack_sdk's SignatureVerifier accepts a timestamp up to five minutes either side of now.
SIGNATURE_WINDOW_MS = 5 * 60 * 1000
# Bot processes sharing a database may disagree about the time: remember a little longer.
CLOCK_SKEW_MS = 60 * 1000
PURGE_EVERY_MS = 60 * 1000


class SeenRequest(peewee.Model):
    """A signed Slack request already taken, remembered until its signature could no longer verify."""

    digest = peewee.CharField(max_length=64, primary_key=True)  # sha256 of "timestamp:signature"
    seen_at = peewee.BigIntegerField()  # UTC epoch milliseconds
    expires_at = peewee.BigIntegerField(index=True)  # UTC epoch ms; the signature no longer verifies by then

    class Meta:
        database = store.db
        table_name = "bot_seen_request"


MIGRATIONS = [create_tables(SeenRequest)]

_purge_lock = threading.Lock()
_next_purge_ms = 0


def prepare() -> None:
    """Create the table in the bot's database (bound by `store.open_store`)."""
    migrate(store.db.obj, "bot_replay", MIGRATIONS)


def digest_of(timestamp: str, signature: str) -> str:
    return hashlib.sha256(f"{timestamp}:{signature}".encode()).hexdigest()


def first_use(timestamp: str, signature: str) -> bool:
    """Record a verified request; False when the same signed request was seen before (a replay)."""
    now = now_ms()
    _purge_expired(now)
    try:
        signed_at = int(timestamp) * 1000
    except ValueError:
        signed_at = now  # cannot happen after verification; remember it for a full window anyway
    row = {"digest": digest_of(timestamp, signature), "seen_at": now,
           "expires_at": max(signed_at, now) + SIGNATURE_WINDOW_MS + CLOCK_SKEW_MS}
    try:
        with store.db.atomic():
            SeenRequest.insert(row).execute()
    except peewee.IntegrityError:
        return False
    return True


def _purge_expired(now: int) -> None:
    """Drop rows whose signatures no longer verify; at most once a minute per process."""
    global _next_purge_ms
    with _purge_lock:
        if now < _next_purge_ms:
            return
        _next_purge_ms = now + PURGE_EVERY_MS
    SeenRequest.delete().where(SeenRequest.expires_at < now).execute()
