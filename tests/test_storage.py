"""The master's store on SQLite, PostgreSQL and MariaDB/MySQL: same models, same migrations.

The servers come from scripts/services.sh (run by `./dev test` and `.ci/run`). A server that
cannot be reached is a skip on a workstation and a failure when $CI is set.

Every test gets an empty place of its own, so test files and whole test runs can share the
servers: a schema inside `ombot_test` on PostgreSQL, a database `ombot_test_<random>` on MySQL
(where a schema is a database), a file on SQLite. End-to-end tests give their master a database
of its own on both servers.
"""

from __future__ import annotations

import os
import stat
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import peewee
import pytest

from masters import store
from ombot import config as cfg
from ombot.errors import ConfigError
from ombot.logs import redact
from ombot.storage import SchemaVersion, StorageError, connect_url, migrate, open_database, redact_url
from tests.support import Cluster

SERVERS = {
    "postgres": ("OMBOT_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/ombot_test"),
    "mysql": ("OMBOT_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/ombot_test"),
}
BACKENDS = ["sqlite", *SERVERS]
MIB = 1024 * 1024
_reachable: dict[str, str] = {}  # backend -> error, "" when it answered; asked once per run


# --- where each test's tables live ---------------------------------------------------------------


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


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def store_url(backend: str, tmp_path: Path) -> Iterator[str]:
    with scratch(backend, tmp_path) as url:
        yield url


@pytest.fixture
def master_db(store_url: str) -> Iterator[peewee.Database]:
    """The master's models bound to a fresh, migrated database."""
    db = store.open_store(store_url)
    yield db
    db.close()


def table_names(db: peewee.Database) -> set[str]:
    if isinstance(db, peewee.PostgresqlDatabase):  # get_tables() looks in "public" unless told
        return set(db.get_tables(schema=db.execute_sql("SELECT current_schema()").fetchone()[0]))
    return set(db.get_tables())


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
    store.remember_nonce("old", 1_000)
    store.remember_nonce("edge", 5_000)
    store.remember_nonce("new", 4_102_444_800)  # 2100: past 2038, so the column must be 64-bit
    assert store.forget_old_nonces(now=5_000) == 1
    assert sorted(n.nonce for n in store.SeenNonce.select()) == ["edge", "new"]
    assert store.remember_nonce("old", 9_000) is True
    assert store.remember_nonce("new", 9_000) is False


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
                  created_at=4_102_444_800)
    store.JobEvent.create(job=job.id, seq=1, kind="started", at=1_700_000_000.123456, data={"hosts": 2})
    store.JobEvent.create(job=job.id, seq=2, kind="host", at=1_700_000_001.5, data=NESTED)
    master_db.close()  # read back through a new connection

    back = store.Job.get_by_id(job.id)
    assert back.params == NESTED and back.approvers == ["U1", "Ünïcode"] and back.hosts == ["web01", "wéb02"]
    assert bytes(back.signed_request) == signed  # Postgres hands back a memoryview
    assert back.created_at == 4_102_444_800 and back.finished_at is None
    events = list(back.events.order_by(store.JobEvent.seq))
    assert [(e.seq, e.kind, e.data) for e in events] == [(1, "started", {"hosts": 2}), (2, "host", NESTED)]
    # A float column would keep about 2 minutes of resolution at today's epoch on Postgres and MySQL.
    assert events[0].at == pytest.approx(1_700_000_000.123456, abs=1e-6)


def test_values_of_several_mebibytes_fit(master_db: peewee.Database) -> None:
    blob = os.urandom(2 * MIB)
    text = "ü" * MIB + "x" * MIB  # 3 MiB of UTF-8, past MySQL's 64 KiB TEXT and 16 MiB MEDIUMTEXT needs
    job = new_job(signed_request=blob, params={"script": text})
    store.JobEvent.create(job=job.id, seq=1, kind="host", at=1.0, data={"stdout": text})
    master_db.close()
    back = store.Job.get_by_id(job.id)
    assert bytes(back.signed_request) == blob and back.params["script"] == text
    assert store.JobEvent.get(store.JobEvent.job == job.id).data["stdout"] == text


@pytest.mark.parametrize("backend", ["mysql"])
def test_mysql_gets_long_column_types(master_db: peewee.Database) -> None:
    rows = master_db.execute_sql(
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = DATABASE() AND table_name IN ('job', 'jobevent')").fetchall()
    types = {f"{t.lower()}.{c}": d.lower() for t, c, d in rows}
    assert types["job.signed_request"] == "longblob"
    assert {types[f"job.{c}"] for c in ("approvers", "params", "hosts")} == {"longtext"}
    assert types["jobevent.data"] == "longtext"
    assert types["jobevent.at"] == "double"


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


# --- bad URLs and unreachable servers ------------------------------------------------------------


def test_an_unreachable_server_is_a_clear_error_without_the_password() -> None:
    for url in ("postgresql://ombot:s3cret@127.0.0.1:1/ombot", "mysql://ombot:s3cret@127.0.0.1:1/ombot"):
        with pytest.raises(StorageError) as caught:
            open_database(url, peewee.DatabaseProxy(), "demo", [])
        message = str(caught.value)
        assert "s3cret" not in message and "cannot open database" in message and ":***@127.0.0.1:1" in message


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
    from masters.keys import Identity

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


@pytest.mark.parametrize("server", list(SERVERS))
def test_a_master_runs_a_job_on_the_server(server: str, make_cluster: Callable[..., Cluster], tmp_path: Path) -> None:
    with scratch(server, tmp_path, own_database=True) as url:
        cluster = make_cluster()
        master = cluster.start("m1", env={"OMBOT_MASTER_DATABASE_URL": url})
        router = cluster.router()
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
        finally:
            db.close()
        assert state == "ok" and count == len(events)


def test_a_master_with_an_unreachable_database_says_so(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster()
    with pytest.raises(RuntimeError, match="exited"):
        cluster.start("m1", env={"OMBOT_MASTER_DATABASE_URL": "postgresql://ombot:s3cret@127.0.0.1:1/ombot"})
    log = cluster.processes["m1"].log()
    assert "cannot open database postgresql://ombot:***@127.0.0.1:1/ombot" in log
    assert "s3cret" not in log and "Traceback" not in log
