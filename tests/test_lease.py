"""ombot.lease on SQLite, MariaDB and PostgreSQL: one holder at a time, renewed by its holder, taken over
once it runs out, and timed by the database's clock: a process whose own clock is a day off still
agrees with the database on when a lease ends.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import peewee
import pytest

from ombot.bot import store
from ombot import lease
from ombot.clock import now_ms
from tests.storage import BACKENDS, scratch

DAY_MS = 86_400_000
REAL_TIME_NS, REAL_TIME = time.time_ns, time.time


@pytest.fixture(params=BACKENDS)
def lease_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[peewee.Database]:
    with scratch(request.param, tmp_path) as url:
        db = store.open_store(url)
        lease.prepare()
        lease.prepare()  # idempotent
        try:
            yield db
        finally:
            db.close()


def expires_at(name: str) -> int:
    return int(lease.Lease.get_by_id(name).expires_at)


def wait_until_free(name: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while lease.holder_of(name) is not None:
        assert time.monotonic() < deadline, f"the lease {name!r} never ran out"
        time.sleep(0.05)


def shift_process_clock(monkeypatch: pytest.MonkeyPatch, by_ms: int) -> None:
    """Move this process's wall clock (what ombot.clock.now_ms reads) from the real one, not the database's."""
    monkeypatch.setattr(time, "time_ns", lambda: REAL_TIME_NS() + by_ms * 1_000_000)
    monkeypatch.setattr(time, "time", lambda: REAL_TIME() + by_ms / 1000)


def test_one_holder_renews_and_another_takes_over_once_it_runs_out(lease_db: peewee.Database) -> None:
    assert lease.acquire("schedules:slack", "bot-a", 60_000)
    assert lease.holder_of("schedules:slack") == "bot-a"
    assert not lease.acquire("schedules:slack", "bot-b", 60_000)  # held: the other waits
    lease.release("schedules:slack", "bot-b")  # not its lease: nothing happens
    assert lease.holder_of("schedules:slack") == "bot-a"

    first = expires_at("schedules:slack")
    time.sleep(0.05)
    assert lease.acquire("schedules:slack", "bot-a", 60_000)  # a renewal pushes the end on
    assert expires_at("schedules:slack") > first

    assert lease.acquire("job:1", "bot-a", 300)  # its holder dies: nobody renews it
    wait_until_free("job:1")
    assert lease.acquire("job:1", "bot-b", 60_000)
    assert lease.holder_of("job:1") == "bot-b" and not lease.acquire("job:1", "bot-a", 60_000)

    lease.release("schedules:slack", "bot-a")  # a holder that stops lets go at once
    assert lease.holder_of("schedules:slack") is None
    assert lease.acquire("schedules:slack", "bot-b", 60_000)
    assert lease.Lease.select().count() == 2


def test_leases_run_on_the_databases_clock(lease_db: peewee.Database, monkeypatch: pytest.MonkeyPatch) -> None:
    assert lease.acquire("live", "bot-a", 60_000)
    assert lease.acquire("ended", "bot-a", 1)
    left = expires_at("live") - lease.database_now_ms()
    assert 50_000 < left <= 60_000  # the end is the database's now plus the ttl
    time.sleep(0.05)  # "ended" is past its end by the database's clock

    shift_process_clock(monkeypatch, DAY_MS)  # this process thinks a day has passed: the database does not
    assert now_ms() - lease.database_now_ms() > DAY_MS - 60_000
    assert lease.holder_of("live") == "bot-a"
    assert not lease.acquire("live", "bot-b", 60_000)

    shift_process_clock(monkeypatch, -DAY_MS)  # a clock a day behind cannot keep an ended lease alive
    assert lease.holder_of("ended") is None
    assert lease.acquire("ended", "bot-b", 60_000)
    assert lease.holder_of("ended") == "bot-b"
