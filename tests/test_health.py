"""Issue 21, health: /healthz and /readyz of a real master and a real bot, and `ombot health` through the
real CLI with its exit codes (0 ready, 1 not ready, 2 unreachable or no ops_listen). A master is not
ready while its database is away; a bot is not ready while no master of an IDC answers, or while Slack
refuses its token; each is ready again once that is over."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any

import pytest

from tests.rigs import SlackRig
from tests.support import Cluster, free_port, wait_for
from tests.scrape import get, master_ops

BAD_TOKEN = "xoxb-0000-refused-by-the-fake"


def readyz(port: int) -> tuple[int, dict[str, Any]]:
    status, _, body = get(port, "/readyz")
    return status, json.loads(body)


def failing(port: int) -> set[str]:
    """The checks /readyz says fail now (none: ready)."""
    status, answer = readyz(port)
    assert (status == 200) == answer["ready"]
    return {name for name, check in answer["checks"].items() if not check["ok"]}


def health(cluster: Cluster, *args: str) -> tuple[int, str]:
    done = cluster.ombot("health", *args)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, done.stdout


def test_a_master_is_ready_only_while_its_database_answers(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster({"local": ["m1", "m2"]})  # m2 has no ops_listen, and never starts
    port = free_port()
    master_ops(cluster, "m1", port)
    cluster.start("m1")
    assert get(port, "/healthz")[::2] == (200, "ok\n")
    assert failing(port) == set()
    code, out = health(cluster, "--master", "m1")
    assert code == 0 and out.split() == ["master", "m1", f"127.0.0.1:{port}", "ready:", "database,", "listener", "ok"]

    state = cluster.master_db("m1").parent
    state.rename(state.with_name("away"))  # the master's SQLite file is gone from where it opens it
    try:
        assert failing(port) == {"database"}
        answer = readyz(port)[1]["checks"]["database"]
        assert answer["detail"] == "OperationalError: unable to open database file", answer
        assert get(port, "/healthz")[0] == 200  # alive all the same
        code, out = health(cluster, "--master", "m1", "--json")
        [probe] = json.loads(out)
        assert code == 1 and probe["status"] == "not_ready" and probe["checks"]["listener"]["ok"] is True
    finally:
        state.with_name("away").rename(state)
    assert failing(port) == set()

    code, out = health(cluster)  # every master of ombot.toml (it has no [bot])
    assert code == 2 and "m1" in out and "master m2" in out and "no ops_listen configured for it" in out
    cluster.processes["m1"].stop()
    code, out = health(cluster, "--master", "m1", "--timeout", "2")
    assert code == 2 and "unreachable: [Errno 111] Connection refused" in out, out


@pytest.mark.slow
def test_a_bot_is_ready_while_masters_and_slack_answer(make_slack_rig: Callable[..., SlackRig]) -> None:
    port = free_port()
    rig = make_slack_rig(ops_listen=f"127.0.0.1:{port}")
    cluster = rig.cluster
    wait_for(lambda: failing(port) == set(), why="the bot ready")
    assert health(cluster, "--bot")[0] == 0
    assert health(cluster)[0] == 2  # m1 has no ops_listen here

    cluster.processes["m1"].stop()
    wait_for(lambda: failing(port) == {"masters"}, why="the masters' check failing")
    assert readyz(port)[1]["checks"]["masters"]["detail"] == "no master of local answers"
    code, out = health(cluster, "--bot")
    assert code == 1 and "not ready: masters: no master of local answers" in out, out
    cluster.start("m1")
    wait_for(lambda: failing(port) == set(), why="the bot ready again")

    rig.bot.stop()
    rig.start_bot(env={"SLACK_BOT_TOKEN": BAD_TOKEN})  # HTTP mode: nothing calls Slack until /readyz asks
    wait_for(lambda: get(port, "/healthz")[0] == 200, why="the bot's listener")
    wait_for(lambda: failing(port) == {"slack"}, why="Slack's check failing")
    _, _, body = get(port, "/readyz")
    assert "auth.test: invalid_auth" in body and BAD_TOKEN not in body


@pytest.mark.slow
def test_a_socket_mode_bot_is_ready_once_connected(make_slack_rig: Callable[..., SlackRig]) -> None:
    port = free_port()
    make_slack_rig(socket_mode=True, ops_listen=f"127.0.0.1:{port}")
    wait_for(lambda: failing(port) == set(), why="the bot ready")
    assert readyz(port)[1]["checks"]["slack"]["detail"] == "Socket Mode connected"


def test_a_port_the_listener_cannot_take_is_logged_and_the_master_serves_on(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        master_ops(cluster, "m1", taken.getsockname()[1])
        master = cluster.start("m1")
        assert "cannot serve /metrics, /healthz and /readyz on 127.0.0.1" in master.log()
        assert cluster.run_job("echo", {"message": "still here"}, ["localhost"])[0] == "ok"
