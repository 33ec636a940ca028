"""Who is asking, as the master sees it: each client has its own key and registration, and the master
maps the key to who it is. Requests that name someone their key does not vouch for are refused.

The attacks: any CLI operator holding the one shared key could name any requester and any
approvers (`approvers=["U0NOBODY"]` passed the master's approval floor), requester spoofs like
`"U0MALLORY "` and `u0mallory` passed, and `LOGNAME=U0LEAD1 ombot run ...` ran as `cli:U0LEAD1`.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import sqlite3
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pexpect
import pytest

from ombot.masters import Refused, Router
from tests.rigs import console
from tests.support import Cluster, MasterProcess, child_env, free_port

LEAD1 = "U0LEAD1"


def master_jobs(cluster: Cluster, master_id: str = "m1") -> list[tuple[str, str, str]]:
    """(sender, requester, approvers) of every job, straight from the master's database."""
    path = cluster.config().masters[master_id].database_url.split("///", 1)[1]
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return db.execute("SELECT sender, requester, approvers FROM job ORDER BY created_at").fetchall()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("identities"), {"local": ["m1"]},
                      extra_toml='[masters.m1.approvals]\n"shell.exec" = 1\n')
    cluster.start("m1")
    yield cluster
    cluster.stop_all()


@contextlib.contextmanager
def router(cluster: Cluster, requester: str, origin: str | None = None, client: str | None = None) -> Iterator[Router]:
    r = cluster.router(requester, origin, client)
    try:
        yield r
    finally:
        r.close()


def refusal(cluster: Cluster, requester: str, client: str, origin: str | None = None, **submit: object) -> Refused:
    args = {"module": "echo", "params": {"message": "x"}, "hosts": ["localhost"], **submit}
    with router(cluster, requester, origin, client) as r, pytest.raises(Refused) as refused:
        r.submit("local", str(args.pop("module")), args.pop("params"), args.pop("hosts"), **args)  # type: ignore[arg-type]
    return refused.value


# -- the CLI key is one fixed person -------------------------------------------------------------------


def test_the_cli_key_cannot_name_another_requester(shared: Cluster) -> None:
    for spoof in ("U0LEAD1", "cli:U0LEAD1", "cli:test ", "CLI:test", "cli:other"):
        refused = refusal(shared, spoof, client="test", origin="cli")
        assert refused.code == "bad_requester" and "acts as cli:test" in refused.message, spoof
    assert master_jobs(shared) == [] or all(row[1] == "cli:test" for row in master_jobs(shared))


def test_the_cli_key_cannot_carry_approvers(shared: Cluster) -> None:
    before = len(master_jobs(shared))
    refused = refusal(shared, "cli:test", client="test", module="shell.exec", params={"cmd": "id"},
                      approvers=["U0NOBODY"])
    assert refused.code == "bad_requester" and "only a chat client may name approvers" in refused.message
    assert len(master_jobs(shared)) == before  # nothing recorded, nothing ran


def test_the_cli_identity_never_comes_from_the_environment(shared: Cluster) -> None:
    env = child_env({"LOGNAME": LEAD1, "USER": LEAD1})
    result = subprocess.run([sys.executable, "-m", "ombot", "--config", str(shared.config_path), "run", "echo",
                             "localhost", "message=who"], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert master_jobs(shared)[-1][:2] == ("test", "cli:test")


# -- the bot attests chat users, in canonical form ---------------------------------------------------


@pytest.mark.parametrize("spoof", ["U0MALLORY ", " U0MALLORY", "u0mallory", "U0Mallory", "U0MAL\u200bLORY",
                                   "U0MALLORY\n", "cli:test", "console:root", ""])
def test_the_bot_names_only_canonical_slack_users(shared: Cluster, spoof: str) -> None:
    refused = refusal(shared, spoof, client="bot", origin="slack")
    assert refused.code in ("bad_requester", "bad_request"), refused


@pytest.mark.parametrize("approver", ["u0lead1", "U0LEAD1 ", "", "cli:test"])
def test_approvers_are_canonical_slack_users(shared: Cluster, approver: str) -> None:
    refused = refusal(shared, "U0ALICE", client="bot", origin="slack", module="shell.exec", params={"cmd": "id"},
                      approvers=[approver])
    assert refused.code == "bad_request" and "not a Slack user id" in refused.message


def test_the_bot_may_name_chat_users_and_their_approvers(shared: Cluster) -> None:
    with router(shared, "U0ALICE", client="bot") as r:
        ref, _ = r.submit("local", "shell.exec", {"cmd": "true"}, ["localhost"], approvers=[LEAD1], requester="U0ALICE")
        assert r.follow(ref, lambda event: None) == "ok"
    assert master_jobs(shared)[-1] == ("bot", "U0ALICE", f'["{LEAD1}"]')


def test_a_chat_client_speaks_only_from_chat_origins(shared: Cluster) -> None:
    assert refusal(shared, "U0ALICE", client="bot", origin="cli").code == "bad_requester"


# -- what a registration may run -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def narrow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The CLI key registered for `echo` on web hosts only."""
    cluster = Cluster(tmp_path_factory.mktemp("narrow"), {"local": ["m1"]})
    text = cluster.config_path.read_text()
    test_table = text.split("[clients.test]", 1)[1].split("\n\n", 1)[0]
    cluster.config_path.write_text(text.replace(test_table, test_table.replace(
        'modules = ["*"]', 'modules = ["echo"]').replace('hosts = ["*"]', 'hosts = ["web*"]')))
    cluster.start("m1")
    yield cluster
    cluster.stop_all()


def test_a_registration_limits_modules_and_hosts(narrow: Cluster) -> None:
    assert narrow.config().clients["test"].modules == ("echo",)
    with router(narrow, "cli:test") as r:
        with pytest.raises(Refused) as refused:
            r.submit("local", "facts", {}, ["web01"])
        assert refused.value.code == "not_permitted" and "may not run facts" in refused.value.message
        with pytest.raises(Refused) as refused:
            r.submit("local", "echo", {"message": "x"}, ["web01", "localhost"])
        assert refused.value.code == "not_permitted" and refused.value.details["hosts"] == ["localhost"]
        ref, _ = r.submit("local", "echo", {"message": "x"}, ["web01"])
        assert r.follow(ref, lambda event: None) == "ok"
    assert [row[1] for row in master_jobs(narrow)] == ["cli:test"]  # only the permitted job exists


def test_the_cli_obeys_its_registration_without_any_policy(narrow: Cluster) -> None:
    # No [bot] policy in this config: the CLI's own policy check is skipped, the master still refuses.
    result = narrow.ombot("run", "facts", "web01")
    assert result.returncode == 2 and "refused (not_permitted)" in result.stderr, result.stdout + result.stderr


# -- ombot init: one key per client, and how to revoke one ----------------------------------------------


def ombot(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ombot", *args], capture_output=True, text=True, timeout=60,
                          env=child_env(), **kw)  # type: ignore[call-overload]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[Path, MasterProcess]]:
    target = tmp_path / "site"
    assert ombot("init", str(target), "--master-port", str(free_port())).returncode == 0
    master = MasterProcess(SimpleNamespace(root=tmp_path, config_path=target / "ombot.toml"), "local-1", {})  # type: ignore[arg-type]
    master.start()
    yield target / "ombot.toml", master
    master.stop()


@pytest.mark.slow
def test_init_gives_each_client_its_own_key(site: tuple[Path, MasterProcess]) -> None:
    config, _ = site
    raw = tomllib.loads(config.read_text())
    user = pwd.getpwuid(os.getuid()).pw_name
    cli_id = raw["client"]["id"]
    assert {cid: c["kind"] for cid, c in raw["clients"].items()} == {"bot": "chat", "console": "console", cli_id: "cli"}
    publics = {c["public_key"] for c in raw["clients"].values()}
    assert len(publics) == 3  # three keys, not one shared
    assert raw["masters"]["local-1"]["accept"] == ["bot", "console", cli_id]
    assert "console_allow_as" not in raw["bot"] and "console_user" not in raw["bot"]  # /as is the demo's only
    run = ombot("--config", str(config), "run", "echo", "localhost", "message=hi")
    assert run.returncode == 0, run.stdout + run.stderr
    path = config.parent / "state" / "local-1.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT sender, requester FROM job").fetchall() == [(cli_id, f"cli:{user}")]


@pytest.mark.slow
def test_the_console_acts_as_itself(site: tuple[Path, MasterProcess]) -> None:
    config, _ = site
    user = pwd.getpwuid(os.getuid()).pw_name
    with console(SimpleNamespace(config_path=config, root=config.parent)) as child:  # type: ignore[arg-type]
        child.expect_exact(f"OMBot console: you are console:{user}.")
        child.sendline("/as U0LEAD1")
        child.expect_exact("/as is disabled")
        child.sendline("/om echo localhost message=from-console")
        child.expect_exact("Starting job #1")
        child.expect(r"\[#1 ok\]")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    with contextlib.closing(sqlite3.connect(config.parent / "state" / "local-1.db")) as db:
        assert db.execute("SELECT sender, requester, origin FROM job").fetchall() == [
            ("console", f"console:{user}", "console")]


@pytest.mark.slow
def test_a_revoked_client_is_refused(site: tuple[Path, MasterProcess]) -> None:
    config, master = site
    cli_id = tomllib.loads(config.read_text())["client"]["id"]
    assert ombot("--config", str(config), "masters").returncode == 0
    text = config.read_text()
    config.write_text(text.replace(f'accept = ["bot", "console", "{cli_id}"]', 'accept = ["bot", "console"]'))
    master.stop()
    master.start()
    result = ombot("--config", str(config), "run", "echo", "localhost", "message=hi")
    assert result.returncode == 2 and "refused (unknown_sender)" in result.stderr, result.stdout + result.stderr
