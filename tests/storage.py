"""The database engines every store is tested on: SQLite, PostgreSQL and MariaDB/MySQL.

The servers come from scripts/services.sh (run by `./dev test` and `.ci/run`). A server that
cannot be reached is a skip on a workstation and a failure when $CI is set.

Every test gets an empty place of its own (`scratch`), so test files and whole test runs can share
the servers: a schema inside `ombot_test` on PostgreSQL, a database `ombot_test_<random>` on MySQL
(where a schema is a database), a file on SQLite. tests/conftest.py builds the fixtures `backend`,
`store_url` and `master_db` on these.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import peewee
import pytest

from ombot.logs import redact
from ombot.storage import connect_url, redact_url

SERVERS = {
    "postgres": ("OMBOT_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/ombot_test"),
    "mysql": ("OMBOT_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/ombot_test"),
}
# The database servers only in the full run: the fast tier keeps SQLite.
BACKENDS = ["sqlite", *(pytest.param(server, marks=pytest.mark.slow) for server in SERVERS)]
_reachable: dict[str, str] = {}  # backend -> error, "" when it answered; asked once per run


def server_url(backend: str) -> str:
    """The URL of the shared test database, after checking the server answers."""
    env, default = SERVERS[backend]
    url = os.environ.get(env) or default
    if backend not in _reachable:
        try:
            db = connect_url(url)
            db.connect()
            db.close()
            _reachable[backend] = ""
        except Exception as exc:  # any failure to reach it is the same finding
            _reachable[backend] = f"{type(exc).__name__}: {redact(str(exc)).strip()}"
    if _reachable[backend]:
        reason = " ".join(_reachable[backend].split())
        message = f"{backend} test database {redact_url(url)} is not reachable ({reason}); " \
                  f"run scripts/services.sh or set ${env}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return url


def with_database(url: str, name: str, **query: str) -> str:
    parts = urlsplit(url)
    params = dict(parse_qsl(parts.query)) | query
    return urlunsplit(parts._replace(path=f"/{name}", query=urlencode(params)))


def admin(url: str, *statements: str) -> None:
    db = connect_url(url)
    try:
        for sql in statements:
            db.execute_sql(sql)
    finally:
        db.close()


@contextmanager
def scratch(backend: str, tmp_path: Path, own_database: bool = False) -> Iterator[str]:
    """A URL to an empty place for tables, removed afterwards."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / f'scratch-{uuid.uuid4().hex[:8]}.db'}"
        return
    base = server_url(backend)
    name = f"ombot_test_{uuid.uuid4().hex[:12]}"
    if backend == "postgres" and not own_database:
        admin(base, f"CREATE SCHEMA {name}")
        try:
            yield with_database(base, urlsplit(base).path.lstrip("/"), options=f"-csearch_path={name}")
        finally:
            admin(base, f"DROP SCHEMA {name} CASCADE")
    elif backend == "postgres":
        admin(base, f"CREATE DATABASE {name} TEMPLATE template0")  # template1 may be in use by others
        try:
            yield with_database(base, name)
        finally:
            admin(base, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    else:
        admin(base, f"CREATE DATABASE {name} CHARACTER SET utf8mb4")
        try:
            yield with_database(base, name)
        finally:
            admin(base, f"DROP DATABASE IF EXISTS {name}")


def current_schema(db: peewee.Database) -> str | None:
    """Postgres introspection looks in "public" unless told; each test here has a schema of its own."""
    if isinstance(db, peewee.PostgresqlDatabase):
        return db.execute_sql("SELECT current_schema()").fetchone()[0]
    return None
