"""The audit on a rig: agent keys registered at the masters (each naming its server), the audit agent
as a real process, batches sent straight from web01's agent key, and the rig whose bot pulls the audit
into its store and posts alerts to the fake Slack; the events and records the audit suites build and
read back, and the alert rules of the rig that tests/conftest.py's `make_rig` builds."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import rpyc

from ombot.envelope import Peer, new_request
from ombot.keys import decode_public
from tests.fakeslack import Call
from tests.rigs.slack import SlackRig
from tests.support import CLI_CLIENT, Cluster, child_env

HOST = "web01"
AGENT = f"agent-{HOST}"
# The usual clients and an agent key each for web01 and web02.
AGENT_CLIENTS = {"bot": "chat", CLI_CLIENT: "cli", "console": "chat", AGENT: "agent", "agent-web02": "agent"}
AUDIT_CHANNEL = "C0AUDIT"
OTHER_AUDIT_CHANNEL = "C0SEC"  # where one alert rule, and the silence alerts of one test, go instead
UID = os.geteuid()  # ours: the uid the hook records for what the tests type
# The rules of make_rig's rigs (tests/conftest.py): audit_site(ALERT_RULES).
ALERT_RULES = f"""
channel = "{AUDIT_CHANNEL}"

[redact]
patterns = ['(?i)\\btoken=(\\S+)']

[[rules]]
name = "wipe the root filesystem"
severity = "critical"
keywords = ["rm -rf /"]
cooldown_seconds = 0

[[rules]]
name = "mysql with a password"
keywords = ["mysql "]
channel = "{OTHER_AUDIT_CHANNEL}"

[[rules]]
name = "alarm"
keywords = ["ALARM"]
cooldown_seconds = 300

[[rules]]
name = "twice"
keywords = ["TWICE"]
cooldown_seconds = 0

[[rules]]
name = "marker"
keywords = ["MARKER"]
"""


def with_agent_hosts(cluster: Cluster, hosts: tuple[str, ...] = (HOST, "web02")) -> Cluster:
    """Each agent registration (agent-HOST) names its server, as `ombot audit enroll` writes it."""
    text = cluster.config_path.read_text()
    for client, host in ((f"agent-{h}", h) for h in hosts):
        text = text.replace(f'[clients.{client}]\nkind = "agent"', f'[clients.{client}]\nkind = "agent"\nhost = "{host}"')
    cluster.config_path.write_text(text)
    return cluster


def agent_cluster(make_cluster: Callable[..., Cluster], masters: list[str] | None = None) -> Cluster:
    """A site of one IDC whose masters accept the agents of web01 and web02 (not started)."""
    return with_agent_hosts(make_cluster({"local": masters or ["m1"]}, clients=dict(AGENT_CLIENTS)))


def audit_site(rules: str, more_agents: tuple[str, ...] = ()) -> dict[str, Any]:
    """slack_rig's options for a site whose bot pulls the audit: agent keys for web01, web02 and
    `more_agents`, the rules file `rules`, a quick poll."""
    hosts = (HOST, "web02", *more_agents)
    return {"clients": {**AGENT_CLIENTS, **{f"agent-{h}": "agent" for h in more_agents}},
            "prepare": lambda cluster: with_agent_hosts(cluster, hosts), "files": {"audit-rules.toml": rules},
            "audit_rules": "audit-rules.toml", "audit_poll_seconds": 0.2}


def ingest(cluster: Cluster, master: str, events: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch straight from web01's agent key to one master, as the agent would send it: the reply."""
    peer = Peer(cluster.identity(AGENT), decode_public(cluster.config().masters[master].public_key))
    conn = rpyc.connect("127.0.0.1", cluster.ports[master], config={"allow_pickle": False})
    try:
        request = new_request("ingest", master, f"agent:{HOST}", "agent", {"host": HOST, "events": events})
        reply: dict[str, Any] = peer.open_reply(conn.root.ingest(peer.seal_request(request)), request)
        return reply
    finally:
        conn.close()


def event(seq: int, host: str = HOST, **changes: Any) -> dict[str, Any]:
    """An event of a batch as an agent sends it: the command `c<seq>` on `host`, its id and time from `seq`."""
    base = {"id": f"{host}:0123abcd-0000:qtest:{seq}", "kind": "command", "at": 1_700_000_000_000 + seq,
            "data": {"command": f"c{seq}"}}
    return {**base, **changes}


def stored(cluster: Cluster, master: str = "m1") -> list[tuple[str, str, dict[str, Any]]]:
    """(id, kind, data) of every audit event in a master's own SQLite database, oldest first."""
    path = cluster.master_db(master)
    if not path.exists():
        return []
    with sqlite3.connect(path) as db:
        try:
            rows = db.execute("SELECT id, kind, data FROM auditevent ORDER BY at").fetchall()
        except sqlite3.OperationalError:
            return []
    return [(i, k, json.loads(d)) for i, k, d in rows]


def record(at: int, command: str = "echo ALARM", **fields: Any) -> dict[str, Any]:
    """A command on web01 at `at` as the bot's store hands it to the alert poster."""
    return {"id": f"web01:b:q:{at}", "idc": "local", "host": "web01", "kind": "command", "at": at, "user": "alice",
            "login_user": "alice", "uid": 1000, "tty": "/dev/pts/1", "cwd": "/root", "command": command,
            "exit_status": 0, "ssh_client": "192.0.2.7", **fields}


class AgentProcess:
    """`python -m ombot.audit_agent run` with an agent.toml for HOST, speeding its timings up for tests."""

    def __init__(self, cluster: Cluster, spool_dir: Path, state_dir: Path, masters: list[str]) -> None:
        conf = cluster.config()
        self.config = cluster.root / "agent.toml"
        lines = [f'host = "{HOST}"', 'idc = "local"', f'key_file = "{cluster.root / "keys" / f"{AGENT}.key"}"',
                 f'spool_dir = "{spool_dir}"', f'state_dir = "{state_dir}"', "scan_seconds = 0.2",
                 "retry_min_seconds = 0.2", "retry_max_seconds = 1.0", "heartbeat_seconds = 1", "batch_events = 50",
                 "connect_timeout_seconds = 2", ""]
        for mid in masters:
            m = conf.masters[mid]
            lines += ["[[masters]]", f'id = "{mid}"', f'address = "{m.host}:{m.port}"', f'public_key = "{m.public_key}"', ""]
        self.config.write_text("\n".join(lines))
        self.log_path = cluster.root / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        self.proc = subprocess.Popen([sys.executable, "-m", "ombot.audit_agent", "run", "--config", str(self.config)],
                                     stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT, env=child_env(),
                                     start_new_session=True)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class AuditRig(SlackRig):
    """A Slack rig whose bot pulls the audit (slack_rig(kind=AuditRig, **audit_site(RULES))): agents
    started on it ship the spool `spool_dir` to its masters and are killed when the rig closes."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.spool_dir = self.cluster.root / "spool"
        self.spool_dir.mkdir(exist_ok=True)
        self.state_dir = self.cluster.root / "agent-state"
        self.agents: list[AgentProcess] = []

    def agent(self, masters: list[str]) -> AgentProcess:
        agent = AgentProcess(self.cluster, self.spool_dir, self.state_dir, masters).start()
        self.agents.append(agent)
        return agent

    def ingest(self, master: str, events: list[dict[str, Any]]) -> None:
        """A batch straight from web01's agent key to one master, every event stored."""
        reply = ingest(self.cluster, master, events)
        assert reply["stored"] == len(events), reply

    def stored(self) -> list[tuple[str, str]]:
        """(id, command) of every event in the bot's own store."""
        with sqlite3.connect(self.cluster.root / "state" / "bot.db") as db:
            try:
                return db.execute("SELECT id, command FROM bot_audit_event").fetchall()
            except sqlite3.OperationalError:
                return []

    def alerts(self, rule: str, channel: str = AUDIT_CHANNEL) -> list[dict[str, Any]]:
        return [m for m in self.fake.messages(channel) if f"] {rule} on " in m["text"]]

    def posts_for(self, rule: str) -> list[Call]:
        return [c for c in self.fake.calls_to("chat.postMessage") if f"] {rule} on " in c.body.get("text", "")]

    def close(self) -> None:
        for agent in self.agents:
            agent.stop(signal.SIGKILL)
        super().close()


def write_records(spool_dir: Path, texts: list[str]) -> None:
    """Lines as the hook writes them, for a steady stream without a shell per line."""
    user_dir = spool_dir / str(UID)
    user_dir.mkdir(mode=0o700, exist_ok=True)
    with open(user_dir / "spool", "a") as f:
        for n, text in enumerate(texts):
            f.write("\t".join(["om1", f"{time.time():.6f}", str(os.getpid()), str(n), "0", "history", "1000", "",
                               "tester", "/dev/pts/9", "", "/tmp", text, str(len(text))]) + "\n")
