"""The audit on a hostile server (issue 17): what a local user, or one server's agent key, tried
against a real agent, real masters and the real bot on the fake Slack, and what stops it now.

The attacker is `nobody` (a second Unix user, through setpriv); the spool lives in a directory every
user can reach, as /var/spool/ombot-audit is. Each test failed on 7947c66.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import rpyc

from ombot.audit_agent import spool
from ombot.envelope import Peer, Refused, new_request
from ombot.keys import Identity, decode_public
from tests.fakeslack import post_to_bot
from tests.rigs import AUDIT_CHANNEL as CHANNEL
from tests.rigs import HOST, SECRET, UID, AgentProcess, AuditRig, agent_cluster, event, stored
from tests.support import Cluster, child_env, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="the attacks need a second Unix user")]

NOBODY = 65534


@pytest.fixture
def spool_dir() -> Iterator[Path]:
    """A spool as the installer makes it (mode 1733, root's own directory in it), where `nobody` can reach it."""
    top = Path(tempfile.mkdtemp(prefix="ombot-hostile-"))
    os.chmod(top, 0o755)
    spool_path = top / "spool"
    spool_path.mkdir()
    os.chmod(spool_path, 0o1733)
    (spool_path / "0").mkdir(mode=0o700)
    try:
        yield spool_path
    finally:
        shutil.rmtree(top, ignore_errors=True)


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    """A command run as `nobody`, the local attacker."""
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv],
                          capture_output=True, text=True, timeout=60)


def records(texts: list[str], when: float | None = None, pid: int = 4242, login_uid: int | None = None,
            uid: int = UID) -> str:
    """Spool lines as the hook writes them."""
    login = str(uid if login_uid is None else login_uid)
    return "".join("\t".join(["om1", f"{time.time() if when is None else when:.6f}", str(pid), str(n), "0", "history",
                              login, "", "tester", "/dev/pts/3", "192.0.2.7", "/srv", text, str(len(text))]) + "\n"
                   for n, text in enumerate(texts))


def type_as_root(spool_path: Path, texts: list[str], **kw: Any) -> None:
    with open(spool_path / "0" / "spool", "a") as f:
        f.write(records(texts, uid=0, **kw))


def master_rows(cluster: Cluster, kind: str | None = None) -> list[tuple[str, str, int, int, dict[str, Any]]]:
    """(id, kind, at, received_at, data) of what m1 stored."""
    path = cluster.root / "state-m1" / "m1.db"
    with sqlite3.connect(path, timeout=10) as db:
        try:
            rows = db.execute("SELECT id, kind, at, received_at, data FROM auditevent ORDER BY received_at").fetchall()
        except sqlite3.OperationalError:
            return []
    return [(i, k, a, r, json.loads(d)) for i, k, a, r, d in rows if kind is None or k == kind]


def heartbeat(cluster: Cluster) -> tuple[Any, ...] | None:
    """m1's heartbeat row of HOST: (last_seen, spool_depth)."""
    with sqlite3.connect(cluster.root / "state-m1" / "m1.db", timeout=10) as db:
        try:
            return db.execute("SELECT last_seen, spool_depth FROM auditagent WHERE host = ?",
                              (HOST,)).fetchone()
        except sqlite3.OperationalError:
            return None


def notices(cluster: Cluster) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for _, _, _, _, data in master_rows(cluster, "notice"):
        found.setdefault(str(data.get("code")), []).append(data)
    return found


class LimitedAgent(AgentProcess):
    """The agent under an address-space limit: a read of a whole 3 GiB file would fail."""

    def start(self) -> AgentProcess:
        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_AS, (1536 << 20, 1536 << 20))

        self.proc = subprocess.Popen([sys.executable, "-m", "ombot.audit_agent", "run", "--config", str(self.config)],
                                     stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT, env=child_env(),
                                     start_new_session=True, preexec_fn=limit)
        return self


def alive(agent: AgentProcess) -> bool:
    return agent.proc is not None and agent.proc.poll() is None


# -- 1: nothing a user puts in the spool stops the agent -----------------------------------------------


def test_what_any_user_can_put_in_the_spool_never_stops_the_agent(
        make_rig: Callable[..., AuditRig], spool_dir: Path, tmp_path: Path) -> None:
    """As nobody: a directory named `²` (a digit to str.isdigit, not to int), an entry whose name is
    not UTF-8, and their own spool made a 3 GiB sparse file. The agent (under a 1.5 GB address-space
    limit) keeps shipping root's commands, reports each entry once with its owner, and a restart
    changes nothing; the notices reach the alert channel."""
    rig = make_rig(["m1"])
    assert as_nobody("mkdir", str(spool_dir / "\u00b2")).returncode == 0
    not_utf8 = bytes(spool_dir) + b"/\xff"
    assert as_nobody(sys.executable, "-c", f"import os; os.mkdir({not_utf8!r})").returncode == 0
    mine = spool_dir / str(NOBODY)
    made = as_nobody("sh", "-c", f'mkdir -m 700 "$1" && : > "$1/spool" && truncate -s 3G "$1/spool"', "sh", str(mine))
    assert made.returncode == 0, made.stderr
    type_as_root(spool_dir, ["echo before-start"])
    agent = LimitedAgent(rig.cluster, spool_dir, tmp_path / "state", ["m1"]).start()
    rig.agents.append(agent)
    wait_for(lambda: any(d.get("command") == "echo before-start" for *_, d in master_rows(rig.cluster)),
             why=f"root's command at the master; agent log:\n{agent.log()}")
    type_as_root(spool_dir, ["echo after-junk"])
    wait_for(lambda: any(d.get("command") == "echo after-junk" for *_, d in master_rows(rig.cluster)),
             why=f"root's next command; agent log:\n{agent.log()}")
    assert alive(agent), agent.log()
    found = notices(rig.cluster)
    entries = " ".join(n["problem"] for n in found.get("spool_entry", []))
    assert "'\u00b2'" in entries and "'\\xff'" in entries
    assert all(n["owner_uid"] == NOBODY for n in found["spool_entry"])
    assert [n["uid"] for n in found["spool_line"]] == [NOBODY]  # the sparse file: one line, cut
    agent.stop()
    again = LimitedAgent(rig.cluster, spool_dir, tmp_path / "state", ["m1"]).start()  # a restart: still fine
    rig.agents.append(again)
    type_as_root(spool_dir, ["echo after-restart"])
    wait_for(lambda: any(d.get("command") == "echo after-restart" for *_, d in master_rows(rig.cluster)),
             why=f"root's command after a restart; agent log:\n{again.log()}")
    assert alive(again) and len(notices(rig.cluster)["spool_entry"]) == 4  # each entry once per start
    rig.fake.wait_for(lambda: [m for m in rig.fake.messages(CHANNEL) if "spool_entry" in m["text"]],
                      what="the junk reported in the alert channel", timeout=30)


def test_a_failing_source_is_a_degraded_agent_said_in_the_channel_then_its_recovery(
        make_rig: Callable[..., AuditRig], tmp_path: Path) -> None:
    """A spool directory that cannot be read makes the agent report a problem in its heartbeat
    (not only "silent" minutes later): the bot says so, and says when it is gone."""
    rig = make_rig(["m1"])
    broken = tmp_path / "not-a-directory"
    broken.write_text("")
    agent = AgentProcess(rig.cluster, broken, tmp_path / "state", ["m1"])
    agent.config.write_text(agent.config.read_text())
    rig.agents.append(agent.start())
    message = rig.fake.wait_for(lambda: [m for m in rig.fake.messages(CHANNEL) if "degraded" in m["text"]],
                                what="the degraded alert", timeout=30)[0]
    assert "NotADirectoryError" in json.dumps(message["blocks"])
    broken.unlink()
    broken.mkdir()
    rig.fake.wait_for(lambda: [m for m in rig.fake.messages(CHANNEL) if "recovered" in m["text"]],
                      what="the recovery", timeout=30)
    assert alive(rig.agents[-1])


# -- 3: agent keys never lock the bot and the CLI out ---------------------------------------------------


class Held:
    """A connection kept open after one authenticated call, as an attacker (or a fleet) holds it."""

    def __init__(self, cluster: Cluster, client: str, host: str) -> None:
        self.cluster, self.host = cluster, host
        self.peer = Peer(cluster.identity(client), decode_public(cluster.config().masters["m1"].public_key))
        self.conn = rpyc.connect("127.0.0.1", cluster.ports["m1"], config={"allow_pickle": False, "sync_request_timeout": 10})

    def ingest(self, events: list[dict[str, Any]] | None = None, host: str | None = None,
               peer: Peer | None = None) -> dict[str, Any]:
        peer = peer or self.peer
        status = {"spool_depth": 0, "dropped_total": 0, "sent_total": 0}
        request = new_request("ingest", "m1", f"agent:{host or self.host}", "agent",
                              {"host": host or self.host, "events": events or [], "status": status})
        return peer.open_reply(self.conn.root.ingest(peer.seal_request(request)), request)

    def open(self) -> bool:
        try:
            self.conn.ping(timeout=3)
            return True
        except Exception:
            return False


def slash(rig: AuditRig, text: str) -> None:
    fields = rig.fake.slash_command(text=text, channel_id="C0OPS")
    status, body = post_to_bot(rig.port, urlencode(fields), SECRET)
    assert status == 200, body


def test_agent_keys_holding_every_slot_they_can_lock_out_neither_the_cli_nor_the_bot(
        make_rig: Callable[..., AuditRig]) -> None:
    """12 servers' agents (more than the 8 operator slots) and web01's key opening 40 connections,
    each authenticated with an empty heartbeat and kept: `ombot masters` and a job through the bot
    still succeed within 5 s. Each agent key holds at most 2 connections."""
    fleet = tuple(f"h{n:02d}" for n in range(12))
    rig = make_rig(["m1"], limits={"max_connections": 8}, more_agents=fleet)  # the defaults otherwise
    held = []
    for host in fleet:  # each server's agent connects and ships, and keeps its connection
        held.append(Held(rig.cluster, f"agent-{host}", host))
        held[-1].ingest()
    attacker, refused = [], []
    for _ in range(40):
        connection = Held(rig.cluster, "agent-web01", HOST)
        try:
            connection.ingest()
            attacker.append(connection)
        except Refused as exc:
            refused.append(exc.code)
    assert len(attacker) == 2 and set(refused) == {"too_many_connections"}, refused
    assert all(c.open() for c in held)  # the fleet keeps its connections
    started = time.monotonic()
    masters = rig.cluster.ombot("masters")
    assert masters.returncode == 0 and "m1" in masters.stdout, masters.stdout + masters.stderr
    # Locked out, either would wait until the fleet's connections time out, which they never do here;
    # 15 s is room for a loaded machine, not a figure to meet (bench/ measures speed)
    assert time.monotonic() - started < 15
    started = time.monotonic()
    slash(rig, "echo localhost message=through")
    rig.fake.wait_for(lambda: [m for m in rig.fake.messages("C0OPS") if m.get("text", "").startswith("[#1 ok]")],
                      what="the job's card, ended ok", timeout=15)
    assert time.monotonic() - started < 15


def test_idle_and_misused_agent_connections_are_closed(make_rig: Callable[..., AuditRig]) -> None:
    """An authenticated agent connection left idle is closed after agent_idle_seconds; a connection
    bound to one key refuses another key's frame and closes."""
    rig = make_rig(["m1"], limits={"agent_idle_seconds": 2})
    idle = Held(rig.cluster, "agent-web01", HOST)
    idle.ingest()
    misused = Held(rig.cluster, "agent-web01", HOST)
    misused.ingest()
    other = Peer(rig.cluster.identity("agent-web02"), decode_public(rig.cluster.config().masters["m1"].public_key))
    with pytest.raises(Refused) as info:
        misused.ingest(host="web02", peer=other)
    assert info.value.code == "wrong_connection"
    wait_for(lambda: not misused.open(), within=5, why="the misused connection closed")
    wait_for(lambda: not idle.open(), within=15, why="the idle agent connection closed by the master")


def test_an_idc_the_bot_cannot_reach_is_said_in_the_alert_channel(make_rig: Callable[..., AuditRig]) -> None:
    """While no master of an IDC answers, its agents are not judged silent: the channel hears that the
    IDC itself is unreachable (once), and when it answers again."""
    rig = make_rig(["m1"], audit_silent_after_seconds=3)
    rig.cluster.processes["m1"].stop()

    def said(text: str) -> list[dict[str, Any]]:
        return [m for m in rig.fake.messages(CHANNEL) if text in m["text"]]

    rig.fake.wait_for(lambda: said("no master of local answers"), what="the unreachable IDC", timeout=30)
    time.sleep(2)
    assert len(said("no master of local answers")) == 1
    rig.cluster.start("m1")
    rig.fake.wait_for(lambda: said("the masters of local answer again"), what="the IDC back", timeout=60)


# -- 6: one server cannot fill its master -----------------------------------------------------------------


BURST = 8000  # lines a real agent sends after the flood: 40 s of the master's rate


def test_one_agent_key_cannot_flood_its_master_and_a_real_agent_loses_nothing(
        make_rig: Callable[..., AuditRig], spool_dir: Path, tmp_path: Path) -> None:
    """web01's key sends 30 batches of 1,000 events as fast as it can: the master stores at most its
    burst (20,000) plus the rate (200 a second), says when to come back, and stores one notice. A real
    agent behind the same limit gets every event through, in its own time."""
    rig = make_rig(["m1"])
    flood = Held(rig.cluster, "agent-web01", HOST)
    started = time.monotonic()
    deferred = 0
    for batch in range(30):
        reply = flood.ingest([event(batch * 1000 + n) for n in range(1000)])
        deferred += reply.get("deferred", 0)
        assert reply.get("deferred", 0) == 0 or reply["retry_after"] > 0
    took = time.monotonic() - started
    commands = master_rows(rig.cluster, "command")
    assert len(commands) <= 20_000 + 200 * took + 1000 and deferred >= 30_000 - len(commands)
    rate = notices(rig.cluster)["ingest_rate"]
    assert len(rate) == 1 and "faster than master m1 takes" in rate[0]["problem"]
    # More than the bucket refills (200 a second) while the agent starts, however loaded the machine.
    with open(spool_dir / "0" / "spool", "a") as f:
        f.write(records([f"burst {n}" for n in range(BURST)], uid=0))
    agent = AgentProcess(rig.cluster, spool_dir, tmp_path / "state", ["m1"]).start()
    rig.agents.append(agent)
    wait_for(lambda: sum(1 for *_, d in master_rows(rig.cluster, "command") if str(d.get("command")).startswith("burst "))
             == BURST, within=120, why=f"every burst line; agent log:\n{agent.log()}")
    assert "ingest limit" in agent.log()  # it was told to wait, and did


# -- 2: nobody can stop another user's records being written ----------------------------------------------


@pytest.fixture
def installed(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """(install root, its spool, a base for homes), all where any user can reach them."""
    base = Path(tempfile.mkdtemp(prefix="ombot-hostile-"))
    os.chmod(base, 0o755)
    root = base / "root"
    made = subprocess.run([sys.executable, "-m", "ombot.audit_agent", "install", "--root", str(root)], env=child_env(),
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    try:
        yield root, root / "var" / "spool" / "ombot-audit", base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def shipped(cluster: Cluster, uid: int) -> list[tuple[str, str]]:
    """(command, how the hook saw it) of uid's records at m1."""
    return [(d["command"], d["seen"]) for *_, d in master_rows(cluster, "command") if d.get("uid") == uid]


def squat_undone(rig: AuditRig, spool_path: Path, tmp_path: Path, uid: int, shell: Any) -> None:
    """With SPOOL/UID squatted, uid's `shell` types a line; the agent starts and gives the directory
    back; the shell types another: both lines reach the master."""
    shell.run("echo typed-while-squatted")
    agent = AgentProcess(rig.cluster, spool_path, tmp_path / "state", ["m1"]).start()
    rig.agents.append(agent)
    wait_for(lambda: (spool_path / str(uid)).stat().st_uid == uid, within=15,
             why=f"uid {uid}'s directory back; {agent.log()}")
    shell.run("echo typed-after")
    shell.close()
    wait_for(lambda: {c for c, _ in shipped(rig.cluster, uid)} >= {"echo typed-while-squatted", "echo typed-after"},
             why=f"uid {uid}'s commands at the master: {shipped(rig.cluster, uid)}; agent log:\n{agent.log()}")


def test_the_installer_makes_roots_spool_directory_so_nobody_can_take_it_first(
        installed: tuple[Path, Path, Path]) -> None:
    _, spool_path, _ = installed
    assert (spool_path / "0").stat().st_uid == 0 and oct((spool_path / "0").stat().st_mode & 0o777) == "0o700"
    assert as_nobody("mkdir", "-m", "700", str(spool_path / "0")).returncode != 0


def test_a_squat_of_roots_spool_directory_is_undone_reported_and_loses_nothing(
        make_rig: Callable[..., AuditRig], installed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """An install from before the installer made root's directory: nobody makes SPOOL/0 before root's
    first shell. The root agent moves it aside, makes root's again and says so in the channel
    (critical); root's commands typed meanwhile arrive from history, and the rest as usual."""
    from tests.shells import Shell

    rig = make_rig(["m1"])
    root, spool_path, base = installed
    if (spool_path / "0").exists():  # an install from before the installer made it
        (spool_path / "0").rmdir()
    assert as_nobody("mkdir", "-m", "700", str(spool_path / "0")).returncode == 0
    squat_undone(rig, spool_path, tmp_path, 0, Shell(root, base / "roothome"))
    assert ("echo typed-while-squatted", "missed") in shipped(rig.cluster, 0)
    squat = notices(rig.cluster)["spool_squatted"][0]
    assert squat["uid"] == 0 and squat["owner_uid"] == NOBODY and "moved aside" in squat["problem"]
    assert (spool_path / squat["moved_to"]).stat().st_uid == NOBODY  # kept, as evidence
    alert = rig.fake.wait_for(lambda: [m for m in rig.fake.messages(CHANNEL) if "spool_squatted" in m["text"]],
                              what="the squat in the alert channel", timeout=30)[0]
    assert "*critical*" in json.dumps(alert["blocks"])


def test_a_squat_of_another_users_spool_directory_is_undone_for_that_user(
        make_rig: Callable[..., AuditRig], installed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """nobody makes the directory of `daemon` (uid 1) before daemon's first zsh: the agent gives it
    back to daemon, and daemon's lines, those typed before included, are recorded."""
    from tests.shells import ZSH, Zsh

    if ZSH is None:
        pytest.skip("zsh is not installed")
    rig = make_rig(["m1"])
    root, spool_path, base = installed
    assert as_nobody("mkdir", "-m", "700", str(spool_path / "1")).returncode == 0
    squat_undone(rig, spool_path, tmp_path, 1, Zsh(root, base / "daemonhome", user="daemon"))
    assert notices(rig.cluster)["spool_squatted"][0]["uid"] == 1


# -- 4 and 5: times and logins the user writes --------------------------------------------------------------


def bot_events(rig: AuditRig, like: str) -> list[tuple[int, int, dict[str, Any]]]:
    """(at, stored_at, data) of the bot's stored events whose command contains `like`."""
    with sqlite3.connect(rig.cluster.root / "state" / "bot.db", timeout=10) as db:
        try:
            rows = db.execute("SELECT at, stored_at, data FROM bot_audit_event WHERE command LIKE ?",
                              (f"%{like}%",)).fetchall()
        except sqlite3.OperationalError:
            return []
    return [(a, s, json.loads(d)) for a, s, d in rows]


def test_forged_clocks_move_no_event_out_of_its_window(
        make_rig: Callable[..., AuditRig], installed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """In a hooked bash, `unset EPOCHREALTIME; EPOCHREALTIME=1000` dates the next lines 1970; 20 lines
    written dated 2100 claim the future. Each is stored at the time the agent could have read it (the
    claim kept as claimed_at), so `since=` finds them and retention keeps them; the future-dated burst
    of a rule without cooldown is one Slack post, and the alert shows the claimed time as such."""
    from tests.shells import Shell

    rig = make_rig(["m1"])
    root, spool_path, base = installed
    agent = AgentProcess(rig.cluster, spool_path, tmp_path / "state", ["m1"]).start()
    rig.agents.append(agent)
    wait_for(lambda: heartbeat(rig.cluster), why=f"the agent's first heartbeat; agent log:\n{agent.log()}")
    started = int(time.time() * 1000)
    shell = Shell(root, base / "roothome")
    shell.run("unset EPOCHREALTIME; EPOCHREALTIME=1000")
    shell.run("echo ALARM from-1970")
    shell.close()
    future = time.mktime((2100, 1, 1, 0, 0, 0, 0, 0, 0))
    with open(spool_path / "0" / "spool", "a") as f:
        for n in range(20):
            f.write(records([f"echo TWICE {n}"], when=future + 3600 * n, uid=0))
    wait_for(lambda: len(bot_events(rig, "TWICE")) == 20 and bot_events(rig, "from-1970"),
             why=f"the forged lines in the bot's store; agent log:\n{agent.log()}")
    now = int(time.time() * 1000)
    for at, _, data in bot_events(rig, "from-1970") + bot_events(rig, "TWICE"):
        assert started - 1000 <= at <= now and data["claimed_at"] not in range(started - 1000, now + 1)
    assert bot_events(rig, "from-1970")[0][2]["claimed_at"] == 1_000_000
    alarm = rig.fake.wait_for(lambda: rig.alerts("alarm"), what="the alarm alert", timeout=30)[0]
    assert "claimed 1970-01-01 00:16:40 UTC" in json.dumps(alarm["blocks"])
    time.sleep(3)  # every post of the burst would have gone by now (the channel paces one a second)
    assert len(rig.posts_for("twice")) == 1


def test_a_login_the_kernel_contradicts_is_flagged(
        make_rig: Callable[..., AuditRig], spool_dir: Path, tmp_path: Path) -> None:
    """nobody writes a record claiming login root (uid 0) from the pid of a live process of theirs:
    the kernel says otherwise, and the alert and the search say so."""
    rig = make_rig(["m1"])
    sleeper = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "sleep", "120"])
    try:
        wait_for(lambda: os.stat(f"/proc/{sleeper.pid}").st_uid == NOBODY, within=5, why="the sleeper as nobody")
        forged = records(["echo ALARM i-am-root"], pid=sleeper.pid, login_uid=0, uid=NOBODY)
        made = as_nobody("sh", "-c", 'mkdir -m 700 "$1" && printf %s "$2" > "$1/spool"', "sh",
                         str(spool_dir / str(NOBODY)), forged)
        assert made.returncode == 0, made.stderr
        agent = AgentProcess(rig.cluster, spool_dir, tmp_path / "state", ["m1"]).start()
        rig.agents.append(agent)
        alarm = rig.fake.wait_for(lambda: rig.alerts("alarm"), what="the alarm alert", timeout=30)[0]
    finally:
        sleeper.kill()
        sleeper.wait()
    shown = json.dumps(alarm["blocks"])
    assert "*user* nobody (uid 65534)" in shown and "the shell claims login root" in shown
    data = bot_events(rig, "i-am-root")[0][2]
    assert data["login_check"] == "mismatch" and data["login_uid"] == 0


def test_masters_keep_audit_events_only_until_the_bot_has_them_or_their_retention_ends(
        make_cluster: Callable[..., Cluster]) -> None:
    """m1 keeps its audit rows 9 s (audit_retention_days): the bot's reads leave their cursor there,
    and once the retention has passed the rows are gone, pulled or not."""
    cluster = agent_cluster(make_cluster)
    text = cluster.config_path.read_text().replace('state_dir = "state-m1"\n',
                                                   'state_dir = "state-m1"\naudit_retention_days = 0.0001\n')
    cluster.config_path.write_text(text)
    cluster.start("m1")
    Held(cluster, "agent-web01", HOST).ingest([event(n, at=int(time.time() * 1000)) for n in range(50)])
    assert len(master_rows(cluster)) == 50
    bot = cluster.config().clients["bot"].identity
    peer = Peer(cluster.identity("bot"), decode_public(cluster.config().masters["m1"].public_key))
    conn = rpyc.connect("127.0.0.1", cluster.ports["m1"], config={"allow_pickle": False})
    request = new_request("audit_read", "m1", bot, "slack", {"after": 0})
    assert len(peer.open_reply(conn.root.audit_read(peer.seal_request(request)), request)["events"]) == 50
    conn.close()
    with sqlite3.connect(cluster.root / "state-m1" / "m1.db") as db:
        assert db.execute("SELECT reader FROM auditreader").fetchall() == [("bot",)]
    wait_for(lambda: master_rows(cluster) == [], within=30, why="the rows past their retention pruned")
    assert stored(cluster) == []
