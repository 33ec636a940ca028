"""systemd's readiness protocol without systemd: a test-owned unix datagram socket stands in for the
service manager's $NOTIFY_SOCKET, and real master and bot processes talk to it. READY=1 comes only
once the process accepts connections, WATCHDOG=1 repeats at half of WATCHDOG_USEC, STOPPING=1 comes
on SIGTERM; every datagram comes from the main process (NotifyAccess=main), and nothing the process
starts inherits the socket."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from ombot import proc as hygiene
from tests.fakeslack import TEAM_ID, FakeSlack
from tests.rigs.slack import slack_env
from tests.support import BotProcess, Cluster, bot_table, child_env, free_port, run_job, wait_for

WATCHDOG_USEC = 3_000_000  # a ping every 1.5 s: a loaded machine's stall of a second still passes
UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass
class Datagram:
    """One message to the service manager, and who sent it (SO_PASSCRED: the kernel says, not the sender)."""

    lines: list[str]
    pid: int
    at: float


class NotifySocket:
    """The service manager's end: a bound datagram socket that reads senders' credentials."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(path)
        self.received: list[Datagram] = []

    def next(self, timeout: float = 30) -> Datagram:
        self.sock.settimeout(timeout)
        data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(UCRED.size))
        pid = next(UCRED.unpack(d[:UCRED.size])[0] for level, kind, d in ancillary
                   if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
        got = Datagram(data.decode().split("\n"), pid, time.monotonic())
        self.received.append(got)
        return got

    def until(self, line: str, timeout: float = 30) -> Datagram:
        """Read up to the first datagram holding `line`."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.next(max(0.1, deadline - time.monotonic()))
            if line in got.lines:
                return got

    def close(self) -> None:
        self.sock.close()


@contextmanager
def notify_socket() -> Iterator[NotifySocket]:
    """Under a short private directory: a unix socket's path must fit in 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="ombot-notify-") as directory:
        sock = NotifySocket(str(Path(directory) / "notify"))
        try:
            yield sock
        finally:
            sock.close()


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def stop(process: subprocess.Popen[bytes]) -> int:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        return process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise


def pings(sock: NotifySocket, seconds: float) -> list[Datagram]:
    """The WATCHDOG=1 datagrams of the next `seconds`."""
    found, deadline = [], time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            got = sock.next(left)
        except TimeoutError:
            break
        if "WATCHDOG=1" in got.lines:
            found.append(got)
    return found


def assert_watchdog_beats(sock: NotifySocket, pid: int) -> None:
    beats = pings(sock, 8.0)
    assert len(beats) >= 4, [d.lines for d in sock.received]  # 5 or 6 at 1.5 s on a quiet machine
    gaps = [b.at - a.at for a, b in zip(beats, beats[1:])]
    assert max(gaps) < WATCHDOG_USEC / 1e6, gaps  # never as late as the watchdog's whole period
    assert {b.pid for b in beats} == {pid}


# -- the master ------------------------------------------------------------------------------------------


def test_a_master_says_ready_once_it_accepts_keeps_its_watchdog_fed_and_says_it_stops(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path / "site", {"local": ["m1"]})
    port = cluster.ports["m1"]
    with notify_socket() as sock:
        env = child_env({"NOTIFY_SOCKET": sock.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
        log = open(tmp_path / "m1.log", "wb")
        master = subprocess.Popen([sys.executable, "-m", "ombot", "--config", str(cluster.config_path), "master",
                                   "--id", "m1"], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            first = sock.next()
            assert accepts(port), "READY=1 came before the master accepted connections"
            assert first.lines[0] == "READY=1" and first.pid == master.pid, first
            assert first.lines[1] == f"STATUS=master m1 (IDC local) serving on 127.0.0.1:{port}"
            assert_watchdog_beats(sock, master.pid)
            jobs_cannot_notify(cluster, sock, master.pid)
            assert stop(master) == 0
            stopping = sock.until("STOPPING=1", timeout=5)
            assert stopping.pid == master.pid and "STATUS=master m1 stopping" in stopping.lines
        finally:
            if master.poll() is None:
                os.killpg(master.pid, signal.SIGKILL)
            log.close()
    assert {d.pid for d in sock.received} == {master.pid}, (tmp_path / "m1.log").read_text()


def jobs_cannot_notify(cluster: Cluster, sock: NotifySocket, master_pid: int) -> None:
    """A job's command finds no NOTIFY_SOCKET to speak for its master with."""
    router = cluster.router()
    try:
        probe = ("import os, socket\nname = os.environ.get('NOTIFY_SOCKET')\nprint('socket', name)\n"
                 "name and socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'READY=1\\nSTATUS=job', name)\n")
        state, host = run_job(router, "shell.exec", {"cmd": f"python3 -c \"{probe}\"; env"})
    finally:
        router.close()
    assert state == "ok", host
    assert host["stdout"].startswith("socket None\n"), host
    assert not any(name.startswith(("NOTIFY_SOCKET=", "WATCHDOG_")) for name in host["stdout"].splitlines())
    assert all(d.pid == master_pid for d in sock.received)


# -- the bot ---------------------------------------------------------------------------------------------


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[Cluster, FakeSlack, int]]:
    port = free_port()
    cluster = Cluster(tmp_path / "site", {"local": ["m1"]}, extra_toml=bot_table(port, TEAM_ID))
    cluster.start("m1")
    try:
        with FakeSlack() as fake:
            yield cluster, fake, port
    finally:
        cluster.stop_all()


def test_an_http_bot_says_ready_once_its_port_accepts_and_stopping_on_sigterm(
        site: tuple[Cluster, FakeSlack, int]) -> None:
    cluster, fake, port = site
    with notify_socket() as sock:
        bot = BotProcess(cluster, slack_env(fake, NOTIFY_SOCKET=sock.path, WATCHDOG_USEC=str(WATCHDOG_USEC))).start()
        assert bot.proc is not None
        try:
            first = sock.next()
            assert accepts(port), f"READY=1 came before the bot listened:\n{bot.log()}"
            assert first.lines == ["READY=1", f"STATUS=serving workspace {TEAM_ID} on http://127.0.0.1:{port}/slack/events"]
            assert_watchdog_beats(sock, bot.proc.pid)
            assert stop(bot.proc) == 0
            assert sock.until("STOPPING=1", timeout=5).pid == bot.proc.pid
        finally:
            bot.stop()
        assert {d.pid for d in sock.received} == {bot.proc.pid}


def test_a_socket_mode_bot_says_ready_once_connected_to_slack(site: tuple[Cluster, FakeSlack, int]) -> None:
    cluster, fake, _ = site
    # An abstract-namespace name nobody listens on: the bot serves all the same, and says why it could not notify.
    deaf = BotProcess(cluster, slack_env(fake, socket_mode=True, NOTIFY_SOCKET=f"@ombot-test-nobody-{os.getpid()}"))
    try:
        deaf.start()
        wait_for(lambda: "cannot notify the service manager" in deaf.log(), why=f"the warning in\n{deaf.log()}")
        assert fake.socket.connections == 1
    finally:
        deaf.stop()
    wait_for(lambda: fake.socket.connections == 0, why="the first bot's connection to close")
    with notify_socket() as sock:
        bot = BotProcess(cluster, slack_env(fake, socket_mode=True, NOTIFY_SOCKET=sock.path)).start()
        try:
            first = sock.next()
            assert fake.socket.connections == 1, "READY=1 came before the Socket Mode connection"
            assert first.lines == ["READY=1", f"STATUS=serving workspace {TEAM_ID} over Socket Mode"]
        finally:
            bot.stop()
        assert "STOPPING=1" in sock.until("STOPPING=1", timeout=5).lines


# -- the protocol, in this process -----------------------------------------------------------------------


def test_an_abstract_socket_name_is_reached_and_children_never_inherit_the_socket() -> None:
    """`@name` is the abstract namespace; after `claim` a child started with the inherited
    environment sees neither the socket nor the watchdog (a fresh Python process, so claim is fresh)."""
    name = f"ombot-test-{os.getpid()}-{time.monotonic_ns()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(b"\0" + name.encode())
    server.settimeout(10)
    script = ("import os, subprocess, sys\nfrom ombot import sdnotify\nsdnotify.claim()\n"
              "print(sdnotify.watchdog_interval())\nprint(sdnotify.notify('READY=1', 'STATUS=x'))\n"
              "sys.stdout.flush()\nsubprocess.run(['env'])\n")
    try:
        env = child_env({"NOTIFY_SOCKET": f"@{name}", "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())})
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        interval, sent, *children = done.stdout.splitlines()
        assert server.recv(4096) == b"READY=1\nSTATUS=x" and sent == "True"
        assert interval == "None"  # WATCHDOG_PID names another process (this test's): not its watchdog
        assert not [line for line in children if line.startswith(("NOTIFY_SOCKET=", "WATCHDOG_"))], children
    finally:
        server.close()


def test_without_a_socket_notify_does_nothing_and_a_watchdog_for_this_pid_counts() -> None:
    script = ("import os\nos.environ['WATCHDOG_USEC'] = '3000000'\nos.environ['WATCHDOG_PID'] = str(os.getpid())\n"
              "from ombot import sdnotify\nprint(sdnotify.notify('READY=1'), sdnotify.watchdog_interval())\n")
    env = {k: v for k, v in child_env().items() if k != "NOTIFY_SOCKET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["False", "1.5"], done.stderr


def test_a_child_environment_never_carries_the_notify_socket_even_when_asked() -> None:
    source = {"PATH": "/bin", "NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1"}
    assert hygiene.child_env(keep=["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"], source=source) == {"PATH": "/bin"}
