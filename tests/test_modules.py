"""Each built-in module end to end through a real master process."""

from __future__ import annotations

import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ombot.masters.backends.local import CHILD_PATH
from ombot.modules import Command, load_modules
from ombot.modules.plan import FirstAvailable
from tests.support import Cluster, run_job


@pytest.fixture(scope="module")
def master(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Any]]:
    """One master shared by this file's tests: they only submit jobs, so they cannot disturb each other."""
    cluster = Cluster(tmp_path_factory.mktemp("modules"), {"local": ["m1"]})
    cluster.start("m1")
    router = cluster.router()
    yield cluster, router
    router.close()
    cluster.stop_all()


@pytest.fixture
def log_dir() -> Iterator[Path]:
    """A fresh directory under /var/log (the tests run as root), removed afterwards."""
    path = Path("/var/log") / f"ombot-test-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_shell_exec_runs_a_pipeline(master) -> None:
    state, host = run_job(master[1], "shell.exec", {"cmd": "echo a | tr a b"})
    assert (state, host["status"], host["rc"], host["stdout"]) == ("ok", "ok", 0, "b\n")


def test_script_run_pushes_and_runs_a_script_with_args(master) -> None:
    script = '#!/bin/sh\necho "running $(basename "$0") with $# args"\nprintf "<%s>\\n" "$@"\n'
    state, host = run_job(master[1], "script.run", {"script": script, "args": "one 'two three' --four"})
    assert state == "ok", host
    assert host["stdout"] == "running script with 3 args\n<one>\n<two three>\n<--four>\n"


def test_script_run_without_args_and_its_exit_code(master) -> None:
    state, host = run_job(master[1], "script.run", {"script": "#!/bin/sh\necho no args: $#\nexit 3\n"})
    assert (state, host["status"], host["rc"], host["stdout"]) == ("failed", "failed", 3, "no args: 0\n")


def test_log_tail_shows_the_last_lines(master, log_dir: Path) -> None:
    log = log_dir / "app.log"
    log.write_text("".join(f"line {i}\n" for i in range(1, 201)))
    state, host = run_job(master[1], "log.tail", {"path": str(log), "lines": "3"})
    assert (state, host["stdout"]) == ("ok", "line 198\nline 199\nline 200\n")
    state, host = run_job(master[1], "log.tail", {"path": str(log)})  # default: 100 lines
    assert state == "ok" and host["stdout"].splitlines()[0] == "line 101" and len(host["stdout"].splitlines()) == 100


def test_log_tail_of_a_missing_file_fails_cleanly(master, log_dir: Path) -> None:
    state, host = run_job(master[1], "log.tail", {"path": str(log_dir / "absent.log")})
    assert (state, host["status"], host["rc"]) == ("failed", "failed", 1)
    assert host["error"] == f"path: cannot open {log_dir / 'absent.log'}: No such file or directory"
    assert "No such file" in host["stderr"]


def store_file(cluster: Cluster, relative: str, content: str) -> None:
    """Put a file in the master's store, <state_dir>/files."""
    path = cluster.root / "state-m1" / "files" / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)


def test_file_push_copies_a_store_file_with_its_mode(master, tmp_path: Path) -> None:
    cluster, router = master
    store_file(cluster, "app/app.conf", "listen = 8080\n")
    dest = tmp_path / "app.conf"  # pytest's tmp_path is under /tmp, one of file.push's roots
    dest.write_text("old contents\n")
    params = {"source": "app/app.conf", "dest": str(dest), "mode": "0640", "owner": "root", "group": "root"}
    state, host = run_job(router, "file.push", params)
    assert state == "ok", host
    assert dest.read_text() == "listen = 8080\n"
    info = dest.stat()
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o640, 0, 0)
    assert os.listdir(tmp_path) == ["app.conf"]  # no partial file left behind


def test_file_push_failures_are_clean_host_failures(master, tmp_path: Path) -> None:
    cluster, router = master
    store_file(cluster, "motd", "hello\n")
    state, host = run_job(router, "file.push", {"source": "missing.txt", "dest": str(tmp_path / "x")})
    assert (state, host["status"]) == ("failed", "failed")
    assert host["error"] == "missing.txt is not a file in the master's store"
    state, host = run_job(router, "file.push", {"source": "motd", "dest": str(tmp_path / "x"), "owner": "nosuchuser42"})
    assert host["error"] == "no user named 'nosuchuser42' on this host"
    state, host = run_job(router, "file.push", {"source": "motd", "dest": str(tmp_path / "no" / "dir" / "x")})
    assert host["status"] == "failed" and "No such file or directory" in host["error"]
    assert os.listdir(tmp_path) == []


def test_service_plan_prefers_systemctl_then_service() -> None:
    service = load_modules()["service"]
    plan = service.plan(service.validate({"action": "restart", "name": "getty@tty1.service"}))
    assert plan.steps == (FirstAvailable(
        Command(["systemctl", "restart", "--", "getty@tty1.service"]),
        Command(["service", "getty@tty1.service", "restart"]),
    ),)


def test_service_on_a_host_without_that_service_fails_cleanly(master) -> None:
    # This machine has no running systemd, so whichever program is installed refuses; the host
    # fails with that program's exit code and output, and the job ends normally.
    state, host = run_job(master[1], "service", {"action": "status", "name": "ombot-no-such-service"})
    assert (state, host["status"]) == ("failed", "failed")
    assert isinstance(host["rc"], int) and host["rc"] != 0
    installed = [prog for prog in ("systemctl", "service") if shutil.which(prog, path=CHILD_PATH)]
    if installed:
        assert host["error"] == f"{installed[0]} exited with {host['rc']}"
    else:
        assert (host["rc"], host["error"]) == (127, "none of these programs is installed: systemctl, service")


def test_catalog_lists_the_builtins_with_risk(master) -> None:
    catalog = master[1].catalog("local")
    risks = {name: str(spec.risk) for name, spec in catalog.modules.items()}
    assert {k: risks[k] for k in ("shell.exec", "script.run", "service", "log.tail", "file.push")} == {
        "shell.exec": "high", "script.run": "high", "service": "medium", "log.tail": "low", "file.push": "high"}
    assert catalog.modules["shell.exec"].allows_shell
    assert not any(spec.allows_shell for name, spec in catalog.modules.items() if name != "shell.exec")
