"""The agent as a service on a server, and the undoing of everything `install` put there.

Two ways to keep the agent running, chosen by what the server is:

- systemd is PID 1 (`/run/systemd/system` exists) and the root is `/`: `service install` writes
  `/etc/systemd/system/ombot-audit-agent.service` (a hardened unit: `render_unit`) and enables and
  starts it; `service remove` stops, disables and deletes it.
- no systemd (a container, CI): `service start` starts the agent detached (double fork, a new session,
  its output appended to STATE_DIR/agent.log) and writes its pid to STATE_DIR/agent.pid, created with
  O_EXCL; `service stop` signals that pid only once /proc says it is this agent (its command line runs
  the agent with this config, as our uid), through a pidfd, so a stale pidfile never kills a process
  that took the pid over.

`uninstall` undoes `install` and the service: the hook files and marked lines (hook.uninstall_hook),
the auditd rules on request, and with `purge` the spool, the state and /etc/ombot/agent.*, removed by
descriptor (shutil.rmtree's fd-based walk): the spool is world-writable (1733) and each user owns
their directory in it, so a symlink planted there must never lead root's removal elsewhere.

Runs on the servers: Python 3.9 and the standard library only.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from ombot.audit_agent import auditd_rules, hook
from ombot.audit_agent.records import printable
from ombot.audit_agent.settings import DEFAULT_CONFIG, DEFAULT_STATE_DIR, load
from ombot.errors import OmbotError
from ombot.tables import read_toml

UNIT_NAME = "ombot-audit-agent.service"
UNIT_PATH = f"etc/systemd/system/{UNIT_NAME}"
DEFAULT_PREFIX = "/opt/ombot-agent"  # where the rollout makes the agent's venv
PIDFILE = "agent.pid"
LOGFILE = "agent.log"
AGENT_FILES = ("agent.toml", "agent.key", "agent.pub", "agent.binding")  # in etc/ombot: enrolment's and keygen's
START_CHECK_SECONDS = 1.5  # a started agent that dies this soon (a bad key, a broken install) is reported
STOP_SECONDS = 15.0  # SIGTERM, then SIGKILL after this long (the agent ends its pass first)
FRESH_PIDFILE_SECONDS = 10.0  # an empty pidfile this young is another `service start` under way
# What a path in a unit may hold: anything else would need systemd's quoting (%, $, spaces, quotes).
_UNIT_SAFE = re.compile(r"[A-Za-z0-9_./+:@=,-]+")

_UNIT = """\
# Written by `ombot-agent service install` (docs/audit.md, "Uninstall, and the agent as a service").
# Do not edit: run that again, or `ombot-agent service remove`.
[Unit]
Description=OMBot shell audit agent (ships shell and auditd records to its IDC's masters)
Wants=network-online.target
After=network-online.target auditd.service
StartLimitIntervalSec=300
StartLimitBurst=10

[Service]
Type=simple
ExecStart=@EXEC@
# Root: it reads every user's spool directory (0700, theirs), moves a squatted one aside and makes it
# again for its uid, and reads the audit log. Those need only these capabilities.
User=root
CapabilityBoundingSet=CAP_DAC_OVERRIDE CAP_CHOWN CAP_FOWNER
NoNewPrivileges=yes
Restart=on-failure
RestartSec=5s
TimeoutStopSec=20s
# The filesystem is read-only but for the spool (rotation, repairs) and the state (the queue).
ProtectSystem=strict
ReadWritePaths=-@SPOOL@
@STATE@
UMask=0077
ProtectHome=yes
PrivateTmp=yes
PrivateMounts=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
# TCP to the masters; AF_UNIX for journald and the name service (sssd, nscd).
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@resources
SystemCallErrorNumber=EPERM
Environment=PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
StandardOutput=journal
StandardError=journal
SyslogIdentifier=ombot-audit-agent

[Install]
WantedBy=multi-user.target
"""


# -- the unit ------------------------------------------------------------------------------------------


def render_unit(command: Sequence[str], spool_dir: str = hook.DEFAULT_SPOOL_DIR,
                state_dir: str = DEFAULT_STATE_DIR) -> str:
    """The systemd unit running `command` (the agent's `run`, with its config) with `spool_dir` and
    `state_dir` writable. A state directory under /var/lib is systemd's StateDirectory (made 0700 at
    start); one elsewhere must exist (`install_unit` makes it)."""
    for word in (*command, spool_dir, state_dir):
        _unit_safe(word)
    state = Path(state_dir)
    if state.parent == Path("/var/lib"):
        state_lines = f"StateDirectory={state.name}\nStateDirectoryMode=0700"
    else:
        state_lines = f"ReadWritePaths={state}"
    return (_UNIT.replace("@EXEC@", " ".join(command)).replace("@SPOOL@", spool_dir)
            .replace("@STATE@", state_lines))


def _unit_safe(word: str) -> str:
    if not _UNIT_SAFE.fullmatch(word):
        raise OmbotError(f"{word!r} cannot go into a systemd unit as it is: use a path of letters, digits "
                         "and ._/+:@=,- only")
    return word


def agent_command(root: Path, prefix: str, config: str) -> list[str]:
    """ExecStart: PREFIX/bin/ombot-agent run --config CONFIG (the ombot-agent distribution's entry
    point); PREFIX/bin/python -m ombot.audit_agent where only the package is installed."""
    if not prefix.startswith("/") or not config.startswith("/"):
        raise OmbotError("--prefix and --config must be absolute paths")
    tail = ["run", "--config", config]
    entry, python = f"{prefix.rstrip('/')}/bin/ombot-agent", f"{prefix.rstrip('/')}/bin/python"
    if os.access(under(root, entry), os.X_OK):
        return [entry, *tail]
    if os.access(under(root, python), os.X_OK):
        return [python, "-m", "ombot.audit_agent", *tail]
    raise OmbotError(f"no agent installed in {prefix} (neither {entry} nor {python} is there): install the "
                     "ombot-agent package into that venv first, or name the venv with --prefix")


def agent_dirs(config_file: Path, relative_to: Path) -> tuple[str, str]:
    """(spool_dir, state_dir) that the agent.toml at `config_file` names (relative ones against the
    directory `relative_to`, as the agent resolves them); the defaults when there is no such file yet."""
    if not config_file.is_file():
        return hook.DEFAULT_SPOOL_DIR, DEFAULT_STATE_DIR
    data = read_toml(config_file, "an agent.toml")
    found = []
    for key, default in (("spool_dir", hook.DEFAULT_SPOOL_DIR), ("state_dir", DEFAULT_STATE_DIR)):
        value = data.get(key, default)
        if not isinstance(value, str) or not value:
            raise OmbotError(f"{config_file}: {key} must be a path")
        found.append(os.path.normpath(os.path.join(str(relative_to), value)))
    return found[0], found[1]


def systemd_runs(root: Path) -> bool:
    """systemd is PID 1 here (sd_booted's test) and `root` is this machine's /."""
    return root.resolve() == Path("/") and os.path.isdir("/run/systemd/system")


def _pid1() -> str:
    try:
        return Path("/proc/1/comm").read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def install_unit(root: Path, prefix: str, config: str) -> list[str]:
    """Write ROOT/etc/systemd/system/ombot-audit-agent.service; where systemd runs (and root is /),
    enable and start it, restarting it when the unit changed. Returns what it did, line by line."""
    command = agent_command(root, prefix, config)
    spool_dir, state_dir = agent_dirs(under(root, config), Path(config).parent)
    text = render_unit(command, spool_dir, state_dir)
    path = under(root, UNIT_PATH)
    changed = not path.is_file() or path.read_text() != text
    done = [f"wrote {path}" if changed else f"{path} is up to date"]
    if changed:
        _write(path, text, 0o644)
    if Path(state_dir).parent != Path("/var/lib"):  # a ReadWritePaths= that is missing fails the start
        under(root, state_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    if not systemd_runs(root):
        why = "--root is not /" if root.resolve() != Path("/") else f"systemd is not PID 1 here (PID 1 is {_pid1()})"
        return done + [f"not enabled: {why}; start the agent with `ombot-agent service start`"]
    if changed:
        _systemctl("daemon-reload")
    active = _systemctl_ok("is-active", "--quiet", UNIT_NAME)
    enabled = _systemctl_ok("is-enabled", "--quiet", UNIT_NAME)
    if active and enabled and not changed:
        return done + [f"{UNIT_NAME} is enabled and running"]
    _systemctl("enable", UNIT_NAME)
    _systemctl("restart" if active and changed else "start", UNIT_NAME)
    return done + [f"{'restarted' if active and changed else 'enabled and started'} {UNIT_NAME}"]


def remove_unit(root: Path, config: Path) -> list[str]:
    """Stop, disable and delete the unit (systemctl only where systemd runs and root is /), and stop
    an agent that `service start` started. Returns what it did; nothing when there was nothing."""
    done: list[str] = []
    path = under(root, UNIT_PATH)
    if systemd_runs(root) and (os.path.lexists(path) or _systemctl_ok("is-active", "--quiet", UNIT_NAME)):
        if os.path.lexists(path):
            _systemctl("disable", "--now", UNIT_NAME)
        else:  # loaded although its file is gone
            _systemctl("stop", UNIT_NAME)
        done.append(f"stopped and disabled {UNIT_NAME}")
    if hook.unlink_entry(path):
        done.append(f"removed {path}")
        if systemd_runs(root):
            _systemctl("daemon-reload")
            _systemctl_ok("reset-failed", UNIT_NAME)
    return done + stop_detached(config, quiet=True)


def _systemctl(*args: str) -> None:
    proc = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise OmbotError(f"systemctl {' '.join(args)}: {(proc.stderr or proc.stdout).strip()}")


def _systemctl_ok(*args: str) -> bool:
    return subprocess.run(["systemctl", *args], capture_output=True, timeout=120).returncode == 0


def _systemd_manages(config: Path) -> bool:
    return systemd_runs(Path("/")) and os.path.isfile(under(Path("/"), UNIT_PATH))


# -- without systemd: a detached agent and its pidfile -------------------------------------------------


def start(config: Path) -> list[str]:
    """Start the agent: through systemd when it manages the unit, else detached with a pidfile.
    A live agent with that pidfile is never started twice."""
    config = config.absolute()
    if _systemd_manages(config):
        _systemctl("start", UNIT_NAME)
        return [f"started {UNIT_NAME} (systemd)"]
    settings = load(config)  # a broken agent.toml is refused here, before anything starts
    settings.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    pidfile = settings.state_dir / PIDFILE
    done: list[str] = []
    pid = _read_pid(pidfile)
    if pid is not None and _runs(pid, config):
        return [f"the agent already runs (pid {pid}, {pidfile}): not started again"]
    fd = _claim(pidfile, pid, config, done)
    log = settings.state_dir / LOGFILE
    try:
        pid = _spawn([sys.executable, "-m", "ombot.audit_agent", "run", "--config", str(config)], log)
        os.write(fd, f"{pid}\n".encode())
    except BaseException:
        os.close(fd)
        hook.unlink_entry(pidfile)
        raise
    os.close(fd)
    if not _stays_up(pid, config):
        hook.unlink_entry(pidfile)
        raise OmbotError(f"the agent exited at once; the end of {log}:\n{_tail(log)}")
    return done + [f"started the agent: pid {pid}, pidfile {pidfile}, log {log}"]


def _claim(pidfile: Path, pid: Optional[int], config: Path, done: list[str]) -> int:
    """The pidfile, created with O_EXCL; a stale one (its pid dead, or not this agent) goes first."""
    if os.path.lexists(pidfile):
        if pid is None and _age(pidfile) < FRESH_PIDFILE_SECONDS:
            raise OmbotError(f"{pidfile} is empty and new: another `service start` is under way; try again")
        hook.unlink_entry(pidfile)
        done.append(f"removed a stale pidfile {pidfile} ({_describe(pid)})")
    try:
        return os.open(pidfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        raise OmbotError(f"{pidfile} appeared meanwhile: another `service start` is under way") from None


def stop(config: Path) -> list[str]:
    """Stop the agent: the systemd unit where systemd manages it, and a detached one by its pidfile."""
    config = config.absolute()
    done = []
    if _systemd_manages(config):
        _systemctl("stop", UNIT_NAME)
        done.append(f"stopped {UNIT_NAME} (systemd)")
    return done + stop_detached(config, quiet=bool(done))


def stop_detached(config: Path, quiet: bool = False) -> list[str]:
    """Stop the agent that `service start` started with `config`, by its pidfile: only a process that
    /proc shows is that agent (our uid, running the agent with that config) is signalled."""
    config = config.absolute()
    pidfile = _pidfile(config)
    pid = _read_pid(pidfile)
    if pid is None and not os.path.lexists(pidfile):
        return [] if quiet else [f"the agent is not running (no {pidfile})"]
    handle = None if pid is None else _agent_process(pid, config)
    if handle is None:
        hook.unlink_entry(pidfile)
        return [f"removed a stale pidfile {pidfile} ({_describe(pid)}); nothing was signalled"]
    try:
        how = _terminate(handle, pid or 0)
    finally:
        if handle >= 0:
            os.close(handle)
    hook.unlink_entry(pidfile)
    return [f"stopped the agent (pid {pid}{how}); removed {pidfile}"]


def status(config: Path, root: Path = Path("/")) -> tuple[int, list[str]]:
    """Which way the agent is kept running here, and whether it runs: (0 running | 3 not, lines)."""
    config = config.absolute()
    if systemd_runs(root):
        active = _systemctl_ok("is-active", "--quiet", UNIT_NAME)
        enabled = _systemctl_ok("is-enabled", "--quiet", UNIT_NAME)
        installed = os.path.isfile(under(root, UNIT_PATH))
        line = (f"systemd: {UNIT_NAME} is {'active' if active else 'not active'}, "
                f"{'enabled' if enabled else 'not enabled'}" if installed
                else f"systemd runs, but {UNIT_NAME} is not installed (`ombot-agent service install`)")
        if active:
            return 0, [line]
        lines = [line]
    else:
        lines = [f"no systemd (PID 1 is {_pid1()}): the agent runs detached, by `service start`"]
    pidfile = _pidfile(config)
    pid = _read_pid(pidfile)
    if pid is not None and _runs(pid, config):
        return 0, lines + [f"the agent runs: pid {pid} ({pidfile})"]
    if os.path.lexists(pidfile):
        return 3, lines + [f"the agent is not running: {pidfile} is stale ({_describe(pid)})"]
    return 3, lines + [f"the agent is not running (no {pidfile})"]


def _pidfile(config: Path) -> Path:
    """STATE_DIR/agent.pid of the agent.toml `config`; where it cannot be read (gone, broken), the
    default state directory beside it (/etc/ombot/agent.toml -> /var/lib/ombot-audit, under a root)."""
    try:
        if config.is_file():
            return Path(agent_dirs(config, config.parent)[1]) / PIDFILE
    except OmbotError:
        pass
    base = config.parent.parent.parent if config.parent.name == "ombot" else Path("/")
    return base / DEFAULT_STATE_DIR.lstrip("/") / PIDFILE


def _read_pid(pidfile: Path) -> Optional[int]:
    try:
        fd = os.open(pidfile, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        text = os.read(fd, 64).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    return int(text) if text.isascii() and text.isdigit() and 1 < int(text) < 2**22 else None


def _age(path: Path) -> float:
    try:
        return time.time() - os.lstat(path).st_mtime
    except OSError:
        return 0.0


def _agent_process(pid: int, config: Path) -> Optional[int]:
    """A handle on process `pid` if it is the agent of `config`, else None: a pidfd opened before /proc
    is read (so the answer is about that very process, whatever reuses the pid later), or -1 where
    the kernel has no pidfds (then a signal may race a reuse of the pid, as with any pidfile)."""
    opener = getattr(os, "pidfd_open", None)
    handle = -1
    if opener is not None:
        try:
            handle = opener(pid)
        except ProcessLookupError:
            return None
        except OSError:  # ENOSYS: a kernel before 5.3
            handle = -1
    if _is_agent(pid, config):
        return handle
    if handle >= 0:
        os.close(handle)
    return None


def _runs(pid: int, config: Path) -> bool:
    """Process `pid` is the agent of `config`."""
    handle = _agent_process(pid, config)
    if handle is not None and handle >= 0:
        os.close(handle)
    return handle is not None


def _is_agent(pid: int, config: Path) -> bool:
    """/proc/PID is alive, ours, and runs the agent (`... ombot.audit_agent run --config CONFIG`, or the
    ombot-agent entry point) with this very config."""
    proc = f"/proc/{pid}"
    try:
        if os.stat(proc).st_uid != os.geteuid() or _state(pid) in ("Z", "X", ""):
            return False
        argv = Path(proc, "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    words = [w.decode("utf-8", "surrogateescape") for w in argv if w]
    return _runs_agent(words) and _names_config(words, config)


def _runs_agent(words: list[str]) -> bool:
    if "run" not in words:
        return False
    before = words[:words.index("run")]
    module = any(a == "-m" and b == "ombot.audit_agent" for a, b in zip(before, before[1:]))
    entry = any(os.path.basename(w) == "ombot-agent" for w in before[:2])
    return module or entry


def _names_config(words: list[str], config: Path) -> bool:
    wanted = os.path.abspath(str(config))
    return any(a == "--config" and os.path.abspath(b) == wanted for a, b in zip(words, words[1:]))


def _state(pid: int) -> str:
    """The process state letter from /proc/PID/stat ('' if it is gone): Z, a zombie, is no agent."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return text.rsplit(")", 1)[-1].split()[0] if ")" in text else ""


def _describe(pid: Optional[int]) -> str:
    if pid is None:
        return "no pid in it"
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").strip()
    except OSError:
        return f"pid {pid} is not running"
    if not argv or _state(pid) in ("Z", "X", ""):
        return f"pid {pid} is not running"
    shown = printable(argv[:120].decode("utf-8", "surrogateescape"))
    return f"pid {pid} is not this agent: {shown!r}"


def _terminate(handle: int, pid: int) -> str:
    """SIGTERM, then SIGKILL after STOP_SECONDS; through the pidfd when there is one."""
    _signal(handle, pid, signal.SIGTERM)
    if _wait_exit(handle, pid, STOP_SECONDS):
        return ""
    _signal(handle, pid, signal.SIGKILL)
    _wait_exit(handle, pid, 5.0)
    return f", killed: it did not stop within {STOP_SECONDS:.0f} s of SIGTERM"


def _signal(handle: int, pid: int, signum: int) -> None:
    sender = getattr(signal, "pidfd_send_signal", None)
    try:
        if handle >= 0 and sender is not None:
            sender(handle, signum)
        else:
            os.kill(pid, signum)
    except ProcessLookupError:
        pass  # it ended meanwhile


def _wait_exit(handle: int, pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    if handle >= 0:  # a pidfd turns readable when its process exits
        poller = select.poll()
        poller.register(handle, select.POLLIN)
        return bool(poller.poll(int(seconds * 1000)))
    while time.monotonic() < deadline:
        if _state(pid) in ("Z", "X", ""):
            return True
        time.sleep(0.05)
    return False


def _stays_up(pid: int, config: Path) -> bool:
    """The agent is still there, and is the agent (it has exec'd), after START_CHECK_SECONDS."""
    deadline = time.monotonic() + START_CHECK_SECONDS
    while time.monotonic() < deadline:
        if _state(pid) in ("Z", "X", ""):
            return False
        time.sleep(0.05)
    return _is_agent(pid, config)


def _spawn(argv: list[str], log: Path) -> int:
    """Start `argv` detached: fork, setsid, fork again (no controlling terminal can ever be taken),
    stdin /dev/null, stdout and stderr appended to `log`, a clean environment. Returns its pid."""
    log_fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
           "PYTHONUNBUFFERED": "1"}
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (runs in the forked child)
        try:
            os.close(read_end)
            os.setsid()
            grandchild = os.fork()
            if grandchild == 0:
                _become(argv, env, log_fd)
            os.write(write_end, str(grandchild).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    os.close(log_fd)
    os.waitpid(child, 0)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    if not data.isdigit():
        raise OmbotError("could not start the agent (the fork failed)")
    return int(data)


def _become(argv: list[str], env: dict[str, str], log_fd: int) -> None:  # pragma: no cover (the grandchild)
    try:
        os.chdir("/")
        os.umask(0o077)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.closerange(3, 65536)
        for name in ("SIGPIPE", "SIGXFSZ", "SIGHUP", "SIGINT", "SIGTERM"):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
        os.execve(argv[0], argv, env)
    except BaseException as exc:
        os.write(2, f"could not start {argv[0]}: {exc}\n".encode())
    finally:
        os._exit(127)


def _tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- uninstall ---------------------------------------------------------------------------------------


def uninstall(root: Path, spool_dir: str = hook.DEFAULT_SPOOL_DIR, auditd: bool = False,
              purge: bool = False) -> tuple[int, list[str]]:
    """Undo `install` (and the service, and with `auditd` the auditd rules; with `purge` the spool,
    the state and the agent's files in /etc/ombot). Returns (0, or 1 if something stayed; the lines
    saying what was removed)."""
    config = under(root, DEFAULT_CONFIG)
    record = hook.installed_record(root)  # read first: --purge removes the state directory that holds it
    done = remove_unit(root, config)
    problems: list[str] = []
    if auditd:
        done += auditd_rules.remove_rules(root, unload=False)
        if root.resolve() == Path("/") and auditd_rules.available():  # never the kernel's rules for a test root
            try:
                done += auditd_rules.remove_rules(root, unload=True)
            except auditd_rules.AuditdError as exc:
                problems.append(f"the auditd rules stay loaded: {exc}")
    done += hook.uninstall_hook(root, record)
    if purge:
        removed, failed = _purge(root, spool_dir, config)
        done += removed
        problems += failed
    done += hook.remove_created(root, spool_dir, record, purge)
    kept = [] if purge else [str(p) for p in (under(root, spool_dir), under(root, DEFAULT_STATE_DIR))
                             if os.path.lexists(p)]
    lines = done or ["nothing to remove" + ("" if kept else ": the agent is not installed here")]
    if kept:
        lines.append(f"kept {' and '.join(kept)} (records not sent yet, the queue): --purge removes them")
    return (1 if problems else 0), lines + [f"error: {p}" for p in problems]


def _purge(root: Path, spool_dir: str, config: Path) -> tuple[list[str], list[str]]:
    """The spool and state directories (the defaults under root) and etc/ombot/agent.*. Directories go
    by descriptor: rmtree never follows a symlink a user planted in the spool."""
    if not shutil.rmtree.avoids_symlink_attacks:
        return [], ["this platform's shutil.rmtree is not safe against symlinks: remove the spool by hand"]
    removed: list[str] = []
    failed: list[str] = []
    try:
        named = agent_dirs(config, config.parent) if config.is_file() else None
    except OmbotError:
        named = None
    for path, mode in ((under(root, spool_dir), 0o1733), (under(root, DEFAULT_STATE_DIR), None)):
        problem = _remove_tree(path, mode)
        if problem is None:
            removed.append(f"removed {path}")
        elif problem:
            failed.append(problem)
    etc = under(root, os.path.dirname(DEFAULT_CONFIG))
    for name in AGENT_FILES:
        if hook.unlink_entry(etc / name):
            removed.append(f"removed {etc / name}")
    try:
        if stat.S_ISDIR(os.lstat(etc).st_mode):
            os.rmdir(etc)  # only when nothing else (a master's or the bot's files) is in it
            removed.append(f"removed {etc}")
    except OSError:
        pass
    if named is not None:
        for where in named:
            if Path(where) not in (under(root, spool_dir), under(root, DEFAULT_STATE_DIR)) and os.path.lexists(where):
                removed.append(f"left {where}: agent.toml named it, it is not a default path; remove it by hand")
    return removed, failed


def _remove_tree(path: Path, mode: Optional[int]) -> Optional[str]:
    """None when removed, '' when absent, else why it stays. Only a real directory of ours (and, for
    the spool, the installer's mode 1733) is removed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return ""
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or (mode is not None and stat.S_IMODE(st.st_mode) != mode):
        return f"left {path}: not the directory the installer made (a directory of uid {os.geteuid()}" + \
            (f", mode {mode:o})" if mode is not None else ")")
    try:
        shutil.rmtree(path)
    except (OSError, RecursionError) as exc:
        return f"could not remove all of {path} ({exc}): remove the rest with `rm -rf --one-file-system {path}`"
    return None


# -- files ---------------------------------------------------------------------------------------------


def under(root: Path, path: str) -> Path:
    """`path` (absolute, as on the server) under `root`."""
    return root / str(path).lstrip("/")


def _write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.chmod(partial, mode)
    partial.replace(path)
