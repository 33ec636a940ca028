"""Host locks at the master, on real master processes: two jobs that change one host never run on it
at once (they wait, or are refused), read-only modules never wait, a job takes all its hosts or
none, masters sharing a MariaDB/PostgreSQL database respect each other's locks and recover only
their own jobs after a restart, and finished jobs are deleted after the retention."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from masters import JobRef, Refused, Router
from modules import Concurrency, ModuleLoadError, load_modules
from ombot import config as cfg
from ombot.errors import ConfigError
from ombot.storage import connect_url
from tests.support import REPO, Cluster
from tests.test_storage import SERVERS, create_schema_v1, scratch

SITE = REPO / "tests" / "site_modules"
REFUSING = '''\
from modules import Command, Plan, module, params as p


@module("test.exclusive", category="test", concurrency="refuse", params=[p.Int("seconds", min=0, max=600)])
def run(seconds: int) -> Plan:
    """Sleep on each host, refusing to wait for hosts another job is changing."""
    return Plan(Command(["sleep", str(seconds)]))
'''


# --- helpers ------------------------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def submit_to(router: Router, master_id: str, module: str, params: dict[str, Any], hosts: list[str],
              timeout: int | None = None) -> JobRef:
    """A submit to one named master of the IDC (Router.submit always tries the first)."""
    job_id = str(uuid.uuid4())
    args = {"module": module, "params": params, "hosts": hosts, "idc": "local", "approvers": [],
            "timeout": timeout, "wait": 0}
    router.links[master_id].call("submit", args, job_id)
    return JobRef(job_id, "local", master_id)


def followed(router: Router, ref: JobRef) -> tuple[str, list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    return router.follow(ref, events.append), events


def of_kind(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e["data"] for e in events if e["kind"] == kind]


def running(router: Router, ref: JobRef) -> Callable[[], bool]:
    return lambda: router.job_state(ref) == "running"


def lock_rows(url: str) -> dict[str, str]:
    """host -> the job holding it, straight from the database."""
    db = connect_url(url)
    try:
        return dict(db.execute_sql("SELECT host, job FROM hostlock").fetchall())
    finally:
        db.close()


def job_rows(url: str) -> dict[str, str]:
    """job id -> state, straight from the database."""
    db = connect_url(url)
    try:
        return dict(db.execute_sql("SELECT id, state FROM job").fetchall())
    finally:
        db.close()


def events_of(url: str, job_id: str) -> int:
    """How many events of the job the database holds."""
    db = connect_url(url)
    try:
        return int(db.execute_sql(f"SELECT COUNT(*) FROM jobevent WHERE job_id = {db.param}", (job_id,)).fetchone()[0])
    finally:
        db.close()


def sqlite_url(cluster: Cluster, master_id: str = "m1") -> str:
    return f"sqlite:///{cluster.root / f'state-{master_id}' / f'{master_id}.db'}"


def set_master_key(cluster: Cluster, master_id: str, line: str) -> None:
    """Add a key to [masters.ID] of the cluster's config (its [limits] table follows it)."""
    text = cluster.config_path.read_text()
    header = f"[masters.{master_id}.limits]"
    assert text.count(header) == 1
    cluster.config_path.write_text(text.replace(header, f"{line}\n\n{header}"))


@pytest.fixture
def cluster(make_cluster: Callable[..., Cluster], tmp_path: Path) -> Iterator[Cluster]:
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "exclusive.py").write_text(REFUSING)
    c = make_cluster(module_dirs=[SITE, mods])
    c.start("m1")
    yield c


@pytest.fixture
def router(cluster: Cluster) -> Iterator[Router]:
    r = cluster.router()
    yield r
    r.close()


# --- one master ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_job_on_a_host_waits_for_the_first(cluster: Cluster, router: Router) -> None:
    first, _ = router.submit("local", "test.sleep", {"seconds": 2}, ["web01"])
    wait_until(running(router, first))
    second, _ = router.submit("local", "test.sleep", {"seconds": 0}, ["web01"])
    wait_until(lambda: any(e["kind"] == "waiting" for e in router.events(second)["events"]))
    # It waits in no job slot, still queued, and the lock is the first job's.
    assert router.job_state(second) == "queued"
    health = next(m for m in router.health() if m["master"] == "m1")
    assert (health["running_jobs"], health["waiting_jobs"]) == (1, 1)
    assert lock_rows(sqlite_url(cluster)) == {"web01": first.job_id}

    first_state, first_events = followed(router, first)
    second_state, second_events = followed(router, second)
    assert (first_state, second_state) == ("ok", "ok")
    assert of_kind(second_events, "waiting") == [{"hosts": ["web01"], "behind": [first.job_id]}]
    assert of_kind(second_events, "host")[0]["started"] >= of_kind(first_events, "host")[0]["ended"]
    assert lock_rows(sqlite_url(cluster)) == {}  # both released at their end


@pytest.mark.slow
def test_the_wait_counts_against_the_timeout(router: Router) -> None:
    first, _ = router.submit("local", "test.sleep", {"seconds": 2}, ["web01"])
    wait_until(running(router, first))
    # 2 s of sleep fit in a 3 s timeout, but not after about 2 s of waiting for web01.
    late, _ = router.submit("local", "test.sleep", {"seconds": 2}, ["web01"], timeout=3)
    # This one never gets web01 at all within its 1 s.
    never, _ = router.submit("local", "test.sleep", {"seconds": 0}, ["web01"], timeout=1)
    never_state, never_events = followed(router, never)
    assert never_state == "timed_out"
    [host] = of_kind(never_events, "host")
    assert host["status"] == "timed_out" and "waiting" in host["error"] and "web01" in host["error"]
    assert "waiting" in of_kind(never_events, "finished")[0]["reason"]
    assert followed(router, first)[0] == "ok"
    late_state, late_events = followed(router, late)
    assert late_state == "timed_out"
    assert of_kind(late_events, "waiting") == [{"hosts": ["web01"], "behind": [first.job_id]}]


@pytest.mark.slow
def test_read_only_modules_do_not_wait(router: Router) -> None:
    busy, _ = router.submit("local", "test.sleep", {"seconds": 5}, ["web01", "web02"])
    wait_until(running(router, busy))
    for module, params in (("echo", {"message": "hi"}), ("ping", {}), ("facts", {})):
        ref, _ = router.submit("local", module, params, ["web01"])
        state, events = followed(router, ref)
        assert state == "ok" and not of_kind(events, "waiting"), (module, events)
    assert router.job_state(busy) == "running"  # they ran beside it, not after it
    router.cancel(busy)
    assert followed(router, busy)[0] == "cancelled"


@pytest.mark.slow
def test_a_job_takes_all_its_hosts_or_none(cluster: Cluster, router: Router) -> None:
    a, _ = router.submit("local", "test.sleep", {"seconds": 3}, ["web01"])
    wait_until(running(router, a))
    b, _ = router.submit("local", "test.sleep", {"seconds": 0}, ["web01", "web02"])
    wait_until(lambda: any(e["kind"] == "waiting" for e in router.events(b)["events"]))
    assert lock_rows(sqlite_url(cluster)) == {"web01": a.job_id}  # b holds nothing while it waits
    # So a job on web02 alone runs now, while b still waits for web01.
    c, _ = router.submit("local", "test.sleep", {"seconds": 0}, ["web02"])
    c_state, c_events = followed(router, c)
    assert c_state == "ok" and not of_kind(c_events, "waiting")
    assert (router.job_state(a), router.job_state(b)) == ("running", "queued")
    assert followed(router, a)[0] == "ok"
    b_state, b_events = followed(router, b)
    assert b_state == "ok"
    assert of_kind(b_events, "waiting") == [{"hosts": ["web01"], "behind": [a.job_id]}]


@pytest.mark.slow
def test_a_refusing_module_is_refused_on_a_busy_host_and_nothing_is_recorded(cluster: Cluster,
                                                                              router: Router) -> None:
    busy, _ = router.submit("local", "test.sleep", {"seconds": 30}, ["web01"])
    wait_until(running(router, busy))
    with pytest.raises(Refused) as refused:
        router.submit("local", "test.exclusive", {"seconds": 0}, ["web02", "web01"])
    assert refused.value.code == "host_busy"
    assert refused.value.details == {"hosts": ["web01"], "behind": [busy.job_id]}
    assert "web01" in refused.value.message
    assert set(job_rows(sqlite_url(cluster))) == {busy.job_id}  # no job, no lock on web02
    assert lock_rows(sqlite_url(cluster)) == {"web01": busy.job_id}

    # On free hosts it runs, holding them from the submit: a waiting job queues behind it.
    mine, _ = router.submit("local", "test.exclusive", {"seconds": 2}, ["web02"])
    assert lock_rows(sqlite_url(cluster))["web02"] == mine.job_id
    behind, _ = router.submit("local", "test.sleep", {"seconds": 0}, ["web02"])
    assert followed(router, mine)[0] == "ok"
    state, events = followed(router, behind)
    assert state == "ok" and of_kind(events, "waiting") == [{"hosts": ["web02"], "behind": [mine.job_id]}]
    router.cancel(busy)
    assert followed(router, busy)[0] == "cancelled"


@pytest.mark.slow
def test_a_waiting_job_can_be_cancelled_and_never_runs(cluster: Cluster, router: Router, tmp_path: Path) -> None:
    busy, _ = router.submit("local", "test.sleep", {"seconds": 30}, ["web01"])
    wait_until(running(router, busy))
    mark = tmp_path / "ran"
    waiting, _ = router.submit("local", "shell.exec", {"cmd": f"touch {mark}"}, ["web01"])
    wait_until(lambda: any(e["kind"] == "waiting" for e in router.events(waiting)["events"]))
    assert router.cancel(waiting)["cancelled"] is True
    state, events = followed(router, waiting)
    assert state == "cancelled" and [h["status"] for h in of_kind(events, "host")] == ["cancelled"]
    assert router.job_state(busy) == "running" and not mark.exists()
    router.cancel(busy)
    assert followed(router, busy)[0] == "cancelled"


# --- masters sharing a database -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("server", list(SERVERS))
def test_masters_sharing_a_database_respect_each_others_locks_and_recover_only_their_own_jobs(
        server: str, make_cluster: Callable[..., Cluster], tmp_path: Path) -> None:
    with scratch(server, tmp_path, own_database=True) as url:
        cluster = make_cluster({"local": ["m1", "m2"]}, module_dirs=[SITE])
        env = {"OMBOT_MASTER_DATABASE_URL": url}
        cluster.start("m1", env=env)
        cluster.start("m2", env=env)
        router = cluster.router()
        try:
            a = submit_to(router, "m1", "test.sleep", {"seconds": 60}, ["web01"])
            b = submit_to(router, "m2", "test.sleep", {"seconds": 60}, ["web02"])
            wait_until(lambda: router.job_state(a) == router.job_state(b) == "running")
            assert lock_rows(url) == {"web01": a.job_id, "web02": b.job_id}

            # A job on m2 waits for web01, which m1's job holds.
            c = submit_to(router, "m2", "test.sleep", {"seconds": 0}, ["web01"])
            wait_until(lambda: any(e["kind"] == "waiting" for e in router.events(c)["events"]))
            assert router.job_state(c) == "queued"

            # m1 dies mid-job; m2 must not touch its jobs, and m1's lock still holds.
            cluster.processes["m1"].kill()
            time.sleep(1.5)  # m2's lock retries run meanwhile
            assert router.job_state(b) == "running" and router.job_state(c) == "queued"
            assert job_rows(url)[a.job_id] == "queued"  # m1's job: as m1 left it
            assert lock_rows(url)["web01"] == a.job_id

            # m1 restarts: its own job ends unknown and its lock goes; m2's job and lock are untouched.
            cluster.start("m1", env=env)
            a_state, a_events = followed(router, a)
            assert a_state == "unknown" and "stopped" in of_kind(a_events, "finished")[0]["reason"]
            assert router.job_state(b) == "running" and job_rows(url)[b.job_id] == "queued"
            assert lock_rows(url).get("web02") == b.job_id

            # m2's waiting job gets web01 now that m1 freed it (within m2's retry tick).
            c_state, c_events = followed(router, c)
            assert c_state == "ok" and of_kind(c_events, "waiting")[0]["behind"] == [a.job_id]

            # And m1 waits for m2's lock on web02 in turn.
            d = submit_to(router, "m1", "test.sleep", {"seconds": 0}, ["web02"])
            wait_until(lambda: any(e["kind"] == "waiting" for e in router.events(d)["events"]))
            router.cancel(b)
            assert followed(router, b)[0] == "cancelled"
            d_state, d_events = followed(router, d)
            assert d_state == "ok" and of_kind(d_events, "waiting") == [{"hosts": ["web02"], "behind": [b.job_id]}]
            assert lock_rows(url) == {}
        finally:
            router.close()
            cluster.stop_all()


@pytest.mark.slow
@pytest.mark.parametrize("server", list(SERVERS))
def test_a_masters_retention_in_a_shared_database_leaves_the_other_masters_jobs_alone(
        server: str, make_cluster: Callable[..., Cluster], tmp_path: Path) -> None:
    with scratch(server, tmp_path, own_database=True) as url:
        cluster = make_cluster({"local": ["m1", "m2"]}, module_dirs=[SITE])
        set_master_key(cluster, "m1", f"retention_days = {4 / 86400}")  # 4 seconds; m2 keeps the default 30 days
        env = {"OMBOT_MASTER_DATABASE_URL": url}
        cluster.start("m1", env=env)
        cluster.start("m2", env=env)
        router = cluster.router()
        try:
            mine = submit_to(router, "m1", "echo", {"message": "m1's"}, ["web01"])
            theirs = submit_to(router, "m2", "echo", {"message": "m2's"}, ["web02"])
            assert followed(router, mine)[0] == followed(router, theirs)[0] == "ok"
            time.sleep(6)  # both ended past m1's retention; m1 purges every second
            wait_until(lambda: mine.job_id not in job_rows(url))
            assert job_rows(url)[theirs.job_id] == "ok"  # m2's job, kept by m2's own retention
            assert events_of(url, mine.job_id) == 0 and events_of(url, theirs.job_id) > 0
            assert of_kind(router.events(theirs)["events"], "finished")
        finally:
            router.close()
            cluster.stop_all()


# --- restart, migration, retention --------------------------------------------------------------


@pytest.mark.slow
def test_a_restarted_master_frees_its_locks_and_ends_its_jobs_unknown(cluster: Cluster, router: Router) -> None:
    a, _ = router.submit("local", "test.sleep", {"seconds": 60}, ["web01"])
    wait_until(running(router, a))
    cluster.processes["m1"].kill()
    assert lock_rows(sqlite_url(cluster)) == {"web01": a.job_id}
    cluster.start("m1")
    assert followed(router, a)[0] == "unknown"
    assert lock_rows(sqlite_url(cluster)) == {}
    b, _ = router.submit("local", "test.sleep", {"seconds": 0}, ["web01"])
    state, events = followed(router, b)
    assert state == "ok" and not of_kind(events, "waiting")


@pytest.mark.slow
def test_jobs_of_a_database_from_before_sharing_are_the_masters_own(make_cluster: Callable[..., Cluster],
                                                                    tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    create_schema_v1(url)  # one finished job, from before jobs recorded their master
    db = connect_url(url)
    try:
        db.execute_sql("UPDATE job SET state = 'queued', finished_at = NULL")  # left behind by a stop
    finally:
        db.close()
    cluster = make_cluster(module_dirs=[SITE])
    cluster.start("m1", env={"OMBOT_MASTER_DATABASE_URL": url})
    cluster.processes["m1"].stop()
    db = connect_url(url)
    try:
        (state, master_id), = db.execute_sql("SELECT state, master_id FROM job").fetchall()
    finally:
        db.close()
    assert (state, master_id) == ("unknown", None)


@pytest.mark.slow
def test_finished_jobs_are_deleted_after_the_retention(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(module_dirs=[SITE])
    set_master_key(cluster, "m1", f"retention_days = {4 / 86400}")  # 4 seconds
    cluster.start("m1")
    router = cluster.router()
    url = sqlite_url(cluster)
    try:
        old, _ = router.submit("local", "echo", {"message": "soon gone"}, ["web01"])
        assert followed(router, old)[0] == "ok"
        long, _ = router.submit("local", "test.sleep", {"seconds": 9}, ["web02"])
        time.sleep(6)  # past the retention, while `long` still runs
        wait_until(lambda: old.job_id not in job_rows(url))
        assert long.job_id in job_rows(url)  # running: it has not ended, so it is kept
        with pytest.raises(Refused) as gone:
            router.events(old)
        assert gone.value.code == "unknown_job"
        assert events_of(url, old.job_id) == 0
        assert followed(router, long)[0] == "ok"
        wait_until(lambda: long.job_id not in job_rows(url), within=30)
    finally:
        router.close()


@pytest.mark.parametrize("value", ["0", "-1", '"30"', "nan", "true"])
def test_a_bad_retention_is_a_config_error(make_cluster: Callable[..., Cluster], value: str) -> None:
    cluster = make_cluster()
    set_master_key(cluster, "m1", f"retention_days = {value}")
    with pytest.raises(ConfigError, match="retention_days"):
        cfg.load(cluster.config_path)


def test_retention_defaults_to_thirty_days(make_cluster: Callable[..., Cluster]) -> None:
    assert make_cluster().config().masters["m1"].retention_days == 30


# --- the module SDK -----------------------------------------------------------------------------


def test_concurrency_is_declared_validated_and_in_the_catalog(tmp_path: Path) -> None:
    modules = load_modules([SITE])
    assert {name: str(m.concurrency) for name, m in modules.items() if m.concurrency != Concurrency.WAIT} == {
        "echo": "parallel", "ping": "parallel", "facts": "parallel", "log.tail": "parallel"}
    assert modules["shell.exec"].schema()["concurrency"] == "wait"
    assert modules["facts"].schema()["concurrency"] == "parallel"

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "odd.py").write_text(REFUSING.replace('"refuse"', '"sometimes"'))
    with pytest.raises(ModuleLoadError, match="concurrency must be one of wait, refuse, parallel"):
        load_modules([bad])
