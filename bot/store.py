"""The bot's central database: the jobs it started, where their cards are, and which master owns them."""

from __future__ import annotations

from typing import Any

import peewee

from playhouse.migrate import SchemaMigrator
from playhouse.migrate import migrate as run_operations

from ombot import audit
from ombot import lease
from ombot.clock import now_ms
from ombot.storage import JSONField, create_tables, epoch_seconds_to_ms, find_by_number_or_id, open_database

db = peewee.DatabaseProxy()


class BotJob(peewee.Model):
    """Timestamps are UTC epoch milliseconds (ombot.clock)."""

    number = peewee.AutoField()  # the short number people type: /om cancel 12
    job_id = peewee.CharField(max_length=36, unique=True)  # the UUID, also the request id at the master
    requester = peewee.CharField(max_length=64, index=True)
    origin = peewee.CharField(max_length=16)
    channel = peewee.CharField(max_length=64)
    card_ts = peewee.CharField(max_length=32, null=True)  # None when the card went out by response_url
    reply_url = peewee.TextField(null=True)  # the command's response_url, for channels the bot is not in
    idc = peewee.CharField(max_length=64)
    master_id = peewee.CharField(max_length=64, null=True)
    module = peewee.CharField(max_length=128)
    params = JSONField()  # as shown on the card
    host_count = peewee.IntegerField()
    hosts = JSONField(null=True)  # the host names (None for jobs stored before version 3)
    state = peewee.CharField(max_length=16, index=True)
    note = peewee.TextField(null=True)  # why it ended the way it did (unknown, failed early), as the card says
    approvers = JSONField(default=list)  # who approved it (they may cancel it too)
    cancel_roles = JSONField(default=list)  # policy roles that may cancel it
    reported = peewee.BooleanField(default=False, index=True)  # final card and thread results are posted
    # An ended job's per-host results, for cards drawn from the database (None: it ended before a
    # master ran it, refused or lost, or before version 4)
    hosts_ok = peewee.IntegerField(null=True)
    hosts_failed = peewee.IntegerField(null=True)
    created_at = peewee.BigIntegerField()
    finished_at = peewee.BigIntegerField(null=True)

    class Meta:
        database = db
        table_name = "bot_job"


def _columns_and_indexes(db: peewee.Database) -> tuple[set[str], set[tuple[str, ...]]]:
    schema = db.execute_sql("SELECT current_schema()").fetchone()[0] if isinstance(db, peewee.PostgresqlDatabase) else None
    return ({c.name for c in db.get_columns("bot_job", schema=schema)},
            {tuple(i.columns) for i in db.get_indexes("bot_job", schema=schema)})


def _add_missing(db: peewee.Database, fields: dict[str, peewee.Field]) -> None:
    """Add the columns a database created at an earlier version lacks (step 1 creates the current model)."""
    columns, _ = _columns_and_indexes(db)
    migrator = SchemaMigrator.from_database(db)
    run_operations(*(migrator.add_column("bot_job", name, field) for name, field in fields.items() if name not in columns))


def _hosts_and_notes(db: peewee.Database) -> None:
    """Version 3: each job's host names and the reason it ended, and an index for the unfinished ones."""
    _add_missing(db, {"hosts": JSONField(null=True), "note": peewee.TextField(null=True)})
    if ("reported",) not in _columns_and_indexes(db)[1]:
        run_operations(SchemaMigrator.from_database(db).add_index("bot_job", ("reported",)))


def _host_counts(db: peewee.Database) -> None:
    """Version 4: an ended job's per-host counts."""
    _add_missing(db, {"hosts_ok": peewee.IntegerField(null=True), "hosts_failed": peewee.IntegerField(null=True)})


# Version 1 kept seconds in 32-bit INTs; its JSON text columns are already what JSONField reads.
MIGRATIONS = [create_tables(BotJob), epoch_seconds_to_ms({"bot_job": ("created_at", "finished_at")}),
              _hosts_and_notes, _host_counts]


def open_store(url: str) -> peewee.Database:
    """Open the bot's database and migrate the job tables; the leases (ombot.lease) and the audit store
    (audit), which keep their tables in it, are bound to it here too (each migrates its own: `prepare`)."""
    database = open_database(url, db, "bot", MIGRATIONS)
    lease.bind(database)
    audit.bind(database)
    return database


def find_job(ref: str) -> BotJob | None:
    """A job by its short number or its UUID."""
    job: BotJob | None = find_by_number_or_id(BotJob, BotJob.number, BotJob.job_id, ref)
    return job


def update_job(job: BotJob, **fields: Any) -> None:
    for key, value in fields.items():
        setattr(job, key, value)
    BotJob.update(**fields).where(BotJob.number == job.number).execute()


def now() -> int:
    """Now in epoch ms, as BotJob's timestamps are stored."""
    return now_ms()


def forget_jobs_before(cutoff_ms: int) -> int:
    """Delete reported jobs created before `cutoff_ms` (retention); unfinished jobs are always kept."""
    return int(BotJob.delete().where(BotJob.reported & (BotJob.created_at < cutoff_ms)).execute())
