"""The master's own state: replay cache, jobs, their events and host locks.

Masters of one IDC may share the database: each job records its master (restart recovery and
retention touch only their own), a host lock is a row all of them see, and the replay cache is
common (a nonce is global, and each envelope names the one master it is for)."""

from __future__ import annotations

import peewee
from playhouse.migrate import SchemaMigrator
from playhouse.migrate import migrate as run_migration

from ombot import storage
from ombot.clock import now_ms
from ombot.storage import JSONField, create_tables, epoch_seconds_to_ms, open_database

db = peewee.DatabaseProxy()


class BaseModel(peewee.Model):
    """The master's tables, all in the one database `db` is bound to."""

    class Meta:
        database = db


class SeenNonce(BaseModel):
    """Nonces of accepted requests, kept until their request could no longer pass the time checks.

    Every timestamp here is UTC epoch milliseconds (ombot.clock) in a 64-bit integer."""

    nonce = peewee.CharField(max_length=32, primary_key=True)
    keep_until = peewee.BigIntegerField(index=True)


class Job(BaseModel):
    """One accepted job, keyed by its request id: who asked, what and where, and its state."""

    id = peewee.CharField(max_length=36, primary_key=True)  # the request id
    sender = peewee.CharField(max_length=64)
    requester = peewee.CharField(max_length=256)
    origin = peewee.CharField(max_length=16)
    approvers = JSONField()
    module = peewee.CharField(max_length=128)
    params = JSONField()
    hosts = JSONField()
    idc = peewee.CharField(max_length=64)
    timeout = peewee.IntegerField()
    state = peewee.CharField(max_length=16, index=True)
    created_at = peewee.BigIntegerField()
    finished_at = peewee.BigIntegerField(null=True)
    signed_request = peewee.BlobField()  # the signed envelope: proof of who asked for this job
    # The master that accepted it; NULL for jobs from before databases could be shared (one master's).
    master_id = peewee.CharField(max_length=64, null=True, index=True)


class JobEvent(BaseModel):
    """One numbered event of a job (accepted, host, cancel_requested, finished), as clients receive it."""

    job = peewee.ForeignKeyField(Job, backref="events", on_delete="CASCADE")
    seq = peewee.IntegerField()
    kind = peewee.CharField(max_length=32)
    at = peewee.BigIntegerField()  # sent to clients as stored: epoch ms
    data = JSONField()

    class Meta:
        indexes = ((("job", "seq"), True),)


class HostLock(BaseModel):
    """A host a running (or about to run) job is changing: one row per host, for every master sharing the database.

    A job takes all its rows in one INSERT or none (the primary key refuses a host already taken). Its
    master renews the lease (`expires_at`, by the database's clock) while it holds them; once it lapses,
    any master may take the hosts over (masters.leases)."""

    idc = peewee.CharField(max_length=64)
    host = peewee.CharField(max_length=255)
    job = peewee.CharField(max_length=36, index=True)  # the holder's request id
    master_id = peewee.CharField(max_length=64, index=True)
    taken_at = peewee.BigIntegerField()
    # Epoch ms by the database's clock. NULL: taken by a master from before leases, held until it restarts.
    expires_at = peewee.BigIntegerField(null=True)

    class Meta:
        primary_key = peewee.CompositeKey("idc", "host")


def _add_master_id(db: peewee.Database) -> None:
    """Jobs record their master. A database created since has the column already (step 1 creates the
    current model). Nullable: on SQLite a NOT NULL column means copying the table, and dropping the
    old copy would cascade to every job's events."""
    columns = [d[0] for d in db.execute_sql("SELECT * FROM job WHERE 1 = 0").description]
    if "master_id" in columns:
        return
    migrator = SchemaMigrator.from_database(db)
    run_migration(migrator.add_column("job", "master_id", peewee.CharField(max_length=64, null=True, index=True)))


def _add_lock_expiry(db: peewee.Database) -> None:
    """Host locks carry a lease. Locks already held keep none (NULL): a master of the previous version
    may still hold them without renewing, so they are never taken over, only freed by its restart.
    Skipped when the column exists (a new database; or a step cut short on MySQL, run again)."""
    columns = [d[0] for d in db.execute_sql("SELECT * FROM hostlock WHERE 1 = 0").description]
    if "expires_at" in columns:
        return
    run_migration(SchemaMigrator.from_database(db).add_column("hostlock", "expires_at",
                                                              peewee.BigIntegerField(null=True)))


MIGRATIONS = [
    create_tables(SeenNonce, Job, JobEvent),
    epoch_seconds_to_ms({"seennonce": ("keep_until",), "job": ("created_at", "finished_at"), "jobevent": ("at",)}),
    _add_master_id,
    create_tables(HostLock),
    _add_lock_expiry,
]


def open_store(url: str) -> peewee.Database:
    return open_database(url, db, "master", MIGRATIONS)


def database_now_ms() -> int:
    """Now by the database's clock, in epoch ms: the clock every master sharing it agrees on."""
    return storage.database_now_ms(db.obj)


def remember_nonce(nonce: str, keep_until: int) -> bool:
    """Record a nonce, kept until `keep_until` (epoch ms); False if it was already seen (a replay).
    One insert, no read-then-write race."""
    # INSERT ... ON CONFLICT DO NOTHING (INSERT IGNORE on MySQL): one statement, no savepoint.
    inserted = SeenNonce.insert(nonce=nonce, keep_until=keep_until).on_conflict_ignore().as_rowcount().execute()
    return inserted == 1


def forget_old_nonces(now: int | None = None) -> int:
    """Forget nonces kept until before `now` (epoch ms; default: now)."""
    return SeenNonce.delete().where(SeenNonce.keep_until < (now_ms() if now is None else now)).execute()
