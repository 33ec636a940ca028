"""sshd test hosts with roots of their own (tests/sshd.py, `SshHosts(..., private_roots=True)`).

Each host's sshd runs in a mount namespace of its own: what a session writes in /etc, /opt, ...
lands in that host's tree (`host.root`), never on the other host nor on the machine; its shells
read the host's /etc/profile and /etc/bash.bashrc, not the machine's; what a session leaves running
is ended by `stop()`, and nothing else is; Ansible, driven by a real master, works against them.

Before a test writes anything through a host it checks that the host's sessions run in the host's
namespace, on its overlay (`own_root`): were the feature broken, the test fails there instead of
writing to the machine. Whatever a test names on the machine is unique to the run and removed if it
leaked (after the assertion that it did not).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import sshd
from tests.support import Cluster, statuses, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sshd.available(), reason="needs openssh-server (sshd)")]


def start(root: Path, names: list[str]) -> sshd.SshHosts:
    made = sshd.SshHosts(root, names, private_roots=True)
    try:
        return made.start()
    except sshd.Unavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sshd.SshHosts]:
    made = start(tmp_path_factory.mktemp("roots"), ["web01", "web02"])
    yield made
    made.stop()


def own_root(hosts: sshd.SshHosts, name: str) -> sshd.SshHost:
    """The host, once its sessions are seen to run in its own namespace with /etc an overlay."""
    host = hosts.host(name)
    seen = hosts.ssh(name, "readlink /proc/self/ns/mnt; stat -f -c %T /etc /opt /var/lib /tmp")
    assert seen.returncode == 0, seen.stderr
    assert host.namespace is not None and host.namespace != os.readlink("/proc/self/ns/mnt")
    assert seen.stdout.split()[:4] == [host.namespace, "overlayfs", "overlayfs", "overlayfs"], seen.stdout
    return host


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def test_a_file_written_in_profile_d_is_the_hosts_own(hosts: sshd.SshHosts) -> None:
    web01, web02 = own_root(hosts, "web01"), own_root(hosts, "web02")
    name = unique("ombot-test") + ".sh"
    machine = Path("/etc/profile.d") / name
    machine_names = sorted(os.listdir("/etc/profile.d"))
    before = web01.snapshot()
    try:
        wrote = hosts.ssh("web01", f"echo 'export OMBOT_TEST_ROOT=web01' > /etc/profile.d/{name}; ls -A /etc/profile.d")
        assert wrote.returncode == 0, wrote.stderr
        assert wrote.stdout.split() == [name]  # the host's profile.d started empty: none of the machine's files
        assert (web01.root / "etc/profile.d" / name).read_text() == "export OMBOT_TEST_ROOT=web01\n"
        assert sshd.changes(before, web01.snapshot()) == [
            f"+ /etc/profile.d/{name}: {sshd.describe(web01.root / 'etc/profile.d' / name)}"]
        assert sshd.describe(web01.root / "etc/profile.d" / name).startswith("file 0644 0:0 sha256:")
        assert not (web02.root / "etc/profile.d" / name).exists()
        assert hosts.ssh("web02", "ls -A /etc/profile.d").stdout == ""
        # a login shell reads the host's /etc/profile, which sources the host's profile.d
        login = "bash -lc 'echo \"[$OMBOT_TEST_ROOT]\"'"
        assert hosts.ssh("web01", login).stdout == "[web01]\n"
        assert hosts.ssh("web02", login).stdout == "[]\n"
        removed = hosts.ssh("web01", f"rm /etc/profile.d/{name}")
        assert removed.returncode == 0, removed.stderr
        assert sshd.changes(before, web01.snapshot()) == []  # as it was: nothing left behind
    finally:
        leaked = machine.exists()
        if leaked:
            machine.unlink()
    assert not leaked, f"{machine} was written on the machine"
    assert sorted(os.listdir("/etc/profile.d")) == machine_names


def _reads_global_bashrc() -> bool:
    """Whether this bash reads /etc/bash.bashrc (Debian builds it in)."""
    bash = shutil.which("bash")
    return bash is not None and b"/etc/bash.bashrc\0" in Path(bash).resolve().read_bytes()


def test_sessions_read_the_hosts_bash_bashrc_and_profile_not_the_machines(hosts: sshd.SshHosts) -> None:
    web01, web02 = own_root(hosts, "web01"), own_root(hosts, "web02")
    machine = {p: os.stat(p) for p in ("/etc/bash.bashrc", "/etc/profile") if os.path.exists(p)}
    for name, host in (("web01", web01), ("web02", web02)):
        seen = hosts.ssh(name, "cat /etc/bash.bashrc; echo ===; cat /etc/profile")
        assert seen.stdout == (sshd.OWN_FILES["/etc/bash.bashrc"] + "===\n" + sshd.OWN_FILES["/etc/profile"])
        assert (host.root / "etc/bash.bashrc").read_text() == sshd.OWN_FILES["/etc/bash.bashrc"]
        assert "tests/sshd.py" in seen.stdout
    if not _reads_global_bashrc():
        pytest.skip("this bash does not read /etc/bash.bashrc")
    token = unique("bashrc")
    try:
        marked = hosts.ssh("web01", f"sed -i '1i export OMBOT_TEST_BASHRC={token}' /etc/bash.bashrc")
        assert marked.returncode == 0, marked.stderr
        interactive = "bash -ic 'echo \"[$OMBOT_TEST_BASHRC]\"' 2>/dev/null"
        assert hosts.ssh("web01", interactive).stdout.splitlines()[-1] == f"[{token}]"
        assert hosts.ssh("web02", interactive).stdout.splitlines()[-1] == "[]"
    finally:
        hosts.ssh("web01", "sed -i '1d' /etc/bash.bashrc")
    assert (web01.root / "etc/bash.bashrc").read_text() == sshd.OWN_FILES["/etc/bash.bashrc"]
    for path, was in machine.items():  # never read, never written: the same inode, size and time
        now = os.stat(path)
        assert (now.st_ino, now.st_size, now.st_mtime_ns) == (was.st_ino, was.st_size, was.st_mtime_ns)


def test_changing_a_file_of_the_machine_changes_only_the_hosts_view(hosts: sshd.SshHosts) -> None:
    """The machine's files show through (/etc/hostname here); a host writing or deleting one gets its
    own copy or a whiteout, and the machine and the other host keep theirs."""
    if not os.path.isfile("/etc/hostname"):
        pytest.skip("this machine has no /etc/hostname")
    web01, _ = own_root(hosts, "web01"), own_root(hosts, "web02")
    was = os.stat("/etc/hostname")
    machine = Path("/etc/hostname").read_text()
    token = unique("host")
    appended = hosts.ssh("web01", f"echo {token} >> /etc/hostname; cat /etc/hostname")
    assert appended.stdout == machine + f"{token}\n"
    assert (web01.root / "etc/hostname").read_text() == machine + f"{token}\n"  # copied up, then written
    assert hosts.ssh("web02", "cat /etc/hostname").stdout == machine
    deleted = hosts.ssh("web01", "rm /etc/hostname; ls /etc/hostname")
    assert deleted.returncode != 0 and "No such file" in deleted.stderr
    assert web01.snapshot()["/etc/hostname"] == "whiteout"
    assert hosts.ssh("web02", "cat /etc/hostname").stdout == machine
    now = os.stat("/etc/hostname")
    assert (now.st_ino, now.st_size, now.st_mtime_ns) == (was.st_ino, was.st_size, was.st_mtime_ns)
    assert Path("/etc/hostname").read_text() == machine


def test_each_host_has_its_own_tmp_opt_and_var(hosts: sshd.SshHosts) -> None:
    own_root(hosts, "web01")
    own_root(hosts, "web02")
    name = unique("ombot-test")
    paths = [f"/tmp/{name}", f"/opt/{name}", f"/var/lib/{name}", f"/var/spool/{name}", f"/usr/local/{name}",
             f"/etc/{name}"]
    try:
        for host in ("web01", "web02"):
            made = hosts.ssh(host, " && ".join(f"mkdir {p} && echo {host} > {p}/who" for p in paths))
            assert made.returncode == 0, made.stderr
        for host in hosts.hosts:
            assert host.root is not None
            assert {p: (host.root / p.lstrip("/") / "who").read_text() for p in paths} == {p: f"{host.name}\n"
                                                                                           for p in paths}
        removed = hosts.ssh("web01", "rm -r " + " ".join(paths))  # no mount point in the way: they go
        assert removed.returncode == 0, removed.stderr
        assert not any((hosts.host("web01").root / p.lstrip("/")).exists() for p in paths)
        assert hosts.ssh("web02", f"cat /opt/{name}/who").stdout == "web02\n"
    finally:
        leaked = [p for p in paths if os.path.lexists(p)]
        for path in leaked:
            shutil.rmtree(path)
        hosts.ssh("web02", "rm -rf " + " ".join(paths))
    assert not leaked, f"written on the machine: {leaked}"


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().split("\0")[:-1]
    except OSError:
        return []


def test_stop_ends_what_a_session_left_running_and_nothing_else(tmp_path: Path) -> None:
    made = start(tmp_path / "hosts", ["web01", "web02"])
    seconds = str(600 + os.getpid() % 97)  # a sleep of our own, told apart by its argument
    bystander = subprocess.Popen(["sleep", seconds])  # on the machine: stop() must leave it alone
    detached: list[int] = []
    try:
        for name in ("web01", "web02"):
            left = made.ssh(name, f"setsid nohup sleep {seconds} >/dev/null 2>&1 </dev/null & echo $!")
            assert left.returncode == 0, left.stderr
            detached.append(int(left.stdout))
        for pid, host in zip(detached, made.hosts):  # the session is over, the sleep lives on
            wait_for(lambda: _cmdline(pid) == ["sleep", seconds], within=10, why=f"setsid, nohup to exec sleep ({pid})")
            assert _alive(pid)
            assert os.readlink(f"/proc/{pid}/ns/mnt") == host.namespace
        made.stop()
        assert [_alive(pid) for pid in detached] == [False, False]
        assert [pid in host.leftovers for pid, host in zip(detached, made.hosts)] == [True, True]
        assert bystander.poll() is None and _alive(bystander.pid)
    finally:
        made.stop()
        bystander.kill()
        bystander.wait()
        for pid in detached:  # ours, if stop() missed them
            if _alive(pid) and _cmdline(pid)[-2:] == ["sleep", seconds]:
                os.kill(pid, signal.SIGKILL)


def test_ten_hosts_start_in_seconds_each_in_a_namespace_of_its_own(tmp_path: Path) -> None:
    began = time.monotonic()
    made = start(tmp_path / "hosts", [f"web{i:02d}" for i in range(1, 11)])
    took = time.monotonic() - began
    try:
        namespaces = [h.namespace for h in made.hosts]
        assert len(set(namespaces)) == 10 and os.readlink("/proc/self/ns/mnt") not in namespaces
        assert took < 10, f"10 hosts took {took:.1f} s to start"
        assert [made.ssh(h.name, "readlink /proc/self/ns/mnt").stdout.strip() for h in made.hosts] == namespaces
    finally:
        made.stop()


def test_a_master_runs_ansible_jobs_on_private_root_hosts(hosts: sshd.SshHosts,
                                                          make_cluster: Callable[..., Cluster]) -> None:
    for host in hosts.hosts:
        own_root(hosts, host.name)
    before = {h.name: h.snapshot() for h in hosts.hosts}
    cluster = make_cluster(inventory=hosts.inventory())
    text = cluster.config_path.read_text()
    ansible = text.replace('state_dir = "state-m1"', 'state_dir = "state-m1"\nbackend = "ansible"')
    cluster.config_path.write_text(ansible)
    cluster.start("m1")
    name = unique("ombot-test")
    install = (f'mkdir /opt/{name} && echo "$OMBOT_HOST" > /opt/{name}/who && '
               f"echo 'export OMBOT_TEST_ROOT=1' > /etc/profile.d/{name}.sh && cat /etc/bash.bashrc")
    try:
        state, results, _ = cluster.run_job("shell.exec", {"cmd": install}, ["web01", "web02", "down01"])
        assert statuses(results) == {"web01": "ok", "web02": "ok", "down01": "unreachable"}, results
        for host in hosts.hosts:
            assert results[host.name]["stdout"] == sshd.OWN_FILES["/etc/bash.bashrc"]
            assert host.root is not None and (host.root / "opt" / name / "who").read_text() == f"{host.name}\n"
            assert [line.split(":")[0] for line in sshd.changes(before[host.name], host.snapshot())] == [
                f"+ /etc/profile.d/{name}.sh", f"+ /opt/{name}", f"+ /opt/{name}/who"]
        state, results, _ = cluster.run_job("shell.exec", {"cmd": f"rm -r /opt/{name} /etc/profile.d/{name}.sh"},
                                            ["web01", "web02"])
        assert state == "ok", results
        assert {h.name: sshd.changes(before[h.name], h.snapshot()) for h in hosts.hosts} == {"web01": [], "web02": []}
    finally:
        leaked = [p for p in (f"/opt/{name}", f"/etc/profile.d/{name}.sh") if os.path.lexists(p)]
        for path in leaked:
            shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
    assert not leaked, f"written on the machine: {leaked}"
