"""Warm starts of ansible-playbook (masters/backends/ansible_forkserver.py, ansible_warm.py).

First the fork server and its launcher as ansible-runner would start them, with a stand-in for
the real ansible-playbook that only says it ran (so a cold start is visible); then through a real
master with the Ansible backend on real sshd hosts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ombot.masters.backends import ansible_forkserver
from tests import sshd
from tests.support import Cluster, statuses, wait_for

SERVER = str(Path(ansible_forkserver.__file__))
BASE_ENV = {"PATH": f"{os.path.dirname(sys.executable)}:/usr/bin:/bin", "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}


def test_the_server_imports_no_project_package() -> None:
    """It runs as its own script (python -I), outside the master: the standard library and Ansible only."""
    from tests.test_layout import imports_of

    tops = {name.split(".")[0] for name in imports_of(Path(SERVER))}
    assert tops - {"ansible"} <= sys.stdlib_module_names, tops


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, str], Path]]:
    env = {**BASE_ENV, "HOME": str(tmp_path), "ANSIBLE_HOME": str(tmp_path / "ah")}
    sock = tmp_path / "warm.sock"
    proc = subprocess.Popen([sys.executable, "-I", SERVER, "serve", str(sock), str(os.getpid())], env=env,
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(sock.exists)
    yield proc, env, sock
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def cold(tmp_path: Path) -> Path:
    """A stand-in for the real ansible-playbook: it prints `cold` and its arguments."""
    path = tmp_path / "real-ansible-playbook"
    path.write_text('#!/bin/sh\necho cold "$@"\nexit 7\n')
    path.chmod(0o755)
    return path


def launch(cold: Path, sock: Path, env: dict[str, str], *args: str,
           **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-I", "-S", SERVER, "launch", str(cold), str(sock), *args], env=env,
                          capture_output=True, text=True, timeout=60, **kw)  # type: ignore[call-overload]


def test_the_server_runs_ansible_playbook_and_the_launcher_exits_with_its_status(server, cold: Path) -> None:
    _, env, sock = server
    done = launch(cold, sock, env, "--version")
    assert done.returncode == 0 and done.stdout.startswith("ansible-playbook [core 2.19") and "cold" not in done.stdout
    real = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ansible-playbook"), "--no-such-option"],
                          env=env, capture_output=True, text=True)
    bad = launch(cold, sock, env, "--no-such-option")
    assert (bad.returncode, "cold" in bad.stdout) == (real.returncode, False) and real.returncode != 0
    assert bad.stderr == real.stderr  # the same usage message, on the same stream


def test_a_run_with_another_environment_or_no_server_starts_cold(server, cold: Path, tmp_path: Path) -> None:
    proc, env, sock = server
    other = launch(cold, sock, {**env, "ANSIBLE_FORKS": "7"}, "--version")
    assert (other.returncode, other.stdout) == (7, "cold --version\n")  # Ansible read ANSIBLE_FORKS at import
    per_run = launch(cold, sock, {**env, "AWX_ISOLATED_DATA_DIR": str(tmp_path)}, "--version")
    assert per_run.returncode == 0 and "cold" not in per_run.stdout  # read at run time: still warm
    proc.terminate()
    proc.wait(10)
    assert not sock.exists()
    gone = launch(cold, sock, env, "--version")
    assert (gone.returncode, gone.stdout) == (7, "cold --version\n")


def test_a_killed_launcher_takes_its_run_with_it(server, cold: Path, tmp_path: Path) -> None:
    proc, env, sock = server
    book = tmp_path / "wait.yml"
    book.write_text("- hosts: localhost\n  gather_facts: false\n  tasks:\n  - ansible.builtin.pause:\n"
                    "      seconds: 60\n")
    launcher = subprocess.Popen([sys.executable, "-I", "-S", SERVER, "launch", str(cold), str(sock), "-i",
                                 "localhost,", "-c", "local", str(book)], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(lambda: children(proc.pid))
    (run,) = children(proc.pid)
    os.killpg(launcher.pid, signal.SIGKILL)  # what ansible-runner does on a cancel or a timeout
    launcher.wait()
    wait_for(lambda: run not in children(proc.pid))
    assert proc.poll() is None and launch(cold, sock, env, "--version").returncode == 0  # still serving


def test_a_server_whose_master_died_exits(tmp_path: Path) -> None:
    sock = tmp_path / "warm.sock"
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, os, time; subprocess.Popen([sys.argv[1], "
                               "'-I', sys.argv[2], 'serve', sys.argv[3], str(os.getpid())]); time.sleep(60)",
                               sys.executable, SERVER, str(sock)], env={**BASE_ENV, "HOME": str(tmp_path)})
    wait_for(sock.exists)
    (served,) = children(parent.pid)
    parent.kill()
    parent.wait()
    wait_for(lambda: not Path(f"/proc/{served}").exists() or "Z" in Path(f"/proc/{served}/stat").read_text().split()[2])
    assert not sock.exists()


# -- through a real master --------------------------------------------------------------------


def ansible_cluster(root: Path, hosts: sshd.SshHosts, warm: bool) -> Cluster:
    made = Cluster(root, {"local": ["m1"]}, inventory=hosts.inventory(),
                   extra_toml=f"[masters.m1.ansible]\nwarm_start = {str(warm).lower()}\n")
    text = made.config_path.read_text()
    made.config_path.write_text(text.replace('state_dir = "state-m1"', 'state_dir = "state-m1"\nbackend = "ansible"'))
    made.start("m1")
    return made


def servers_of(cluster: Cluster) -> list[int]:
    master = cluster.processes["m1"].proc
    assert master is not None
    return [pid for pid in children(master.pid)
            if "ansible_forkserver.py" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")]


@pytest.mark.slow
def test_jobs_run_from_the_warm_server_and_a_dead_server_is_replaced(hosts: sshd.SshHosts, tmp_path: Path) -> None:
    cluster = ansible_cluster(tmp_path / "c", hosts, warm=True)
    try:
        assert cluster.run_job("shell.exec", {"cmd": "echo one"}, ["web01"])[0] == "ok"  # starts the server
        (server,) = servers_of(cluster)
        sock = Path(Path(f"/proc/{server}/cmdline").read_text().split("\0")[4])
        wait_for(sock.exists)  # listening: Ansible is imported
        forked: list[int] = []
        router = cluster.router()
        ref, _ = router.submit("local", "shell.exec", {"cmd": "sleep 2; echo two"}, ["web01", "web02"])
        wait_for(lambda: forked.extend(children(server)) or forked)  # the run is the server's child,
        assert "ansible_forkserver.py" in Path(f"/proc/{forked[0]}/cmdline").read_text()  # not a cold exec
        events: list[dict] = []
        assert router.follow(ref, events.append) == "ok"
        router.close()
        assert {e["data"]["host"]: e["data"]["stdout"] for e in events if e["kind"] == "host"} == {
            "web01": "two\n", "web02": "two\n"}
        os.kill(server, signal.SIGKILL)
        wait_for(lambda: server not in servers_of(cluster))
        state, results, _ = cluster.run_job("shell.exec", {"cmd": "echo three"}, ["web01", "web02"])
        assert state == "ok" and {r["stdout"] for r in results.values()} == {"three\n"}
        (again,) = servers_of(cluster)
        assert again != server
        assert "cold start" not in (cluster.root / "state-m1" / "ansible" / "warm.log").read_text()
    finally:
        cluster.stop_all()
    assert not Path(f"/proc/{again}").exists() or "Z" in Path(f"/proc/{again}/stat").read_text().split()[2]


@pytest.mark.slow
def test_warm_start_can_be_turned_off(hosts: sshd.SshHosts, tmp_path: Path) -> None:
    cluster = ansible_cluster(tmp_path / "c", hosts, warm=False)
    try:
        state, results, _ = cluster.run_job("shell.exec", {"cmd": "echo cold"}, ["web01", "web02"])
        assert state == "ok" and statuses(results) == {"web01": "ok", "web02": "ok"}
        assert servers_of(cluster) == []
    finally:
        cluster.stop_all()
