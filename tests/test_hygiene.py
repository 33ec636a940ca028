"""Process and file hygiene: what jobs can reach of OMBot's secrets, what they leave behind, and
which files OMBot writes for its user alone. Real masters, a real `ombot up`, real processes."""

from __future__ import annotations

import fcntl
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ombot.masters.backends.cgroup import own_cgroup
from tests.support import Cluster, child_env, free_port, run_job

SLACK_ENV = {"SLACK_SIGNING_SECRET": "sekrit-signing-9f2c", "SLACK_APP_TOKEN": "xapp-sekrit-77",
             "SLACK_HYGIENE_CANARY": "canary-1d4e"}


def processes_with(marker: str) -> list[int]:
    """Live processes whose command line holds `marker` (zombies have none)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass
    return found


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                raw = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(raw[raw.rfind(")") + 2:].split()[1]) == pid:
                found.append(int(entry))
    return found


def wait_until(check: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass




# -- jobs leave no process behind ----------------------------------------------------------------------


def why_no_job_cgroups() -> str | None:
    """Why a master here cannot give jobs cgroups (None: it can): its own test, and a real mkdir."""
    root = own_cgroup()
    if root is None or not os.access(root, os.W_OK):
        return f"cgroup v2 is not writable here ({root or 'no cgroup2 hierarchy holds this process'})"
    probe = root / f"test-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        return f"cannot make a cgroup under {root}: {exc}"
    return None


@dataclass
class Confining:
    """A master's client, and the cgroup name prefix its jobs must run under (None: the fallback)."""

    router: Any
    cgroup_prefix: str | None

    def shell(self, cmd: str) -> tuple[str, dict[str, Any]]:
        """Run `cmd` with shell.exec, after checking the job ran in its own cgroup exactly when it must;
        the host's stdout is what `cmd` printed."""
        where_am_i = "echo \"cgroup $(grep '^0::' /proc/self/cgroup)\"\n"
        state, host = run_job(self.router, "shell.exec", {"cmd": where_am_i + cmd})
        where, _, rest = host["stdout"].partition("\n")
        assert where.startswith("cgroup 0::"), host
        if self.cgroup_prefix is None:
            assert "/ombot-" not in where, where
        else:
            assert f"/{self.cgroup_prefix}" in where, f"the job did not run in a job cgroup: {where}"
        return state, {**host, "stdout": rest}


@pytest.fixture(scope="module", params=["cgroup", "subreaper"])
def confining(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Confining]:
    """A master confining jobs in cgroups, where cgroup v2 is writable, and one forced onto the
    fallback: a child subreaper that finds leftovers by their token."""
    cgroups = request.param == "cgroup"
    if cgroups and (why := why_no_job_cgroups()):
        pytest.skip(f"{why}: only the subreaper fallback can be tested")
    cluster = Cluster(tmp_path_factory.mktemp(f"hygiene-{request.param}"), {"local": ["m1"]})
    master = cluster.start("m1", env={} if cgroups else {"OMBOT_JOB_CGROUPS": "off"})
    assert master.proc is not None
    router = cluster.router()
    yield Confining(router, f"ombot-{master.proc.pid}-" if cgroups else None)
    router.close()
    cluster.stop_all()


@pytest.mark.slow
@pytest.mark.parametrize("template", ["setsid sleep {marker} &", "(sleep {marker} &)",
                                      "setsid sh -c 'sleep {marker} & wait' > /dev/null 2>&1 < /dev/null &"])
def test_background_processes_die_with_their_job(confining: Confining, template: str) -> None:
    marker = f"300.{uuid.uuid4().int % 10**9}"
    try:
        state, host = confining.shell(template.format(marker=marker) + "\necho started")
        assert (state, host["stdout"]) == ("ok", "started\n"), host
        assert wait_until(lambda: not processes_with(marker), 5), f"left behind: {processes_with(marker)}"
    finally:
        kill_all(processes_with(marker))


@pytest.mark.slow
def test_a_background_yes_holding_stdout_ends_with_its_job(confining: Confining) -> None:
    marker = f"ombot-yes-{uuid.uuid4().hex}"
    try:
        started = time.monotonic()
        # echo first: a `yes` started first may write before it (the machine's scheduler decides)
        state, host = confining.shell(f"echo started; yes {marker} &")
        assert state == "ok" and host["stdout"].startswith("started\n"), host
        assert time.monotonic() - started < 30  # generous: the job must not wait for `yes`
        assert wait_until(lambda: not processes_with(marker), 5), f"left behind: {processes_with(marker)}"
    finally:
        kill_all(processes_with(marker))


# -- `ombot up`: no Slack secret reaches a master; signals stop its masters ----------------------------


class Up:
    """`ombot up` on a fresh demo directory, in console mode with its stdin held open."""

    def __init__(self, root: Path) -> None:
        self.demo = root / "demo"
        init = subprocess.run([sys.executable, "-m", "ombot", "init", str(self.demo), "--master-port",
                               str(free_port())], capture_output=True, text=True, env=child_env(), timeout=60)
        assert init.returncode == 0, init.stderr
        self.log = root / "up.out"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ombot", "--config", str(self.demo / "ombot.toml"), "up"],
            stdin=subprocess.PIPE, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT,
            env=child_env(SLACK_ENV), start_new_session=True)
        assert wait_until(lambda: "OMBot console" in self.output() or self.proc.poll() is not None, 60), self.output()
        assert self.proc.poll() is None, self.output()
        [self.master] = children_of(self.proc.pid)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def lock_is_free(self) -> bool:
        fd = os.open(self.demo / "state" / "local-1.lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        kill_all([self.master])


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    started = Up(tmp_path)
    yield started
    started.close()


def gone(pid: int) -> bool:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return raw[raw.rfind(")") + 2] in "ZX"


@pytest.mark.slow
def test_masters_started_by_up_hold_no_slack_secret(up: Up) -> None:
    environ = Path(f"/proc/{up.master}/environ").read_bytes()  # what a job sees as /proc/$PPID/environ
    assert b"PATH=" in environ
    for name, value in SLACK_ENV.items():
        assert name.encode() not in environ and value.encode() not in environ


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_up_stops_its_master_on_sigterm_and_sighup(up: Up, sig: signal.Signals) -> None:
    os.kill(up.proc.pid, sig)
    up.proc.wait(timeout=60)
    assert gone(up.master), "the master outlived `ombot up`"
    assert up.lock_is_free()
    # A second `up` on the same directory starts its master: nothing says "already running".
    second = subprocess.Popen([sys.executable, "-m", "ombot", "--config", str(up.demo / "ombot.toml"), "up"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=child_env(), start_new_session=True)
    out, _ = second.communicate(b"/quit\n", timeout=90)
    assert second.returncode == 0, out.decode()
    assert b"already running" not in out and b"master local-1 (IDC local) on" in out


@pytest.mark.slow
def test_a_master_exits_by_itself_when_up_is_killed(up: Up) -> None:
    os.kill(up.proc.pid, signal.SIGKILL)
    up.proc.wait(timeout=10)
    assert wait_until(lambda: gone(up.master), 30), "the master outlived a SIGKILLed `ombot up`"
    # A leader shows as a zombie while its other threads still exit: the lock goes with the last one.
    assert wait_until(up.lock_is_free, 30), "the master's state lock was never freed"


# -- private files -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_everything_up_writes_is_private(up: Up) -> None:
    up.proc.stdin.write(b"/om echo localhost message=private\n")  # type: ignore[union-attr]
    up.proc.stdin.flush()  # type: ignore[union-attr]
    assert wait_until(lambda: "Starting job #1" in up.output(), 60), up.output()
    up.close()
    wrote = [up.demo, *up.demo.rglob("*")]
    assert up.demo / "state" / "bot.db" in wrote and up.demo / "state" / "local-1.log" in wrote
    public = [f"{p} {stat.filemode(p.stat().st_mode)}" for p in wrote if p.stat().st_mode & 0o077]
    assert not public


def undumpable_cmd(*args: str) -> list[str]:
    """Run as root without any capability: the same uid as OMBot, but no power to bypass its flags."""
    return ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--", *args]


@pytest.mark.slow
def test_the_console_is_not_dumpable(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    assert subprocess.run([sys.executable, "-m", "ombot", "init", str(demo)], env=child_env(),
                          capture_output=True, timeout=60).returncode == 0
    log = tmp_path / "console.out"
    console = subprocess.Popen(undumpable_cmd(sys.executable, "-m", "ombot", "--config", str(demo / "ombot.toml"),
                                              "console"),
                               stdin=subprocess.PIPE, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                               env=child_env(SLACK_ENV))
    try:
        assert wait_until(lambda: "OMBot console" in log.read_text() or console.poll() is not None, 60), log.read_text()
        assert console.poll() is None, log.read_text()
        peek = subprocess.run(undumpable_cmd("cat", f"/proc/{console.pid}/environ"), capture_output=True, timeout=30)
        assert b"sekrit" not in peek.stdout
        assert peek.returncode != 0 and b"Permission denied" in peek.stderr
    finally:
        console.kill()
        console.wait()


# -- log.tail checks the file it opened ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tail_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Path, Path]]:
    cluster = Cluster(tmp_path_factory.mktemp("hygiene-tail"), {"local": ["m1"]})
    log_dir = Path("/var/log") / f"ombot-hygiene-{uuid.uuid4().hex[:8]}"
    log_dir.mkdir()
    secret = Path("/tmp") / f"ombot-hygiene-secret-{uuid.uuid4().hex}"  # /tmp: same filesystem as /var/log here
    secret.write_text("top secret shadow line\n")
    cluster.start("m1")
    router = cluster.router()
    try:
        yield router, log_dir, secret
    finally:
        router.close()
        cluster.stop_all()
        for path in sorted(log_dir.rglob("*"), reverse=True):
            path.unlink()
        log_dir.rmdir()
        secret.unlink()


def test_log_tail_refuses_a_hardlink_to_a_file_elsewhere(tail_world: tuple[Any, Path, Path]) -> None:
    router, log_dir, secret = tail_world
    if os.stat(secret).st_dev != os.stat(log_dir).st_dev:
        pytest.skip("/tmp and /var/log are on different filesystems here")
    link = log_dir / "shadow.log"
    os.link(secret, link)
    state, host = run_job(router, "log.tail", {"path": str(link)})
    assert (state, host["status"]) == ("failed", "failed")
    assert "secret" not in host["stdout"]
    assert host["error"] == f"path: {link} has 2 links; only single-link files are shown"


@pytest.mark.slow
def test_log_tail_never_shows_a_file_swapped_in_by_symlink(tail_world: tuple[Any, Path, Path]) -> None:
    router, log_dir, secret = tail_world
    harmless = log_dir / "harmless.log"
    harmless.write_text("harmless line\n")
    race = log_dir / "race.log"
    race.symlink_to(harmless)
    stop = threading.Event()

    def swap() -> None:  # atomically repoint race.log between the harmless file and the secret
        n = 0
        while not stop.is_set():
            n += 1
            fresh = log_dir / f".race-{n}"
            fresh.symlink_to(secret if n % 2 else harmless)
            os.replace(fresh, race)

    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    shown = []
    try:
        for _ in range(40):
            state, host = run_job(router, "log.tail", {"path": str(race)})
            shown.append(host["stdout"])
    finally:
        stop.set()
        swapper.join()
    assert not [s for s in shown if "secret" in s]
    assert set(shown) <= {"harmless line\n", ""}
