"""Every store (master, bot, approvals) on SQLite, PostgreSQL and MariaDB/MySQL: same models, same migrations.

The engines, and each test's empty place on them, are tests/storage.py's (the fixtures `backend`,
`store_url` and `master_db` are in tests/conftest.py). End-to-end tests give their master a
database of its own on both servers.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import stat
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import peewee
import pytest

from ombot import approvals
from ombot.approvals import store as astore
from ombot.audit import store as bot_audit
from ombot.bot import multi, replay, schedules
from ombot.bot import store as bot_store
from ombot.masters import audit as master_audit
from ombot.masters import registrations as master_tables
from ombot.masters import registry as master_registry
from ombot.masters import store
from ombot import config as cfg
from ombot import lease
from ombot.clock import now_ms
from ombot.errors import ConfigError
from ombot.logs import redact
from ombot.storage import (JSONField, SchemaVersion, StorageError, connect_url, create_tables, migrate, open_database,
                           redact_url)
from tests.schema_v1 import JOB_ID, T, create_schema_v1
from tests.storage import SERVERS, admin, current_schema, scratch
from tests.support import Cluster

MIB = 1024 * 1024


# --- the bot's database, and what a database holds ------------------------------------------------


@pytest.fixture
def bot_db(store_url: str) -> Iterator[peewee.Database]:
    """The bot's and the approvals' models on one fresh, migrated database, as the bot runs them."""
    db = bot_store.open_store(store_url)
    approvals.bind(db)
    yield db
    db.close()


def table_names(db: peewee.Database) -> set[str]:
    schema = current_schema(db)
    return set(db.get_tables(schema=schema) if schema else db.get_tables())


def index_names(db: peewee.Database) -> dict[str, set[str]]:
    schema = current_schema(db)
    return {t: {i.name for i in (db.get_indexes(t, schema=schema) if schema else db.get_indexes(t))}
            for t in V1_TABLES}


def column_types(db: peewee.Database, table: str) -> dict[str, str]:
    schema = current_schema(db)
    columns = db.get_columns(table, schema=schema) if schema else db.get_columns(table)
    return {c.name: c.data_type.lower() for c in columns}


# Every table of every component, and its timestamp columns: UTC epoch milliseconds in a 64-bit integer.
# test_every_model_is_listed_here keeps this whole: a model added to any package fails it until it is here.
TIMESTAMPS: dict[str, tuple[str, ...]] = {
    # the master's database
    "seennonce": ("keep_until",), "job": ("created_at", "finished_at"), "jobevent": ("at",), "hostlock": ("taken_at", "expires_at"),
    "auditevent": ("at", "received_at"), "auditagent": ("last_seen",), "auditreader": ("after", "read_at"),
    "registeredclient": ("added_at",), "revokedkey": ("revoked_at",),
    "agentenrolment": ("enrolled_at", "bound_at", "revoked_at"),
    # the bot's database, the approvals' tables included
    "bot_job": ("created_at", "finished_at"), "bot_seen_request": ("seen_at", "expires_at"), "bot_lease": ("expires_at",),
    "bot_multi_request": ("created_at",), "bot_multi_part": (),
    "bot_schedule": ("approval_expires_at", "anchor_at", "last_fire_at", "created_at"),
    "bot_schedule_run": ("scheduled_at", "fired_at"),
    "bot_audit_event": ("at", "stored_at"), "bot_audit_cursor": ("received_after",),
    "approval_request": ("created_at", "expires_at", "decided_at"), "approval_vote": ("at",), "chat_trail": ("at",),
    # the migration runner's, in each database
    "ombot_schema_version": (),
}
# The tables of schema version 1 (before epoch milliseconds), which the migration tests convert.
V1_TABLES = ("seennonce", "job", "jobevent", "bot_job", "approval_request", "approval_vote", "chat_trail")
MS = 4_102_444_800_123  # 2100-01-01 00:00:00.123 UTC: past 2038, and not a whole second


def assert_timestamps_are_bigint(db: peewee.Database, tables: list[str]) -> None:
    # SQLite's INTEGER is 64-bit; it is what peewee declares for a BigIntegerField there.
    wanted = {"integer"} if isinstance(db, peewee.SqliteDatabase) else {"bigint"}
    found = {f"{t}.{c}": column_types(db, t)[c] for t in tables for c in TIMESTAMPS[t]}
    assert {k: v for k, v in found.items() if v not in wanted} == {}


def new_job(job_id: str | None = None, **fields: object) -> store.Job:
    values: dict[str, object] = dict(
        id=job_id or str(uuid.uuid4()), sender="bot", requester="slack:U123", origin="slack", approvers=[],
        module="echo", params={"message": "hi"}, hosts=["localhost"], idc="local", timeout=600,
        state="queued", created_at=1_700_000_000, signed_request=b"\x00signed",
    )
    return store.Job.create(**(values | fields))


# --- migrations ----------------------------------------------------------------------------------


def test_migrations_create_the_tables_and_record_the_version(store_url: str) -> None:
    db = store.open_store(store_url)
    try:
        assert {"seennonce", "job", "jobevent", "ombot_schema_version"} <= table_names(db)
        assert_timestamps_are_bigint(db, ["seennonce", "job", "jobevent"])
        with db.bind_ctx([SchemaVersion]):
            assert SchemaVersion.get_by_id("master").version == len(store.MIGRATIONS)
    finally:
        db.close()
    again = store.open_store(store_url)  # a restart: nothing to do, nothing fails
    try:
        with again.bind_ctx([SchemaVersion]):
            assert [(r.component, r.version) for r in SchemaVersion.select()] == [("master", len(store.MIGRATIONS))]
    finally:
        again.close()


def test_migrations_run_each_step_once_in_order(store_url: str) -> None:
    ran: list[str] = []

    def step(name: str) -> Callable[[peewee.Database], None]:
        return lambda db: ran.append(name)

    db = connect_url(store_url)
    try:
        assert migrate(db, "demo", [step("a")]) == 1
        assert migrate(db, "demo", [step("a")]) == 1
        assert migrate(db, "demo", [step("a"), step("b"), step("c")]) == 3
        assert migrate(db, "demo", [step("a"), step("b"), step("c")]) == 3
        assert ran == ["a", "b", "c"]
        with db.bind_ctx([SchemaVersion]):
            assert SchemaVersion.get_by_id("demo").version == 3
    finally:
        db.close()


def test_a_failing_migration_is_not_recorded(store_url: str) -> None:
    def broken(db: peewee.Database) -> None:
        raise RuntimeError("step failed")

    db = connect_url(store_url)
    try:
        migrate(db, "demo", [lambda db: None])
        with pytest.raises(RuntimeError):
            migrate(db, "demo", [lambda db: None, broken])
        with db.bind_ctx([SchemaVersion]):
            assert SchemaVersion.get_by_id("demo").version == 1
    finally:
        db.close()


# --- the replay cache ----------------------------------------------------------------------------


def test_a_nonce_is_accepted_once(master_db: peewee.Database) -> None:
    assert store.remember_nonce("a" * 32, 2_000_000_000) is True
    assert store.remember_nonce("a" * 32, 2_000_000_000) is False
    assert store.remember_nonce("b" * 32, 2_000_000_000) is True


def test_a_replay_inside_a_transaction_leaves_it_usable(master_db: peewee.Database) -> None:
    # Postgres aborts a whole transaction on an error unless the insert ran in a savepoint.
    with master_db.atomic():
        assert store.remember_nonce("n1", 2_000_000_000) is True
        assert store.remember_nonce("n1", 2_000_000_000) is False
        new_job("after-a-replay")
    assert store.Job.get_by_id("after-a-replay").module == "echo"


def test_old_nonces_are_forgotten(master_db: peewee.Database) -> None:
    now = now_ms()
    store.remember_nonce("old", now - 1)
    store.remember_nonce("edge", now)
    store.remember_nonce("new", MS)  # 2100 in ms: the column must be 64-bit
    assert store.forget_old_nonces(now=now) == 1
    assert sorted(n.nonce for n in store.SeenNonce.select()) == ["edge", "new"]
    store.remember_nonce("stale", now - 60_000)
    store.remember_nonce("recent", now + 60_000)
    store.forget_old_nonces()  # by default "now" is now, in ms
    left = {n.nonce for n in store.SeenNonce.select()}
    assert {"new", "recent"} <= left and "stale" not in left


def test_one_of_many_concurrent_inserts_of_a_nonce_wins(master_db: peewee.Database) -> None:
    for round_ in range(3):
        nonce = f"race-{round_}"
        results: list[bool] = []
        errors: list[BaseException] = []
        barrier = threading.Barrier(8)

        def contend() -> None:
            try:
                barrier.wait()
                results.append(store.remember_nonce(nonce, 2_000_000_000))
            except BaseException as exc:  # reported below; a thread must not swallow it
                errors.append(exc)
            finally:
                master_db.close()  # this thread's connection

        threads = [threading.Thread(target=contend) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert sorted(results) == [False] * 7 + [True]


# --- jobs and events -----------------------------------------------------------------------------

NESTED = {
    "text": "héllo wörld ✓ 日本語 🚀 \u0000 \\ \" '",
    "list": [1, 2.5, None, True, False, {"deep": [[], {}, ["🚀"]]}],
    "big": 2**53,
}


def test_job_and_events_round_trip(master_db: peewee.Database) -> None:
    signed = bytes(range(256)) * 4
    job = new_job(approvers=["U1", "Ünïcode"], params=NESTED, hosts=["web01", "wéb02"], signed_request=signed,
                  created_at=MS)
    store.JobEvent.create(job=job.id, seq=1, kind="started", at=MS + 1, data={"hosts": 2})
    store.JobEvent.create(job=job.id, seq=2, kind="host", at=MS + 2, data=NESTED)
    master_db.close()  # read back through a new connection

    back = store.Job.get_by_id(job.id)
    assert back.params == NESTED and back.approvers == ["U1", "Ünïcode"] and back.hosts == ["web01", "wéb02"]
    assert bytes(back.signed_request) == signed  # Postgres hands back a memoryview
    assert back.created_at == MS and back.finished_at is None
    events = list(back.events.order_by(store.JobEvent.seq))
    assert [(e.seq, e.kind, e.data) for e in events] == [(1, "started", {"hosts": 2}), (2, "host", NESTED)]
    assert [e.at for e in events] == [MS + 1, MS + 2]


def test_values_of_several_mebibytes_fit(master_db: peewee.Database) -> None:
    blob = os.urandom(2 * MIB)
    text = "ü" * MIB + "x" * MIB  # 3 MiB of UTF-8, past MySQL's 64 KiB TEXT and 16 MiB MEDIUMTEXT needs
    job = new_job(signed_request=blob, params={"script": text})
    store.JobEvent.create(job=job.id, seq=1, kind="host", at=1.0, data={"stdout": text})
    master_db.close()
    back = store.Job.get_by_id(job.id)
    assert bytes(back.signed_request) == blob and back.params["script"] == text
    assert store.JobEvent.get(store.JobEvent.job == job.id).data["stdout"] == text


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["mysql"])
def test_mysql_gets_long_column_types(master_db: peewee.Database) -> None:
    rows = master_db.execute_sql(
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = DATABASE() AND table_name IN ('job', 'jobevent')").fetchall()
    types = {f"{t.lower()}.{c}": d.lower() for t, c, d in rows}
    assert types["job.signed_request"] == "longblob"
    assert {types[f"job.{c}"] for c in ("approvers", "params", "hosts")} == {"longtext"}
    assert types["jobevent.data"] == "longtext"
    assert types["jobevent.at"] == "bigint"


def test_event_numbers_are_unique_per_job(master_db: peewee.Database) -> None:
    first, second = new_job(), new_job()
    store.JobEvent.create(job=first.id, seq=1, kind="started", at=1.0, data={})
    store.JobEvent.create(job=second.id, seq=1, kind="started", at=1.0, data={})  # another job: fine
    with pytest.raises(peewee.IntegrityError):
        with master_db.atomic():
            store.JobEvent.create(job=first.id, seq=1, kind="again", at=2.0, data={})
    assert store.JobEvent.select().where(store.JobEvent.job == first.id).count() == 1


def test_events_need_their_job(master_db: peewee.Database) -> None:
    with pytest.raises(peewee.IntegrityError):
        with master_db.atomic():
            store.JobEvent.create(job="no-such-job", seq=1, kind="started", at=1.0, data={})


# --- the bot's and the approvals' tables ---------------------------------------------------------


def new_bot_job(**fields: object) -> bot_store.BotJob:
    values: dict[str, object] = dict(
        job_id=str(uuid.uuid4()), requester="U123", origin="slack", channel="C1", idc="local", module="echo",
        params={"message": "hi"}, host_count=1, state="queued", created_at=MS,
    )
    return bot_store.BotJob.create(**(values | fields))


def new_request(**fields: object) -> astore.ApprovalRequest:
    values: dict[str, object] = dict(
        request_id=str(uuid.uuid4()), requester="U123", origin="slack", channel="C1", idc="local", module="echo",
        params={"message": "hi"}, hosts=["web01"], rules=["deploys"], needed=1, approver_roles=["leads"],
        cancel_roles=[], created_at=MS, expires_at=MS + 3_600_000,
    )
    return astore.ApprovalRequest.create(**(values | fields))


def test_bot_jobs_round_trip(bot_db: peewee.Database) -> None:
    job = new_bot_job(params=NESTED, approvers=["U2", "Ünïcode"], cancel_roles=["leads"], finished_at=MS + 1)
    plain = new_bot_job()
    bot_db.close()
    back = bot_store.find_job(str(job.number))
    assert back is not None and back.params == NESTED
    assert (back.approvers, back.cancel_roles) == (["U2", "Ünïcode"], ["leads"])
    assert (back.created_at, back.finished_at) == (MS, MS + 1)
    default = bot_store.find_job(plain.job_id)
    assert default is not None and (default.approvers, default.cancel_roles, default.finished_at) == ([], [], None)
    assert_timestamps_are_bigint(bot_db, ["bot_job"])


def test_approval_tables_round_trip(bot_db: peewee.Database) -> None:
    request = new_request(params=NESTED, hosts=["web01", "wéb02"], timeout=60)
    astore.ApprovalVote.create(request=request.number, approver="U2", at=MS + 1)
    astore.TrailEntry.create(at=MS + 2, user="U2", channel="C1", origin="slack", action="approve",
                             detail="#1 ✓", outcome="ok")
    bot_db.close()
    back = astore.find_request(str(request.number))
    assert back is not None and back.params == NESTED and back.hosts == ["web01", "wéb02"]
    assert (back.created_at, back.expires_at, back.decided_at) == (MS, MS + 3_600_000, None)
    assert [(v.approver, v.at) for v in back.votes] == [("U2", MS + 1)]
    assert [(t.at, t.detail) for t in astore.TrailEntry.select()] == [(MS + 2, "#1 ✓")]
    with pytest.raises(peewee.IntegrityError):  # one vote per approver
        with bot_db.atomic():
            astore.ApprovalVote.create(request=request.number, approver="U2", at=MS + 3)
    assert_timestamps_are_bigint(bot_db, ["approval_request", "approval_vote", "chat_trail"])


# --- every table on every engine ----------------------------------------------------------------

# Every model, each in the database its component opens it in (test_every_model_is_listed_here).
MASTER_MODELS = [store.SeenNonce, store.Job, store.JobEvent, store.HostLock, master_audit.AuditEvent,
                 master_audit.AuditAgent, master_audit.AuditReader,
                 master_tables.RegisteredClient, master_tables.RevokedKey, master_tables.AgentEnrolment]
BOT_MODELS = [bot_store.BotJob, replay.SeenRequest, lease.Lease, multi.MultiRequest, multi.MultiPart,
              schedules.Schedule, schedules.ScheduleRun, bot_audit.AuditRecord, bot_audit.AuditCursor,
              astore.ApprovalRequest, astore.ApprovalVote, astore.TrailEntry, SchemaVersion]
PACKAGES = ("ombot",)  # every room is inside it (ombot/bot -> ../bot, ...)
TEXT = "héllo wörld ✓ 日本語 🚀 \\ \" '"


def open_master_tables(url: str) -> peewee.Database:
    db = store.open_store(url)
    migrate(db, "audit", master_audit.MIGRATIONS)  # as a master with audit agents registered does
    migrate(db, "registry", master_registry.MIGRATIONS)  # as every master's live registry does
    return db


def open_bot_tables(url: str) -> peewee.Database:
    """The bot's database as bot.service opens it: its own tables, the approvals', every feature's."""
    db = bot_store.open_store(url)
    approvals.bind(db)
    for feature in (replay, lease, schedules, multi, bot_audit):
        feature.prepare()
    return db


def write_row(model: type[peewee.Model], now: int) -> dict[str, Any]:
    """One row with a value in every column, as written (a foreign key's row first); each timestamp
    is `now` plus a few ms, so that seconds, or a float, would not give it back."""
    fields = model._meta.sorted_fields
    row = {field.name: column_value(model, field, now + n) for n, field in enumerate(fields)
           if not isinstance(field, peewee.AutoField)}
    created = model.create(**row)
    return row | {field.name: getattr(created, field.name) for field in fields if isinstance(field, peewee.AutoField)}


def column_value(model: type[peewee.Model], field: peewee.Field, at: int) -> Any:
    if field.name in TIMESTAMPS[model._meta.table_name]:
        return at
    if isinstance(field, peewee.ForeignKeyField):
        return write_row(field.rel_model, at)[field.rel_field.name]
    if isinstance(field, JSONField):
        return NESTED
    if isinstance(field, peewee.BooleanField):
        return True
    if isinstance(field, peewee.BlobField):
        return bytes(range(256))
    if isinstance(field, peewee.BigIntegerField):
        return 2**40 + at % 1000  # past 32 bits
    if isinstance(field, peewee.IntegerField):
        return at % 1000
    if isinstance(field, peewee.CharField):
        return f"ü{uuid.uuid4().hex}"[:field.max_length]  # unique, for keys
    if isinstance(field, peewee.TextField):
        return TEXT
    raise AssertionError(f"{model.__name__}.{field.name} is a {type(field).__name__}: say here what to write in it "
                         "(a time is epoch milliseconds in a BigIntegerField)")


def read_row(model: type[peewee.Model], row: dict[str, Any]) -> dict[str, Any]:
    key = model._meta.primary_key
    names = key.field_names if isinstance(key, peewee.CompositeKey) else [key.name]
    found = model.get(*[getattr(model, name) == row[name] for name in names])
    return {name: bytes(v) if isinstance(v, memoryview) else v  # Postgres hands back a memoryview
            for name, v in found.__data__.items()}


def test_now_round_trips_to_the_millisecond(store_url: str) -> None:
    """Every column of every table keeps exactly what was written, each timestamp to the millisecond:
    a float column would not (15 s off on a Postgres REAL, thousands of seconds on a MariaDB FLOAT),
    nor would seconds."""
    master_db, bot_db = open_master_tables(store_url), open_bot_tables(store_url)  # no table name clashes
    try:
        on = [(model, master_db) for model in MASTER_MODELS] + [(model, bot_db) for model in BOT_MODELS]
        now = now_ms()
        written = []
        for model, db in on:
            with db.bind_ctx([model]):
                written.append(write_row(model, now))
        request = new_request(created_at=now, expires_at=now + 1)
        before = now_ms()
        astore.record("U2", "C1", "slack", "approve", "#1", "ok")  # the writers stamp now_ms() themselves
        assert astore.transition(request, astore.APPROVED, decided_by="U2")
        after = now_ms()
        master_db.close()
        bot_db.close()

        for (model, db), row in zip(on, written):
            with db.bind_ctx([model]):
                assert read_row(model, row) == row, model._meta.table_name
        assert_timestamps_are_bigint(master_db, [model._meta.table_name for model in MASTER_MODELS])
        assert_timestamps_are_bigint(bot_db, [model._meta.table_name for model in BOT_MODELS])
        trail = astore.TrailEntry.select().order_by(astore.TrailEntry.id.desc()).first()
        stamped = [trail.at, astore.ApprovalRequest.get_by_id(request.number).decided_at]
        assert all(isinstance(t, int) and before <= t <= after for t in stamped), (before, stamped, after)
    finally:
        master_db.close()
        bot_db.close()


def test_every_model_is_listed_here() -> None:
    """A table added to any package must be in the round trip above, with its timestamps named."""
    for package in PACKAGES:
        for module in pkgutil.walk_packages(importlib.import_module(package).__path__, f"{package}."):
            if not module.name.endswith(".__main__"):  # the CLI: importing it runs it
                importlib.import_module(module.name)
    found = {model for model in all_subclasses(peewee.Model)
             if model.__module__.split(".")[0] in PACKAGES and not model.__subclasses__()}  # not a base class
    assert sorted(m._meta.table_name for m in found - {*MASTER_MODELS, *BOT_MODELS}) == []
    assert sorted(m._meta.table_name for m in [*MASTER_MODELS, *BOT_MODELS]) == sorted(TIMESTAMPS)
    for model in found:
        fields = model._meta.fields
        named_like_times = {name for name in fields
                            if name == "at" or name.endswith(("_at", "_until", "_after")) or name == "last_seen"}
        assert named_like_times <= set(TIMESTAMPS[model._meta.table_name]), model._meta.table_name
        assert all(type(fields[name]) is peewee.BigIntegerField for name in TIMESTAMPS[model._meta.table_name])


def all_subclasses(cls: type) -> set[type]:
    return {sub for direct in cls.__subclasses__() for sub in (direct, *all_subclasses(direct))}


# --- migrating a database of the schema before epoch milliseconds --------------------------------
# The database as version 1 left it is tests/schema_v1.py's (create_schema_v1).

INDEXES_ADDED_SINCE_V1 = {"bot_job": {"bot_job_reported"},  # bot version 3: the unfinished jobs
                         "job": {"job_master_id"}}  # master version 3: jobs record their master


def test_a_database_of_the_previous_schema_is_converted(backend: str, tmp_path: Path) -> None:
    with scratch(backend, tmp_path) as url:
        create_schema_v1(url)
        before = connect_url(url)
        try:
            indexes = index_names(before)
        finally:
            before.close()
        master_db = store.open_store(url)
        bot_db = bot_store.open_store(url)
        approvals.bind(bot_db)
        try:
            # SQLite copies jobevent and chat_trail: indexes come along; later versions add their own
            assert {t: names - INDEXES_ADDED_SINCE_V1.get(t, set())
                    for t, names in index_names(bot_db).items()} == indexes
            with bot_db.bind_ctx([SchemaVersion]):
                versions = {r.component: r.version for r in SchemaVersion.select()}
            assert versions == {"master": len(store.MIGRATIONS), "bot": len(bot_store.MIGRATIONS),
                                "approvals": len(astore.MIGRATIONS)}
            assert_timestamps_are_bigint(bot_db, list(V1_TABLES))
            assert_converted()

            # A step interrupted on MySQL (where each ALTER commits at once) runs again from the start:
            # it must not multiply twice.
            for db, migrations in ((master_db, store.MIGRATIONS), (bot_db, bot_store.MIGRATIONS),
                                   (bot_db, astore.MIGRATIONS)):
                with db.atomic():
                    migrations[-1](db)
            assert_converted()

            # The converted tables keep their constraints and take new rows.
            with pytest.raises(peewee.IntegrityError):
                with master_db.atomic():
                    store.JobEvent.create(job="no-such-job", seq=1, kind="started", at=MS, data={})
            with pytest.raises(peewee.IntegrityError):
                with master_db.atomic():
                    store.JobEvent.create(job=JOB_ID, seq=2, kind="again", at=MS, data={})
            store.JobEvent.create(job=JOB_ID, seq=3, kind="note", at=MS, data={"x": 1})
            astore.record("U3", "C1", "slack", "help", "", "ok")
            assert store.JobEvent.get(store.JobEvent.seq == 3).at == MS
            assert astore.TrailEntry.select().order_by(astore.TrailEntry.id.desc()).first().at > T * 1000
        finally:
            master_db.close()
            bot_db.close()


def assert_converted() -> None:
    assert store.SeenNonce.get().keep_until == (T + 60) * 1000
    job = store.Job.get_by_id(JOB_ID)
    assert (job.created_at, job.finished_at, job.params, job.hosts) == (T * 1000, (T + 5) * 1000, {"message": "hé"},
                                                                        ["web01"])
    events = store.JobEvent.select().where(store.JobEvent.job == JOB_ID).order_by(store.JobEvent.seq)
    assert [(e.seq, e.at, e.data) for e in events][:2] == [
        (1, T * 1000 + 123, {"hosts": ["web01"]}), (2, T * 1000 + 5000, {"state": "ok"})]  # rounded to the ms

    done, running = (bot_store.find_job(ref) for ref in (JOB_ID, "still-running"))
    assert done is not None and running is not None
    assert (done.created_at, done.finished_at) == (T * 1000, (T + 6) * 1000)
    assert (done.params, done.approvers, done.cancel_roles) == ({"message": "hé 🚀"}, ["U2"], ["leads"])
    assert (running.created_at, running.finished_at, running.params, running.approvers) == ((T + 1) * 1000, None, {}, [])

    decided, pending = (astore.find_request(ref) for ref in (JOB_ID, "pending-one"))
    assert decided is not None and pending is not None
    assert (decided.created_at, decided.expires_at, decided.decided_at) == ((T - 100) * 1000, (T + 3500) * 1000,
                                                                            (T - 1) * 1000)
    assert (pending.expires_at, pending.decided_at, pending.params) == ((T + 3600) * 1000, None, {})
    assert [(v.approver, v.at) for v in decided.votes] == [("U2", (T - 1) * 1000)]
    assert astore.TrailEntry.select().order_by(astore.TrailEntry.id).first().at == T * 1000


def test_stored_times_are_shown_in_seconds_where_people_read_them() -> None:
    from ombot.bot.messages import CardState, job_card
    from ombot.message import slack_date

    assert slack_date(MS).startswith("<!date^4102444800^") and slack_date(MS).endswith("|2100-01-01 00:00 UTC>")
    card = CardState(number=1, job_id="j", requester="U1", module="echo", params={}, idc="local", hosts=1,
                     created_at=MS, state="ok", finished_at=MS + 125_000)
    assert "took 2m05s" in job_card(card).text + str(job_card(card).blocks)


# --- bad URLs and unreachable servers ------------------------------------------------------------


def test_an_unreachable_server_is_a_clear_error_without_the_password() -> None:
    for url in ("postgresql://ombot:s3cret@127.0.0.1:1/ombot", "mysql://ombot:s3cret@127.0.0.1:1/ombot"):
        with pytest.raises(StorageError) as caught:
            open_database(url, peewee.DatabaseProxy(), "demo", [])
        message = str(caught.value)
        assert "s3cret" not in message and "cannot open database" in message and ":***@127.0.0.1:1" in message


@pytest.mark.slow
def test_mysql_refuses_a_database_without_utf8mb4(tmp_path: Path) -> None:
    with scratch("mysql", tmp_path) as url:
        name = urlsplit(url).path.lstrip("/")
        admin(url, f"ALTER DATABASE {name} CHARACTER SET latin1")
        with pytest.raises(StorageError, match=f"uses character set latin1; OMBot needs utf8mb4: ALTER DATABASE `{name}`"):
            open_database(url, peewee.DatabaseProxy(), "demo", [])


def test_an_unknown_scheme_is_a_clear_error() -> None:
    with pytest.raises(StorageError, match=r"cannot use database oracle://u:\*\*\*@h/db"):
        connect_url("oracle://u:pw@h/db")


def test_percent_encoded_credentials_are_decoded() -> None:
    for url in ("postgresql://us%40er:p%40ss%3Aw@127.0.0.1/db", "mysql://us%40er:p%40ss%3Aw@127.0.0.1/db"):
        params = connect_url(url).connect_params
        assert params["user"] == "us@er" and params["password"] == "p@ss:w"


def test_redaction_hides_passwords() -> None:
    assert redact_url("postgresql://u:secret@db.example:5432/ombot") == "postgresql://u:***@db.example:5432/ombot"
    assert redact_url("mysql://u:p@ss:w0rd@h/db") == "mysql://u:***@h/db"  # raw '@' and ':' in the password
    assert redact_url("postgresql://u@h/db") == "postgresql://u@h/db"
    assert redact_url("sqlite:////var/lib/ombot/m1.db") == "sqlite:////var/lib/ombot/m1.db"
    line = redact("connecting to postgresql://ombot:hunter2@10.0.0.5/ombot with xoxb-123-abc")
    assert "hunter2" not in line and "xoxb-123" not in line and "postgresql://ombot:***@10.0.0.5/ombot" in line


# --- database URLs in ombot.toml -----------------------------------------------------------------


def write_config(tmp_path: Path, master_extra: str) -> Path:
    from ombot.keys import Identity

    path = tmp_path / "ombot.toml"
    path.write_text(f'[masters.bj-1]\nidc = "bj"\naddress = "127.0.0.1:1"\npublic_key = "{Identity.generate().public}"\n'
                    f"{master_extra}\n")
    return path


@pytest.fixture
def no_database_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMBOT_MASTER_DATABASE_URL", raising=False)


def test_a_password_in_the_config_file_is_refused(tmp_path: Path, no_database_env: None) -> None:
    path = write_config(tmp_path, 'database = "postgresql://u:secret@h/db"')
    with pytest.raises(ConfigError) as caught:
        cfg.load(path)
    assert caught.value.key == "masters.bj-1.database"
    assert str(path) in str(caught.value) and "OMBOT_MASTER_DATABASE_URL" in str(caught.value)
    assert "secret" not in str(caught.value)


def test_a_password_free_url_in_the_config_file_is_used(tmp_path: Path, no_database_env: None) -> None:
    path = write_config(tmp_path, 'database = "postgresql://ombot@db.example/ombot"')
    assert cfg.load(path).masters["bj-1"].database_url == "postgresql://ombot@db.example/ombot"


def test_the_default_is_sqlite_in_the_state_dir(tmp_path: Path, no_database_env: None) -> None:
    settings = cfg.load(write_config(tmp_path, "")).masters["bj-1"]
    assert settings.database_url == f"sqlite:///{tmp_path.resolve()}/state/bj-1.db"
    relative = cfg.load(write_config(tmp_path, 'database = "sqlite:///data/m.db"')).masters["bj-1"]
    assert relative.database_url == f"sqlite:///{tmp_path.resolve()}/data/m.db"  # beside ombot.toml, not the cwd


def test_the_url_file_must_be_private(tmp_path: Path, no_database_env: None) -> None:
    secret = tmp_path / "db.url"
    secret.write_text("postgresql://u:secret@h/db\n")
    path = write_config(tmp_path, 'database_url_file = "db.url"')
    secret.chmod(0o644)
    with pytest.raises(ConfigError) as caught:
        cfg.load(path)
    assert caught.value.key == "masters.bj-1.database_url_file" and "chmod 600" in str(caught.value)
    secret.chmod(0o600)
    assert cfg.load(path).masters["bj-1"].database_url == "postgresql://u:secret@h/db"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600


def test_a_missing_url_file_is_named(tmp_path: Path, no_database_env: None) -> None:
    with pytest.raises(ConfigError, match=r"masters\.bj-1\.database_url_file: expected an existing file"):
        cfg.load(write_config(tmp_path, 'database_url_file = "nope.url"'))


def test_the_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMBOT_MASTER_DATABASE_URL", "mysql://u:pw@h/db")
    path = write_config(tmp_path, 'database = "sqlite:///x.db"')
    assert cfg.load(path).masters["bj-1"].database_url == "mysql://u:pw@h/db"


# --- a real master on each server ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("server", list(SERVERS))
def test_a_master_runs_a_job_on_the_server(server: str, make_cluster: Callable[..., Cluster], tmp_path: Path) -> None:
    with scratch(server, tmp_path, own_database=True) as url:
        cluster = make_cluster()
        master = cluster.start("m1", env={"OMBOT_MASTER_DATABASE_URL": url})
        router = cluster.router()
        started = now_ms()
        try:
            ref, _ = router.submit("local", "echo", {"message": "über 🚀"}, ["localhost", "web01"])
            events: list[dict] = []
            assert router.follow(ref, events.append) == "ok"
        finally:
            router.close()
            master.stop()
        hosts = sorted((e["data"]["host"], e["data"]["stdout"]) for e in events if e["kind"] == "host")
        assert hosts == [("localhost", "über 🚀\n"), ("web01", "über 🚀\n")]
        assert not (cluster.root / "state-m1" / "m1.db").exists()  # it did not fall back to SQLite

        db = connect_url(url)  # the job really is in that server's database
        try:
            (state,) = db.execute_sql("SELECT state FROM job WHERE id = %s", (ref.job_id,)).fetchone()
            (count,) = db.execute_sql("SELECT COUNT(*) FROM jobevent WHERE job_id = %s", (ref.job_id,)).fetchone()
            (created, finished) = db.execute_sql("SELECT created_at, finished_at FROM job WHERE id = %s",
                                                 (ref.job_id,)).fetchone()
            (kept_until,) = db.execute_sql("SELECT MAX(keep_until) FROM seennonce").fetchone()
        finally:
            db.close()
        assert state == "ok" and count == len(events)
        # The master writes epoch ms, and sends event times as stored.
        ended = now_ms()
        assert started <= created <= finished <= ended
        assert all(created <= e["at"] <= ended and isinstance(e["at"], int) for e in events)
        assert kept_until > ended  # a nonce outlives its request's time window, so a purge now keeps it


def test_a_master_with_an_unreachable_database_says_so(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster()
    with pytest.raises(RuntimeError, match="exited"):
        cluster.start("m1", env={"OMBOT_MASTER_DATABASE_URL": "postgresql://ombot:s3cret@127.0.0.1:1/ombot"})
    log = cluster.processes["m1"].log()
    assert "cannot open database postgresql://ombot:***@127.0.0.1:1/ombot" in log
    assert "s3cret" not in log and "Traceback" not in log


def test_audit_events_are_stored_once_and_acknowledged(master_db: peewee.Database) -> None:
    """The master's audit tables on every engine: insert-ignore on the event id, every held id acked,
    an id of a length MySQL must index, the heartbeat upserted."""
    from ombot.masters.audit import AuditAgent, AuditEvent, AuditIngest
    from ombot.envelope import new_request
    from ombot.config import ClientRegistration

    agent = ClientRegistration("agent-web01", "k", "agent", "web01", host="web01")
    ingest = AuditIngest({"agent-web01": agent}, master_settings())
    boot = "0f" * 18  # a boot id's length, hex
    at = now_ms() - 10_000  # an event dated later than its arrival is stored at its arrival (below)
    events = [{"id": f"web01:{boot}:bash:{n}", "kind": "command", "at": at + n,
               "data": {"cmd": "ls ✓" * 200, "uid": 1000}} for n in range(150)]
    status = {"spool_depth": 3, "dropped_total": 0, "sent_total": 150}

    def send(batch: list[dict[str, object]]) -> dict[str, object]:
        args = {"host": "web01", "events": batch, "status": status}
        return ingest.ingest(agent, new_request("ingest", "m1", "agent:web01", "agent", args))

    first = send(events[:100])
    assert first["stored"] == 100 and len(first["acked"]) == 100 and first["rejected"] == []  # type: ignore[arg-type]
    again = send(events)  # a lost ack: the first 100 come again, with 50 new ones
    assert again["stored"] == 50 and again["acked"] == [e["id"] for e in events]
    assert AuditEvent.select().count() == 150
    back = AuditEvent.get_by_id(events[7]["id"])
    assert (back.host, back.at, back.data) == ("web01", at + 7, events[7]["data"])
    assert AuditAgent.get_by_id("web01").sent_total == 150
    future = send([{"id": f"web01:{boot}:bash:999", "kind": "command", "at": MS, "data": {"cmd": "x"}}])
    row = AuditEvent.get_by_id(future["acked"][0])  # type: ignore[index]
    assert row.at == row.received_at and row.data == {"cmd": "x", "agent_at": MS}  # the claim kept beside


def master_settings(**changes: Any) -> cfg.MasterSettings:
    """A master's settings for the audit code run in-process."""
    return cfg.MasterSettings("m1", "local", "127.0.0.1", 1, "k", None, None, "local", (), Path("/nonexistent"),
                              "sqlite://", cfg.Limits(**changes))


def test_masters_prune_audit_events_the_bot_pulled_and_past_their_retention(master_db: peewee.Database) -> None:
    """On every engine: events every reader pulled go (a margin behind the slowest reader), events past
    the retention go pulled or not (and are counted), a reader silent past the retention holds nothing."""
    from ombot.masters.audit import AuditEvent, AuditReader, prune_events

    migrate(master_db, "audit", master_audit.MIGRATIONS)
    now, hour = 10 * 86_400_000, 3_600_000
    AuditEvent.insert_many([{"id": f"web01:0:q:{n}", "host": "web01", "kind": "command", "at": n * hour,
                             "received_at": n * hour, "sender": "agent-web01", "data": {}} for n in range(240)]).execute()
    AuditReader.insert_many([{"reader": "bot", "after": 200 * hour, "read_at": now},
                             {"reader": "staging-bot", "after": 150 * hour, "read_at": now},
                             {"reader": "gone-bot", "after": 0, "read_at": hour}]).execute()
    deleted, unpulled = prune_events(now, retention_ms=5 * 86_400_000, margin_ms=hour)
    assert (deleted, unpulled) == (149, 0)  # below the slowest live reader's cursor, an hour behind
    assert min(e.received_at for e in AuditEvent.select()) == 149 * hour
    assert {r.reader for r in AuditReader.select()} == {"bot", "staging-bot"}
    AuditReader.delete().execute()
    deleted, unpulled = prune_events(now + 100 * hour, retention_ms=5 * 86_400_000, margin_ms=hour)
    assert (deleted, unpulled) == (91 - 20, 91 - 20)  # no reader: only the retention, every one unpulled


def test_the_audit_tables_of_an_older_master_are_upgraded_in_place(master_db: peewee.Database) -> None:
    """A master's audit tables from before heartbeats carried a problem and readers a cursor: the
    upgrade adds both and keeps the rows, on every engine."""
    from ombot.masters.audit import AuditAgent, AuditReader

    migrate(master_db, "audit", master_audit.MIGRATIONS[:2])
    master_db.execute_sql("DROP TABLE auditagent")
    master_db.execute_sql("CREATE TABLE auditagent (host VARCHAR(255) PRIMARY KEY, last_seen BIGINT NOT NULL, "
                          "spool_depth BIGINT NOT NULL, dropped_total BIGINT NOT NULL, sent_total BIGINT NOT NULL)")
    master_db.execute_sql("INSERT INTO auditagent VALUES ('web01', 5, 1, 2, 3)")
    migrate(master_db, "audit", master_audit.MIGRATIONS)
    row = AuditAgent.get_by_id("web01")
    assert (row.last_seen, row.sent_total, row.problem) == (5, 3, None)
    AuditReader.create(reader="bot", after=1, read_at=2)
    assert AuditReader.select().count() == 1


def test_a_bot_database_from_before_the_audit_room_opens_as_it_is(store_url: str) -> None:
    """Issue 19 moved the central audit's tables (now audit.store) and the leases (now ombot.lease) out
    of the bot. A bot database made before, by their schema as it then was (frozen below: the same
    tables, columns and migration components), opens with the moved code, runs no migration again,
    and keeps every row: the events, the pull cursor, a lease."""

    class OldLease(peewee.Model):
        name = peewee.CharField(max_length=191, primary_key=True)
        holder = peewee.CharField(max_length=128)
        expires_at = peewee.BigIntegerField(index=True)

        class Meta:
            table_name = "bot_lease"

    class OldAuditRecord(peewee.Model):
        id = peewee.CharField(max_length=255, primary_key=True)
        idc = peewee.CharField(max_length=64)
        host = peewee.CharField(max_length=255, index=True)
        kind = peewee.CharField(max_length=16)
        at = peewee.BigIntegerField(index=True)
        user = peewee.CharField(max_length=64, null=True, index=True)
        login_user = peewee.CharField(max_length=64, null=True)
        uid = peewee.BigIntegerField(null=True)
        tty = peewee.CharField(max_length=64, null=True)
        cwd = peewee.TextField(null=True)
        command = peewee.TextField(default="")
        exit_status = peewee.IntegerField(null=True)
        ssh_client = peewee.CharField(max_length=255, null=True)
        source = peewee.CharField(max_length=64)
        data = JSONField()
        stored_at = peewee.BigIntegerField()

        class Meta:
            table_name = "bot_audit_event"

    class OldAuditCursor(peewee.Model):
        master = peewee.CharField(max_length=64, primary_key=True)
        received_after = peewee.BigIntegerField()

        class Meta:
            table_name = "bot_audit_cursor"

    now = now_ms()
    old = open_database(store_url, peewee.DatabaseProxy(), "bot", bot_store.MIGRATIONS)
    try:
        with old.bind_ctx([OldLease, OldAuditRecord, OldAuditCursor]):
            migrate(old, "bot_lease", [create_tables(OldLease)])  # bot.lease's MIGRATIONS then
            migrate(old, "bot_audit", [create_tables(OldAuditRecord, OldAuditCursor)])  # bot.audit_store's
            OldLease.create(name="audit-feed", holder="bot-before", expires_at=now + 3_600_000)
            OldAuditRecord.create(id="web01:b:q:1", idc="bj", host="web01", kind="command", at=now - 1000,
                                  user="alice", command="rm -rf /tmp/x", source="q", data={"command": "rm -rf /tmp/x"},
                                  stored_at=now - 500)
            OldAuditCursor.create(master="bj-1", received_after=now - 2000)
    finally:
        old.close()

    db = bot_store.open_store(store_url)  # binds the moved tables, as bot.service opens it
    try:
        lease.prepare()
        bot_audit.prepare()
        with db.bind_ctx([SchemaVersion]):
            versions = {row.component: row.version for row in SchemaVersion.select()}
        assert versions["bot_lease"] == len(lease.MIGRATIONS) == 1
        assert versions["bot_audit"] == len(bot_audit.MIGRATIONS) == 1
        assert lease.holder_of("audit-feed") == "bot-before"
        assert not lease.acquire("audit-feed", "bot-after", 60_000)  # still held: the move took it from nobody
        assert bot_audit.received_after("bj-1") == now - 2000
        assert [r.command for r in bot_audit.search(host="web01")] == ["rm -rf /tmp/x"]
        event = {"id": "web01:b:q:1", "kind": "command", "at": now - 1000, "data": {"command": "rm -rf /tmp/x"}}
        assert bot_audit.insert_new("bj", [event]) == []  # stored before the move: not stored, nor alerted, again
        fresh = bot_audit.insert_new("bj", [event | {"id": "web01:b:q:2", "data": {"command": "uptime"}}])
        assert [r.command for r in fresh] == ["uptime"]
    finally:
        db.close()
