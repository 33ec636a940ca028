"""The schedule tables and their migrations: what the bot's database keeps of each schedule and run.

The tables are the truth the service arms APScheduler from; their names (`bot_schedule`,
`bot_schedule_run`) and the component's migration name (`schedules`) are what existing databases know.
"""

from __future__ import annotations

from typing import Any

import peewee
from playhouse.migrate import SchemaMigrator
from playhouse.migrate import migrate as run_operations

from ombot.bot import store
from ombot.storage import JSONField, create_tables, find_by_number_or_id, migrate

ACTIVE, AWAITING, PAUSED, DELETED = "active", "awaiting", "paused", "deleted"  # awaiting: approval


class Schedule(peewee.Model):
    """One schedule. Times are UTC epoch ms; `hosts` is the list its approvers saw."""

    number = peewee.AutoField()  # what people type: /om schedule pause 3
    schedule_id = peewee.CharField(max_length=36, unique=True)
    requester = peewee.CharField(max_length=64)
    origin = peewee.CharField(max_length=16, index=True)
    channel = peewee.CharField(max_length=64)  # where it was made: its cards and questions go there
    idc = peewee.CharField(max_length=64)
    module = peewee.CharField(max_length=128)
    params = JSONField()
    targets = peewee.TextField()  # as typed: expanded again at every run
    hosts = JSONField()
    timeout = peewee.IntegerField(null=True)
    timing = peewee.CharField(max_length=128)  # "every 15m" or a five-field cron line (UTC)
    state = peewee.CharField(max_length=16, index=True)
    reason = peewee.TextField(null=True)  # why it is paused or awaiting approval
    paused_by = peewee.CharField(max_length=64, null=True)  # the person whose pause holds it, until it runs again
    paused_authority = peewee.IntegerField(null=True)  # their say over it then (approvals.AUTHORITY_NAMES)
    approval_request = peewee.CharField(max_length=36, null=True, index=True)  # the request that covers it
    approvers = JSONField(default=list)
    cancel_roles = JSONField(default=list)
    approval_expires_at = peewee.BigIntegerField(null=True)  # None: no approval needed
    anchor_at = peewee.BigIntegerField()  # when it was last activated: intervals count from here
    last_fire_at = peewee.BigIntegerField()  # the latest fire time handled (run, skipped or missed)
    last_job_id = peewee.CharField(max_length=36, null=True)
    busy_skipped = peewee.IntegerField(default=0)  # firings skipped while a run was in flight, to report
    missed_old = peewee.IntegerField(default=0)  # firings too old to run, to report
    created_at = peewee.BigIntegerField()

    class Meta:
        database = store.db
        table_name = "bot_schedule"


class ScheduleRun(peewee.Model):
    """One run a schedule fired: its job id, and what its card says about the schedule."""

    job_id = peewee.CharField(max_length=36, primary_key=True)
    schedule = peewee.IntegerField(index=True)  # Schedule.number
    scheduled_at = peewee.BigIntegerField()
    fired_at = peewee.BigIntegerField()
    label = peewee.TextField()

    class Meta:
        database = store.db
        table_name = "bot_schedule_run"
        indexes = ((("schedule", "scheduled_at"), True),)


def _pausers(db: peewee.Database) -> None:
    """Version 2: who paused a schedule, and with how much say (a database made since has them)."""
    columns = {d[0] for d in db.execute_sql("SELECT * FROM bot_schedule WHERE 1 = 0").description}
    migrator = SchemaMigrator.from_database(db)
    run_operations(*[migrator.add_column("bot_schedule", name, field) for name, field in
                     (("paused_by", peewee.CharField(max_length=64, null=True)),
                      ("paused_authority", peewee.IntegerField(null=True))) if name not in columns])


# Append-only: a new step goes at the end, never edit one that has shipped.
MIGRATIONS = [create_tables(Schedule, ScheduleRun), _pausers]


def prepare() -> None:
    """Create the schedule tables in the bot's database (after bot.store is opened)."""
    migrate(store.db.obj, "schedules", MIGRATIONS)


def find_schedule(ref: str) -> Schedule | None:
    """The schedule a person names by its number or id, deleted ones too (None: no such schedule)."""
    found: Schedule | None = find_by_number_or_id(Schedule, Schedule.number, Schedule.schedule_id, ref)
    return found


def reload(schedule: Schedule) -> Schedule:
    """The schedule's row as the table has it now."""
    fresh: Schedule = Schedule.get_by_id(schedule.number)
    return fresh


def set_fields(schedule: Schedule, **fields: Any) -> None:
    """Change these fields on the object and in its row (only these: others may have changed the rest)."""
    for key, value in fields.items():
        setattr(schedule, key, value)
    Schedule.update(**fields).where(Schedule.number == schedule.number).execute()
