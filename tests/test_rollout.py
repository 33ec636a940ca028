"""Rolling the audit agent out as a job (`audit.rollout`, `audit.remove`): the master's part
(masters/rollout.py), the on-host setup (masters/backends/agent_setup.py), and the fleet path end to end."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
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
from tests.rigs import ALERT_RULES, ALICE, ApprovalRig, AuditRig, approval, floor, policy, role, rule, stored
from tests.support import CLI_CLIENT, Cluster, type_line, wait_for

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


LEAD = "U0LEAD1"
ROLLOUT_POLICY = policy(role("ops", ALICE), role("leads", LEAD),
                        rule("the agent's rollout needs a lead", modules=["audit.rollout", "audit.remove"],
                             targets=["web*"], request=["ops"], max_hosts=100, approval=approval()))


class RolloutRig(ApprovalRig, AuditRig):
    """A site whose bot pulls the audit and asks a lead to approve the rollout."""

    def approved_job(self, text: str) -> tuple[str, dict[str, dict[str, Any]]]:
        """`/om TEXT` by Alice, approved by a lead: the job's final state at its master and each host's result."""
        pending = self.ask(text)
        self.approve(pending, LEAD).wait(f"Approved request #{pending.number}; its job starts now")
        card = self.final_card(pending.asked.number("Starting job #"), timeout=600)
        events = self.master_events(pending.request_id)
        results = {e["data"]["host"]: e["data"] for e in events if e["kind"] == "host"}
        state = next(e["data"]["state"] for e in events if e["kind"] == "finished")
        assert f"[#{pending.asked.number('Starting job #')} {state}]" in card["text"]
        return state, results

    def commands(self) -> set[str]:
        """The commands in the bot's own audit store."""
        return {command for _, command in self.stored()}


def ansible_with_a_wheelhouse(cluster: Cluster) -> None:
    """The masters run the Ansible backend and carry a wheelhouse (the agent's wheel built from this checkout)."""
    text = cluster.config_path.read_text()
    for mid in cluster.ports:
        text = text.replace(f'state_dir = "state-{mid}"', f'state_dir = "state-{mid}"\nbackend = "ansible"')
    cluster.config_path.write_text(text)
    house = cluster.root / "wheelhouse"
    made = cluster.ombot("audit", "wheelhouse", str(house), "--python", "3.11", timeout=600)
    if made.returncode != 0 and "pip download failed" in made.stderr:
        pytest.skip(f"no package index reachable to fill the wheelhouse: {made.stderr[-300:]}")
    assert made.returncode == 0, made.stderr
    for mid in cluster.ports:
        shutil.copytree(house, cluster.root / f"state-{mid}" / "wheelhouse")


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
def test_enrol_roll_out_ship_revoke_and_remove_across_ten_hosts(fleet: sshd.SshHosts,
                                                                 make_slack_rig: Callable[..., RolloutRig]) -> None:
    """One command enrols ten hosts; one job, approved in Slack by a lead (and demanded by the masters'
    own floor), installs the agent (keys made on the hosts, bound by the master, each host's first
    heartbeat checked); a re-run and a check run change nothing; each host's typed commands reach the
    bot's store without a restart; with the first master down, the second takes each key by the
    certificate the first signed; revoking one host is refused within seconds; `audit.remove` leaves
    every host as it was."""
    before = {h.name: h.snapshot(skip=HOST_NOISE) for h in fleet.hosts}
    rig = make_slack_rig({"local": ["m1", "m2"]}, kind=RolloutRig, policy=ROLLOUT_POLICY,
                         inventory=fleet.inventory(unreachable=None), admins=(CLI_CLIENT,),
                         prepare=ansible_with_a_wheelhouse, extra_toml=floor("m1", "m2", module="audit.*"),
                         files={"audit-rules.toml": ALERT_RULES}, audit_rules="audit-rules.toml", audit_poll_seconds=0.2)
    cluster = rig.cluster
    enrolled = cluster.ombot("audit", "enroll", "web[01-10]", "--idc", "local")
    assert enrolled.returncode == 0, enrolled.stderr
    with pytest.raises(Refused) as unapproved:  # the masters' own floor, whatever a client says
        cluster.run_job("audit.rollout", {}, FLEET)
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
    # m1 goes down: each agent shows m2, which never saw its key, the certificate m1 signed for it.
    cluster.processes["m1"].stop()
    for name in FLEET:
        type_in(fleet, name, f"echo failed-over-{name}")
    wait_for(lambda: all(any(d.get("command") == f"echo failed-over-{n}" for _, _, d in stored(cluster, "m2"))
                         for n in FLEET), within=90, why="every host's command stored at m2")
    cluster.start("m1")
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
    assert not any(d.get("command") == "echo after-revoke-web03" for _, _, d in stored(cluster, "m1") + stored(cluster, "m2"))

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
