"""`ombot install-units`: the master's and the bot's systemd units pass systemd's own checks, keep
their secrets out, and refuse to overwrite a hand-edited unit; and the master's unit really lets jobs
have cgroups of their own. systemd is not PID 1 here, so that last part runs a real master the way
the unit would: as an unprivileged user, in a fresh cgroup v2 directory chowned to it as Delegate=yes
does, without new privileges, capabilities or writable-executable memory. A negative control runs it
with the cgroup tree read-only, as ProtectControlGroups=yes would: the master says it falls back.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ombot.app import units
from tests import shells, systemd_units
from tests.support import Cluster, child_env, run_job

MASTER, BOT = units.MASTER_UNIT, units.BOT_UNIT
NOBODY = 65534
FALLBACK = "each job's commands run under the subreaper fallback"

# What `systemd-analyze security` may find unset, and why. Any other unset item (a protection dropped
# from a unit) fails the test.
ACCEPTED_MASTER = {
    "Delegate": "each job's commands run in a cgroup of their own below the master's",
    "ProtectControlGroups": "that needs /sys/fs/cgroup writable",
    "SystemCallFilter_privileged": "a local job's commands and ssh run under the master's filter: "
                                   "@system-service, nothing narrower",
    "SystemCallFilter_resources": "the same",
    "ProcSubset": "a local job (facts) reads /proc/meminfo, /proc/uptime",
    "PrivateUsers": "a local job, ssh and the Salt client see files' real owners",
    "RestrictAddressFamilies_AF_INET_INET6": "it serves the bot, CLIs and agents, and reaches servers over ssh",
    "RestrictAddressFamilies_AF_UNIX": "journald, the notify socket, the warm Ansible server, the salt-master",
    "PrivateNetwork": "it serves the network and reaches servers over it",
    "IPAddressDeny": "the servers' addresses live in inventories, which change without the unit",
    "RootDirectoryOrRootImage": "it runs ssh, ansible-playbook and local commands from the host",
    "DeviceAllow": "ProtectClock's own read access to the RTC",
}
ACCEPTED_BOT = {key: ACCEPTED_MASTER[key] for key in (
    "RestrictAddressFamilies_AF_INET_INET6", "RestrictAddressFamilies_AF_UNIX", "PrivateNetwork", "IPAddressDeny",
    "DeviceAllow")} | {"RootDirectoryOrRootImage": "it runs from the host's Python install",
                       "ProcSubset": "prometheus_client's process metrics read /proc/stat (the boot time)"}
# systemd 252 rates the master 1.7 and the bot 1.1: room for its weights to move, not for a protection to go.
MAX_EXPOSURE = {MASTER: 2.0, BOT: 1.5}


def ombot(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ombot", *args], capture_output=True, text=True, timeout=120,
                          env=child_env())


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A host's root holding a production configuration in /etc/ombot, as `ombot init --production` writes it."""
    made = ombot("init", "--production", str(tmp_path / "etc" / "ombot"), "--idc", "bj,sh", "--masters-per-idc", "2")
    assert made.returncode == 0, made.stderr
    return tmp_path


def install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return ombot("install-units", "--root", str(root), *args)


def unit(root: Path, name: str) -> Path:
    return root / units.UNIT_DIR / name


def lines(root: Path, name: str) -> list[str]:
    return unit(root, name).read_text().splitlines()


# -- the units -------------------------------------------------------------------------------------------


def test_the_units_pass_systemd_analyze_verify_and_their_exposure_is_low(root: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    done = install(root)
    assert done.returncode == 0, done.stderr
    instance = tmp_path / "instance" / "ombot-master@bj-1.service"  # the template with %i resolved
    instance.parent.mkdir()
    shutil.copy(unit(root, MASTER), instance)
    systemd_units.verify(unit(root, MASTER), instance, unit(root, BOT))
    for name, accepted in ((MASTER, ACCEPTED_MASTER), (BOT, ACCEPTED_BOT)):
        exposure = systemd_units.security(unit(root, name))
        with capsys.disabled() if os.environ.get("CI") else contextlib.nullcontext():  # in CI's log, always
            print(f"\nsystemd-analyze security --offline=true {name}\n{exposure.text}")
        assert exposure.unset <= set(accepted), (name, sorted(exposure.unset - set(accepted)))
        assert exposure.score <= MAX_EXPOSURE[name], exposure.text


def test_the_master_unit_delegates_cgroups_and_both_are_notify_units_without_secrets(root: Path) -> None:
    done = install(root, "--bin", "/opt/ombot/bin/ombot")
    assert done.returncode == 0, done.stderr
    master, bot = lines(root, MASTER), lines(root, BOT)
    assert "Delegate=yes" in master
    assert not [line for line in master if line.startswith(("ProtectControlGroups", "ReadOnlyPaths", "InaccessiblePaths",
                                                            "TemporaryFileSystem", "BindReadOnlyPaths"))]
    assert "ExecStart=/opt/ombot/bin/ombot --config /etc/ombot/ombot.toml master --id %i" in master
    assert "ExecStart=/opt/ombot/bin/ombot --config /etc/ombot/ombot.toml bot" in bot
    assert {"StateDirectory=ombot/%i", "StateDirectoryMode=0700", "EnvironmentFile=-/etc/ombot/master-%i.env",
            "KillMode=mixed"} <= set(master)
    assert {"StateDirectory=ombot/bot", "EnvironmentFile=/etc/ombot/bot.env", "ProtectControlGroups=yes",
            "PrivateUsers=yes"} <= set(bot)
    for text in (master, bot):
        assert {"Type=notify", "NotifyAccess=main", f"WatchdogSec={units.WATCHDOG_SECONDS}s", "Restart=on-failure",
                "User=ombot", "Group=ombot", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
                "NoNewPrivileges=yes", "CapabilityBoundingSet=", "AmbientCapabilities=", "StandardOutput=journal",
                "StandardError=journal", "[Install]", "WantedBy=multi-user.target"} <= set(text)
        assert not [line for line in text if re.match(r"(Environment=.*(SLACK_|DATABASE_URL)|LoadCredential)", line)]
        assert not [line for line in text if re.search(r"xox.-|xapp-|://[^/\s]*:[^@\s]*@", line)]


def test_it_refuses_to_overwrite_a_changed_unit_without_force(root: Path) -> None:
    first = install(root)
    assert first.returncode == 0, first.stderr
    assert f"wrote {unit(root, MASTER)}" in first.stdout.splitlines()
    steps = first.stdout.split("next, as root", 1)[1]
    assert "systemctl daemon-reload" in steps and "systemctl enable --now ombot-bot.service" in steps
    assert all(f"systemctl enable --now ombot-master@{mid}.service" in steps for mid in ("bj-1", "bj-2", "sh-1", "sh-2"))
    again = install(root)
    assert again.returncode == 0 and f"unchanged {unit(root, BOT)}" in again.stdout.splitlines()
    edited = unit(root, BOT).read_text().replace("RestartSec=5s", "RestartSec=1s")
    unit(root, BOT).write_text(edited)
    refused = install(root)
    assert refused.returncode == 2 and "--force" in refused.stderr and "drop-in" in refused.stderr
    assert unit(root, BOT).read_text() == edited
    forced = install(root, "--force")
    assert forced.returncode == 0 and "RestartSec=5s" in lines(root, BOT)
    assert oct(unit(root, BOT).stat().st_mode & 0o777) == "0o644"  # systemd's files are world-readable


def test_state_outside_var_lib_is_named_and_made_and_odd_words_are_refused(tmp_path: Path) -> None:
    """A site whose state lives beside its config (as `ombot init`'s): ReadWritePaths=, made 0700."""
    cluster = Cluster(tmp_path / "etc" / "ombot", {"bj": ["bj-1"], "sh": ["sh-1"]})
    done = install(tmp_path, "--user", "ombot-ops", "--config", "/etc/ombot/ombot.toml")
    assert done.returncode == 0, done.stderr
    assert "ReadWritePaths=/etc/ombot/state-bj-1 /etc/ombot/state-sh-1" in lines(tmp_path, MASTER)
    assert "ReadWritePaths=/etc/ombot/state" in lines(tmp_path, BOT)
    assert "User=ombot-ops" in lines(tmp_path, BOT)
    for made in ("state-bj-1", "state-sh-1", "state"):
        assert oct((cluster.root / made).stat().st_mode & 0o777) == "0o700"
    before = unit(tmp_path, MASTER).read_text()
    for option, word, why in (("--bin", "/opt/my ombot/bin/ombot", "cannot go into a systemd unit"),
                              ("--bin", "/opt/%n", "cannot go into a systemd unit"),
                              ("--user", "om$bot", "cannot go into a systemd unit"),
                              ("--bin", "ombot", "must be absolute paths")):
        refused = install(tmp_path, option, word, "--force")
        assert refused.returncode == 2 and why in refused.stderr, refused.stderr
    assert unit(tmp_path, MASTER).read_text() == before


# -- cgroup delegation, with a real master ---------------------------------------------------------------


def cgroup2_mount() -> Path | None:
    """Where the cgroup v2 hierarchy's root is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        if fields[sep + 1] == "cgroup2" and fields[3] == "/":
            return Path(fields[4])
    return None


def why_no_delegation() -> str | None:
    if not shells.real_root():
        return "a delegated cgroup is made and chowned as systemd does: needs root of the machine"
    if None in (shells.SETPRIV, shells.UNSHARE, shells.MOUNT):
        return "needs setpriv, unshare and mount (util-linux)"
    if (mount := cgroup2_mount()) is None:
        return "no cgroup v2 hierarchy is mounted here"
    probe = mount / f"omtest-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        return f"cannot make a cgroup under {mount}: {exc}"
    try:
        if shells.namespace_mode() != "root":
            return "needs `unshare --mount` as root"
    except shells.Unavailable as exc:
        return str(exc)
    return None


@contextlib.contextmanager
def delegated_cgroup(owner: int) -> Iterator[Path]:
    """A fresh cgroup, chowned to `owner` as systemd does for Delegate=yes (the directory, cgroup.procs,
    cgroup.threads, cgroup.subtree_control); on leaving, whatever is in it is killed and it is removed."""
    mount = cgroup2_mount()
    assert mount is not None
    path = mount / f"omtest-delegate-{uuid.uuid4().hex[:12]}"
    path.mkdir()
    for item in (path, path / "cgroup.procs", path / "cgroup.threads", path / "cgroup.subtree_control"):
        os.chown(item, owner, owner)
    try:
        yield path
    finally:
        if (path / "cgroup.kill").exists():
            (path / "cgroup.kill").write_text("1")
        deadline = time.monotonic() + 10
        while "populated 1" in (path / "cgroup.events").read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        for child in sorted(path.rglob("*/"), key=lambda p: len(p.parts), reverse=True):
            if (child / "cgroup.procs").exists():
                child.rmdir()
        path.rmdir()


# Inside a private mount namespace, as root: move into the cgroup, make the cgroup tree read-only if
# asked (what ProtectControlGroups=yes does), then exec the rest. Paths arrive as arguments only.
_ENTER = r"""
set -eu
m=$1 cg=$2 tree=$3 mode=$4; shift 4
echo 0 > "$cg/cgroup.procs"
if [ "$mode" = ro ]; then "$m" --bind "$tree" "$tree"; "$m" -o remount,bind,ro "$tree"; fi
exec "$@"
"""
# As MemoryDenyWriteExecute=yes does (PR_SET_MDWE, Linux 6.3+; kept across exec), then the master itself.
_NO_WX = ("import ctypes, os, sys\nctypes.CDLL(None).prctl(65, 1, 0, 0, 0)\n"
          "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n")


@contextlib.contextmanager
def master_as_the_unit_runs_it(cluster: Cluster, cgroup: Path, mode: str) -> Iterator[subprocess.Popen[bytes]]:
    """Master m1 in `cgroup`, as uid/gid 65534 with no new privileges, no capabilities but reading
    (this machine's Python lives under /root, 0700), no writable-executable memory."""
    mount = cgroup2_mount()
    assert mount is not None and shells.SETPRIV and shells.UNSHARE and shells.MOUNT
    ready = cluster.root / "m1.ready"
    drop = [shells.SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--no-new-privs",
            "--inh-caps=-all,+dac_read_search", "--ambient-caps=+dac_read_search", "--bounding-set=-all,+dac_read_search"]
    master = [sys.executable, "-c", _NO_WX, "-m", "ombot", "--config", str(cluster.config_path), "master",
              "--id", "m1", "--ready-file", str(ready)]
    argv = [shells.UNSHARE, "--mount", "--propagation", "private", "--", shells.SH, "-c", _ENTER, "ombot-test-unit",
            shells.MOUNT, str(cgroup), str(mount), mode, *drop, "--", *master]
    with open(cluster.root / "m1.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, f"the master exited {proc.returncode}:\n{master_log(cluster)}"
            assert time.monotonic() < deadline, f"the master did not become ready:\n{master_log(cluster)}"
            time.sleep(0.05)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):  # it may have died already: its failure is the news
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def master_log(cluster: Cluster) -> str:
    return (cluster.root / "m1.log").read_text(errors="replace")


@pytest.fixture
def unit_site() -> Iterator[Cluster]:
    """A site the service user owns (as /etc/ombot/keys and its state), where it can reach it: not
    under pytest's 0700 directory, as access(2), which click's checks use, ignores capabilities."""
    if (why := why_no_delegation()) is not None:
        pytest.skip(why)
    top = Path(tempfile.mkdtemp(prefix="ombot-unit-"))
    try:
        top.chmod(0o755)
        cluster = Cluster(top / "site", {"local": ["m1"]})
        for here, dirs, files in os.walk(top):
            for name in [here, *(os.path.join(here, n) for n in dirs + files)]:
                os.chown(name, NOBODY, NOBODY)
        yield cluster
    finally:
        shutil.rmtree(top)


def where_the_job_ran(cluster: Cluster) -> tuple[str, str, str]:
    """The uid a job's command ran as, its cgroup, and its PR_GET_MDWE flags (inherited from the master)."""
    probe = "python3 -c 'import ctypes; print(ctypes.CDLL(None).prctl(66, 0, 0, 0, 0))'"
    router = cluster.router()
    try:
        state, host = run_job(router, "shell.exec", {"cmd": f"id -u; grep '^0::' /proc/self/cgroup; {probe}"})
    finally:
        router.close()
    assert state == "ok", host
    uid, where, mdwe = str(host["stdout"]).split()
    return uid, where, mdwe


def mdwe_here() -> bool:
    return int(ctypes.CDLL(None).prctl(66, 0, 0, 0, 0)) >= 0  # PR_GET_MDWE answers: the kernel has it


def test_under_delegation_a_job_runs_in_a_cgroup_of_its_own(unit_site: Cluster) -> None:
    with delegated_cgroup(NOBODY) as cgroup, master_as_the_unit_runs_it(unit_site, cgroup, "rw") as master:
        uid, where, mdwe = where_the_job_ran(unit_site)
        assert uid == str(NOBODY)
        assert where.startswith(f"0::/{cgroup.name}/ombot-{master.pid}-"), (where, master_log(unit_site))
        assert mdwe == ("1" if mdwe_here() else "-1")  # the master served under MemoryDenyWriteExecute's rule
        assert not list(cgroup.glob("ombot-*")), "the job's cgroup outlived it"
        assert FALLBACK not in master_log(unit_site)


def test_with_the_cgroup_tree_read_only_the_master_says_it_falls_back(unit_site: Cluster) -> None:
    """The negative control: ProtectControlGroups=yes (the tree mounted read-only) defeats delegation."""
    with delegated_cgroup(NOBODY) as cgroup, master_as_the_unit_runs_it(unit_site, cgroup, "ro"):
        uid, where, _ = where_the_job_ran(unit_site)
        assert (uid, where) == (str(NOBODY), f"0::/{cgroup.name}")  # the master's own cgroup: the fallback's
        log = master_log(unit_site)
        # the namespace mounts the same tree at the same place, read-only
        assert f"the master's cgroup {cgroup} is not writable: {FALLBACK}" in log, log
        assert "Delegate=yes, and no ProtectControlGroups=" in log
