"""Rolling the audit agent out through the Salt backend (`audit.rollout`, `audit.remove`; the Salt side
of masters/backends/salt_job.py's AgentSetup, the wheels sent by salt_copy.py), end to end: a real
salt-master and minions whose roots are their own (tests/saltrig.py with private roots, as
tests/sshd.py's hosts), a real OMBot master on Salt.

From enrolment to a first command typed at a login shell on the minion stored at the master, then the
removal leaving the minion's tree as it was; the wheels go to both minions in one publish per chunk,
as the salt-master's job cache shows. tests/test_rollout.py does the same through Ansible.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ombot
from ombot.masters.backends import salt_copy
from tests import saltrig, sshd
from tests.rigs import stored
from tests.saltrig import salt_cluster
from tests.support import CLI_CLIENT, Cluster, type_line, wait_for

pytestmark = [pytest.mark.slow]
MINION = "minion1"
OTHER = "minion2"  # takes the wheels with MINION until one it cannot write: its copy fails, nothing else runs there
# What the minion's tree gains that is not the agent's: its own salt state lives in /tmp, Python's and
# pip's caches in root's home (the machine's, as on sshd hosts) and /var/cache.
NOISE = ("/tmp", "/root", "/var/log", "/var/cache", "/var/lib/dpkg", "/var/lib/apt", "/var/lib/systemd")


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[saltrig.SaltRig]:
    """A salt-master and two minions, each in a mount namespace of its own (its /etc, /opt, /var/lib ...)."""
    if not saltrig.available():
        pytest.skip("needs the salt extra (pip install 'ombot[salt]') and root, to run a salt-master and minions")
    if (why := sshd.private_roots_unavailable(tmp_path_factory.mktemp("probe"))) is not None:
        pytest.skip(f"a salt minion with a root of its own: {why}")
    started = saltrig.SaltRig(tmp_path_factory.mktemp("salt"), minions=[MINION, OTHER], private_roots=True).start()
    yield started
    started.stop()


@pytest.fixture
def cluster(rig: saltrig.SaltRig, tmp_path: Path) -> Iterator[Cluster]:
    """Master m1 on the Salt backend, carrying a wheelhouse (the agent's wheel built from this checkout);
    the CLI's key is an admin's (it enrols)."""
    made = salt_cluster(tmp_path / "c", rig, admins=(CLI_CLIENT,))
    house = made.root / "wheelhouse"
    filled = made.ombot("audit", "wheelhouse", str(house), "--python", "3.11", timeout=600)
    if filled.returncode != 0 and "pip download failed" in filled.stderr:
        pytest.skip(f"no package index reachable to fill the wheelhouse: {filled.stderr[-300:]}")
    assert filled.returncode == 0, filled.stderr
    shutil.copytree(house, made.root / "state-m1" / "wheelhouse")
    made.start("m1")
    yield made
    made.stop_all()


def in_minion(rig: saltrig.SaltRig, name: str, *argv: str) -> None:
    """Run `argv` in the minion's mount namespace (its own /opt)."""
    subprocess.run(["nsenter", "--target", str(rig.pid(name)), "--mount", *argv], check=True)


def copies(rig: saltrig.SaltRig) -> dict[str, dict[str, Any]]:
    """Every cp.recv_chunked job in the salt-master's job cache, by jid: its target and arguments."""
    listed = subprocess.run([str(saltrig.BIN / "salt-run"), "-c", str(rig.master_dir), "--out=json",
                             "jobs.list_jobs", "search_function=cp.recv_chunked"],
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr[-800:]
    return dict(json.loads(listed.stdout))


def type_in(rig: saltrig.SaltRig, name: str, line: str) -> None:
    """`line` typed at an interactive login shell in the minion's namespace (its /etc/profile.d hook records it)."""
    env = ["HOME=/root", "USER=root", "LOGNAME=root", "TERM=dumb", "PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"]
    type_line(["nsenter", "--target", str(rig.pid(name)), "--mount", "env", "-i", *env, "bash", "-il"], line)


def agents_running(rig: saltrig.SaltRig, name: str) -> list[str]:
    """The command lines of agent processes in the minion's namespace."""
    found = []
    for pid in sshd.in_namespace(rig.namespaces[name]):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"ombot-agent" in a for a in argv):
            found.append(" ".join(a.decode(errors="replace") for a in argv))
    return found


def job(cluster: Cluster, module: str, check: bool = False, minion: str = MINION) -> dict[str, Any]:
    """Run `module` on the minion through m1; the minion's result, which must be ok."""
    state, results, _ = cluster.run_job(module, {}, [minion], check=check)
    result = results[minion]
    assert state == "ok", (result["status"], result["error"], result["stdout"][-600:], result["stderr"][-800:])
    return result


def test_enrol_roll_out_ship_and_remove_on_a_salt_minion(rig: saltrig.SaltRig, cluster: Cluster) -> None:
    """`ombot audit enroll` the minion; `audit.rollout` through Salt installs the agent in the minion's own
    root (its key made there, bound by the master, its first heartbeat heard); a re-run and a check run
    change nothing; a command typed at a login shell on the minion is stored at the master; `audit.remove`
    stops the agent and leaves the minion's tree as it was."""
    before = rig.snapshot(MINION, skip=NOISE)
    enrolled = cluster.ombot("audit", "enroll", MINION, "--idc", "local")
    assert enrolled.returncode == 0, enrolled.stderr
    router = cluster.router()
    try:
        shown = router.preview("local", "audit.rollout", {}, MINION, check=False)
    finally:
        router.close()
    house = cluster.root / "state-m1" / "wheelhouse"
    wheels = sorted(p.name for p in house.glob("*.whl"))
    assert shown["steps"][1:] == [  # what this master would install, and where
        f"on each host: ombot-agent {ombot.__version__} into /opt/ombot-agent from {len(wheels)} wheels in {house}",
        f"on each host: /etc/ombot/agent.toml naming m1@127.0.0.1:{cluster.ports['m1']}; a key made there; the hook; "
        "the service", "then: each host's key bound here, and its first heartbeat awaited"]
    assert shown["salt"]["calls"] == [
        "cp.recv_chunked: the master's wheelhouse to /opt/ombot-agent/wheels/, as salt-cp --chunked does, one publish "
        "per chunk for all the hosts of a batch",
        "cmd.run_all [/usr/bin/python3, -c, AGENT_SETUP, MINION] (the request on stdin): install the OMBot audit agent "
        "(venv by /usr/bin/python3; docs/audit.md: Rolling the agent out)"]

    state, results, _ = cluster.run_job("audit.rollout", {"python": "/usr/bin/python3.99"}, [MINION])
    assert (state, results[MINION]["error"]) == ("failed", "command not found: the agent's setup (/usr/bin/python3.99)")
    blocked = wheels[-1]  # OTHER cannot write the last wheel: a directory stands where it goes
    in_minion(rig, OTHER, "mkdir", "-p", f"/opt/ombot-agent/wheels/{blocked}")
    state, results, _ = cluster.run_job("audit.rollout", {}, [MINION, OTHER])
    assert state == "partial" and results[MINION]["status"] == "ok", results[MINION]["error"]
    assert results[OTHER]["status"] == "failed"
    error = results[OTHER]["error"]
    assert error.startswith(f"copying the agent's wheels to /opt/ombot-agent/wheels failed at {blocked}: ")
    assert "Is a directory" in error
    cached = copies(rig)
    sent = [jid for jid in results[MINION]["data"]["salt"]["jids"] if jid in cached]
    chunks = [w for w in wheels for _ in range(max(1, math.ceil((house / w).stat().st_size / salt_copy.CHUNK_BYTES)))]
    assert [cached[jid]["Arguments"][0]["dest"] for jid in sent] == [f"/opt/ombot-agent/wheels/{w}" for w in chunks]
    together = chunks.index(blocked) + 1  # one publish per chunk to both, until OTHER's write failed
    targets = [sorted(cached[jid]["Target"]) for jid in sent]
    assert targets == [[MINION, OTHER]] * together + [[MINION]] * (len(sent) - together)
    assert results[OTHER]["data"]["salt"]["jids"] == sent[:together]  # no publish of its own, no setup run
    # A check run copies nothing and names the wheel that did not come (the others came intact).
    checked = job(cluster, "audit.rollout", check=True, minion=OTHER)["data"]["changes"]
    assert [c for c in checked if "copied" in c] == [f"would have copied the wheel /opt/ombot-agent/wheels/{blocked}"]
    data = results[MINION]["data"]
    assert data["public_key"] and data["heartbeat_at"] > 0 and data["version"] == ombot.__version__
    assert "started the agent" in data["changes"] and any("wrote /etc/ombot/agent.toml" in c for c in data["changes"])
    root = rig.host_root(MINION)
    assert (root / "etc" / "ombot" / "agent.key").stat().st_mode & 0o777 == 0o600
    assert f'host = "{MINION}"' in (root / "etc" / "ombot" / "agent.toml").read_text()
    assert agents_running(rig, MINION), "the agent runs in the minion's namespace"
    again = job(cluster, "audit.rollout")["data"]
    assert again["changes"] == [] and again["public_key"] == data["public_key"]  # the same key: made once
    assert job(cluster, "audit.rollout", check=True)["data"]["changes"] == []

    type_in(rig, MINION, "echo rolled-out-by-salt")
    wait_for(lambda: any(i.startswith(f"{MINION}:") and d.get("command") == "echo rolled-out-by-salt"
                         for i, _, d in stored(cluster, "m1")), within=60, why="the minion's command stored at m1")
    listed = cluster.ombot("audit", "agents", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {a["host"]: a["state"] for a in json.loads(listed.stdout)["agents"]}[MINION] == "bound"

    removed = job(cluster, "audit.remove")["data"]
    assert any("removed /opt/ombot-agent" in c for c in removed["changes"]), removed
    wait_for(lambda: not agents_running(rig, MINION), within=15, why="the agent stopped by the removal")
    after = rig.snapshot(MINION, skip=NOISE)
    assert sshd.changes(before, after) == []
    assert os.path.isdir(root / "etc") and not (root / "opt" / "ombot-agent").exists()
