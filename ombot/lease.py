"""Leases in the bot's database: with several bot processes on one database, exactly one holds a
named lease (firing a schedule, following a job, pulling the audit feed) until it lets go or stops
renewing it.

Time is the database's clock, never the processes' own: two bots whose clocks disagree still agree
on when a lease ran out. A holder that dies is replaced once its lease expires (`ttl`).

In the base because the chat face (bot) and the central audit (audit) both take leases. The table
keeps its name and its migration component (`bot_lease`): databases made before the move open as
they are. `bind` points it at the bot's database (bot.store.open_store does, when it opens it).
"""

from __future__ import annotations

import peewee
from peewee import fn

from ombot import storage
from ombot.storage import create_tables, migrate

db = peewee.DatabaseProxy()


class Lease(peewee.Model):
    """Who holds the lease `name`, until when (epoch ms by the database's clock)."""

    name = peewee.CharField(max_length=191, primary_key=True)  # 191: a utf8mb4 key MySQL can index
    holder = peewee.CharField(max_length=128)
    expires_at = peewee.BigIntegerField(index=True)

    class Meta:
        database = db
        table_name = "bot_lease"


MIGRATIONS = [create_tables(Lease)]


def bind(database: peewee.Database) -> None:
    """Keep the leases in `database` (the bot's, open)."""
    db.initialize(database)


def prepare() -> None:
    """Create the lease table in the database `bind` named."""
    migrate(db.obj, "bot_lease", MIGRATIONS)


def database_now_ms() -> int:
    """Now, in epoch ms, by the database server's clock (SQLite: this host's)."""
    return storage.database_now_ms(db.obj)


def acquire(name: str, holder: str, ttl_ms: int, preempt: str | None = None) -> bool:
    """Take or renew the lease: True when `holder` holds it now, for `ttl_ms` from the database's now.
    `preempt`: a holder prefix this caller may take the lease from even before it runs out (the Slack
    bot takes the audit feed from a console, `console:`); the one it took it from learns so at its
    next renewal, which fails.

    One conditional UPDATE (ours, expired, or a preemptible holder's), else one INSERT that a unique
    key lets only one process win: no read-then-write race between bots."""
    with db.atomic():
        now = database_now_ms()
        free = (Lease.holder == holder) | (Lease.expires_at < now)
        if preempt:  # SUBSTR, not LIKE: a `_` or `%` in the prefix is no wildcard
            free |= fn.SUBSTR(Lease.holder, 1, len(preempt)) == preempt
        taken = (Lease.update(holder=holder, expires_at=now + ttl_ms)
                 .where((Lease.name == name) & free).execute())
        if taken:
            return True
        inserted = (Lease.insert(name=name, holder=holder, expires_at=now + ttl_ms)
                    .on_conflict_ignore().as_rowcount().execute())
        return inserted == 1


def release(name: str, holder: str) -> None:
    """Let go of the lease, if `holder` still holds it."""
    Lease.delete().where((Lease.name == name) & (Lease.holder == holder)).execute()


def holder_of(name: str) -> str | None:
    """Who holds the lease now (an expired lease is held by nobody)."""
    row = Lease.get_or_none(Lease.name == name)
    return row.holder if row is not None and row.expires_at >= database_now_ms() else None
