"""The central audit store on SQLite, PostgreSQL and MariaDB: dedupe on insert, literal search, filters."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import peewee
import pytest

from ombot.audit import store as audit_store
from ombot.bot import store as bot_store
from ombot.storage import SchemaVersion
from tests.storage import BACKENDS, scratch

T0 = 1_800_000_000_000


@pytest.fixture(params=BACKENDS)
def audit_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[peewee.Database]:
    with scratch(request.param, tmp_path) as url:
        db = bot_store.open_store(url)
        audit_store.prepare()
        yield db
        db.close()


def event(seq: int, command: str = "ls", host: str = "web01", user: str | None = "alice", at: int | None = None,
          **data: Any) -> dict[str, Any]:
    return {"id": f"{host}:0f3e-11aa:q9c1d:{seq}", "kind": "command", "at": T0 + seq if at is None else at,
            "data": {"uid": 1000, "user": user, "login_user": "bob", "tty": "/dev/pts/3", "cwd": "/srv",
                     "ssh_client": "10.1.2.3 51000 22", "command": command, "exit": 0} | data}


def commands(records: list[audit_store.AuditRecord]) -> list[str]:
    return [r.command for r in records]


def test_prepare_records_its_own_component_and_runs_twice(audit_db: peewee.Database) -> None:
    audit_store.prepare()
    with audit_db.bind_ctx([SchemaVersion]):
        assert SchemaVersion.get_by_id("bot_audit").version == len(audit_store.MIGRATIONS)


def test_fields_come_from_the_event(audit_db: peewee.Database) -> None:
    [record] = audit_store.insert_new("bj", [event(7, "make install", exit=2, uid=4_294_967_294)])
    back = audit_store.AuditRecord.get_by_id(record.id)
    for row in (record, back):
        assert (row.idc, row.host, row.kind, row.at, row.user, row.login_user, row.uid, row.tty, row.cwd) == \
            ("bj", "web01", "command", T0 + 7, "alice", "bob", 4_294_967_294, "/dev/pts/3", "/srv")
        assert (row.command, row.exit_status, row.ssh_client, row.source) == \
            ("make install", 2, "10.1.2.3 51000 22", "q9c1d")
        assert row.data["command"] == "make install" and row.stored_at >= T0 - 10**12


def test_the_same_event_twice_is_stored_and_returned_once(audit_db: peewee.Database) -> None:
    first = audit_store.insert_new("bj", [event(1), event(2)])
    again = audit_store.insert_new("bj", [event(2), event(3), event(3)])  # a lost ack; twice in one batch too
    assert [r.id for r in first] == [event(1)["id"], event(2)["id"]]
    assert [r.id for r in again] == [event(3)["id"]]
    assert audit_store.AuditRecord.select().count() == 3
    assert audit_store.insert_new("sh", [event(1)]) == []  # the same event through another IDC's master


def test_batches_larger_than_one_statement(audit_db: peewee.Database) -> None:
    count = audit_store.BATCH_ROWS * 2 + 7
    audit_store.insert_new("bj", [event(i) for i in range(0, count, 2)])  # every other one already there
    fresh = audit_store.insert_new("bj", [event(i) for i in range(count)])
    assert [r.id for r in fresh] == [event(i)["id"] for i in range(1, count, 2)]
    assert audit_store.AuditRecord.select().count() == count


def test_text_no_driver_accepts_is_made_safe(audit_db: peewee.Database) -> None:
    audit_store.insert_new("bj", [event(1, "echo a\x00b \ud800 \u00e9\U0001f600", tty="t" * 500)])
    [back] = audit_store.search()
    assert back.command == "echo a\ufffdb ? \u00e9\U0001f600" and back.tty == "t" * 64


@pytest.mark.parametrize("needle", ["%", "_", "'", "!", "\\", "50%_off", "it's"])
def test_grep_is_a_literal_substring(audit_db: peewee.Database, needle: str) -> None:
    audit_store.insert_new("bj", [
        event(1, "echo 50%_off it's! back\\slash"), event(2, "echo 50x off its back slash"),
        event(3, "echo 5000 offers"), event(4, "ECHO 50X OFF ITS BACK SLASH"),
    ])
    assert commands(audit_store.search(grep=needle)) == ["echo 50%_off it's! back\\slash"]


def test_grep_is_case_sensitive_on_every_backend(audit_db: peewee.Database) -> None:
    audit_store.insert_new("bj", [event(1, "rm -rf /tmp/x"), event(2, "RM -RF /TMP/X")])
    assert commands(audit_store.search(grep="rm -rf")) == ["rm -rf /tmp/x"]
    assert commands(audit_store.search(grep="RM -RF")) == ["RM -RF /TMP/X"]


def test_filters_and_newest_first(audit_db: peewee.Database) -> None:
    audit_store.insert_new("bj", [event(1, "one", host="web01"), event(2, "two", host="web02", user="carol"),
                                  event(3, "three", host="db01"), event(4, "four", host="Web03")])
    audit_store.insert_new("sh", [event(5, "five", host="web_1")])
    assert commands(audit_store.search()) == ["five", "four", "three", "two", "one"]
    assert commands(audit_store.search(host="web0*")) == ["two", "one"]  # globs are case-sensitive
    assert commands(audit_store.search(host="web0[12]")) == ["two", "one"]
    assert commands(audit_store.search(host="web_1")) == ["five"]  # `_` in a glob is a plain character
    assert commands(audit_store.search(host="web?1")) == ["five", "one"]
    assert commands(audit_store.search(host="db01")) == ["three"]
    assert commands(audit_store.search(user="carol")) == ["two"]
    assert commands(audit_store.search(user="ALICE")) == []
    assert commands(audit_store.search(idc="sh")) == ["five"]
    assert commands(audit_store.search(since_ms=T0 + 3)) == ["five", "four", "three"]
    assert commands(audit_store.search(since_ms=T0 + 2, until_ms=T0 + 4)) == ["three", "two"]
    assert commands(audit_store.search(host="web*", user="alice", idc="bj")) == ["one"]
    assert commands(audit_store.search(limit=2)) == ["five", "four"]


def test_the_limit_counts_exact_matches_past_the_coarse_filter(audit_db: peewee.Database) -> None:
    # SQLite's and MySQL's LIKE ignore case: the newer upper-case rows pass the database, not the search
    audit_store.insert_new("bj", [event(i, "sudo su") for i in range(3)] +
                           [event(i, "SUDO SU") for i in range(3, 40)])
    assert commands(audit_store.search(grep="sudo", limit=3)) == ["sudo su"] * 3


def test_events_without_a_command(audit_db: peewee.Database) -> None:
    dropped = {"id": "web01:0f3e-11aa:q9c1d:9", "kind": "dropped", "at": T0, "data": {"count": 5}}
    [record] = audit_store.insert_new("bj", [dropped])
    assert (record.command, record.user, record.exit_status, record.data) == ("", None, None, {"count": 5})
    assert audit_store.search(user="*") == [] and len(audit_store.search()) == 1


def test_cursor_per_master(audit_db: peewee.Database) -> None:
    assert audit_store.received_after("bj-1") == 0
    audit_store.save_position("bj-1", T0)
    audit_store.save_position("bj-1", T0 + 5)
    audit_store.save_position("bj-2", T0 + 1)
    assert (audit_store.received_after("bj-1"), audit_store.received_after("bj-2")) == (T0 + 5, T0 + 1)


def test_forget_events_before_goes_by_the_event_and_the_store_time(audit_db: peewee.Database) -> None:
    day = 86_400_000
    audit_store.insert_new("bj", [event(n, at=n * day) for n in (1, 2, 3)])
    assert audit_store.forget_events_before(2 * day) == 0  # dated long ago but stored now: kept its retention
    audit_store.AuditRecord.update(stored_at=day).execute()
    assert audit_store.forget_events_before(2 * day) == 1
    assert [r.at for r in audit_store.search()] == [3 * day, 2 * day]


def test_glob_to_like() -> None:
    assert audit_store.glob_to_like("web*") == "web%"
    assert audit_store.glob_to_like("a_b%c!?") == "a!_b!%c!!_"
    assert audit_store.glob_to_like("db[0-9]x") == "db_x"
    assert audit_store.glob_to_like("db[!]]") == "db_"
    assert audit_store.glob_to_like("db[") == "db["
