"""`file.push` cannot be redirected outside its roots, on every backend (issue 18, item 1).

The attacker is `nobody` (a second Unix user, through setpriv). It owns a directory under /tmp on the
destination's path and, in a tight loop, swaps the subdirectory the file is pushed into with a symlink
to a root-only directory outside file.push's roots (renameat2 RENAME_EXCHANGE: the name is always one
or the other). Root pushes many times through a real master: with the local backend, with Ansible over
real sshd hosts on loopback (tests/sshd.py), and with Salt (tests/saltrig.py); all of them run as root
on this machine, so the target is this filesystem. Each push must end ok with the file in the real
directory, or refused naming the way out, and nothing may ever appear in the root-only directory.

The helper that does the work (masters/backends/put_file.py) is also run here in-process, for what the
race cannot show: symlinks that stay inside the roots are still followed, and what a check run shows.
"""

from __future__ import annotations

import ast
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ombot.masters.backends import put_file
from ombot.modules.builtin.file_push import DEST_ROOTS
from tests import saltrig, sshd
from tests.saltrig import salt_cluster
from tests.support import Cluster

ROOTS = ", ".join(DEST_ROOTS)
NAME = "pushed.conf"
# As nobody: exchange `sub` (the real directory) and `link` (the way out) forever, until killed.
SWAP = r"""
import ctypes, os, sys
os.chdir(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD, RENAME_EXCHANGE = -100, 2
while True:
    if libc.renameat2(AT_FDCWD, b"sub", AT_FDCWD, b"link", RENAME_EXCHANGE) != 0:
        sys.exit("renameat2: " + os.strerror(ctypes.get_errno()))
"""


def why_no_second_user() -> str | None:
    if os.geteuid() != 0:
        return "needs root, to act as the second user nobody"
    if shutil.which("setpriv") is None:
        return "needs setpriv (util-linux)"
    return None


@dataclass
class Arena:
    """Where the race is run: `dest` lies in nobody's `home`; `real` is a descriptor of the directory
    `sub` names half the time, `secret` the root-only directory outside the roots it names otherwise."""

    home: Path
    secret: Path
    real: int

    @property
    def dest(self) -> Path:
        return self.home / "sub" / NAME


@pytest.fixture
def arena() -> Iterator[Arena]:
    why = why_no_second_user()
    if why:
        pytest.skip(why)
    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="ombot-race-", dir="/tmp"))
    secret = Path(tempfile.mkdtemp(prefix="ombot-race-secret-", dir="/var/lib"))  # 0700 root, not a root of file.push
    home = base / "home"
    try:
        base.chmod(0o755)
        home.mkdir()
        os.chown(home, nobody.pw_uid, nobody.pw_gid)
        as_nobody(nobody, "mkdir", str(home / "sub"))
        as_nobody(nobody, "ln", "-s", str(secret), str(home / "link"))
        real = os.open(home / "sub", os.O_RDONLY | os.O_DIRECTORY)
        try:
            yield Arena(home, Path(os.path.realpath(secret)), real)
        finally:
            os.close(real)
    finally:
        shutil.rmtree(base)
        shutil.rmtree(secret)


def as_nobody(nobody: pwd.struct_passwd, *argv: str) -> None:
    subprocess.run(["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups", *argv],
                   check=True, timeout=30)


def race(arena: Arena, cluster: Cluster, targets: list[str], runs: int) -> None:
    """Push `runs` times to each target while nobody swaps. Nothing may land in the secret directory;
    each push is ok (this run's file in the real directory) or refused naming the way out."""
    store = cluster.root / "state-m1" / "files"
    store.mkdir(parents=True, exist_ok=True)
    nobody = pwd.getpwnam("nobody")
    swapper = subprocess.Popen(["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
                                "/usr/bin/python3", "-c", SWAP, str(arena.home)])
    escaped: list[str] = []
    outcomes: list[str] = []
    left: list[str] = []
    try:
        for run in range(runs):
            (store / "app.conf").write_text(f"run {run}\n")
            _, results, _ = cluster.run_job("file.push", {"source": "app.conf", "dest": str(arena.dest)}, targets)
            escaped += [f"run {run}: {name} ({results})" for name in os.listdir(arena.secret)]
            outcomes += [outcome(arena, results[host], run) for host in targets]
            for name in os.listdir(arena.secret):  # counted above; gone, so the next run is seen on its own
                os.unlink(arena.secret / name)
            left += [f"run {run}: {name}" for name in os.listdir(arena.real) if name != NAME]
            for name in os.listdir(arena.real):
                os.unlink(name, dir_fd=arena.real)
        assert swapper.poll() is None, "the swap loop stopped"
    finally:
        swapper.kill()
        swapper.wait()
    assert escaped == [], "file.push wrote outside its roots"
    assert set(outcomes) == {"ok", "refused"}, outcomes  # nothing else, and the loop really raced the pushes
    assert left == [], "partial files left behind"


def outcome(arena: Arena, result: dict[str, object], run: int) -> str:
    """`ok` with this run's file in the real directory, `refused` naming where the symlink led, else
    what happened."""
    if result["status"] == "ok":
        try:
            written = os.open(NAME, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=arena.real)
        except FileNotFoundError:
            return f"ok, but no file in the real directory: {result}"
        with os.fdopen(written, "rb") as f:
            return "ok" if f.read() == f"run {run}\n".encode() else f"ok, but another run's file: {result}"
    if (result["status"], result["error"]) == (
            "failed", f"dest: {arena.dest} resolves to {arena.secret}/{NAME}, outside {ROOTS}"):
        return "refused"
    return f"{result['status']}: {result['error']}"


# -- the race, on each backend -----------------------------------------------------------------


@pytest.mark.slow
def test_the_local_backend_never_writes_where_a_swapped_symlink_leads(arena: Arena,
                                                                     tmp_path_factory: pytest.TempPathFactory) -> None:
    cluster = Cluster(tmp_path_factory.mktemp("race-local"), {"local": ["m1"]})
    cluster.start("m1")
    try:
        race(arena, cluster, ["localhost"], runs=80)
    finally:
        cluster.stop_all()


@pytest.mark.slow
@pytest.mark.skipif(not sshd.available(), reason="needs openssh-server (sshd)")
def test_the_ansible_backend_never_writes_where_a_swapped_symlink_leads(
        arena: Arena, tmp_path_factory: pytest.TempPathFactory) -> None:
    hosts = sshd.SshHosts(tmp_path_factory.mktemp("race-sshd"), ["web01", "web02"]).start()
    try:
        cluster = Cluster(tmp_path_factory.mktemp("race-ansible") / "c", {"local": ["m1"]},
                          inventory=hosts.inventory())
        text = cluster.config_path.read_text()
        cluster.config_path.write_text(text.replace('state_dir = "state-m1"',
                                                    'state_dir = "state-m1"\nbackend = "ansible"'))
        cluster.start("m1")
        try:
            race(arena, cluster, ["web01", "web02"], runs=12)
        finally:
            cluster.stop_all()
    finally:
        hosts.stop()


@pytest.mark.slow
def test_the_salt_backend_never_writes_where_a_swapped_symlink_leads(arena: Arena,
                                                                    tmp_path_factory: pytest.TempPathFactory) -> None:
    if not saltrig.available():
        pytest.skip("needs the salt extra (pip install 'ombot[salt]') and root, to run a salt-master and minions")
    rig = saltrig.SaltRig(tmp_path_factory.mktemp("race-salt"), minions=["minion1", "minion2"]).start()
    try:
        cluster = salt_cluster(tmp_path_factory.mktemp("race-saltmaster") / "c", rig)
        cluster.start("m1")
        try:
            race(arena, cluster, ["minion1", "minion2"], runs=12)
        finally:
            cluster.stop_all()
    finally:
        rig.stop()


# -- the helper itself -------------------------------------------------------------------------


def test_the_helper_runs_on_the_oldest_python_ansible_supports() -> None:
    """It is shipped as source to the hosts, whose Python may be 3.8 (ansible-core's floor)."""
    ast.parse(put_file.source(), feature_version=(3, 8))
    assert not {name for name in _imports(put_file.source()) if name.split(".")[0] in ("masters", "modules", "ombot")}


def _imports(source: str) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_symlinks_that_stay_inside_the_roots_are_followed(tmp_path: Path) -> None:
    (tmp_path / "releases" / "42").mkdir(parents=True)
    (tmp_path / "current").symlink_to("releases/../releases/42")  # relative, with `..`: as the kernel reads it
    assert put_file.put(str(tmp_path / "current" / "a.conf"), b"a\n", 0o640, roots=("/tmp",)) == (True, "")
    written = tmp_path / "releases" / "42" / "a.conf"
    assert written.read_bytes() == b"a\n" and stat.S_IMODE(written.stat().st_mode) == 0o640
    inode = written.stat().st_ino
    assert put_file.put(str(tmp_path / "current" / "a.conf"), b"a\n", 0o640, roots=("/tmp",)) == (False, "")
    assert written.stat().st_ino == inode  # the same content and mode: nothing written


def test_a_symlink_at_the_destination_is_replaced_never_written_through(tmp_path: Path) -> None:
    target = tmp_path / "target.conf"
    target.write_text("kept\n")
    (tmp_path / "link.conf").symlink_to(target)
    assert put_file.put(str(tmp_path / "link.conf"), b"new\n", 0o644, roots=("/tmp",))[0]
    assert target.read_text() == "kept\n"
    assert not (tmp_path / "link.conf").is_symlink() and (tmp_path / "link.conf").read_text() == "new\n"


def test_a_check_run_writes_nothing_and_shows_no_hardlinked_file(tmp_path: Path) -> None:
    dest = tmp_path / "app.conf"
    dest.write_text("key = old\n")
    dest.chmod(0o600)
    changed, diff = put_file.put(str(dest), b"key = new\n", 0o644, check=True, after="store:app.conf")
    assert changed and dest.read_text() == "key = old\n"
    assert diff == (f"--- before: {dest}\n+++ after: store:app.conf\n@@ -1 +1 @@\n-key = old\n+key = new\n"
                    "mode 0600 -> 0644\n")
    os.link(dest, tmp_path / "elsewhere")  # a hardlink may name a secret: its text is never shown
    changed, diff = put_file.put(str(dest), b"key = new\n", 0o600, check=True)
    assert changed and "old" not in diff and diff.startswith("(a file with 2 links: its contents are not shown)\n")
