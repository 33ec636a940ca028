"""Job control on a real master: cancel and timeout stop everything, a second copy of a master
cannot touch the running one's jobs, and a lost submit is followed where it went."""

from __future__ import annotations

import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ombot.masters import JobState, MasterLost, Refused
from tests.support import INVENTORY, REPO, Cluster, child_env, wait_for

SITE = [REPO / "tests" / "site_modules"]


@pytest.fixture
def cluster(make_cluster):
    c = make_cluster(module_dirs=SITE, limits={"max_parallel_hosts": 1})
    c.start("m1")
    return c


def test_a_cancelled_job_starts_nothing_more(cluster, tmp_path: Path) -> None:
    router = cluster.router()
    marks = tmp_path / "marks"
    marks.mkdir()
    # One host at a time: cancelling during web01's sleep must keep web02 and web03 from running.
    ref, _ = router.submit("local", "shell.exec", {"cmd": f"touch {marks}/$OMBOT_HOST; sleep 2"},
                           ["web01", "web02", "web03"])
    wait_for(lambda: (marks / "web01").exists(), why="web01 to start")  # then 2 s of sleep left to cancel in
    router.cancel(ref)
    events: list[dict] = []
    assert router.follow(ref, events.append) == "cancelled"
    assert sorted(p.name for p in marks.iterdir()) == ["web01"]
    statuses = {e["data"]["host"]: e["data"]["status"] for e in events if e["kind"] == "host"}
    assert statuses == {"web01": "cancelled", "web02": "cancelled", "web03": "cancelled"}


@pytest.mark.slow
def test_timeout_kills_children_that_ignore_sigterm(cluster, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    cmd = f"sh -c 'trap \"\" TERM; echo $$ > {pidfile}; sleep 60' & wait"
    ref, _ = cluster.router().submit("local", "shell.exec", {"cmd": cmd}, ["localhost"], timeout=2)
    assert cluster.router().follow(ref, lambda e: None) == "timed_out"
    child = int(pidfile.read_text())
    for _ in range(50):
        if not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"child {child} survived the timeout")


@pytest.mark.slow
def test_a_second_copy_of_a_master_refuses_to_start_and_leaves_jobs_alone(cluster) -> None:
    router = cluster.router()
    ref, _ = router.submit("local", "test.sleep", {"seconds": "2"}, ["localhost"])
    second = subprocess.run([sys.executable, "-m", "ombot", "--config", str(cluster.config_path), "master",
                             "--id", "m1"], capture_output=True, text=True, timeout=60, env=child_env())
    assert second.returncode == 2 and "already running" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr
    assert router.follow(ref, lambda e: None) == "ok"


def test_the_master_state_is_private(cluster) -> None:
    state = cluster.root / "state-m1"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "m1.db").stat().st_mode) & 0o077 == 0


def test_a_submit_whose_link_broke_is_followed_where_it_went(cluster) -> None:
    router = cluster.router(lost_retry=1.0)
    link = router.links["m1"]
    real_call = link.call

    def breaks_after_sending(op, args, request_id=None, requester=None):
        result = real_call(op, args, request_id, requester)
        if op == "submit":
            raise MasterLost("link broke after sending")
        return result

    link.call = breaks_after_sending  # the reply is lost; the job reached the master
    with pytest.raises(MasterLost) as lost:
        router.submit("local", "echo", {"message": "x"}, ["localhost"])
    link.call = real_call
    assert lost.value.ref is not None and lost.value.ref.master_id == "m1"
    assert router.follow(lost.value.ref, lambda e: None) == "ok"


def test_job_state_answers_the_state_alone_without_waiting(cluster) -> None:
    router = cluster.router()
    ref, _ = router.submit("local", "test.sleep", {"seconds": "30"}, ["localhost"])
    deadline = time.monotonic() + 20
    while router.job_state(ref) != JobState.RUNNING and time.monotonic() < deadline:
        time.sleep(0.05)
    # A long-poll after the "accepted" event would wait the full 15 s: state_only answers at once, bare.
    started = time.monotonic()
    reply = router.links["m1"].call("events", {"job": ref.job_id, "after": 1, "wait": 15, "state_only": True})
    assert reply == {"job": ref.job_id, "state": "running", "done": False}
    assert time.monotonic() - started < 10
    with pytest.raises(Refused) as bad:
        router.links["m1"].call("events", {"job": ref.job_id, "state_only": "yes"})
    assert bad.value.code == "bad_request"
    # Another client's job does not exist for it, state or not.
    with pytest.raises(Refused) as unknown:
        cluster.router("U0OTHER").job_state(ref)
    assert unknown.value.code == "unknown_job"
    router.cancel(ref)
    assert router.follow(ref, lambda e: None) == "cancelled"
    assert router.job_state(ref) == "cancelled"
    assert router.events(ref)["events"][-1]["kind"] == "finished"  # a plain events call is unchanged


@pytest.mark.slow
def test_one_requester_cannot_hold_every_job_slot(make_cluster: Callable[..., Cluster]) -> None:
    """Eight `sleep 20` from one person used to fill all eight slots and make everyone wait."""
    spare = "".join(f"h{i} ansible_connection=local\n" for i in range(6))  # one host each: no host lock waits
    cluster = make_cluster(module_dirs=[REPO / "tests" / "site_modules"],
                           limits={"max_jobs": 4, "max_jobs_per_requester": 2}, inventory=f"{INVENTORY}[spare]\n{spare}")
    cluster.start("m1")
    hog, other = cluster.router("U0HOG"), cluster.router("U0OTHER")
    try:
        hogs = [hog.submit("local", "test.sleep", {"seconds": 30}, [f"h{i}"], requester="U0HOG")[0]
                for i in range(6)]
        health = next(m for m in other.health() if m["master"] == "m1")
        assert (health["running_jobs"], health["waiting_jobs"]) == (2, 4)
        # Another person's job takes a free slot at once, not after the hog's queue.
        ref, _ = other.submit("local", "echo", {"message": "my turn"}, ["localhost"], requester="U0OTHER")
        assert other.follow(ref, lambda event: None) == "ok"
        states = [hog.job_state(r) for r in hogs]
        assert states.count("queued") == 4, states  # still waiting their turn: two at a time
        for r in hogs:
            hog.cancel(r, requester="U0HOG")
        assert {hog.follow(r, lambda event: None) for r in hogs} == {"cancelled"}
    finally:
        hog.close()
        other.close()
