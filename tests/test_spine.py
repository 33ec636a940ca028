"""The whole path through a real master process: submit, follow, results."""

from __future__ import annotations

from tests.support import Cluster


def collect(router, ref) -> tuple[str, list[dict]]:
    events: list[dict] = []
    state = router.follow(ref, events.append)
    return state, events


def test_echo_round_trip(router) -> None:
    ref, reply = router.submit("local", "echo", {"message": "hello; rm -rf /"}, ["localhost"])
    assert reply["duplicate"] is False and reply["job"]["id"] == ref.job_id
    state, events = collect(router, ref)
    assert state == "ok"
    hosts = [e["data"] for e in events if e["kind"] == "host"]
    assert [(h["host"], h["status"], h["stdout"]) for h in hosts] == [("localhost", "ok", "hello; rm -rf /\n")]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))


def test_facts_from_the_cli(cluster: Cluster) -> None:
    out = cluster.ombot("run", "facts", "localhost")
    assert out.returncode == 0, out.stderr
    assert '"memory_total_bytes"' in out.stdout and "state: ok" in out.stdout
