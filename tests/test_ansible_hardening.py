"""The Ansible backend's edges (issue 18, items 4 to 6), through real masters on real sshd "hosts".

- A warm fork server killed in the middle of a run: the hosts it was running are `unknown` (they may
  finish the work), never `failed`, and the run's processes and local temp directories are gone.
- The backend's settings (and the inventory settings masters/inventory.py exports) reach every run,
  even where the master's own environment holds the same values; a check run's diff names a store
  file as file.push was given it, not by the master's path.
- The ssh control directory of a master whose state path is too long for a socket is private and
  random: `nobody` making the old, guessable directory first no longer stops the master.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import sshd
from tests.support import Cluster, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sshd.available(), reason="needs openssh-server (sshd)")]

NOBODY = 65534
# The backend's settings a run must see, whatever the master's environment holds.
SETTINGS = {"ANSIBLE_INVENTORY_ENABLED": "ini,yaml", "ANSIBLE_INVENTORY_UNPARSED_FAILED": "True",
            "ANSIBLE_INVENTORY_ANY_UNPARSED_IS_FAILED": "True", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "ANSIBLE_NOCOLOR": "True", "ANSIBLE_DEPRECATION_WARNINGS": "False", "ANSIBLE_LOCALHOST_WARNING": "False"}
OPERATOR = {"ANSIBLE_OMBOT_OPERATOR_OWN": "kept-out", "SLACK_BOT_TOKEN": "xoxb-ombot-hardening-secret"}
ENV_BOOK = """\
- name: env
  hosts: all
  gather_facts: false
  tasks:
    - name: the run's environment
      ansible.builtin.debug:
        msg: "{% for name in names %}{{ name }}={{ lookup('env', name) }};{% endfor %}"
      vars:
        names: [NAMES]
""".replace("NAMES", ", ".join([*SETTINGS, *OPERATOR]))


def ansible_master(root: Path, hosts: sshd.SshHosts, books: Path | None = None, env: dict[str, str] | None = None,
                   start: bool = True) -> Cluster:
    """One master (m1) with the Ansible backend and a warm start, on the sshd hosts."""
    extra = "[masters.m1.ansible]\nwarm_start = true\n" + (f'playbooks = "{books}"\n' if books else "")
    made = Cluster(root, {"local": ["m1"]}, inventory=hosts.inventory(), extra_toml=extra)
    text = made.config_path.read_text()
    made.config_path.write_text(text.replace('state_dir = "state-m1"', 'state_dir = "state-m1"\nbackend = "ansible"'))
    if start:
        made.start("m1", env=env)
    return made


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def parents() -> dict[int, int]:
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit():
                found[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return found


def descendants(pid: int) -> list[int]:
    tree, found, todo = parents(), [], [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, pp in tree.items() if pp == parent]
        found += kids
        todo += kids
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    except OSError:
        return ""


def warm_server(cluster: Cluster) -> int:
    master = cluster.processes["m1"].proc
    assert master is not None
    (server,) = [p for p in descendants(master.pid) if "ansible_forkserver.py\0serve" in cmdline(p)]
    return server


# -- item 4: a warm server that dies mid-run ----------------------------------------------------


def test_a_run_whose_warm_server_dies_is_unknown_and_leaves_nothing(hosts: sshd.SshHosts, tmp_path: Path) -> None:
    cluster = ansible_master(tmp_path / "c", hosts)
    marks = Path(tempfile.mkdtemp(prefix="ombot-lost-"))
    marks.chmod(0o755)
    try:
        assert cluster.run_job("ping", {}, ["web01"])[0] == "ok"  # starts the server
        server = warm_server(cluster)
        router = cluster.router()
        ref, _ = router.submit("local", "shell.exec", {"cmd": f"echo $$ > {marks}/$OMBOT_HOST; exec sleep 120"},
                               ["web01", "web02"])
        wait_for(lambda: all((marks / h).exists() and (marks / h).read_text().strip() for h in ("web01", "web02")))
        run = [p for p in descendants(server) if "ansible_forkserver.py" in cmdline(p)]  # its child and workers
        assert len(run) >= 3, run
        os.kill(server, signal.SIGKILL)
        events: list[dict[str, Any]] = []
        assert router.follow(ref, events.append) == "unknown"
        router.close()
        results = {e["data"]["host"]: e["data"] for e in events if e["kind"] == "host"}
        assert {h: r["status"] for h, r in results.items()} == {"web01": "unknown", "web02": "unknown"}
        assert all("warm ansible-playbook server died" in r["error"] for r in results.values())
        wait_for(lambda: not any(running(p) for p in run))  # Ansible ended its workers; none is left behind
        temp = cluster.root / "state-m1" / "ansible" / "tmp"
        assert [p.name for p in temp.iterdir() if p.name.startswith("ansible-local-")] == []
        state, results, _ = cluster.run_job("shell.exec", {"cmd": "echo again"}, ["web01"])
        assert state == "ok" and results["web01"]["stdout"] == "again\n"  # a new server
    finally:
        cluster.stop_all()
        for mark in marks.iterdir():  # the hosts' sleeps, which nothing here stops: they are "still at work"
            pid = int(mark.read_text() or 0)
            if pid and "sleep" in cmdline(pid):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(marks)


# -- item 6: the backend's settings, and the diff header -----------------------------------------


@pytest.fixture(scope="module")
def env_master(hosts: sshd.SshHosts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    books = tmp_path_factory.mktemp("books")
    (books / "env.yml").write_text(ENV_BOOK)
    # The master's own environment holds the same values as the backend's settings, and some of its own.
    made = ansible_master(tmp_path_factory.mktemp("env") / "c", hosts, books, env={**SETTINGS, **OPERATOR})
    yield made
    made.stop_all()


def test_the_backends_settings_always_reach_the_run(env_master: Cluster) -> None:
    state, results, _ = env_master.run_job("ansible.playbook", {"playbook": "env"}, ["web01"])
    assert state == "ok", results
    line = next(line for line in results["web01"]["stdout"].splitlines() if line.startswith("ANSIBLE_"))
    seen = dict(pair.split("=", 1) for pair in line.rstrip(";").split(";"))
    assert {name: seen[name] for name in SETTINGS} == SETTINGS
    assert {name: seen[name] for name in OPERATOR} == {name: "" for name in OPERATOR}  # the master's own stay out


def test_a_check_runs_diff_names_the_store_file_not_the_masters_path(env_master: Cluster) -> None:
    store = env_master.root / "state-m1" / "files"
    store.mkdir(parents=True, exist_ok=True)
    (store / "app.conf").write_text("key = new\n")
    scratch = Path(tempfile.mkdtemp(prefix="ombot-diff-"))
    try:
        dest = scratch / "app.conf"
        dest.write_text("key = old\n")
        state, results, _ = env_master.run_job("file.push", {"source": "app.conf", "dest": str(dest)}, ["web01"],
                                               check=True)
        out = results["web01"]["stdout"]
        assert state == "ok" and "-key = old\n+key = new\n" in out, results
        after = next(line for line in out.splitlines() if line.startswith("+++ "))
        assert "app.conf" in after and str(env_master.root) not in out, out
        assert dest.read_text() == "key = old\n"
    finally:
        shutil.rmtree(scratch)


# -- item 5: the ssh control directory -------------------------------------------------------------


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv for `nobody`")
def test_a_control_directory_another_user_made_first_does_not_stop_the_master(hosts: sshd.SshHosts,
                                                                              tmp_path: Path) -> None:
    cluster = ansible_master(tmp_path / "c", hosts, start=False)
    preferred = cluster.config().masters["m1"].state_dir / "ansible" / "cp"
    assert len(str(preferred)) > 60  # too long for a socket: the control directory goes to the temp dir
    digest = hashlib.sha256(str(preferred).encode()).hexdigest()[:12]
    old = Path(tempfile.gettempdir()) / f"ombot-cp-{os.getuid()}-{digest}"  # the name the old code used
    assert as_nobody("mkdir", "-m", "0755", str(old)).returncode == 0  # what the old name made possible
    record = preferred.with_name("cp.path")
    try:
        cluster.start("m1")
        assert cluster.run_job("ping", {}, ["web01", "web02"])[0] == "ok"
        first = Path(record.read_text())
        info = first.lstat()
        assert first != old and first.name.startswith("ombot-cp-") and first.parent == Path(tempfile.gettempdir())
        assert (info.st_uid, info.st_mode & 0o777) == (os.getuid(), 0o700)
        cluster.processes["m1"].kill()  # it cannot remove its directory: the next start does
        assert first.exists()
        cluster.start("m1")
        assert cluster.run_job("ping", {}, ["web01"])[0] == "ok"
        second = Path(record.read_text())
        assert second != first and not first.exists() and second.exists()
        cluster.stop_all()
        assert not second.exists() and not record.exists()  # removed with the master
        assert old.stat().st_uid == NOBODY  # nobody's directory is left as it was
    finally:
        cluster.stop_all()
        old.rmdir()
