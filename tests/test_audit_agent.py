"""Shell audit, capture and first hop (issue 11): the bash hook in a real pty, the agent daemon as a
real process, a real master storing what it ships, and the attacks on the ingest operation."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import rpyc

from ombot.audit_agent import hook, spool
from ombot.envelope import Peer, Refused, new_request
from ombot.keys import Identity, decode_public
from tests.rigs import AGENT, HOST, UID, AgentProcess, agent_cluster, event, stored, write_records
from tests.shells import PROMPT, Shell
from tests.support import REPO, Cluster, child_env, wait_for

pytestmark = pytest.mark.slow


# -- helpers -----------------------------------------------------------------------------------------


def installed(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "root"
    subprocess.run([sys.executable, "-m", "ombot.audit_agent", "install", "--root", str(root)], check=True,
                   env=child_env(), capture_output=True)
    return root, root / hook.DEFAULT_SPOOL_DIR.lstrip("/")


def spooled(spool_dir: Path) -> list[dict[str, Any]]:
    """The command records now in the spool, as the agent reads them."""
    events = [e for chunk in spool.scan(spool_dir, {}, set()) for e in chunk.events]
    return [data for kind, _, data in events if kind == "command"]


def commands(spool_dir: Path) -> list[str]:
    return [e["command"] for e in spooled(spool_dir)]


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.stop(signal.SIGKILL)


# -- capture ---------------------------------------------------------------------------------------


def test_install_writes_the_hook_once_and_never_touches_the_real_etc(tmp_path: Path) -> None:
    root, spool_dir = installed(tmp_path)
    installed(tmp_path)  # again: still one line in bash.bashrc
    assert (root / hook.BASHRC).read_text().count(hook.MARKER) == 1
    assert (root / hook.PROFILE_LOADER).exists() and (root / hook.HOOK_BODY).exists()
    assert oct(spool_dir.stat().st_mode & 0o7777) == "0o1733"
    assert str(root) in (root / hook.HOOK_BODY).read_text()
    # the loader is POSIX sh (dash sources /etc/profile.d too) and skips non-bash shells
    dash = subprocess.run(["sh", "-c", f". {root / hook.PROFILE_LOADER}; echo loaded"], capture_output=True, text=True)
    assert dash.stdout.strip() == "loaded" and not dash.stderr


def test_typed_commands_arrive_once_with_their_fields(tmp_path: Path) -> None:
    root, spool_dir = installed(tmp_path)
    shell = Shell(root, tmp_path / "home", theme=True)
    shell.run("echo one | cat")
    shell.run("")  # a re-displayed prompt records nothing
    shell.run("cd /tmp && false")
    shell.run("echo 'a*b'")  # no glob expansion of the recorded text
    theme_runs = shell.run("echo runs=$THEME_RUNS")
    shell.close()
    assert "runs=5" in theme_runs  # the theme appended to PROMPT_COMMAND still runs at every prompt
    records = spooled(spool_dir)
    assert [r["command"] for r in records] == ["echo one | cat", "cd /tmp && false", "echo 'a*b'", "echo runs=$THEME_RUNS"]
    first, second = records[0], records[1]
    assert first["uid"] == UID and first["exit"] == 0 and second["exit"] == 1
    assert first["cwd"] == str(tmp_path / "home") and second["cwd"] == str(tmp_path / "home")  # where it started
    assert first["logname"] == "tester" and first["ssh_client"] == "192.0.2.7" and first["tty"].startswith("/dev/")
    assert first["pid"] == shell.child.pid and first["seen"] == "history"
    mode = (spool_dir / str(UID)).stat()
    assert mode.st_uid == UID and oct(mode.st_mode & 0o777) == "0o700"


def test_what_the_hook_still_sees_after_evasion_attempts(tmp_path: Path) -> None:
    """Still captured: a child bash (it arms itself again), `unset PROMPT_COMMAND` (the DEBUG trap
    puts the hook back, and the unset line comes from history), `set +o history` and a leading
    space under HISTCONTROL=ignorespace (the DEBUG trap saw what bash ran). Not captured: `exec` of
    a shell that skips its rc files; only the auditd layer (docs/audit.md) sees that."""
    root, spool_dir = installed(tmp_path)
    shell = Shell(root, tmp_path / "home")
    shell.run("bash")  # a child shell reads /etc/bash.bashrc (the test root's) again: armed again
    shell.run("unset PROMPT_COMMAND")
    shell.run("echo after-unset")
    shell.run("set +o history")
    shell.run("echo history-off")
    shell.run("set -o history")
    shell.run("HISTCONTROL=ignorespace")
    shell.run(" echo leading-space")
    shell.child.sendline("exec bash --norc --noprofile")
    shell.child.expect(r"bash-[0-9.]+[#$] ")
    shell.run(f"PS1='{PROMPT}'")
    shell.run("echo after-exec")
    shell.run("exit")  # back in the first shell
    shell.close()
    seen = commands(spool_dir)
    for captured in ("bash", "unset PROMPT_COMMAND", "echo after-unset", "echo history-off", "echo leading-space",
                     "exec bash --norc --noprofile"):
        assert any(c == captured for c in seen), (captured, seen)
    assert not any("after-exec" in c for c in seen)
    assert len(seen) == len(set(seen))  # each once


def test_another_users_spool_is_not_believed(tmp_path: Path) -> None:
    """The uid is the directory's and file's owner: a directory named for uid 4242 but owned by us
    is reported, never read as 4242's commands; a symlinked spool is not followed."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    forged = spool_dir / "4242"
    forged.mkdir()
    (forged / "spool").write_text("om1\t1.0\t1\t1\t0\thistory\t4242\t\troot\t\t\t/\trm -rf /\t8\n")
    mine = spool_dir / str(UID)
    mine.mkdir()
    secret = tmp_path / "secret"
    secret.write_text("om1\t1.0\t1\t1\t0\thistory\t0\t\t\t\t\t/\tsecret\t6\n")
    (mine / "spool").symlink_to(secret)
    events = [e for chunk in spool.scan(spool_dir, {}, set()) for e in chunk.events]
    assert [k for k, _, _ in events] == ["notice"]
    assert "belongs to uid" in events[0][2]["problem"]


# -- shipping ----------------------------------------------------------------------------------------


def test_commands_typed_while_the_agent_is_down_arrive_when_it_starts(
        tmp_path: Path, make_cluster: Callable[..., Cluster], agents: list[AgentProcess]) -> None:
    cluster = agent_cluster(make_cluster)
    cluster.start("m1")
    root, spool_dir = installed(tmp_path)
    shell = Shell(root, tmp_path / "home")
    for n in range(3):
        shell.run(f"echo typed-{n}")
    shell.close()
    agent = AgentProcess(cluster, spool_dir, tmp_path / "state", ["m1"]).start()
    agents.append(agent)
    wait_for(lambda: len(stored(cluster)) >= 3, why=f"3 events; agent log:\n{agent.log()}")
    rows = stored(cluster)
    assert [d["command"] for _, _, d in rows] == ["echo typed-0", "echo typed-1", "echo typed-2"]
    assert all(i.startswith(f"{HOST}:") and d["uid"] == UID for i, _, d in rows)

    def heartbeat() -> tuple[str, int] | None:  # sent on its own beat, not with the events
        with sqlite3.connect(cluster.root / "state-m1" / "m1.db") as db:
            return db.execute("SELECT host, spool_depth FROM auditagent").fetchone()
    wait_for(heartbeat, why="the agent's heartbeat")
    row = heartbeat()
    assert row is not None and row[0] == HOST and row[1] >= 0


def test_a_master_outage_and_an_agent_kill_lose_and_duplicate_nothing(
        tmp_path: Path, make_cluster: Callable[..., Cluster], agents: list[AgentProcess]) -> None:
    cluster = agent_cluster(make_cluster, ["m1", "m2"])
    cluster.start("m1")
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    agent = AgentProcess(cluster, spool_dir, tmp_path / "state", ["m1"]).start()
    agents.append(agent)
    sent = []
    for wave in range(6):  # a steady stream; the master is down for waves 1-3
        if wave == 1:
            cluster.processes["m1"].stop()
        if wave == 4:
            cluster.start("m1")
        texts = [f"cmd-{wave}-{n}" for n in range(40)]
        write_records(spool_dir, texts)
        sent += texts
        time.sleep(0.5)
    wait_for(lambda: len(stored(cluster)) >= len(sent), why=f"{len(sent)} events; log:\n{agent.log()}")
    agent.stop(signal.SIGKILL)  # killed mid-stream: whatever was in flight is sent again, stored once
    write_records(spool_dir, [f"late-{n}" for n in range(300)])
    restarted = AgentProcess(cluster, spool_dir, tmp_path / "state", ["m1"]).start()
    agents.append(restarted)
    time.sleep(0.3)
    restarted.stop(signal.SIGKILL)
    again = AgentProcess(cluster, spool_dir, tmp_path / "state", ["m1"]).start()
    agents.append(again)
    sent += [f"late-{n}" for n in range(300)]
    wait_for(lambda: len(stored(cluster)) >= len(sent), why="the late events")
    time.sleep(1)  # anything duplicated would have arrived by now
    rows = stored(cluster)
    texts = [d["command"] for _, k, d in rows if k == "command"]
    assert sorted(texts) == sorted(sent)  # nothing lost, nothing twice
    assert len({i for i, _, _ in rows}) == len(rows)


def test_a_full_queue_drops_the_oldest_and_says_so(tmp_path: Path) -> None:
    from ombot.audit_agent.queue import EventQueue

    queue = EventQueue(tmp_path / "state", HOST, max_events=10)
    queue.add([("command", n, {"command": f"c{n}"}) for n in range(25)])
    batch = queue.batch(100, 1 << 20)
    dropped = [e for e in batch if e["kind"] == "dropped"]
    kept = [e["data"]["command"] for e in batch if e["kind"] == "command"]
    assert len(dropped) == 1 and dropped[0]["data"]["count"] + len(kept) == 25
    assert kept == [f"c{n}" for n in range(25 - len(kept), 25)]  # the newest stay
    assert queue.status()["dropped_total"] == dropped[0]["data"]["count"]


# -- the master's side: who may ingest, and what ---------------------------------------------------------


class Sender:
    def __init__(self, cluster: Cluster, client: str | None = None, identity: Identity | None = None) -> None:
        conf = cluster.config()
        self.identity = identity or Identity.load(cluster.root / "keys" / f"{client}.key")
        self.peer = Peer(self.identity, decode_public(conf.masters["m1"].public_key))
        self.conn = rpyc.connect("127.0.0.1", cluster.ports["m1"], config={"allow_pickle": False})

    def call(self, op: str, args: dict[str, Any], requester: str = f"agent:{HOST}", origin: str = "agent") -> dict[str, Any]:
        request = new_request(op, "m1", requester, origin, args)
        return self.peer.open_reply(getattr(self.conn.root, op)(self.peer.seal_request(request)), request)


def test_forged_and_misdirected_batches_are_refused(make_cluster: Callable[..., Cluster]) -> None:
    cluster = agent_cluster(make_cluster)
    cluster.start("m1")
    with pytest.raises(Refused) as info:  # a key no master knows
        Sender(cluster, identity=Identity.generate()).call("ingest", {"host": HOST, "events": [event(1)]})
    assert info.value.code == "unknown_sender"
    agent = Sender(cluster, AGENT)
    with pytest.raises(Refused) as info:  # web01's key speaking for web02
        agent.call("ingest", {"host": "web02", "events": [event(1, host="web02")]})
    assert info.value.code == "wrong_host"
    for op, args in (("submit", {"module": "echo", "params": {"message": "x"}, "hosts": ["localhost"],
                                 "idc": "local", "approvers": [], "timeout": None}), ("health", {})):
        with pytest.raises(Refused) as info:  # an agent key may only ingest
            agent.call(op, args)
        assert info.value.code == "not_permitted"
    with pytest.raises(Refused) as info:  # and only an agent key ingests
        Sender(cluster, "test").call("ingest", {"host": HOST, "events": [event(1)]}, requester="cli:test", origin="cli")
    assert info.value.code == "not_permitted"
    assert stored(cluster) == []


def test_bad_events_are_rejected_with_a_reason_and_the_rest_kept(make_cluster: Callable[..., Cluster]) -> None:
    cluster = agent_cluster(make_cluster)
    cluster.start("m1")
    agent = Sender(cluster, AGENT)
    batch = [event(1), "not an object", event(2, kind="mystery"), event(3, data={"command": "x" * 40_000}),
             event(4, id="web02:0123abcd:qtest:4"), event(5, at=-1), event(6)]
    reply = agent.call("ingest", {"host": HOST, "events": batch})
    assert sorted(reply["acked"]) == sorted([event(1)["id"], event(6)["id"]]) and reply["stored"] == 2
    reasons = {r["index"]: r["reason"] for r in reply["rejected"]}
    assert set(reasons) == {1, 2, 3, 4, 5}
    assert "oversized" in reasons[3] and "kind" in reasons[2] and "id" in reasons[4]
    again = agent.call("ingest", {"host": HOST, "events": [event(1), event(7)]})  # a replay is acked, stored once
    assert sorted(again["acked"]) == sorted([event(1)["id"], event(7)["id"]]) and again["stored"] == 1
    assert sorted(i for i, _, _ in stored(cluster)) == sorted(event(n)["id"] for n in (1, 6, 7))
    other = Sender(cluster, "agent-web02")  # web02 cannot write (or pre-empt) web01's ids
    reply = other.call("ingest", {"host": "web02", "events": [event(8)]}, requester="agent:web02")
    assert reply["acked"] == [] and reply["rejected"][0]["index"] == 0


def test_enroll_print_only_writes_the_agents_files_offline(tmp_path: Path, make_cluster: Callable[..., Cluster]) -> None:
    """`enroll --print-only`, the offline way: the key (0600) and agent.toml, and the table for
    ombot.toml; no master is asked (tests/test_registry.py tests enrolling and revoking at the masters)."""
    cluster = agent_cluster(make_cluster)
    out = tmp_path / "enrol"
    out.mkdir()
    enrolled = cluster.ombot("audit", "enroll", "db01", "--idc", "local", "--out", str(out), "--print-only")
    assert enrolled.returncode == 0, enrolled.stderr
    assert '[clients.agent-db01]\nkind = "agent"\nhost = "db01"' in enrolled.stdout
    assert oct((out / "agent-db01.key").stat().st_mode & 0o777) == "0o600"
    from ombot.audit_agent.settings import load

    (out / "agent.key").write_bytes((out / "agent-db01.key").read_bytes())
    settings = load(out / "agent-db01.toml")
    assert settings.host == "db01" and [m.id for m in settings.masters] == ["m1"]


def test_the_agent_installs_light_in_a_fresh_venv(tmp_path: Path) -> None:
    """The project with --no-deps plus PyNaCl and rpyc only: no Slack, Ansible, Salt or database
    libraries, and the agent still starts."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    deps = subprocess.run([*pip, "pynacl>=1.5,<2", "rpyc>=6.0.2,<7"], capture_output=True, text=True)
    if deps.returncode != 0:
        pytest.skip(f"no package index reachable to build the fresh venv: {deps.stderr[-300:]}")
    built = subprocess.run([*pip, "--no-deps", str(REPO)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    python = str(venv / "bin" / "python")
    help_text = subprocess.run([python, "-m", "ombot.audit_agent", "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert help_text.returncode == 0 and "run" in help_text.stdout, help_text.stderr
    probe = ("import sys, ombot.audit_agent.agent; heavy = ('peewee', 'playhouse', 'typer', 'slack_sdk', 'slack_bolt', "
             "'ansible', 'salt', 'pymysql', 'psycopg2', 'apscheduler', 're2', 'ombot.bot', 'ombot.approvals'); "
             "print([m for m in sys.modules if m.split('.')[0] in heavy or m.startswith(heavy[-2:])])")
    assert subprocess.run([python, "-c", probe], cwd=tmp_path, capture_output=True, text=True).stdout.strip() == "[]"
