"""The agent's own install/uninstall and service on a server (issue 20, item 2's per-host part):
`ombot audit-agent uninstall` leaves a server as `install` found it, byte for byte; the systemd unit
passes systemd's own checks; without systemd the agent runs detached with a pidfile, and a stale
pidfile never leads to signalling another process; a local user's symlinks in the spool never lead
root's purge out of it.

Everything happens under a temporary root (`--root`): the machine's own /etc, /var and kernel audit
rules are never touched. The systemd path runs in a private mount namespace where systemd seems to
be PID 1 and `systemctl` is a recording stand-in (systemd is not PID 1 on the test machine).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ombot.audit_agent import hook, service
from ombot.errors import OmbotError
from ombot.keys import Identity
from tests import systemd_units
from tests.rigs import AGENT, agent_cluster, stored
from tests.support import Cluster, child_env, wait_for

NOBODY = 65534
UNIT = "ombot-audit-agent.service"
# What `systemd-analyze security` may find unset in our unit, and why the agent needs it so. Any other
# unset item (a protection dropped from the unit) fails the test.
ACCEPTED_EXPOSURE = {
    "UserOrDynamicUser": "root: it reads every user's 0700 spool directory and the audit log",
    "CapabilityBoundingSet_CAP_DAC_FOWNER_IPC_OWNER": "CAP_DAC_OVERRIDE reads users' spools and rotates them; "
                                                     "CAP_FOWNER sets the mode of a directory remade for its uid",
    "CapabilityBoundingSet_CAP_CHOWN_FSETID_SETFCAP": "CAP_CHOWN gives a squatted spool directory back to its uid",
    "SystemCallFilter_privileged": "@privileged holds chown(2), which that needs",
    "RestrictAddressFamilies_AF_INET_INET6": "it ships to its masters over TCP",
    "RestrictAddressFamilies_AF_UNIX": "journald, and the name service (sssd, nscd) for uid lookups",
    "PrivateNetwork": "it ships to its masters",
    "IPAddressDeny": "the masters' addresses live in agent.toml and change with enrolment, not with the unit",
    "ProtectProc": "it reads /proc/PID/loginuid of other users' shells (hidepid would hide them)",
    "ProcSubset": "it reads /proc/stat (boot time) and /proc/sys/kernel/random/boot_id",
    "PrivateUsers": "it must see users' real uids on their spool files",
    "RootDirectoryOrRootImage": "it reads the host's spool and audit log",
    "DeviceAllow": "ProtectClock's own read access to the RTC",
}
# The unit's overall exposure with the above: 2.3 on systemd 252. Each accepted item costs 0.1-0.5; what
# the agent cannot do without (root, network, DAC and chown capabilities, /proc) is most of it, so 2.5
# leaves room for systemd's weights to move a little between versions, not for a protection to go.
MAX_EXPOSURE = 2.5


# -- helpers -----------------------------------------------------------------------------------------


def agent_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ombot.audit_agent", *args], capture_output=True, text=True,
                          env=env or child_env(), timeout=120)


def tree(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every path under `root`: its kind, mode, owner and content (a link's target), never following links."""
    found: dict[str, tuple[Any, ...]] = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(top, name)
            st = os.lstat(path)
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                found[rel] = ("dir", oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid)
            else:
                found[rel] = ("file", oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid,
                              hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def installed(root: Path) -> list[str]:
    made = agent_cli("install", "--root", str(root))
    assert made.returncode == 0, made.stderr
    assert (root / hook.HOOK_BODY).is_file() and hook.MARKER in (root / hook.BASHRC).read_text()
    return made.stdout.splitlines()


def spool_of(root: Path) -> Path:
    return root / hook.DEFAULT_SPOOL_DIR.lstrip("/")


def as_if_it_ran(root: Path) -> None:
    """What enrolment, keygen and a running agent leave on a server after install."""
    etc = root / "etc" / "ombot"
    etc.mkdir(exist_ok=True)
    for name in ("agent.toml", "agent.key", "agent.pub", "agent.binding"):
        (etc / name).write_text(f"{name}\n")
    os.chmod(etc / "agent.key", 0o600)
    state = root / "var" / "lib" / "ombot-audit"
    (state / "queue.db").write_bytes(b"SQLite format 3\0")
    user = spool_of(root) / str(os.geteuid() or 1000)
    user.mkdir(mode=0o700, exist_ok=True)
    (user / "spool").write_text("om1\t...\n")


def record_line(text: str) -> str:
    """A spool line as the hook writes it."""
    return "\t".join(["om1", f"{time.time():.6f}", str(os.getpid()), "1", "0", "history", str(os.geteuid()), "",
                      "tester", "/dev/pts/9", "", "/tmp", text, str(len(text))]) + "\n"


# Layouts of a server's files before install: what uninstall must give back exactly.
LAYOUTS: dict[str, dict[str, str]] = {
    "empty": {},
    "debian": {"etc/bash.bashrc": "# System-wide .bashrc\nalias ll='ls -l'",  # no newline at its end
               "etc/zsh/zshrc": "# zshrc\nautoload -U compinit\n", "etc/profile.d/locale.sh": "export LANG=C.UTF-8\n",
               "etc/ombot/ombot.toml": "# a master's config\n", "var/spool/cron/.keep": "", "var/lib/dpkg/status": "x\n"},
    "zshrc.d": {"etc/bash.bashrc": "", "etc/zsh/zshrc": "for f in /etc/zsh/zshrc.d/*.zsh; do . $f; done\n",
                "etc/zsh/zshrc.d/00-site.zsh": "setopt no_beep\n"},
    "rhel": {"etc/zshrc": "# /etc/zshrc\n", "etc/bashrc": "# RHEL's\n", "etc/profile.d/colorls.sh": ""},
}


def lay_out(root: Path, layout: dict[str, str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for rel, text in layout.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    if (root / "etc/bash.bashrc").exists():
        os.chmod(root / "etc/bash.bashrc", 0o640)  # a mode of its own: uninstall must keep it


# -- uninstall: the tree as it was ---------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_uninstall_purge_gives_back_the_tree_install_found(tmp_path: Path, name: str) -> None:
    root = tmp_path / "root"
    lay_out(root, LAYOUTS[name])
    before = tree(root)
    installed(root)
    installed(root)  # twice: still one line, and the record of what it made stays true
    as_if_it_ran(root)
    assert tree(root) != before

    removed = agent_cli("uninstall", "--root", str(root), "--purge")

    assert removed.returncode == 0, removed.stderr
    assert tree(root) == before
    lines = removed.stdout.splitlines()
    assert f"removed {root / hook.HOOK_BODY}" in lines and f"removed {root / hook.PROFILE_LOADER}" in lines
    assert f"removed {spool_of(root)}" in lines and f"removed {root / 'etc/ombot/agent.key'}" in lines
    assert len(lines) == len(set(lines)) and all(str(root) in line for line in lines)  # one line per path
    again = agent_cli("uninstall", "--root", str(root), "--purge")
    assert again.returncode == 0 and again.stdout == "nothing to remove: the agent is not installed here\n"
    assert tree(root) == before


def test_uninstall_keeps_every_line_but_its_own_and_the_spool_without_purge(tmp_path: Path) -> None:
    """A bashrc that existed keeps its content, an admin's line added after ours included; a zshrc install
    made keeps the admin's line too; the spool (records not sent yet) and the queue stay until --purge."""
    root = tmp_path / "root"
    lay_out(root, {"etc/bash.bashrc": "A", "etc/zsh/.keep": ""})
    installed(root)
    with open(root / hook.BASHRC, "a") as f:
        f.write("B\n")
    zshrc = root / hook.ZSHRC
    assert zshrc.read_text().count(hook.MARKER) == 1  # install made it for our line
    with open(zshrc, "a") as f:
        f.write("setopt share_history\n")
    as_if_it_ran(root)

    removed = agent_cli("uninstall", "--root", str(root))

    assert removed.returncode == 0, removed.stderr
    assert (root / hook.BASHRC).read_bytes() == b"A\nB\n"  # its newline stays: our line was not the last
    assert zshrc.read_text() == "setopt share_history\n"
    assert stat.S_IMODE((root / hook.BASHRC).stat().st_mode) == 0o640
    assert not (root / hook.HOOK_BODY).exists() and not (root / hook.ZSH_BODY).exists()
    assert (spool_of(root) / str(os.geteuid() or 1000) / "spool").exists()
    assert (root / "var/lib/ombot-audit/queue.db").exists() and (root / "etc/ombot/agent.key").exists()
    assert removed.stdout.splitlines() == [
        f"removed {root / hook.HOOK_BODY}", f"removed {root / hook.PROFILE_LOADER}", f"removed {root / hook.ZSH_BODY}",
        f"removed the hook line from {root / hook.BASHRC}", f"removed the hook line from {zshrc}",
        f"removed {root / 'etc/profile.d'}",
        f"kept {spool_of(root)} and {root / 'var/lib/ombot-audit'} (records not sent yet, the queue): "
        "--purge removes them"]
    snapshot = tree(root)
    again = agent_cli("uninstall", "--root", str(root))
    assert again.returncode == 0 and again.stdout.startswith("nothing to remove\nkept ")
    assert tree(root) == snapshot
    purged = agent_cli("uninstall", "--root", str(root), "--purge")
    assert purged.returncode == 0, purged.stderr
    assert sorted(tree(root)) == ["etc", "etc/bash.bashrc", "etc/zsh", "etc/zsh/.keep", "etc/zsh/zshrc"]


def test_uninstall_of_an_install_from_before_the_record_removes_files_and_lines_only(tmp_path: Path) -> None:
    root = tmp_path / "root"
    lay_out(root, {"etc/bash.bashrc": "A\n"})
    installed(root)
    (root / hook.INSTALLED).unlink()  # as an older installer left it

    removed = agent_cli("uninstall", "--root", str(root), "--purge")

    assert removed.returncode == 0, removed.stderr
    assert (root / hook.BASHRC).read_text() == "A\n"
    assert not (root / hook.HOOK_BODY).exists() and not spool_of(root).exists()
    assert (root / "etc/profile.d").is_dir()  # not known to be install's: left


def test_purge_leaves_a_spool_directory_that_is_not_the_installers(tmp_path: Path) -> None:
    root = tmp_path / "root"
    installed(root)
    os.chmod(spool_of(root), 0o755)  # not the 1733 directory install made: not ours to delete

    removed = agent_cli("uninstall", "--root", str(root), "--purge")

    assert removed.returncode == 1
    assert spool_of(root).is_dir()
    assert f"error: left {spool_of(root)}: not the directory the installer made" in removed.stderr


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="the attack needs a second Unix user")
def test_purge_never_follows_a_symlink_a_user_planted_in_the_spool() -> None:
    """nobody, a local user, plants links in their own spool directory to a root-owned file and
    directory elsewhere (/etc/shadow, say), hoping root's purge deletes through them."""
    top = Path(tempfile.mkdtemp(prefix="ombot-purge-"))
    try:
        os.chmod(top, 0o755)
        root, victims = top / "root", top / "victims"
        (victims / "dir").mkdir(parents=True)
        (victims / "shadow").write_text("root:secret\n")
        (victims / "dir" / "keep").write_text("keep\n")
        installed(root)
        mine = spool_of(root) / str(NOBODY)
        script = ('mkdir -m 700 "$1" && ln -s "$2/shadow" "$1/spool" && ln -s "$2/dir" "$1/sub" '
                  '&& mkdir "$1/deep" && ln -s "$2" "$1/deep/up" && ln -s "$2/shadow" "$3/planted"')
        made = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "sh", "-c",
                               script, "sh", str(mine), str(victims), str(spool_of(root))],
                              capture_output=True, text=True, timeout=30)
        assert made.returncode == 0, made.stderr
        assert (mine / "sub").is_symlink() and (spool_of(root) / "planted").is_symlink()

        removed = agent_cli("uninstall", "--root", str(root), "--purge")

        assert removed.returncode == 0, removed.stderr
        assert not spool_of(root).exists()
        assert (victims / "shadow").read_text() == "root:secret\n" and (victims / "dir" / "keep").read_text() == "keep\n"
    finally:
        shutil.rmtree(top)


def test_uninstall_auditd_removes_the_rules_file_and_never_the_kernels_rules_under_a_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    written = agent_cli("install", "--auditd", "--no-load", "--root", str(root))
    assert written.returncode == 0, written.stderr
    rules = root / "etc/audit/rules.d/ombot.rules"
    assert rules.exists()

    removed = agent_cli("uninstall", "--auditd", "--root", str(root))

    assert removed.returncode == 0, removed.stderr
    assert not rules.exists() and f"removed {rules}" in removed.stdout.splitlines()
    assert "unloaded" not in removed.stdout  # a test root never reaches the kernel's rules


# -- the systemd unit ----------------------------------------------------------------------------------


def test_the_unit_passes_systemd_analyze_verify_and_its_exposure_is_low(tmp_path: Path) -> None:
    unit = tmp_path / UNIT
    unit.write_text(service.render_unit([sys.executable, "-m", "ombot.audit_agent", "run", "--config",
                                         "/etc/ombot/agent.toml"]))
    systemd_units.verify(unit)
    exposure = systemd_units.security(unit)
    print(exposure.text)  # -s shows it
    assert exposure.unset <= set(ACCEPTED_EXPOSURE), sorted(exposure.unset - set(ACCEPTED_EXPOSURE))
    assert exposure.score <= MAX_EXPOSURE, exposure.text


def test_the_unit_runs_the_agent_as_root_with_the_spool_and_state_writable() -> None:
    text = service.render_unit(["/opt/ombot-agent/bin/ombot-agent", "run", "--config", "/etc/ombot/agent.toml"])
    lines = text.splitlines()
    assert "ExecStart=/opt/ombot-agent/bin/ombot-agent run --config /etc/ombot/agent.toml" in lines
    assert {"User=root", "Restart=on-failure", "ProtectSystem=strict", "ReadWritePaths=-/var/spool/ombot-audit",
            "StateDirectory=ombot-audit", "StateDirectoryMode=0700", "ProtectHome=yes", "PrivateTmp=yes",
            "NoNewPrivileges=yes", "CapabilityBoundingSet=CAP_DAC_OVERRIDE CAP_CHOWN CAP_FOWNER",
            "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX", "StandardError=journal"} <= set(lines)
    elsewhere = service.render_unit(["/a/b"], "/srv/spool", "/srv/state").splitlines()
    assert "ReadWritePaths=/srv/state" in elsewhere and not any(x.startswith("StateDirectory") for x in elsewhere)
    for bad in ("/opt/my agent/bin/ombot-agent", "/opt/%n", "/opt/$HOME", "/opt/x\nExecStartPre=/bin/sh"):
        with pytest.raises(OmbotError, match="cannot go into a systemd unit"):
            service.render_unit([bad, "run"])


def test_service_install_writes_the_unit_under_root_and_enables_nothing_without_systemd(tmp_path: Path) -> None:
    root = tmp_path / "root"
    entry = root / "opt/ombot-agent/bin/ombot-agent"
    missing = agent_cli("service", "install", "--root", str(root))
    assert missing.returncode == 2 and "no agent installed in /opt/ombot-agent" in missing.stderr
    assert not (root / "etc/systemd").exists()
    entry.parent.mkdir(parents=True)
    entry.write_text("#!/bin/sh\n")
    entry.chmod(0o755)
    (root / "etc/ombot").mkdir(parents=True)
    (root / "etc/ombot/agent.toml").write_text('state_dir = "/srv/agent-state"\nspool_dir = "../../var/spool/x"\n')

    made = agent_cli("service", "install", "--root", str(root))

    unit = root / "etc/systemd/system" / UNIT
    assert made.returncode == 0, made.stderr
    assert made.stdout.splitlines() == [f"wrote {unit}", "not enabled: --root is not /; start the agent with "
                                                          "`ombot-agent service start`"]
    assert unit.read_text() == service.render_unit(
        ["/opt/ombot-agent/bin/ombot-agent", "run", "--config", "/etc/ombot/agent.toml"], "/var/spool/x",
        "/srv/agent-state")
    assert stat.S_IMODE((root / "srv/agent-state").stat().st_mode) == 0o700  # ReadWritePaths= needs it to exist
    again = agent_cli("service", "install", "--root", str(root))
    assert again.stdout.splitlines()[0] == f"{unit} is up to date"
    removed = agent_cli("service", "remove", "--root", str(root))
    assert removed.returncode == 0 and removed.stdout == f"removed {unit}\n" and not unit.exists()
    assert agent_cli("service", "remove", "--root", str(root)).stdout == "nothing to do\n"


FAKE_SYSTEMCTL = """#!/bin/sh
# systemctl as far as the agent's service commands use it, its calls recorded (systemd is not PID 1 here)
echo "$*" >> "$FAKE_SYSTEMD/calls"
case "$1" in
  is-active) [ -e "$FAKE_SYSTEMD/active" ] ;;
  is-enabled) [ -e "$FAKE_SYSTEMD/enabled" ] ;;
  enable) : > "$FAKE_SYSTEMD/enabled" ;;
  start|restart) : > "$FAKE_SYSTEMD/active" ;;
  stop) rm -f "$FAKE_SYSTEMD/active" ;;
  disable) rm -f "$FAKE_SYSTEMD/enabled"; if [ "$2" = --now ]; then rm -f "$FAKE_SYSTEMD/active"; fi ;;
esac
"""


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/etc/systemd/system").is_dir() or not Path("/run/systemd").is_dir(),
                    reason="needs root and /etc/systemd/system, /run/systemd to cover in a mount namespace")
def test_where_systemd_is_pid_1_install_enables_and_starts_the_unit_and_remove_undoes_it(tmp_path: Path) -> None:
    """In a private mount namespace /run/systemd/system exists (systemd's own test for "booted with
    systemd") and /etc/systemd/system is an empty tmpfs; `systemctl` records its calls."""
    fake = tmp_path / "systemd"
    (fake / "bin").mkdir(parents=True)
    (fake / "bin" / "systemctl").write_text(FAKE_SYSTEMCTL)
    (fake / "bin" / "systemctl").chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    prefixes = [tmp_path / "venv1", tmp_path / "venv2"]
    for prefix in prefixes:
        (prefix / "bin").mkdir(parents=True)
        (prefix / "bin" / "ombot-agent").write_text("#!/bin/sh\n")
        (prefix / "bin" / "ombot-agent").chmod(0o755)
    cli = f"{sys.executable} -m ombot.audit_agent service"
    (tmp_path / "agent.toml").write_text(f'state_dir = "{tmp_path / "state"}"\n')  # its pidfile: never the machine's
    config = f"--config {tmp_path / 'agent.toml'}"
    steps = [f"install --prefix {prefixes[0]}", f"install --prefix {prefixes[0]}", f"status", f"install --prefix {prefixes[1]}",
             "start", "remove", "remove", "status"]
    script = ["set -e", "mount -t tmpfs none /run/systemd", "mkdir /run/systemd/system",
              "mount -t tmpfs none /etc/systemd/system"]
    for n, step in enumerate(steps):
        script += [f"echo '== {step}' >> {fake}/calls", f"{cli} {step} {config} > {out}/{n} 2>&1 || echo rc=$? >> {out}/{n}",
                   f"cp /etc/systemd/system/{UNIT} {out}/unit{n} 2>/dev/null || true"]
    env = child_env({"FAKE_SYSTEMD": str(fake), "PATH": f"{fake / 'bin'}:{os.environ['PATH']}"})
    ran = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(script)],
                         capture_output=True, text=True, env=env, timeout=120)
    if ran.returncode != 0 and "unshare" in ran.stderr:
        pytest.skip(f"no mount namespace here: {ran.stderr.strip()}")
    assert ran.returncode == 0, ran.stderr
    said = [(out / str(n)).read_text() for n in range(len(steps))]
    calls = (fake / "calls").read_text().split("== ")[1:]
    unit = f"/etc/systemd/system/{UNIT}"
    assert said[0].splitlines() == [f"wrote {unit}", f"enabled and started {UNIT}"]
    assert calls[0].splitlines()[1:] == ["daemon-reload", f"is-active --quiet {UNIT}", f"is-enabled --quiet {UNIT}",
                                         f"enable {UNIT}", f"start {UNIT}"]
    assert f"ExecStart={prefixes[0]}/bin/ombot-agent run --config {tmp_path / 'agent.toml'}" in (out / "unit0").read_text()
    assert said[1].splitlines() == [f"{unit} is up to date", f"{UNIT} is enabled and running"]
    assert said[2].splitlines() == [f"systemd: {UNIT} is active, enabled"]
    assert said[3].splitlines() == [f"wrote {unit}", f"restarted {UNIT}"]  # a changed unit is restarted
    assert f"restart {UNIT}" in calls[3]
    assert said[4].splitlines() == [f"started {UNIT} (systemd)"]
    assert said[5].splitlines() == [f"stopped and disabled {UNIT}", f"removed {unit}"]
    assert calls[5].splitlines()[1:] == [f"disable --now {UNIT}", "daemon-reload", f"reset-failed {UNIT}"]
    assert not (out / "unit5").exists()
    assert said[6] == "nothing to do\n"
    assert said[7].splitlines()[0] == f"systemd runs, but {UNIT} is not installed (`ombot-agent service install`)"
    assert said[7].rstrip().endswith("rc=3")


# -- without systemd: a detached agent and its pidfile -------------------------------------------------


@pytest.fixture
def started() -> Iterator[list[int]]:
    """Pids of processes a test started; whatever still runs at its end is killed (by pid: ours only)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def agent_toml(root: Path, master_lines: list[str], key: str = "agent.key") -> Path:
    """ROOT/etc/ombot/agent.toml with the spool and state under ROOT, quick timings, and a key (made
    here unless it exists, or is meant to be missing)."""
    config = root / "etc/ombot/agent.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    if key == "agent.key" and not (config.parent / key).exists():
        Identity.generate().save(config.parent / key)
    config.write_text("\n".join([
        'host = "web01"', 'idc = "local"', f'key_file = "{key}"', f'spool_dir = "{spool_of(root)}"',
        f'state_dir = "{root / "var/lib/ombot-audit"}"', "scan_seconds = 0.2", "retry_min_seconds = 0.2",
        "retry_max_seconds = 1.0", "heartbeat_seconds = 1", "connect_timeout_seconds = 2", "", *master_lines, ""]))
    return config


def unreachable_master() -> list[str]:
    return ["[[masters]]", 'id = "m1"', 'address = "127.0.0.1:9"', f'public_key = "{Identity.generate().public}"']


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def agents_running(config: Path) -> list[int]:
    """Pids of processes running the agent with `config` (the detached one has no parent here)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                words = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"run" in words and str(config).encode() in words and alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def decoy(argv: list[str], started: list[int], user: int | None = None) -> int:
    """A process that is not our agent, running `argv` (as `user` if given)."""
    prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] if user is not None else []
    proc = subprocess.Popen([*prefix, *argv], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    started.append(proc.pid)
    if user is not None:
        wait_for(lambda: os.stat(f"/proc/{proc.pid}").st_uid == user, within=5, why="the decoy as its user")
    return proc.pid


def test_a_stale_pidfile_never_signals_the_process_that_has_its_pid(tmp_path: Path, started: list[int]) -> None:
    """The pidfile names a `sleep`, a process running the agent's command line with another config, and
    a dead pid: stop removes the pidfile and signals none of them."""
    root = tmp_path / "root"
    config = agent_toml(root, unreachable_master())
    pidfile = root / "var/lib/ombot-audit/agent.pid"
    pidfile.parent.mkdir(parents=True)
    other = str(tmp_path / "other/agent.toml")
    sleeper = decoy(["sleep", "120"], started)
    lookalike = decoy([sys.executable, "-c", "import time; time.sleep(120)", "-m", "ombot.audit_agent", "run",
                       "--config", other], started)
    gone = subprocess.Popen(["true"])
    gone.wait()
    for pid, why in ((sleeper, "is not this agent: 'sleep 120'"), (lookalike, "is not this agent"),
                     (gone.pid, "is not running")):
        pidfile.write_text(f"{pid}\n")
        state = agent_cli("service", "status", "--config", str(config))
        assert state.returncode == 3 and f"{pidfile} is stale (pid {pid} {why}" in state.stdout

        stopped = agent_cli("service", "stop", "--config", str(config))

        assert stopped.returncode == 0, stopped.stderr
        assert stopped.stdout.startswith(f"removed a stale pidfile {pidfile} (pid {pid} {why}")
        assert stopped.stdout.rstrip().endswith("nothing was signalled") and not pidfile.exists()
    assert alive(sleeper) and alive(lookalike)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs a second Unix user")
def test_a_process_of_another_user_that_looks_like_the_agent_is_never_signalled(
        tmp_path: Path, started: list[int]) -> None:
    """nobody runs a process whose command line is the agent's, with this very config, and waits for its
    pid to land in a stale pidfile: the pid is not root's, so stop leaves it alone."""
    root = tmp_path / "root"
    config = agent_toml(root, unreachable_master())
    pidfile = root / "var/lib/ombot-audit/agent.pid"
    pidfile.parent.mkdir(parents=True)
    mimic = decoy([sys.executable, "-c", "import time; time.sleep(120)", "-m", "ombot.audit_agent", "run",
                   "--config", str(config)], started, user=NOBODY)
    pidfile.write_text(f"{mimic}\n")

    stopped = agent_cli("service", "stop", "--config", str(config))

    assert "nothing was signalled" in stopped.stdout and alive(mimic)
    pidfile.write_text(f"{mimic}\n")
    begun = agent_cli("service", "start", "--config", str(config))  # a new agent; the mimic still untouched
    assert begun.returncode == 0, begun.stderr
    started.append(int(pidfile.read_text()))
    assert alive(mimic) and int(pidfile.read_text()) != mimic
    assert agent_cli("service", "stop", "--config", str(config)).returncode == 0
    assert alive(mimic)


def test_start_refuses_a_broken_config_and_reports_an_agent_that_dies_at_once(tmp_path: Path) -> None:
    root = tmp_path / "root"
    config = agent_toml(root, unreachable_master())
    config.write_text(config.read_text().replace("scan_seconds", "scan_secnds"))
    refused = agent_cli("service", "start", "--config", str(config))
    assert refused.returncode == 2 and "scan_secnds" in refused.stderr
    assert not (root / "var/lib/ombot-audit").exists()  # nothing started, nothing written

    config = agent_toml(root, unreachable_master(), key="missing.key")  # the agent fails on its key

    died = agent_cli("service", "start", "--config", str(config))

    assert died.returncode == 2 and "error: the agent exited at once; the end of" in died.stderr
    assert "missing.key" in died.stderr  # the log's last lines say why
    assert not (root / "var/lib/ombot-audit/agent.pid").exists() and not agents_running(config)


@pytest.mark.slow
def test_service_start_runs_a_real_agent_detached_and_stop_ends_it_and_uninstall_leaves_nothing(
        tmp_path: Path, make_cluster: Callable[..., Cluster], started: list[int]) -> None:
    cluster = agent_cluster(make_cluster)
    cluster.start("m1")
    root = tmp_path / "root"
    root.mkdir()
    before = tree(root)
    installed(root)
    conf = cluster.config().masters["m1"]
    config = agent_toml(root, ["[[masters]]", 'id = "m1"', f'address = "{conf.host}:{conf.port}"',
                               f'public_key = "{conf.public_key}"'])
    shutil.copy(cluster.root / "keys" / f"{AGENT}.key", root / "etc/ombot/agent.key")
    pidfile, log = root / "var/lib/ombot-audit/agent.pid", root / "var/lib/ombot-audit/agent.log"

    begun = agent_cli("service", "start", "--config", str(config))

    assert begun.returncode == 0, begun.stderr
    pid = int(pidfile.read_text())
    started.append(pid)
    assert begun.stdout.splitlines()[-1] == f"started the agent: pid {pid}, pidfile {pidfile}, log {log}"
    assert agents_running(config) == [pid]
    assert os.getsid(pid) != pid and os.getsid(pid) != os.getsid(0)  # its own session, and not its leader
    assert stat.S_IMODE(pidfile.stat().st_mode) == 0o644 and stat.S_IMODE(log.stat().st_mode) == 0o600
    user_dir = spool_of(root) / str(os.geteuid())
    user_dir.mkdir(mode=0o700, exist_ok=True)
    with open(user_dir / "spool", "a") as f:
        f.write(record_line("echo shipped by the detached agent"))
    wait_for(lambda: any(d.get("command") == "echo shipped by the detached agent" for _, k, d in stored(cluster)),
             within=20, why="the detached agent ships the spool to m1")
    again = agent_cli("service", "start", "--config", str(config))
    assert again.stdout == f"the agent already runs (pid {pid}, {pidfile}): not started again\n"
    assert agents_running(config) == [pid]
    state = agent_cli("service", "status", "--config", str(config))
    assert state.returncode == 0 and f"the agent runs: pid {pid} ({pidfile})" in state.stdout

    stopped = agent_cli("service", "stop", "--config", str(config))

    assert stopped.stdout == f"stopped the agent (pid {pid}); removed {pidfile}\n"
    assert not alive(pid) and not pidfile.exists() and not agents_running(config)
    assert "web01" in log.read_text()  # the agent's own start line went to the log
    after = agent_cli("service", "status", "--config", str(config))
    assert after.returncode == 3 and after.stdout.splitlines()[-1] == f"the agent is not running (no {pidfile})"
    # once more, then uninstall stops it first and leaves the tree as it was
    assert agent_cli("service", "start", "--config", str(config)).returncode == 0
    pid = int(pidfile.read_text())
    started.append(pid)
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert not [m for m in maps.splitlines() if " rwx" in m]  # MemoryDenyWriteExecute= in the unit holds

    removed = agent_cli("uninstall", "--root", str(root), "--purge")

    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.splitlines()[0] == f"stopped the agent (pid {pid}); removed {pidfile}"
    assert not alive(pid) and tree(root) == before
