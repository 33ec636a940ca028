"""The Ansible backend through a real master, on real sshd "hosts" on loopback (tests/sshd.py).

web01..web03 answer over ssh (web03's sessions carry OMBOT_TEST_FAIL=1, so a command can fail on
that host only); down01 is an address where nothing listens. One master with `backend = "ansible"`
serves the whole file.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import sshd
from tests.support import Cluster, statuses

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sshd.available(), reason="needs openssh-server (sshd)")]

SECRETS = {"SLACK_BOT_TOKEN": "xoxb-ombot-test-secret-7Qw", "DATABASE_URL": "postgres://u:pw-ombot-test-9Zk@db/x"}
FAILS = 'echo "on $OMBOT_HOST"; [ -z "$OMBOT_TEST_FAIL" ]'


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sshd.SshHosts]:
    started = sshd.SshHosts(tmp_path_factory.mktemp("sshd"), ["web01", "web02", "web03"],
                            env={"web03": {"OMBOT_TEST_FAIL": "1"}}).start()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def cluster(hosts: sshd.SshHosts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    extra = "[big]\nweb01\nweb02\nweb03\n"
    made = Cluster(tmp_path_factory.mktemp("ansible") / "c", {"local": ["m1"]},
                   inventory=hosts.inventory(extra=extra),
                   extra_toml="[masters.m1.ansible]\nrotate_artifacts = 4\n")
    text = made.config_path.read_text()
    made.config_path.write_text(text.replace('state_dir = "state-m1"', 'state_dir = "state-m1"\nbackend = "ansible"'))
    made.start("m1", env=SECRETS)
    yield made
    made.stop_all()


def run(cluster: Cluster, module: str, params: dict[str, Any], targets: list[str],
        timeout: int | None = None) -> tuple[str, dict[str, dict[str, Any]]]:
    state, results, _ = cluster.run_job(module, params, targets, timeout=timeout)
    return state, results


# -- every built-in module -------------------------------------------------------------------


def test_echo_reaches_each_host_and_reports_the_unreachable(cluster: Cluster) -> None:
    state, results = run(cluster, "echo", {"message": "hello there"}, ["web01", "web02", "down01"])
    assert statuses(results) == {"web01": "ok", "web02": "ok", "down01": "unreachable"}  # a ping, not a guess
    assert {results[h]["stdout"] for h in ("web01", "web02")} == {"hello there\n"}
    assert state != "ok"


def test_ping_answers_per_host_and_reports_the_unreachable(cluster: Cluster) -> None:
    state, results = run(cluster, "ping", {}, ["web01", "web02", "down01"])
    assert statuses(results) == {"web01": "ok", "web02": "ok", "down01": "unreachable"}
    assert results["web01"]["stdout"] == "pong\n"
    assert results["down01"]["error"]
    assert results["web01"]["data"]["ansible"] == {"ok": 1, "changed": 0, "failed": 0}
    assert state != "ok"


def test_facts_are_parsed(cluster: Cluster) -> None:
    state, results = run(cluster, "facts", {}, ["web01", "web02"])
    assert state == "ok"
    for result in results.values():
        assert result["data"]["memory_total_bytes"] > 0 and result["data"]["uptime_seconds"] >= 0


def test_shell_exec_fails_on_the_host_where_the_command_fails(cluster: Cluster) -> None:
    _, results = run(cluster, "shell.exec", {"cmd": FAILS}, ["web01", "web03", "down01"])
    assert statuses(results) == {"web01": "ok", "web03": "failed", "down01": "unreachable"}
    assert results["web01"]["stdout"] == "on web01\n"
    assert (results["web03"]["stdout"], results["web03"]["rc"]) == ("on web03\n", 1)
    assert results["web03"]["error"] == "/bin/sh exited with 1"


def test_script_run_passes_arguments_as_argv_and_removes_its_directory(cluster: Cluster) -> None:
    script = '#!/bin/sh\nfor a in "$@"; do echo "[$a]"; done\necho "$0"\n'
    router = cluster.router()
    ref, _ = router.submit("local", "script.run", {"script": script, "args": "a 'b c' '$HOME'"}, ["web01", "web02"])
    events: list[dict[str, Any]] = []
    assert router.follow(ref, events.append) == "ok"
    router.close()
    results = {e["data"]["host"]: e["data"] for e in events if e["kind"] == "host"}
    for result in results.values():
        lines = result["stdout"].splitlines()
        assert lines[:3] == ["[a]", "[b c]", "[$HOME]"]
        assert Path(lines[3]).name == "script" and not Path(lines[3]).parent.exists()  # the per-job dir is gone
    assert not list(Path("/tmp").glob(f"ombot-{ref.job_id}-*"))


def test_service_status_of_a_missing_service_is_a_clean_failure(cluster: Cluster) -> None:
    state, results = run(cluster, "service", {"action": "status", "name": "ombot-no-such-service"}, ["web01", "web02"])
    assert state == "failed"
    for result in results.values():
        assert result["status"] == "failed" and result["rc"] not in (None, 0)
        assert "Traceback" not in result["error"] + result["stderr"]


@pytest.fixture
def log_file() -> Iterator[Path]:
    if not os.access("/var/log", os.W_OK):
        pytest.skip("needs a writable /var/log")
    path = Path(f"/var/log/ombot-test-{uuid.uuid4().hex}.log")
    path.write_text("".join(f"line {i}\n" for i in range(1, 6)))
    link = path.with_suffix(".link")
    link.symlink_to("/etc/passwd")
    yield path
    path.unlink()
    link.unlink()


def test_log_tail_reads_the_checked_file_on_each_host(cluster: Cluster, log_file: Path) -> None:
    state, results = run(cluster, "log.tail", {"path": str(log_file), "lines": 2}, ["web01", "web02"])
    assert state == "ok"
    assert {r["stdout"] for r in results.values()} == {"line 4\nline 5\n"}
    assert {r["stderr"] for r in results.values()} == {""}
    _, results = run(cluster, "log.tail", {"path": str(log_file.with_suffix(".link")), "lines": 2}, ["web01"])
    assert results["web01"]["status"] == "failed"
    assert results["web01"]["error"].startswith(f"path: {log_file.with_suffix('.link')} resolves to /etc/passwd")
    assert "root:" not in results["web01"]["stdout"]


def test_file_push_writes_the_store_file_with_its_mode(cluster: Cluster, tmp_path: Path) -> None:
    store = cluster.root / "state-m1" / "files"
    (store / "app").mkdir(parents=True, exist_ok=True)
    (store / "app" / "app.conf").write_text("key = value\n")
    dest_dir = Path(f"/tmp/ombot-push-{uuid.uuid4().hex}")
    dest_dir.mkdir()
    dest = dest_dir / "app.conf"
    state, results = run(cluster, "file.push", {"source": "app/app.conf", "dest": str(dest), "mode": "0640"},
                         ["web01"])
    assert state == "ok", results
    assert dest.read_text() == "key = value\n" and dest.stat().st_mode & 0o777 == 0o640
    _, results = run(cluster, "file.push", {"source": "app/app.conf", "dest": str(dest), "owner": "nosuchuser"},
                     ["web01"])
    assert results["web01"]["status"] == "failed" and "nosuchuser" in results["web01"]["error"]


# -- streaming, cancel, timeout, exact hosts -------------------------------------------------


def test_each_host_is_reported_as_soon_as_it_is_done(cluster: Cluster) -> None:
    router = cluster.router()
    cmd = 'if [ "$OMBOT_HOST" = web02 ]; then sleep 8; fi; echo "$OMBOT_HOST"'
    ref, _ = router.submit("local", "shell.exec", {"cmd": cmd}, ["web01", "web02"])
    arrived: dict[str, float] = {}

    def on_event(event: dict[str, Any]) -> None:
        if event["kind"] == "host":
            arrived[event["data"]["host"]] = time.monotonic()

    assert router.follow(ref, on_event, next_wait=lambda: 1.0) == "ok"
    router.close()
    assert arrived["web02"] - arrived["web01"] > 4  # web01 came while web02 still slept (room for a slow start)


def _alive(pid: int) -> bool:
    try:
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False


def _wait_for(paths: list[Path], within: float = 30) -> None:
    deadline = time.monotonic() + within
    while not all(p.exists() and p.read_text().strip() for p in paths):
        assert time.monotonic() < deadline, "the command never started"
        time.sleep(0.1)


def _gone(pids: list[int], within: float = 30) -> bool:
    deadline = time.monotonic() + within
    while any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_cancel_stops_the_run_and_what_it_started(cluster: Cluster, tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    router = cluster.router()
    ref, _ = router.submit("local", "shell.exec", {"cmd": f"sleep 120 & echo $! > {tmp_path}/$OMBOT_HOST; wait"},
                           ["web01", "web02"])
    marks = [tmp_path / "web01", tmp_path / "web02"]
    _wait_for(marks)
    started = time.monotonic()
    router.cancel(ref)
    events: list[dict[str, Any]] = []
    assert router.follow(ref, events.append) == "cancelled"
    router.close()
    assert time.monotonic() - started < 30
    assert {e["data"]["host"]: e["data"]["status"] for e in events if e["kind"] == "host"} == {
        "web01": "cancelled", "web02": "cancelled"}
    assert _gone([int(m.read_text()) for m in marks])  # the remote sleeps were ended too


def test_timeout_stops_the_run(cluster: Cluster, tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    state, results = run(cluster, "shell.exec", {"cmd": f"sleep 120 & echo $! > {tmp_path}/$OMBOT_HOST; wait"},
                         ["web01"], timeout=4)
    assert state == "timed_out"
    assert statuses(results) == {"web01": "timed_out"}
    assert _gone([int((tmp_path / "web01").read_text())])


def test_only_the_listed_hosts_run(cluster: Cluster, tmp_path: Path) -> None:
    tmp_path.chmod(0o777)
    state, results = run(cluster, "shell.exec", {"cmd": f"touch {tmp_path}/$OMBOT_HOST"}, ["web01", "web03"])
    assert state == "ok"
    assert set(results) == {"web01", "web03"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["web01", "web03"]  # web02, in group big too, did not


# -- request values are data -----------------------------------------------------------------

INJECTED = Path(f"/tmp/ombot-injected-{uuid.uuid4().hex}")
LOOKUP = "{{ lookup('pipe', 'touch %s') }}" % INJECTED


@pytest.mark.parametrize(("module", "params"), [
    ("echo", {"message": LOOKUP}),
    ("shell.exec", {"cmd": f'echo "{LOOKUP}"'}),
    ("script.run", {"script": f'#!/bin/sh\necho "{LOOKUP}"\necho "$1"\n', "args": [LOOKUP]}),
    ("log.tail", {"path": f"/var/log/{LOOKUP}"}),
    ("file.push", {"source": "app.conf", "dest": f"/tmp/{LOOKUP}"}),
    ("service", {"action": "status", "name": LOOKUP}),
    ("ping", {}),
    ("facts", {}),
])
def test_request_values_are_never_templates(cluster: Cluster, module: str, params: dict[str, Any]) -> None:
    from ombot.envelope import Refused

    try:
        state, results = run(cluster, module, params, ["web01"])
    except Refused:  # refused before anything ran is just as good
        assert module in ("service", "file.push")
    else:
        result = results["web01"]
        if module in ("echo", "shell.exec"):
            assert result["stdout"] == LOOKUP + "\n"
        if module == "script.run":
            assert result["stdout"] == f"{LOOKUP}\n{LOOKUP}\n"
        if module == "log.tail":
            assert result["status"] == "failed" and LOOKUP in result["error"]
    assert not INJECTED.exists()


def test_forks_follow_the_host_count_up_to_the_cap(cluster: Cluster) -> None:
    """No idle workers for a small job; never more than `forks` or limits.max_parallel_hosts (16 here)."""
    import json

    from ombot.masters.backends.ansible import job_forks

    def forks_of_last_run() -> str:
        commands = sorted((cluster.root / "state-m1" / "ansible" / "artifacts").glob("*/command"),
                          key=lambda p: p.stat().st_mtime)
        argv = json.loads(commands[-1].read_text())["command"]
        return str(argv[argv.index("--forks") + 1])

    for targets in (["web01"], ["web01", "web02"]):
        run(cluster, "ping", {}, targets)
        assert forks_of_last_run() == str(len(targets))
    assert job_forks(50, 50, 16) == 16 and job_forks(50, 8, 16) == 8 and job_forks(0, 50, 16) == 1


# -- hygiene (runs last: it looks at what the runs above left) -------------------------------


def test_the_run_environment_and_artifacts_hold_no_secrets(cluster: Cluster) -> None:
    run(cluster, "ping", {}, ["web01"])
    data_dir = cluster.root / "state-m1" / "ansible"
    artifacts = [p for p in (data_dir / "artifacts").iterdir() if p.is_dir()]
    assert 1 <= len(artifacts) <= 4  # rotate_artifacts = 4
    text = "".join(p.read_text(errors="replace") for a in artifacts for p in a.rglob("*") if p.is_file())
    assert "ANSIBLE_PIPELINING" in text  # the environment is recorded, ...
    for secret in SECRETS.values():
        assert secret not in text  # ... but not the master's secrets
    assert not list((data_dir / "project").iterdir())  # playbooks (request data) are removed after each run


def test_a_plan_with_nothing_to_clean_up_has_no_end_task() -> None:
    """A host is done at its last task (or first failure) unless a temporary directory must go: the
    end marker, one more task per host on every job, is only there with the `always` cleanup."""
    from ombot.masters.backends import ansible_play
    from ombot.modules import Command, FirstAvailable, Plan, TempPath

    simple = ansible_play.build(Plan(FirstAvailable(Command(["systemctl", "status"]), Command(["service", "x"]))),
                                "job", "job", "/usr/bin/python3", None, 1000)
    assert "ombot:-1:end" not in simple.text and "always" not in simple.text
    assert simple.done_after is not None and simple.done_after.startswith("ombot:0:")
    assert simple.done_after in simple.task_steps
    cleaning = ansible_play.build(Plan(Command(["sh", TempPath("s")])), "job", "job", "/usr/bin/python3", None, 1000)
    assert "ombot:-1:end" in cleaning.text and "ombot:-1:cleanup" in cleaning.text and cleaning.done_after is None


def test_hosts_keep_their_own_pace_unless_there_is_one_task() -> None:
    """Several tasks per host: `free`, so no host waits for the slowest at every task. One task: `linear`,
    which reports each host as it ends all the same and costs the controller less while it waits."""
    from ombot.masters.backends import ansible_play
    from ombot.modules import Command, Plan, Shell, TempPath

    def strategy(plan: Plan) -> str:
        text = ansible_play.build(plan, "job", "job", "/usr/bin/python3", None, 1000).text
        return next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("  strategy:"))

    assert strategy(Plan(Shell("uptime"))) == "linear"
    assert strategy(Plan(Command(["true"]), Command(["false"]))) == "free"
    assert strategy(Plan(Command(["sh", TempPath("s")]))) == "free"  # tmp, the command, cleanup in `always`
