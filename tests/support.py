"""Test support: real configs with fresh keys, and real master processes on free loopback ports; and
the small helpers any suite may use (wait_for, run_job, statuses, SteppedClock)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ombot.keys import Identity
from ombot import config as cfg

REPO = Path(__file__).resolve().parent.parent

INVENTORY = """\
[local]
localhost ansible_connection=local

[web]
web01 ansible_connection=local
web02 ansible_connection=local
web03 ansible_connection=local

[db]
db01 ansible_connection=local

[remote]
far01 ansible_host=192.0.2.10
"""


CLI_CLIENT = "test"
# The console acts as chat users here (console_user, /as), as in the demo: a chat client too.
DEFAULT_CLIENTS = {"bot": "chat", CLI_CLIENT: "cli", "console": "chat"}

ALLOW_ALL_POLICY = """\
[roles.everyone]
users = ["U0ALICE", "U0BOB", "U0CAROL", "U0DAVE", "U0DEMO"]

[[rules]]
name = "anything"
request = ["everyone"]

[jobs]
viewers = ["everyone"]  # everyone sees every job and schedule, as everyone may run anything
"""


def bot_table(port: int | None = None, team_id: str | None = "T0OMBOT", policy: str | None = ALLOW_ALL_POLICY,
              **extra: object) -> str:
    """A [bot] table for Cluster(extra_toml=...); the policy text lands in policy.toml beside it.
    `ombot bot` refuses to start without a team_id; team_id=None leaves it out (the console needs none)."""
    lines = ["[bot]"] + ([f'team_id = "{team_id}"'] if team_id is not None else [])
    if port is not None:
        lines.append(f'listen = "127.0.0.1:{port}"')
    if policy is not None:
        lines.append('policy = "policy.toml"')
    for key, value in extra.items():
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    """A config directory describing IDCs, their masters and one client ("bot")."""

    root: Path
    idcs: dict[str, list[str]]
    limits: dict[str, int] = field(default_factory=dict)
    inventory: str = INVENTORY
    module_dirs: list[Path] = field(default_factory=list)
    extra_toml: str = ""
    policy: str = ALLOW_ALL_POLICY  # written to policy.toml; used when the [bot] table names it
    # client id -> kind: "bot" attests chat users; "test" is the CLI (cli:test)
    clients: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_CLIENTS))
    # client ids registered with `admin = true` (cli clients only): admins=(CLI_CLIENT,) lets `ombot` enrol and revoke
    admins: tuple[str, ...] = ()
    ports: dict[str, int] = field(default_factory=dict)
    processes: dict[str, "MasterProcess"] = field(default_factory=dict)
    # True: `root` already holds a site a user wrote (`ombot init` and their edits): read, never rewritten
    existing: bool = False

    def __post_init__(self) -> None:
        if self.existing:
            self.ports = {mid: master.port for mid, master in self.config().masters.items()}
            return
        self.root.mkdir(parents=True, exist_ok=True)
        keys = self.root / "keys"
        lines = ['[client]', f'id = "{CLI_CLIENT}"', f'default_idc = "{next(iter(self.idcs))}"', '']
        for client_id, kind in self.clients.items():  # each client its own key and registration
            ident = Identity.generate()
            ident.save(keys / f"{client_id}.key")
            lines += [f'[clients.{client_id}]', f'kind = "{kind}"', *(['admin = true'] if client_id in self.admins else []),
                      f'public_key = "{ident.public}"',
                      f'key_file = "keys/{client_id}.key"', 'modules = ["*"]', 'hosts = ["*"]', '']
        (self.root / "inventory.ini").write_text(self.inventory)
        (self.root / "policy.toml").write_text(self.policy)
        (self.root / "files").mkdir(exist_ok=True)
        lines += ['[modules]', f'dirs = {[str(d) for d in self.module_dirs]!r}'.replace("'", '"'), '']
        accept = "[" + ", ".join(f'"{c}"' for c in self.clients) + "]"
        for idc, masters in self.idcs.items():
            lines += [f'[idcs.{idc}]', f'masters = {masters!r}'.replace("'", '"'), '']
            for mid in masters:
                ident = Identity.generate()
                ident.save(keys / f"{mid}.key")
                self.ports[mid] = free_port()
                lines += [
                    f'[masters.{mid}]', f'idc = "{idc}"', f'address = "127.0.0.1:{self.ports[mid]}"',
                    f'public_key = "{ident.public}"', f'key_file = "keys/{mid}.key"',
                    'inventory = "inventory.ini"', f'accept = {accept}', f'state_dir = "state-{mid}"', '',
                    f'[masters.{mid}.limits]', *[f"{k} = {v}" for k, v in self.limits.items()], '',
                ]
        self.config_path.write_text("\n".join(lines) + "\n" + self.extra_toml)

    @property
    def config_path(self) -> Path:
        return self.root / "ombot.toml"

    def config(self) -> cfg.Config:
        return cfg.load(self.config_path)

    @classmethod
    def adopt(cls, root: Path) -> "Cluster":
        """The site in `root` as its user left it: IDCs, masters and their ports from its ombot.toml."""
        conf = cfg.load(root / "ombot.toml")
        return cls(root, {idc: list(masters) for idc, masters in conf.idcs.items()}, existing=True)

    def master_db(self, master: str) -> Path:
        """A master's own SQLite database (its state_dir/ID.db)."""
        return self.config().masters[master].state_dir / f"{master}.db"

    def start(self, master_id: str, env: dict[str, str] | None = None) -> "MasterProcess":
        proc = MasterProcess(self, master_id, env or {})
        self.processes[master_id] = proc
        proc.start()
        return proc

    def stop_all(self) -> None:
        for proc in self.processes.values():
            proc.stop()

    def router(self, requester: str = "cli:test", origin: str | None = None, client: str | None = None, **kw):
        """A client library Router; a chat user as requester speaks with the bot's key (origin slack),
        cli:test with the CLI's."""
        from ombot.masters import Router

        conf = self.config()
        chat = not requester.startswith("cli:")
        client = client or ("bot" if chat else CLI_CLIENT)
        return Router(conf, self.identity(client), requester, origin or ("slack" if chat else "cli"),
                      connect_timeout=2.0, **kw)

    def run_job(self, module: str, params: dict[str, Any], targets: list[str], idc: str = "local",
                requester: str = "cli:test", **submit: Any) -> tuple[str, dict[str, dict[str, Any]], list[dict[str, Any]]]:
        """Submit through the client library and follow to the end: the final state, each host's
        result by name, and every event."""
        router = self.router(requester)
        try:
            ref, _ = router.submit(idc, module, params, targets, **submit)
            events: list[dict[str, Any]] = []
            state = router.follow(ref, events.append)
        finally:
            router.close()
        return state, {e["data"]["host"]: e["data"] for e in events if e["kind"] == "host"}, events

    def identity(self, client: str = CLI_CLIENT) -> Identity:
        return Identity.load(self.root / "keys" / f"{client}.key")

    def ombot(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run the real `ombot` CLI against this cluster's config."""
        return subprocess.run([sys.executable, "-m", "ombot", "--config", str(self.config_path), *args],
                              capture_output=True, text=True, timeout=timeout, env=child_env())


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    # Nor ANSIBLE_HOME and ANSIBLE_LOCAL_TEMP: a test that loaded an inventory in this process set them for this uid
    # (masters/inventory.py), and a child running as another user must make its own.
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMBOT_") and k not in ("ANSIBLE_HOME", "ANSIBLE_LOCAL_TEMP")}
    env["PYTHONPATH"] = str(REPO)
    return {**env, **(extra or {})}


class MasterProcess:
    def __init__(self, cluster: Cluster, master_id: str, env: dict[str, str]) -> None:
        self.cluster, self.id, self.env = cluster, master_id, env
        self.log_path = cluster.root / f"{master_id}.log"
        self.ready = cluster.root / f"{master_id}.ready"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> None:
        self.ready.unlink(missing_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ombot", "--config", str(self.cluster.config_path), "master", "--id", self.id,
             "--ready-file", str(self.ready)],
            stdout=log, stderr=subprocess.STDOUT, env=child_env(self.env), start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not self.ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"master {self.id} exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"master {self.id} did not become ready:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


class BotProcess:
    """`ombot bot` (or `ombot console`) as a real child process; `config_path` and `log_path` give a
    second bot on the same site its own copy of the config (another port) and its own log."""

    def __init__(self, cluster: Cluster, env: dict[str, str], args: tuple[str, ...] = ("bot",),
                 config_path: Path | None = None, log_path: Path | None = None) -> None:
        self.cluster, self.env, self.args = cluster, env, args
        self.config_path = config_path or cluster.config_path
        self.log_path = log_path or cluster.root / "bot.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, port: int | None = None, timeout: float = 30) -> "BotProcess":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ombot", "--config", str(self.config_path), *self.args],
            stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT, env=child_env(self.env),
            start_new_session=True,
        )
        if port is not None:
            wait_for_port(port, timeout, self)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def logged(master: MasterProcess, text: str, within: float = 10) -> bool:
    """The master's log says `text` within `within` seconds (it writes after it closed the socket)."""
    deadline = time.monotonic() + within
    while text not in master.log():
        if time.monotonic() > deadline:
            print(master.log())
            return False
        time.sleep(0.1)
    return True


def wait_for_port(port: int, timeout: float, owner: "BotProcess | None" = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if owner is not None and owner.proc is not None and owner.proc.poll() is not None:
                raise RuntimeError(f"process exited {owner.proc.returncode}:\n{owner.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listening on {port}" + (f":\n{owner.log()}" if owner else ""))
            time.sleep(0.05)


def statuses(results: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Each host's status, from Cluster.run_job's results."""
    return {name: r["status"] for name, r in results.items()}


def wait_for(check: Callable[[], object], within: float = 30, why: str = "") -> None:
    """Poll `check` until it is truthy; fail the test after `within` seconds, saying what it waited for."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {why}" if why else "timed out")
        time.sleep(0.05)  # often enough to see a short-lived child process (test_ansible_warm)


def run_job(router: Any, module: str, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Submit to localhost, follow to the end; the final state and the host's result."""
    ref, _ = router.submit("local", module, params, ["localhost"])
    events: list[dict[str, Any]] = []
    state = router.follow(ref, events.append)
    [host] = [e["data"] for e in events if e["kind"] == "host"]
    return state, host


class SteppedClock:
    """time.monotonic for the inventory: the deadline is taken at 0, every later reading is `then`."""

    def __init__(self, then: float, on_time: int = 0) -> None:
        self.readings = [0.0] + [0.5] * on_time  # the deadline, then `on_time` readings before it
        self.readings.reverse()
        self.then = then

    def monotonic(self) -> float:
        return self.readings.pop() if self.readings else self.then


def type_line(argv: list[str], line: str) -> None:
    """`line` typed at the interactive shell `argv` starts in a pty (a hooked shell records it), then `exit`."""
    import pexpect

    child = pexpect.spawn(argv[0], argv[1:], encoding="utf-8", timeout=30)
    try:
        child.sendline(line)
        child.sendline("exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
