"""The `ombot` command as people use it: a real process against a real master."""

from __future__ import annotations

import json
import re
import sqlite3
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from ombot.keys import Identity
from tests.support import REPO, Cluster, MasterProcess, child_env, free_port


def ombot(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ombot", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env=child_env())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def table_rows(stdout: str) -> dict[str, str]:
    """host -> status, from the per-host table `ombot run` prints."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"HOST\s+STATUS\s+RC\s+TIME\s+OUTPUT$", line)) + 1
    rows = {}
    for line in lines[start:]:
        if not line.strip():
            break
        host, status, *_ = line.split()
        rows[host] = status
    return rows


def jobs_in(cluster: Cluster, master_id: str = "m1") -> int:
    db = sqlite3.connect(cluster.root / f"state-{master_id}" / f"{master_id}.db")
    try:
        return db.execute("SELECT COUNT(*) FROM job").fetchone()[0]
    finally:
        db.close()


def master_job(cluster: Cluster, job_id: str, master_id: str = "m1") -> dict[str, object]:
    """One job's row, straight from the master's database."""
    db = sqlite3.connect(cluster.root / f"state-{master_id}" / f"{master_id}.db")
    db.row_factory = sqlite3.Row
    try:
        return dict(db.execute("SELECT * FROM job WHERE id = ?", (job_id,)).fetchone())
    finally:
        db.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One master for the whole file: these tests only add jobs, and count them as differences."""
    shared = Cluster(tmp_path_factory.mktemp("cli"), {"local": ["m1"]})
    shared.start("m1")
    yield shared
    shared.stop_all()


# --- init and keygen -----------------------------------------------------------------------------


def test_init_writes_a_working_set(tmp_path: Path) -> None:
    target = tmp_path / "site"
    port = free_port()
    result = ombot("init", str(target), "--master-port", str(port))
    assert result.returncode == 0, result.stderr
    config = target / "ombot.toml"
    assert f"wrote {config}" in result.stdout

    raw = tomllib.loads(config.read_text())
    for name, public in (("bot", raw["clients"]["bot"]["public_key"]),
                         ("local-1", raw["masters"]["local-1"]["public_key"])):
        key = target / "keys" / f"{name}.key"
        assert mode(key) == 0o600
        assert Identity.load(key).public == public == (target / "keys" / f"{name}.pub").read_text().strip()
    for key in (target / "keys").glob("*.key"):  # private keys stay in their files
        assert key.read_text().strip() not in config.read_text()
    assert "localhost ansible_connection=local" in (target / "inventory" / "local.ini").read_text()
    assert (target / "policy.toml").read_text().startswith("#")

    # It works as written: a master starts from it and the CLI runs a module through it.
    master = MasterProcess(SimpleNamespace(root=tmp_path, config_path=config), "local-1", {})  # type: ignore[arg-type]
    master.start()
    try:
        run = ombot("--config", str(config), "run", "echo", "localhost", "message=hello")
    finally:
        master.stop()
    assert run.returncode == 0, run.stdout + run.stderr
    assert table_rows(run.stdout) == {"localhost": "ok"} and "hello" in run.stdout
    assert (target / "state" / "local-1.db").exists()


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "site"
    assert ombot("init", str(target)).returncode == 0
    before = {p: p.read_bytes() for p in target.rglob("*") if p.is_file()}
    again = ombot("init", str(target))
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert again.stderr.strip() == f"error: {target / 'ombot.toml'} exists; refusing to overwrite it"
    assert {p: p.read_bytes() for p in target.rglob("*") if p.is_file()} == before


def test_keygen_writes_a_private_key_and_prints_the_public_one(tmp_path: Path) -> None:
    result = ombot("keygen", "bj-master-1", "--dir", str(tmp_path / "keys"))
    assert result.returncode == 0, result.stderr
    key, pub = tmp_path / "keys" / "bj-master-1.key", tmp_path / "keys" / "bj-master-1.pub"
    assert mode(key) == 0o600
    assert result.stdout.strip() == Identity.load(key).public == pub.read_text().strip()

    before = key.read_bytes()
    again = ombot("keygen", "bj-master-1", "--dir", str(tmp_path / "keys"))
    assert again.returncode == 2 and again.stdout == ""
    assert again.stderr.strip() == f"error: {key} exists; refusing to overwrite a key"
    assert key.read_bytes() == before


def test_keygen_defaults_to_a_keys_directory_here(tmp_path: Path) -> None:
    result = ombot("keygen", "bot", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert Identity.load(tmp_path / "keys" / "bot.key").public == result.stdout.strip()


# --- run -----------------------------------------------------------------------------------------


def test_run_prints_a_row_per_host_and_succeeds(cluster: Cluster) -> None:
    result = cluster.ombot("run", "echo", "web[01-03]", "message=hi there")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "echo on 3 host(s) in local: web01, web02, web03" in result.stdout
    assert table_rows(result.stdout) == {"web01": "ok", "web02": "ok", "web03": "ok"}
    # Each host's output: previewed in its row, whole in its section of the log.
    assert result.stdout.splitlines().count("hi there") == 3 and result.stdout.count("s  hi there\n") == 3
    assert result.stdout.rstrip().endswith("state: ok")


def test_run_fails_when_a_host_fails(cluster: Cluster) -> None:
    result = cluster.ombot("run", "echo", "far01,localhost", "message=hi")
    assert result.returncode == 1, result.stdout + result.stderr
    assert table_rows(result.stdout) == {"far01": "unreachable", "localhost": "ok"}
    assert result.stdout.rstrip().endswith("state: partial")
    job_id = re.search(r"job (\S+) on master m1", result.stdout)[1]  # type: ignore[index]
    assert master_job(cluster, job_id)["state"] == "partial"
    assert "ansible_connection=local" in result.stdout  # why far01 could not be reached


def test_run_after_the_subcommand_options(cluster: Cluster) -> None:
    result = cluster.ombot("run", "echo", "localhost", "message=x", "--idc", "local", "--timeout", "37")
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = re.search(r"job (\S+) on master m1", result.stdout)[1]  # type: ignore[index]
    assert master_job(cluster, job_id)["timeout"] == 37  # the option reached the master


@pytest.mark.parametrize("idc", ["local,", "*"])
def test_a_list_naming_one_idc_runs_as_a_plain_job(cluster: Cluster, idc: str) -> None:
    """`idc=local,` and `idc=*` in a site of one IDC: that IDC's plain job, no parts."""
    result = cluster.ombot("run", "echo", "localhost", "message=one", f"idc={idc}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[0] == "echo on 1 host(s) in local: localhost"
    job_id = re.search(r"job (\S+) on master m1", result.stdout)[1]  # type: ignore[index]
    assert master_job(cluster, job_id)["state"] == "ok" and "part" not in result.stdout


def test_dry_run_shows_the_hosts_and_submits_nothing(cluster: Cluster) -> None:
    before = jobs_in(cluster)
    result = cluster.ombot("run", "echo", "web[01-03],db", "message=hi", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "echo on 4 host(s) in local: web01, web02, web03, db01"
    assert "steps:\n  emit 'hi'" in result.stdout  # the plan, from the master's preview operation
    assert jobs_in(cluster) == before
    assert cluster.ombot("run", "echo", "db01", "message=hi").returncode == 0
    assert jobs_in(cluster) == before + 1  # the count does see jobs


def test_a_wrong_parameter_shows_the_usage(cluster: Cluster) -> None:
    before = jobs_in(cluster)
    for params in (["nosuch=1"], [], ["message=" + "x" * 2000]):
        result = cluster.ombot("run", "echo", "localhost", *params)
        assert result.returncode == 2, (params, result.stderr)
        assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
        assert "usage: ombot run echo TARGETS message=<string>" in result.stderr
    assert jobs_in(cluster) == before


def test_bad_key_value_syntax_is_a_clear_error(cluster: Cluster) -> None:
    for pair, problem in (("message", "parameters are key=value, got 'message'"),):
        result = cluster.ombot("run", "echo", "localhost", pair)
        assert result.returncode == 2 and problem in result.stderr, result.stderr
    twice = cluster.ombot("run", "echo", "localhost", "message=a", "message=b")
    assert twice.returncode == 2 and "parameter 'message' given twice" in twice.stderr


def test_bad_key_value_syntax_shows_the_usage(cluster: Cluster) -> None:
    result = cluster.ombot("run", "echo", "localhost", "message")
    assert result.returncode == 2 and "usage: ombot run echo TARGETS message=<string>" in result.stderr


def test_an_unknown_module_suggests_a_name(cluster: Cluster) -> None:
    result = cluster.ombot("run", "ehco", "localhost", "message=hi")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: no module 'ehco'; did you mean echo?"
    nothing_close = cluster.ombot("run", "zzzzzz", "localhost")
    assert nothing_close.returncode == 2 and nothing_close.stderr.strip() == "error: no module 'zzzzzz'"


def test_unknown_hosts_are_refused_by_the_master(cluster: Cluster) -> None:
    before = jobs_in(cluster)
    result = cluster.ombot("run", "echo", "nohost", "message=hi")
    assert result.returncode == 2 and "no host or group matches 'nohost'" in result.stderr
    assert jobs_in(cluster) == before


# --- masters and modules -------------------------------------------------------------------------


def test_masters_shows_health(cluster: Cluster) -> None:
    result = cluster.ombot("masters")
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    assert re.match(r"m1\s+local\s+up\s+[\d.]+ ms\s+backend=local running=0 catalog=\w+ version=\d+\.\d+\.\d+$", line), line


@pytest.mark.slow
def test_masters_fails_when_one_is_down(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster({"bj": ["bj-1", "bj-2"], "sh": ["sh-1"]})
    cluster.start("bj-1")
    cluster.start("sh-1")
    result = cluster.ombot("masters")
    assert result.returncode == 1, result.stdout + result.stderr
    status = {line.split()[0]: line.split()[2] for line in result.stdout.splitlines()}
    assert status == {"bj-1": "up", "bj-2": "DOWN", "sh-1": "up"}


def test_masters_fails_when_all_are_down(make_cluster: Callable[..., Cluster]) -> None:
    result = make_cluster().ombot("masters")
    assert result.returncode == 1 and re.match(r"m1\s+local\s+DOWN\s+\S", result.stdout), result.stdout


def test_modules_lists_the_catalog(cluster: Cluster) -> None:
    result = cluster.ombot("modules")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()}
    assert {"echo", "ping", "facts"} <= rows.keys()
    assert rows["echo"] == "low" and set(rows.values()) <= {"low", "medium", "high"}
    assert "Send a message through the whole path" in result.stdout


def test_no_arguments_shows_help() -> None:
    output = ombot().stdout
    assert "Usage" in output
    assert all(command in output for command in ("init", "keygen", "run", "masters", "modules", "master"))


def test_help_keeps_bracketed_words() -> None:
    """Help text is printed as written: Rich markup used to eat `[client] id` and `[bot] listen`."""
    root = ombot("--help")
    assert root.returncode == 0, root.stderr
    flat = " ".join(root.stdout.split())  # help wraps lines
    assert "The [clients.NAME] registration to speak as [default: [client] id]" in flat
    assert "Path to ombot.toml [default: ./ombot.toml]" in flat
    assert "else HTTP on [bot] listen." in " ".join(ombot("bot", "--help").stdout.split())
    assert "IDC to act in [default: the client's default_idc]" in " ".join(ombot("run", "--help").stdout.split())


def test_every_parameter_problem_is_named_at_once(cluster: Cluster) -> None:
    before = jobs_in(cluster)
    result = cluster.ombot("run", "service", "localhost", "action=explode", "name=-x", "extra=1", "stray")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr == (
        "error: parameters are key=value, got 'stray'\n"
        "extra: expected a parameter of service (one of action, name)\n"
        "action: expected one of start, stop, restart, reload, status, got 'explode'\n"
        "name: expected a value that does not start with '-', got '-x'\n"
        "usage: ombot run service TARGETS action=<choice> name=<string>\n")
    assert jobs_in(cluster) == before


# --- exit codes, jobs and status -------------------------------------------------------------------


def test_a_master_that_is_down_exits_4_nothing_sent(make_cluster: Callable[..., Cluster]) -> None:
    """A refused connection sent nothing: exit 4 (safe to retry), not 3 (outcome unknown)."""
    cluster = make_cluster()  # its master is never started
    for args in (["run", "echo", "localhost", "message=hi"], ["modules"], ["jobs"], ["status", "some-job"]):
        result = cluster.ombot(*args)
        assert result.returncode == 4, (args, result.stdout, result.stderr)
        assert "ConnectionRefusedError" in result.stderr and "Traceback" not in result.stderr, args
    run = cluster.ombot("run", "echo", "localhost", "message=hi")
    assert run.stderr.rstrip().endswith("Connection refused; nothing was sent"), run.stderr
    assert not (cluster.root / "state-m1").exists()  # no master ever held anything


def test_jobs_lists_this_clients_jobs_and_status_reports_each(cluster: Cluster) -> None:
    ok = cluster.ombot("run", "echo", "localhost", "message=first")
    partial = cluster.ombot("run", "echo", "far01,localhost", "message=second")
    ok_id, partial_id = (re.search(r"job (\S+) on master m1", r.stdout)[1] for r in (ok, partial))  # type: ignore[index]
    state, _, _ = cluster.run_job("echo", {"message": "not yours"}, ["localhost"], requester="U0ALICE")  # the bot's key
    assert state == "ok"

    listed = cluster.ombot("jobs")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["JOB", "STATE", "IDC", "MASTER", "CREATED", "(UTC)", "HOSTS", "MODULE"]
    rows = [line.split() for line in lines[1:]]
    assert [r[0] for r in rows][:2] == [partial_id, ok_id]  # newest first
    assert rows[0][1:4] + rows[0][-2:] == ["partial", "local", "m1", "2", "echo"]
    assert rows[1][1:4] + rows[1][-2:] == ["ok", "local", "m1", "1", "echo"]
    assert all(master_job(cluster, r[0])["sender"] == "test" for r in rows)  # no other client's job
    as_json = [json.loads(line) for line in cluster.ombot("jobs", "--json", "--limit", "1").stdout.splitlines()]
    assert [(j["id"], j["state"], j["hosts"], j["master_id"]) for j in as_json] == [
        (partial_id, "partial", ["far01", "localhost"], "m1")]

    shown = cluster.ombot("status", ok_id)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[:2] == [f"job {ok_id} on master m1: ok", "echo on 1 host(s): localhost"]
    assert table_rows(shown.stdout) == {"localhost": "ok"} and "first" in shown.stdout
    failed = cluster.ombot("status", partial_id, "--idc", "local")
    assert failed.returncode == 1 and table_rows(failed.stdout) == {"far01": "unreachable", "localhost": "ok"}
    data = json.loads(cluster.ombot("status", partial_id, "--json").stdout)
    assert (data["state"], data["master"], data["final"], data["module"]) == ("partial", "m1", True, "echo")
    assert {r["host"]: r["status"] for r in data["results"]} == {"far01": "unreachable", "localhost": "ok"}

    missing = cluster.ombot("status", "no-such-job")
    assert (missing.returncode, missing.stderr) == (2, "no job no-such-job at m1\n")


@pytest.mark.slow
def test_a_master_lost_mid_job_exits_3_and_status_says_what_became_of_it(make_cluster: Callable[..., Cluster]) -> None:
    """The check exit 3 asks for: `ombot status JOB` says running (5), unreachable (4), then unknown (3)."""
    cluster = make_cluster(module_dirs=[REPO / "tests" / "site_modules"])
    cluster.start("m1")
    run = subprocess.Popen([sys.executable, "-m", "ombot", "--config", str(cluster.config_path), "run", "test.sleep",
                            "localhost", "seconds=120"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=child_env())
    try:
        job_id = running_job(cluster)
        running = cluster.ombot("status", job_id)
        assert running.returncode == 5, running.stdout + running.stderr
        assert running.stdout.splitlines()[0] == f"job {job_id} on master m1: running (not finished: ask again later)"
        cluster.processes["m1"].kill()
        out, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 3, out + err
    assert f"check with `ombot status {job_id}` before sending it again" in err
    unreachable = cluster.ombot("status", job_id)
    assert unreachable.returncode == 4 and "m1: could not be asked" in unreachable.stderr
    cluster.start("m1")  # it marks the job it lost unknown: it cannot know what the host did
    after = cluster.ombot("status", job_id)
    assert after.returncode == 3, after.stdout + after.stderr
    assert after.stdout.splitlines()[0] == f"job {job_id} on master m1: unknown"
    assert re.search(r"^reason: .*master stopped", after.stdout, re.M), after.stdout


def running_job(cluster: Cluster, within: float = 30) -> str:
    """The id of the one job `ombot jobs` shows running (waits for the master to start it)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        rows = [line.split() for line in cluster.ombot("jobs").stdout.splitlines()[1:]]
        if rows and rows[0][1] == "running":
            return rows[0][0]
        time.sleep(0.2)
    raise AssertionError(f"no job started running within {within} s")
