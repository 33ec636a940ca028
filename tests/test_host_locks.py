"""Host locks at the master, on real master processes: two jobs that change one host never run on it
at once (they wait, or are refused), read-only modules never wait, a job takes all its hosts or
none, masters sharing a MariaDB/PostgreSQL database respect each other's locks and recover only
their own jobs after a restart, and finished jobs are deleted after the retention.

Locks carry a lease its master renews: a dead master's lapse and are taken over (its job ends
unknown), a master that cannot renew stops its run before its lease could lapse, one whose locks
were taken over stops at once, and one requester's queue of waiting jobs is bounded."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from ombot.masters import JobRef, Refused, Router, store
from ombot.masters.jobstore import Busy, JobStore
from ombot.modules import Concurrency, ModuleLoadError, load_modules
from ombot import config as cfg
from ombot import storage
from ombot.errors import ConfigError
from ombot.storage import connect_url, migrate
from tests.schema_v1 import create_schema_v1
from tests.storage import BACKENDS, SERVERS, scratch
from tests.support import REPO, Cluster, MasterProcess

SITE = REPO / "tests" / "site_modules"
REFUSING = '''\
from ombot.modules import Command, Plan, module, params as p


@module("test.exclusive", category="test", concurrency="refuse", params=[p.Int("seconds", min=0, max=600)])
def run(seconds: int) -> Plan:
    """Sleep on each host, refusing to wait for hosts another job is changing."""
    return Plan(Command(["sleep", str(seconds)]))
'''

# Leases short enough for a test. A dead master's lock lapses within 9 s; a master stops a run it
# could not renew for 6 s. STALL_LEASE leaves the stop 4 s (less one 1 s watch) before the lapse.
SHORT_LEASE = {"lock_lease_seconds": 9, "lock_renew_seconds": 3}
STALL_LEASE = {"lock_lease_seconds": 12, "lock_renew_seconds": 4}


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


def lock_leases(url: str) -> dict[str, int | None]:
    """host -> when its lock's lease ends (epoch ms by the database's clock), straight from the database."""
    db = connect_url(url)
    try:
        return dict(db.execute_sql("SELECT host, expires_at FROM hostlock").fetchall())
    finally:
        db.close()


def database_now(url: str) -> int:
    db = connect_url(url)
    try:
        return storage.database_now_ms(db)
    finally:
        db.close()


def runs_of(master: MasterProcess, seconds: int, hosts: int = 1) -> list[psutil.Process]:
    """The `sleep SECONDS` a job of `master` runs on each of its `hosts` (the local backend's children)."""
    assert master.proc is not None
    parent = psutil.Process(master.proc.pid)
    found: list[psutil.Process] = []

    def started() -> bool:
        found.clear()
        for child in parent.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):  # a child that ended meanwhile
                if child.cmdline() == ["sleep", str(seconds)]:
                    found.append(child)
        return len(found) == hosts

    wait_until(started)
    return list(found)


def stop_orphans(processes: list[psutil.Process]) -> None:
    """What a killed master's jobs left running: this test started them, by pid."""
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def on(ref: JobRef, master_id: str) -> JobRef:
    """The same job, asked of another master (of a shared database)."""
    return JobRef(ref.job_id, ref.idc, master_id)


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
    first, _ = router.submit("local", "test.sleep", {"seconds": 8}, ["web01"])  # long enough to look at, loaded
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
    first, _ = router.submit("local", "test.sleep", {"seconds": 8}, ["web01"])
    wait_until(running(router, first))
    # 2 s of sleep fit in a 4 s timeout, but not after waiting for web01 (up to 8 s: the submit may come
    # a few seconds late on a loaded machine and still wait long enough). Were only the run timed, it would end ok.
    late, _ = router.submit("local", "test.sleep", {"seconds": 2}, ["web01"], timeout=4)
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
    busy, _ = router.submit("local", "test.sleep", {"seconds": 60}, ["web01", "web02"])  # cancelled below
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
    a, _ = router.submit("local", "test.sleep", {"seconds": 10}, ["web01"])  # still running after c, loaded
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
    mine, _ = router.submit("local", "test.exclusive", {"seconds": 8}, ["web02"])  # still running when behind comes
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
def test_masters_sharing_a_database_respect_each_others_locks_and_take_over_a_dead_masters(
        server: str, make_cluster: Callable[..., Cluster], tmp_path: Path) -> None:
    with scratch(server, tmp_path, own_database=True) as url:
        cluster = make_cluster({"local": ["m1", "m2"]}, module_dirs=[SITE], limits=SHORT_LEASE)
        env = {"OMBOT_MASTER_DATABASE_URL": url}
        cluster.start("m1", env=env)
        cluster.start("m2", env=env)
        router = cluster.router()
        orphans: list[psutil.Process] = []
        try:
            a = submit_to(router, "m1", "test.sleep", {"seconds": 60}, ["web01"])
            b = submit_to(router, "m2", "test.sleep", {"seconds": 60}, ["web02"])
            wait_until(lambda: router.job_state(a) == router.job_state(b) == "running")
            assert lock_rows(url) == {"web01": a.job_id, "web02": b.job_id}
            # Each lock has a lease that its master renews, by the database's clock.
            first = lock_leases(url)["web01"]
            assert first is not None and first > database_now(url)
            wait_until(lambda: (lock_leases(url)["web01"] or 0) > first)

            # A job on m2 waits for web01, which m1's job holds.
            c = submit_to(router, "m2", "test.sleep", {"seconds": 0}, ["web01"], timeout=60)
            wait_until(lambda: any(e["kind"] == "waiting" for e in router.events(c)["events"]))
            assert router.job_state(c) == "queued"

            # m1 dies mid-job (its `sleep 60` lives on, as a run on a real host would).
            orphans += runs_of(cluster.processes["m1"], 60)
            cluster.processes["m1"].kill()
            last_lease = lock_leases(url)["web01"]
            assert last_lease is not None

            # m2's waiting job gets web01 once the lease lapsed, not before; m1's job ends unknown, saying why.
            c_state, c_events = followed(router, c)
            assert c_state == "ok" and of_kind(c_events, "waiting") == [{"hosts": ["web01"], "behind": [a.job_id]}]
            assert of_kind(c_events, "host")[0]["started"] * 1000 >= last_lease
            a_state, a_events = followed(router, on(a, "m2"))  # the shared database answers for m1's job
            assert a_state == "unknown" and job_rows(url)[a.job_id] == "unknown"
            assert of_kind(a_events, "finished")[-1]["reason"] == (
                "master m1 stopped renewing its lease on the job's hosts, and master m2 took them over; "
                "the hosts may or may not have finished")
            assert router.job_state(b) == "running" and lock_rows(url) == {"web02": b.job_id}

            # m1 restarts: the end m2 gave its job stands; m2's job and lock are untouched.
            cluster.start("m1", env=env)
            assert router.job_state(a) == "unknown" and len(of_kind(router.events(a)["events"], "finished")) == 1
            assert router.job_state(b) == "running" and lock_rows(url) == {"web02": b.job_id}

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
            stop_orphans(orphans)


@pytest.mark.slow
@pytest.mark.parametrize("server", list(SERVERS))
def test_a_master_that_cannot_renew_its_lease_stops_its_run_before_the_lease_lapses(
        server: str, make_cluster: Callable[..., Cluster], tmp_path: Path) -> None:
    """The database stops answering m1's renewals (the test holds its lock rows): m1 stops its run on
    the host while the lease still holds, so no master that takes the host over meets it there."""
    with scratch(server, tmp_path, own_database=True) as url:
        cluster = make_cluster(module_dirs=[SITE], limits=STALL_LEASE)
        cluster.start("m1", env={"OMBOT_MASTER_DATABASE_URL": url})
        router = cluster.router()
        db = connect_url(url)
        try:
            a, _ = router.submit("local", "test.sleep", {"seconds": 60}, ["web01"])
            wait_until(running(router, a))
            run, = runs_of(cluster.processes["m1"], 60)
            with db.atomic():  # m1's renewals (and its release of the lock) wait behind this transaction
                (lease,), = db.execute_sql(f"SELECT expires_at FROM hostlock WHERE job = {db.param} FOR UPDATE",
                                           (a.job_id,)).fetchall()
                wait_until(lambda: not run.is_running(), within=STALL_LEASE["lock_lease_seconds"] + 10)
                assert storage.database_now_ms(db) < lease  # stopped while the lease still held
                assert router.job_state(a) == "running"  # its end waits for the database too
            state, events = followed(router, a)
            assert state == "cancelled" and of_kind(events, "host")[0]["status"] == "cancelled"
            assert of_kind(events, "finished")[-1]["reason"].startswith(
                "master m1 could not renew its lease on the job's hosts for ")
            assert lock_rows(url) == {}
        finally:
            db.close()
            router.close()
            cluster.stop_all()


@pytest.mark.slow
def test_a_master_whose_locks_were_taken_over_stops_its_run_at_once(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(module_dirs=[SITE], limits=SHORT_LEASE)
    cluster.start("m1")
    router = cluster.router()
    url = sqlite_url(cluster)
    try:
        a, _ = router.submit("local", "test.sleep", {"seconds": 60}, ["web01", "web02"])
        wait_until(running(router, a))
        runs = runs_of(cluster.processes["m1"], 60, hosts=2)
        db = connect_url(url)  # as another master does once the lease lapsed: the lock on web02 goes
        try:
            db.execute_sql(f"DELETE FROM hostlock WHERE host = {db.param}", ("web02",))
        finally:
            db.close()
        state, events = followed(router, a)
        assert state == "cancelled" and not any(run.is_running() for run in runs)
        assert of_kind(events, "finished")[-1]["reason"] == (
            "master m1 lost its lease on the job's hosts (it lapsed and another master took them over), "
            "so it stopped the job")
        assert lock_rows(url) == {}
    finally:
        router.close()


@pytest.mark.slow
def test_one_requester_queues_a_bounded_number_of_jobs(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(module_dirs=[SITE], limits={"max_waiting_per_requester": 2})
    cluster.start("m1")
    router, other = cluster.router(), cluster.router("U0OTHER")
    try:
        busy, _ = router.submit("local", "test.sleep", {"seconds": 60}, ["web01"])
        wait_until(running(router, busy))
        queued = [router.submit("local", "test.sleep", {"seconds": 0}, ["web01"])[0] for _ in range(2)]
        with pytest.raises(Refused) as refused:
            router.submit("local", "test.sleep", {"seconds": 0}, ["web01"])
        assert refused.value.code == "queue_full"
        assert refused.value.message == (
            "cli:test already has 2 jobs waiting at master m1 for their hosts or a job slot, the most it queues "
            "for one requester; wait for some to start, or cancel some")
        assert refused.value.details == {"waiting": 2, "limit": 2}
        assert len(job_rows(sqlite_url(cluster))) == 3  # nothing recorded for the refused one

        # Running jobs do not count, and another requester has a queue of its own.
        mine, _ = other.submit("local", "test.sleep", {"seconds": 0}, ["web01"], requester="U0OTHER")
        router.cancel(queued[0])
        assert followed(router, queued[0])[0] == "cancelled"
        again, _ = router.submit("local", "test.sleep", {"seconds": 0}, ["web01"])
        router.cancel(busy)
        assert [followed(router, ref)[0] for ref in (busy, queued[1], again)] == ["cancelled", "ok", "ok"]
        assert other.follow(mine, lambda event: None) == "ok"
    finally:
        router.close()
        other.close()


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_locks_from_before_leases_are_kept_without_one_and_never_taken_over(backend: str, tmp_path: Path) -> None:
    """A master of the previous version may still hold them, never renewing: only its restart frees them."""
    with scratch(backend, tmp_path) as url:
        old = connect_url(url)
        try:  # the master's tables at version 4: host locks without a lease
            migrate(old, "master", store.MIGRATIONS[:4])
            old.execute_sql("DROP TABLE hostlock")
            old.execute_sql("CREATE TABLE hostlock (idc VARCHAR(64) NOT NULL, host VARCHAR(255) NOT NULL, "
                            "job VARCHAR(36) NOT NULL, master_id VARCHAR(64) NOT NULL, taken_at BIGINT NOT NULL, "
                            "PRIMARY KEY (idc, host))")
            old.execute_sql("INSERT INTO hostlock VALUES ('local', 'web01', 'old-job', 'm0', 5)")
        finally:
            old.close()
        db = store.open_store(url)
        try:
            store.MIGRATIONS[-1](db)  # cut short on MySQL and run again: changes nothing
            assert [(lock.job, lock.taken_at, lock.expires_at) for lock in store.HostLock.select()] == [
                ("old-job", 5, None)]
            jobs = JobStore("m2", lease_seconds=60)
            assert jobs.take_hosts("new-job", "local", ["web01"]) == Busy(["web01"], ["old-job"])
            assert jobs.take_over_lapsed() == []
            # A lock taken now has its lease, by the database's clock; once it lapses it is taken over.
            assert jobs.take_hosts("new-job", "local", ["web02"]) is None
            lease = store.HostLock.get(store.HostLock.host == "web02").expires_at
            assert lease is not None and 50_000 < lease - store.database_now_ms() <= 60_000
            assert jobs.take_over_lapsed() == []
            store.HostLock.update(expires_at=lease - 60_001).where(store.HostLock.host == "web02").execute()
            assert jobs.take_over_lapsed() == ["new-job"] and store.HostLock.select().count() == 1
        finally:
            db.close()


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


def test_a_lease_must_span_three_renewals(make_cluster: Callable[..., Cluster]) -> None:
    limits = make_cluster().config().masters["m1"].limits
    assert (limits.lock_lease_seconds, limits.lock_renew_seconds, limits.max_waiting_per_requester) == (60, 15, 32)
    assert make_cluster(limits={"lock_lease_seconds": 21, "lock_renew_seconds": 7}).config()
    with pytest.raises(ConfigError) as error:
        make_cluster(limits={"lock_lease_seconds": 20, "lock_renew_seconds": 7}).config()
    assert "masters.m1.limits.lock_lease_seconds" in str(error.value)
    assert "expected at least 3 times lock_renew_seconds (7)" in str(error.value)


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
