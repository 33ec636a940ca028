"""The Salt backend through a real master, on a real salt-master and minions on loopback (tests/saltrig.py).

minion1..minion3 run; gone1 has an accepted key and no minion behind it. The OMBot master's inventory
is the salt-master's accepted keys (`[masters.m1.salt] inventory = "minions"`). minion3 is stopped by
the test that checks a stopped minion is reported unreachable, so no other test targets it.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ombot import config as cfg
from ombot.errors import ConfigError
from tests import saltrig
from tests.saltrig import salt_cluster
from tests.support import REPO, Cluster, statuses

pytestmark = [pytest.mark.slow]
NEEDS_SALT = "needs the salt extra (pip install 'ombot[salt]') and root, to run a salt-master and minions"

INJECTIONS = ["runas=root", "{{ grains['id'] }}", "{% raw %}x", "$HOME", "`id`", "cwd=/etc", "__kwarg__=True"]


@pytest.fixture(scope="session")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[saltrig.SaltRig]:
    if not saltrig.available():
        pytest.skip(NEEDS_SALT)
    started = saltrig.SaltRig(tmp_path_factory.mktemp("salt"), minions=["minion1", "minion2", "minion3"],
                              absent=["gone1"]).start()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def cluster(rig: saltrig.SaltRig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    made = salt_cluster(tmp_path_factory.mktemp("saltmaster") / "c", rig)
    made.start("m1")
    yield made
    made.stop_all()


def run(cluster: Cluster, module: str, params: dict[str, Any], targets: list[str], timeout: int | None = None,
        check: bool = False) -> tuple[str, dict[str, dict[str, Any]]]:
    state, results, _ = cluster.run_job(module, params, targets, timeout=timeout, check=check)
    return state, results


BOTH = ["minion1", "minion2"]


# -- configuration (no Salt needed) ---------------------------------------------------------


def salt_config(tmp_path: Path, table: str) -> cfg.Config:
    made = Cluster(tmp_path / "c", {"local": ["m1"]}, extra_toml="[masters.m1.salt]\n" + table)
    return made.config()


def test_salt_settings_have_defaults_and_are_checked(tmp_path: Path) -> None:
    settings = salt_config(tmp_path, 'states = ["nginx", "web.app"]\n').masters["m1"].salt
    assert settings == cfg.SaltSettings(states=("nginx", "web.app"))
    assert settings.config == Path("/etc/salt/master") and settings.inventory == "file"
    for table, key in [('inventory = "keys"\n', "inventory"), ('python = "python3"\n', "python"),
                       ('states = ["a,b"]\n', "states"), ("answer_seconds = 0\n", "answer_seconds"),
                       ("forks = 3\n", "forks")]:
        with pytest.raises(ConfigError, match=rf"masters\.m1\.salt\.{key}"):
            salt_config(tmp_path / key, table)
    # the minions' keys are the inventory: a file beside them would be silently unused
    with pytest.raises(ConfigError, match=r"masters\.m1\.inventory: expected no inventory file"):
        salt_config(tmp_path / "both", 'inventory = "minions"\n')


# -- inventory -------------------------------------------------------------------------------


def test_the_inventory_is_the_accepted_minion_keys(cluster: Cluster, rig: saltrig.SaltRig) -> None:
    router = cluster.router()
    try:
        assert router.expand("local", "minions") == ["gone1", "minion1", "minion2", "minion3"]
        assert router.expand("local", "minion[1-2]") == BOTH
        # A key accepted while the master runs is a target at once: no second list, no restart.
        late = rig.master_dir / "root" / "pki" / "minions" / "late1"
        late.write_text((rig.master_dir / "root" / "pki" / "minions" / "gone1").read_text())
        try:
            assert "late1" in router.expand("local", "minions")
        finally:
            late.unlink()
        assert "late1" not in router.expand("local", "minions")
    finally:
        router.close()


# -- every built-in module -------------------------------------------------------------------


def test_echo_and_ping_report_the_missing_minion_unreachable(cluster: Cluster) -> None:
    state, results = run(cluster, "echo", {"message": "hello {{ grains['id'] }}"}, [*BOTH, "gone1"])
    assert statuses(results) == {"minion1": "ok", "minion2": "ok", "gone1": "unreachable"}
    assert results["minion1"]["stdout"] == "hello {{ grains['id'] }}\n"
    assert state != "ok"
    state, results = run(cluster, "ping", {}, BOTH)
    assert state == "ok"
    assert {r["stdout"] for r in results.values()} == {"pong\n"}
    assert results["minion1"]["data"]["salt"]["jids"]


def test_shell_exec_runs_through_sh_and_keeps_values_literal(cluster: Cluster) -> None:
    cmd = "printf '%s\\n' " + " ".join(map(shlex.quote, INJECTIONS)) + "; echo job=$OMBOT_JOB_ID; echo oops >&2"
    state, results = run(cluster, "shell.exec", {"cmd": cmd}, BOTH)
    assert state == "ok", results
    out = results["minion1"]["stdout"].splitlines()
    assert out[:len(INJECTIONS)] == INJECTIONS
    assert out[-1].startswith("job=") and len(out[-1]) > 4
    assert results["minion2"]["stderr"] == "oops\n"
    assert results["minion1"]["rc"] == 0


def test_a_shell_line_that_looks_like_a_salt_keyword_stays_the_command(cluster: Cluster, tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    mark = tmp_path / "ran"
    # Positional, Salt would read this as the keyword `runas` (and run `touch` as nobody, or refuse).
    state, results = run(cluster, "shell.exec", {"cmd": f"runas=nobody touch {mark}; echo $runas"}, ["minion1"])
    assert state == "ok", results
    assert results["minion1"]["stdout"] == "\n"  # an assignment for touch only, as sh reads it
    assert mark.stat().st_uid == 0


def test_a_failing_command_fails_the_host_with_its_exit_code(cluster: Cluster) -> None:
    state, results = run(cluster, "shell.exec", {"cmd": "echo before; exit 3"}, ["minion1"])
    assert state == "failed"
    assert results["minion1"]["status"] == "failed"
    assert results["minion1"]["rc"] == 3
    assert results["minion1"]["error"] == "/bin/sh exited with 3"
    assert results["minion1"]["stdout"] == "before\n"


def test_script_run_gets_arguments_literally(cluster: Cluster) -> None:
    script = "#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\"; done\necho \"$0\" >&2\n"
    state, results = run(cluster, "script.run", {"script": script, "args": " ".join(map(shlex.quote, INJECTIONS))},
                         BOTH)
    assert state == "ok", results
    for name, result in results.items():
        assert result["stdout"].splitlines() == INJECTIONS
        pushed = Path(result["stderr"].strip())  # TMP_ROOT/ombot-JOB-RANDOM-MINION/script
        assert pushed.name == "script" and pushed.parent.name.endswith(f"-{name}"), pushed
        assert pushed.parent.name.startswith("ombot-") and pushed.parent.parent == Path("/tmp")
        assert not pushed.parent.exists()  # the job's temporary directory was removed


def test_facts_are_parsed(cluster: Cluster) -> None:
    state, results = run(cluster, "facts", {}, BOTH)
    assert state == "ok", results
    assert results["minion1"]["data"]["memory_total_bytes"] > 0
    assert 0 <= results["minion2"]["data"]["disk_root_used_percent"] <= 100


def test_log_tail_shows_the_last_lines(cluster: Cluster) -> None:
    log = Path(f"/var/log/ombot-salt-test-{uuid.uuid4().hex[:8]}.log")
    link = log.with_suffix(".link")
    log.write_text("".join(f"line {n} runas=root\n" for n in range(1, 51)))
    try:
        state, results = run(cluster, "log.tail", {"path": str(log), "lines": 2}, ["minion1"])
        assert state == "ok", results
        assert results["minion1"]["stdout"] == "line 49 runas=root\nline 50 runas=root\n"
        link.symlink_to("/etc/shadow")  # a way out of /var/log, checked on the minion
        state, results = run(cluster, "log.tail", {"path": str(link), "lines": 2}, ["minion1"])
        assert state == "failed"
        assert results["minion1"]["error"] == f"path: {link} resolves to /etc/shadow, outside /var/log"
        assert results["minion1"]["stdout"] == ""
    finally:
        log.unlink()
        link.unlink(missing_ok=True)


def test_service_runs_the_first_installed_tool(cluster: Cluster) -> None:
    state, results = run(cluster, "service", {"action": "status", "name": "ombot-no-such-unit"}, ["minion1"])
    result = results["minion1"]
    # systemctl is installed here but PID 1 is not systemd: the chosen tool runs and fails, reported so.
    assert result["status"] == "failed"
    assert result["error"] in ("systemctl exited with %d" % result["rc"], "service exited with %d" % result["rc"])
    assert result["rc"] not in (None, 0, 127)


def test_file_push_check_shows_the_diff_then_the_real_run_writes(cluster: Cluster) -> None:
    store = cluster.root / "state-m1" / "files"
    store.mkdir(parents=True, exist_ok=True)
    body = "key = {{ grains['id'] }}\nrunas=root\n"
    (store / "app.conf").write_text(body)
    dest = Path(f"/tmp/ombot-salt-push-{uuid.uuid4().hex[:8]}.conf")
    params = {"source": "app.conf", "dest": str(dest), "mode": "0640"}
    try:
        state, results = run(cluster, "file.push", params, ["minion1"], check=True)
        assert state == "ok", results
        assert not dest.exists()  # a check run changes nothing
        assert f"would change {dest}" in results["minion1"]["stdout"]
        state, results = run(cluster, "file.push", params, ["minion1"])
        assert state == "ok", results
        assert dest.read_text() == body  # literally: no template rendered
        assert dest.stat().st_mode & 0o777 == 0o640
        dest.write_text("key = old\n")
        state, results = run(cluster, "file.push", params, ["minion1"], check=True)
        assert "-key = old" in results["minion1"]["stdout"] and "+runas=root" in results["minion1"]["stdout"], results
        assert dest.read_text() == "key = old\n"
        (store / "empty.conf").write_text("")
        state, results = run(cluster, "file.push", {**params, "source": "empty.conf"}, ["minion1"])
        assert state == "ok", results
        assert dest.read_text() == ""
    finally:
        dest.unlink(missing_ok=True)


def test_file_push_refuses_a_symlinked_way_out(cluster: Cluster) -> None:
    (cluster.root / "state-m1" / "files").mkdir(parents=True, exist_ok=True)
    (cluster.root / "state-m1" / "files" / "x.conf").write_text("x\n")
    outside = Path(f"/run/ombot-salt-outside-{uuid.uuid4().hex[:8]}")  # not under file.push's roots
    outside.mkdir()
    link = Path(f"/tmp/ombot-salt-link-{uuid.uuid4().hex[:8]}")
    link.symlink_to(outside)
    try:
        state, results = run(cluster, "file.push", {"source": "x.conf", "dest": f"{link}/x.conf"}, ["minion1"])
        assert state == "failed"
        assert results["minion1"]["error"] == f"dest: {link}/x.conf resolves to {outside}/x.conf, outside " \
                                              "/opt, /srv, /tmp, /var/tmp"
        assert not (outside / "x.conf").exists()
    finally:
        link.unlink()
        outside.rmdir()


# -- salt.state ------------------------------------------------------------------------------


def test_state_check_shows_the_changes_and_the_real_run_applies(cluster: Cluster) -> None:
    made = [Path(f"/tmp/ombot-salt-demo-{m}") for m in BOTH]
    for path in made:
        path.unlink(missing_ok=True)
    try:
        state, results = run(cluster, "salt.state", {"state": saltrig.DEMO_STATE}, BOTH, check=True)
        assert state == "ok", results
        assert not any(p.exists() for p in made)
        assert "ombot-demo-file: would change" in results["minion1"]["stdout"]
        assert results["minion1"]["data"]["salt"]["states"]["would_change"] == 1
        state, results = run(cluster, "salt.state", {"state": saltrig.DEMO_STATE}, BOTH)
        assert state == "ok", results
        assert all(p.read_text() == "managed by the ombot demo state\n" for p in made)
        assert results["minion2"]["data"]["salt"]["states"]["changed"] == 1
    finally:
        for path in made:
            path.unlink(missing_ok=True)


def test_a_state_outside_the_allow_list_is_refused_at_submit(cluster: Cluster) -> None:
    router = cluster.router()
    try:
        with pytest.raises(Exception, match="not allowed on this master"):
            router.submit("local", "salt.state", {"state": "ombot_other"}, ["minion1"])
    finally:
        router.close()


def test_salt_state_on_another_backend_says_it_needs_salt(tmp_path: Path) -> None:
    made = Cluster(tmp_path / "c", {"local": ["m1"]})
    made.start("m1")
    router = made.router()
    try:
        with pytest.raises(Exception, match="needs the Salt backend"):
            router.submit("local", "salt.state", {"state": saltrig.DEMO_STATE}, ["localhost"])
    finally:
        router.close()
        made.stop_all()


# -- cancel, timeout, a stopped minion -------------------------------------------------------


def _pids(path: Path, count: int, within: float = 20) -> list[int]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().split()) >= count:
            return [int(p) for p in path.read_text().split()]
        time.sleep(0.1)
    raise AssertionError(f"{path} did not get {count} pids")


def _gone(pids: list[int], within: float = 10) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{pid}").exists() for pid in pids):
            return True
        time.sleep(0.1)
    return False


def test_cancel_stops_the_job_and_what_it_started(cluster: Cluster, tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    pids = tmp_path / "pids"
    router = cluster.router()
    try:
        ref, _ = router.submit("local", "shell.exec", {"cmd": f"sleep 120 & echo $! >> {pids}; wait"}, BOTH)
        started = _pids(pids, 2)
        router.cancel(ref)
        events: list[dict[str, Any]] = []
        assert router.follow(ref, events.append) == "cancelled"
    finally:
        router.close()
    assert {e["data"]["host"]: e["data"]["status"] for e in events if e["kind"] == "host"} == {
        "minion1": "cancelled", "minion2": "cancelled"}
    assert _gone(started)


def test_timeout_is_timed_out_not_unreachable(cluster: Cluster, tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    pids = tmp_path / "pids"
    state, results = run(cluster, "shell.exec", {"cmd": f"sleep 120 & echo $! >> {pids}; wait"}, ["minion1"],
                         timeout=8)
    assert state == "timed_out", results
    assert statuses(results) == {"minion1": "timed_out"}
    assert _gone(_pids(pids, 1))


def test_a_stopped_minion_is_unreachable_within_the_timeout(cluster: Cluster, rig: saltrig.SaltRig) -> None:
    rig.stop_minion("minion3")
    started = time.monotonic()
    state, results = run(cluster, "shell.exec", {"cmd": "echo hi"}, ["minion1", "minion3"], timeout=60)
    took = time.monotonic() - started
    assert statuses(results) == {"minion1": "ok", "minion3": "unreachable"}
    assert list(results) == ["minion1", "minion3"]  # minion1 was reported as it returned, not at the end
    assert results["minion1"]["stdout"] == "hi\n"
    assert "did not answer" in results["minion3"]["error"]
    assert took < 60  # reported as the minion failed to answer, not when the job's time ran out


# -- a master without Salt -------------------------------------------------------------------


def test_a_master_without_the_salt_extra_refuses_to_start(tmp_path: Path, rig: saltrig.SaltRig) -> None:
    hide = tmp_path / "nosalt"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoSalt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'salt' or name.startswith('salt.'):\n"
        "            raise ImportError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, _NoSalt())\n")
    made = salt_cluster(tmp_path / "c", rig)
    with pytest.raises(RuntimeError) as failed:
        made.start("m1", env={"PYTHONPATH": f"{hide}:{REPO}"})
    assert "the Salt backend is unavailable: install the salt extra (pip install 'ombot[salt]')" in str(failed.value)
    # the same interpreter, without the hiding, has Salt: the refusal came from the hidden import
    assert subprocess.run([sys.executable, "-c", "import salt"], capture_output=True).returncode == 0


def test_a_playbook_is_refused_on_a_salt_master(cluster: Cluster) -> None:
    router = cluster.router()
    try:
        with pytest.raises(Exception, match="the salt backend cannot run Ansible playbooks"):
            router.submit("local", "ansible.playbook", {"playbook": "ntp-check"}, ["minion1"])
    finally:
        router.close()


def test_a_check_run_does_not_run_commands(cluster: Cluster, tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    mark = tmp_path / "ran"
    state, results = run(cluster, "shell.exec", {"cmd": f"touch {mark}"}, ["minion1"], check=True)
    assert state == "ok", results
    assert not mark.exists()
    assert results["minion1"]["stdout"] == f"check: not run (Salt cannot tell what it would do): sh -c 'touch {mark}'\n"


def test_a_dry_run_shows_the_salt_calls(cluster: Cluster) -> None:
    router = cluster.router()
    try:
        shown = router.preview("local", "shell.exec", {"cmd": "runas=root uptime"}, "minion[1-2]", check=True)
    finally:
        router.close()
    assert shown["hosts"] == BOTH
    assert shown["salt"] == {"tgt": BOTH, "tgt_type": "list", "calls": [
        'cmd.run_all cmd="runas=root uptime" python_shell=True shell=/bin/sh (not run: a check run)']}
