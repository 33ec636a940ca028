"""Several masters per IDC: fail over only when nothing was sent; never run a job twice."""

from __future__ import annotations

import pytest

from ombot.masters import Refused
from tests.support import REPO

SITE = [REPO / "tests" / "site_modules"]
pytestmark = pytest.mark.slow  # every test starts two masters


@pytest.fixture
def pair(make_cluster):
    cluster = make_cluster({"local": ["m1", "m2"]}, module_dirs=SITE)
    cluster.start("m1")
    cluster.start("m2")
    return cluster


def test_first_master_down_next_one_serves(pair) -> None:
    pair.processes["m1"].stop()
    router = pair.router()
    ref, _ = router.submit("local", "echo", {"message": "hi"}, ["localhost"])
    assert ref.master_id == "m2"
    assert router.follow(ref, lambda e: None) == "ok"
    cli = pair.ombot("run", "echo", "localhost", "message=through-m2")
    assert cli.returncode == 0, cli.stderr
    assert "on master m2" in cli.stdout and "through-m2" in cli.stdout


def test_master_killed_after_accepting_leaves_job_unknown_not_rerun(pair) -> None:
    router = pair.router(lost_retry=1.0)
    ref, _ = router.submit("local", "test.sleep", {"seconds": "30"}, ["localhost"])
    assert ref.master_id == "m1"
    events: list[dict] = []
    first = router.events(ref, 0, wait=5)
    assert first["events"][0]["kind"] == "accepted"
    pair.processes["m1"].kill()
    assert router.follow(ref, events.append) == "unknown"
    assert "not re-sent" in events[-1]["data"]["reason"]
    # The other master never heard of the job.
    with pytest.raises(Refused) as refused:
        router.links["m2"].call("events", {"job": ref.job_id, "after": 0})
    assert refused.value.code == "unknown_job"
    # Restarted, the first master reports it unknown too: it cannot know what the hosts did.
    pair.start("m1")
    reply = pair.router().events(ref, 0)
    assert reply["state"] == "unknown" and reply["done"]
    assert "master stopped" in reply["events"][-1]["data"]["reason"]


def test_status_and_cancel_go_to_the_jobs_master(pair) -> None:
    router = pair.router()
    pair.processes["m1"].stop()
    ref, _ = router.submit("local", "test.sleep", {"seconds": "30"}, ["localhost"])
    assert ref.master_id == "m2"
    pair.start("m1")  # m1 is first in line again, but the job lives on m2
    assert router.cancel(ref)["cancelled"] is True
    events: list[dict] = []
    assert router.follow(ref, events.append) == "cancelled"
    assert any(e["kind"] == "cancel_requested" for e in events)


def test_health_sweep_reports_every_master(pair) -> None:
    pair.processes["m2"].stop()
    report = {m["master"]: m for m in pair.router().health()}
    assert report["m1"]["ok"] and report["m1"]["idc"] == "local"
    assert not report["m2"]["ok"] and "ConnectionRefused" in report["m2"]["error"]
    out = pair.ombot("masters")
    assert out.returncode == 1 and "DOWN" in out.stdout and "up" in out.stdout


def test_pooled_connection_to_a_restarted_master_fails_over_cleanly(pair) -> None:
    router = pair.router()
    ref, _ = router.submit("local", "echo", {"message": "one"}, ["localhost"])
    assert ref.master_id == "m1" and router.follow(ref, lambda e: None) == "ok"
    pair.processes["m1"].stop()  # the router still holds an idle connection to m1
    ref, _ = router.submit("local", "echo", {"message": "two"}, ["localhost"])
    assert ref.master_id == "m2"
