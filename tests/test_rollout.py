"""Rolling the audit agent out as a job (`audit.rollout`, `audit.remove`): the master's part
(masters/rollout.py), the on-host setup (masters/backends/agent_setup.py), and the fleet path end to end."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import ombot
from ombot.masters import Refused
from ombot.masters.backends import agent_setup
from ombot.masters.rollout import AgentRollout, IdcMaster, RolloutError
from ombot.modules import AgentSetup, Plan, load_modules
from tests import sshd
from tests.fakeslack import TEAM_ID
from tests.rigs import ALICE, ApprovalRig, AuditRig, stored
from tests.support import Cluster, child_env, free_port, type_line, wait_for

MASTERS = [IdcMaster("m1", "127.0.0.1", 7000, "k" * 43 + "="), IdcMaster("m2", "::1", 7001, "j" * 43 + "=")]


def rollout(state: Path) -> AgentRollout:
    return AgentRollout(state, "bj", MASTERS, bind=lambda *a: None, wait_heartbeat=lambda *a: None)


def test_the_master_fills_in_the_wheelhouse_and_the_idcs_agent_toml(tmp_path: Path) -> None:
    house = tmp_path / "wheelhouse"
    house.mkdir()
    (house / "ombot_agent-0.2.0-py3-none-any.whl").write_bytes(b"agent")
    (house / "rpyc-6.0.2-py3-none-any.whl").write_bytes(b"rpyc")
    (house / "notes.txt").write_text("not a wheel")
    plan = load_modules([])["audit.rollout"].run(auditd=True, python="/usr/bin/python3")
    filled = rollout(tmp_path).fill(plan, check=False)
    step = filled.steps[0]
    assert isinstance(step, AgentSetup) and step.payload is not None
    request = json.loads(step.payload)
    assert request["action"] == "install" and request["version"] == "0.2.0" and request["auditd"] is True
    assert request["wheels"] == {"ombot_agent-0.2.0-py3-none-any.whl": hashlib.sha256(b"agent").hexdigest(),
                                 "rpyc-6.0.2-py3-none-any.whl": hashlib.sha256(b"rpyc").hexdigest()}
    assert step.wheelhouse == str(house)  # the backend copies it over (Ansible's copy, Salt's cp.recv_chunked):
    assert set(request) == {"action", "check", "version", "auditd", "agent_toml", "wheels"}  # no wheel's bytes
    toml = request["agent_toml"]
    assert '\nhost = "@HOST@"' in toml and 'address = "127.0.0.1:7000"' in toml and 'address = "[::1]:7001"' in toml
    assert toml.index('id = "m1"') < toml.index('id = "m2"')  # failover order
    assert filled.parse is agent_setup.reply  # the host's reply becomes the result's data
    removal = rollout(tmp_path).fill(Plan(AgentSetup("remove")), check=True)
    assert json.loads(removal.steps[0].payload or "{}")["wheels"] == {}  # a removal carries no wheels


def test_a_wheel_is_hashed_again_only_when_its_size_or_mtime_changed(tmp_path: Path) -> None:
    """The master keeps each wheel's sha256 by (name, size, mtime): a job or preview reads only changed wheels."""
    (tmp_path / "wheelhouse").mkdir()
    wheel = tmp_path / "wheelhouse" / "ombot_agent-0.2.0-py3-none-any.whl"
    wheel.write_bytes(b"agent")
    master, plan = rollout(tmp_path), Plan(AgentSetup("install"))

    def digest() -> str:
        return str(json.loads(master.fill(plan, check=False).steps[0].payload or "{}")["wheels"][wheel.name])

    assert digest() == hashlib.sha256(b"agent").hexdigest()
    was = wheel.stat()
    wheel.write_bytes(b"AGENT")  # the same size; its mtime put back: not read again
    os.utime(wheel, ns=(was.st_atime_ns, was.st_mtime_ns))
    assert digest() == hashlib.sha256(b"agent").hexdigest()
    os.utime(wheel, ns=(was.st_atime_ns, was.st_mtime_ns + 1_000_000))
    assert digest() == hashlib.sha256(b"AGENT").hexdigest()


@pytest.mark.parametrize("wheels, why", [
    ([], "exactly one ombot-agent wheel (it has 0)"),
    (["ombot_agent-0.1.0-py3-none-any.whl", "ombot_agent-0.2.0-py3-none-any.whl"], "(it has 2)"),
])
def test_a_wheelhouse_without_exactly_one_agent_wheel_is_refused(tmp_path: Path, wheels: list[str], why: str) -> None:
    (tmp_path / "wheelhouse").mkdir()
    for name in wheels:
        (tmp_path / "wheelhouse" / name).write_bytes(b"x")
    with pytest.raises(RolloutError, match="ombot audit wheelhouse") as refused:
        rollout(tmp_path).fill(Plan(AgentSetup("install")), check=False)
    assert why in str(refused.value)


def test_the_hosts_reply_is_read_from_its_last_marked_line() -> None:
    out = "made the venv\n" + agent_setup.REPLY_MARK + json.dumps({"public_key": "PK", "changes": ["x"]}) + "\n"
    assert agent_setup.reply(out) == {"public_key": "PK", "changes": ["x"]}
    assert agent_setup.reply("no reply at all\n") == {}


# -- the fleet path, through real processes -----------------------------------------------------------

FLEET = [f"web{n:02d}" for n in range(1, 11)]
HOST_NOISE = ("/tmp", "/root", "/var/log", "/var/cache", "/var/lib/dpkg", "/var/lib/apt", "/var/lib/systemd")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sshd.SshHosts]:
    """Ten sshd hosts, each with a root of its own (tests/sshd.py): what a rollout installs stays theirs."""
    if not sshd.available():
        pytest.skip("needs openssh-server (sshd)")
    why = sshd.private_roots_unavailable(tmp_path_factory.mktemp("probe"))
    if why:
        pytest.skip(f"sshd hosts with roots of their own: {why}")
    hosts = sshd.SshHosts(tmp_path_factory.mktemp("fleet"), FLEET, private_roots=True).start()
    yield hosts
    hosts.stop()


LEAD = "U0LEAD1"  # a lead in `ombot init`'s sample policy


class RolloutRig(ApprovalRig, AuditRig):
    """A site whose bot pulls the audit and asks a lead to approve the rollout."""

    def approved_job(self, text: str) -> tuple[str, dict[str, dict[str, Any]]]:
        """`/om TEXT` by Alice, approved by a lead: the job's final state at its master and each host's result."""
        pending = self.ask(text)
        self.approve(pending, LEAD).wait(f"Approved request #{pending.number}; its job starts now")
        card = self.final_card(pending.asked.number("Starting job #"), timeout=600)
        events = self.master_events(pending.request_id, FIRST_MASTER)
        results = {e["data"]["host"]: e["data"] for e in events if e["kind"] == "host"}
        state = next(e["data"]["state"] for e in events if e["kind"] == "finished")
        assert f"[#{pending.asked.number('Starting job #')} {state}]" in card["text"]
        return state, results

    def commands(self) -> set[str]:
        """The commands in the bot's own audit store."""
        return {command for _, command in self.stored()}


FIRST_MASTER, SECOND_MASTER = "local-1", "local-2"  # `ombot init`'s master, and the one the user adds


def ombot_in(root: Path, *args: str, timeout: float = 60) -> str:
    """`ombot ARGS` run in `root` as its user would; its output (it must succeed)."""
    done = subprocess.run([sys.executable, "-m", "ombot", *args], cwd=root, capture_output=True, text=True,
                          timeout=timeout, env=child_env())
    if done.returncode != 0 and "pip download failed" in done.stderr:
        pytest.skip(f"no package index reachable to fill the wheelhouse: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr
    return done.stdout


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path.name} no longer holds {old!r}"
    path.write_text(text.replace(old, new, 1))


def site_from_init(root: Path, fleet: sshd.SshHosts) -> Cluster:
    """A fresh `ombot init`, then only what a user does for this (README, docs/audit.md): the Slack
    team and port, a Slack user among the ops, the fleet's inventory, the Ansible backend, a second
    master for the IDC (a key from `ombot keygen`), and a wheelhouse on each master."""
    ombot_in(root.parent, "init", root.name, "--master-port", str(free_port()))
    config = root / "ombot.toml"
    second = ombot_in(root, "keygen", SECOND_MASTER).strip()
    cli = tomllib.loads(config.read_text())["client"]["id"]
    edit(config, '# team_id = "T0123456"', f'team_id = "{TEAM_ID}"')
    edit(config, 'listen = "127.0.0.1:3000"', f'listen = "127.0.0.1:{free_port()}"')
    edit(config, 'backend = "local"', 'backend = "ansible"')
    edit(config, f'masters = ["{FIRST_MASTER}"]', f'masters = ["{FIRST_MASTER}", "{SECOND_MASTER}"]')
    config.write_text(config.read_text() + f"""
[masters.{SECOND_MASTER}]
idc = "local"
address = "127.0.0.1:{free_port()}"
public_key = "{second}"
key_file = "keys/{SECOND_MASTER}.key"
inventory = "inventory/local.ini"
backend = "ansible"
accept = ["bot", "console", "{cli}"]
state_dir = "state-2"

[masters.{SECOND_MASTER}.approvals]
"audit.*" = 1
""")
    edit(root / "policy.toml", "[roles.ops]\nusers = [", f'[roles.ops]\nusers = ["{ALICE}", ')
    (root / "inventory" / "local.ini").write_text(fleet.inventory(unreachable=None))
    ombot_in(root, "audit", "wheelhouse", "state/wheelhouse", "--python", "3.11", timeout=600)
    shutil.copytree(root / "state" / "wheelhouse", root / "state-2" / "wheelhouse")
    return Cluster.adopt(root)


@pytest.fixture
def site(tmp_path: Path, fleet: sshd.SshHosts) -> Iterator[Cluster]:
    """The user's site with both masters started."""
    cluster = site_from_init(tmp_path / "site", fleet)
    try:
        for master in cluster.ports:
            cluster.start(master)
        yield cluster
    finally:
        cluster.stop_all()


def type_in(hosts: sshd.SshHosts, name: str, line: str) -> None:
    """`line` typed at an interactive login shell on host `name` (its hook records it)."""
    host = hosts.host(name)
    type_line(["ssh", "-tt", "-i", str(hosts.client_key), "-p", str(host.port), "-o", "BatchMode=yes",
               "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
               "-o", "LogLevel=ERROR", f"{hosts.user}@{host.address}", "bash", "-il"], line)


def failed(results: dict[str, dict[str, Any]]) -> dict[str, tuple[Any, ...]]:
    return {h: (r["status"], r["error"], r["stdout"][-400:], r["stderr"][-600:]) for h, r in results.items()
            if r["status"] != "ok"}


@pytest.mark.slow
def test_enrol_roll_out_ship_revoke_and_remove_across_ten_hosts(fleet: sshd.SshHosts, site: Cluster,
                                                                 make_slack_rig: Callable[..., RolloutRig]) -> None:
    """From a fresh `ombot init` (site_from_init): one command enrols ten hosts; one job, approved in Slack by a lead (and demanded by the masters'
    own floor), installs the agent (keys made on the hosts, bound by the master, each host's first
    heartbeat checked); a re-run and a check run change nothing; each host's typed commands reach the
    bot's store without a restart; with the first master down, the second takes each key by the
    certificate the first signed; revoking one host is refused within seconds; `audit.remove` leaves
    every host as it was."""
    before = {h.name: h.snapshot(skip=HOST_NOISE) for h in fleet.hosts}
    rig = make_slack_rig(cluster=site, kind=RolloutRig)
    cluster = rig.cluster
    enrolled = cluster.ombot("audit", "enroll", "web[01-10]", "--idc", "local")
    assert enrolled.returncode == 0, enrolled.stderr
    assert enrolled.stdout.count("10 enrolled pending") == 2, enrolled.stdout  # at both masters, no restart
    conf = cluster.config()
    assert conf.client is not None
    router = cluster.router(f"cli:{conf.clients[conf.client.id].user}", client=conf.client.id)
    try:
        with pytest.raises(Refused) as unapproved:  # the masters' own floor, whatever a client says
            router.submit("local", "audit.rollout", {}, FLEET)
    finally:
        router.close()
    assert unapproved.value.code == "approval_required"

    state, results = rig.approved_job("audit.rollout web[01-10]")
    assert state == "ok", failed(results)
    for name, result in results.items():
        data = result["data"]
        assert data["heartbeat_at"] > 0 and data["public_key"] and data["version"] == ombot.__version__
        assert "started the agent" in data["changes"] and any("wrote /etc/ombot/agent.toml" in c for c in data["changes"])
        root = fleet.host(name).root
        assert root is not None and (root / "etc" / "ombot" / "agent.key").stat().st_mode & 0o777 == 0o600
    keys = {name: r["data"]["public_key"] for name, r in results.items()}
    again, rerun = rig.approved_job("audit.rollout web[01-10]")
    assert again == "ok" and {n: r["data"]["changes"] for n, r in rerun.items()} == {n: [] for n in FLEET}
    assert {n: r["data"]["public_key"] for n, r in rerun.items()} == keys  # the same keys: made once
    checked, dry = rig.approved_job("audit.rollout web[01-10] check=yes")
    assert checked == "ok" and {n: r["data"]["changes"] for n, r in dry.items()} == {n: [] for n in FLEET}

    for name in FLEET:
        type_in(fleet, name, f"echo rolled-out-{name}")
    wait_for(lambda: {f"echo rolled-out-{n}" for n in FLEET} <= rig.commands(), within=60,
             why="every host's command in the bot's store")
    # The first master goes down: each agent shows the second, which never saw its key, the
    # certificate the first signed for it.
    cluster.processes[FIRST_MASTER].stop()
    for name in FLEET:
        type_in(fleet, name, f"echo failed-over-{name}")
    wait_for(lambda: all(any(d.get("command") == f"echo failed-over-{n}" for _, _, d in stored(cluster, SECOND_MASTER))
                         for n in FLEET), within=90, why="every host's command stored at the second master")
    cluster.start(FIRST_MASTER)
    listed = cluster.ombot("audit", "agents", "--json")
    assert listed.returncode == 0, listed.stderr
    agents = {a["host"]: a for a in json.loads(listed.stdout)["agents"]}
    assert {h: agents[h]["state"] for h in FLEET} == {h: "bound" for h in FLEET}

    revoked = cluster.ombot("audit", "revoke", "web03")
    assert revoked.returncode == 0, revoked.stderr
    type_in(fleet, "web03", "echo after-revoke-web03")
    type_in(fleet, "web04", "echo after-revoke-web04")
    wait_for(lambda: "echo after-revoke-web04" in rig.commands(), within=30, why="web04 still ships")
    time.sleep(3)
    assert not any(d.get("command") == "echo after-revoke-web03" for _, _, d in stored(cluster, FIRST_MASTER) + stored(cluster, SECOND_MASTER))

    gone, removal = rig.approved_job("audit.remove web[01-10]")
    assert gone == "ok", failed(removal)
    after = {h.name: h.snapshot(skip=HOST_NOISE) for h in fleet.hosts}
    assert {n: sshd.changes(before[n], after[n]) for n in FLEET} == {n: [] for n in FLEET}


def test_the_preview_says_what_a_rollout_installs_and_where(tmp_path: Path) -> None:
    """What a master shows before a rollout: the agent's version and wheels, the masters its agent.toml
    names; without a wheelhouse, why it cannot roll out."""
    assert rollout(tmp_path).describe(True) == [
        f"cannot roll out from this master: the wheelhouse {tmp_path / 'wheelhouse'} must hold exactly one ombot-agent "
        f"wheel (it has 0): fill it with `ombot audit wheelhouse {tmp_path / 'wheelhouse'}`"]
    (tmp_path / "wheelhouse").mkdir()
    (tmp_path / "wheelhouse" / "ombot_agent-0.2.0-py3-none-any.whl").write_bytes(b"agent")
    shown = rollout(tmp_path).describe(True)
    assert shown[0] == f"on each host: ombot-agent 0.2.0 into /opt/ombot-agent from 1 wheels in {tmp_path / 'wheelhouse'}"
    assert "naming m1@127.0.0.1:7000, m2@::1:7001" in shown[1]
    assert "remove" in rollout(tmp_path).describe(False)[0]
