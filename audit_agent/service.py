"""The agent as a service on a server: a systemd unit where systemd runs, else a detached process.

Two ways to keep the agent running, chosen by what the server is:

- systemd is PID 1 (`/run/systemd/system` exists) and the root is `/`: `service install` writes
  `/etc/systemd/system/ombot-audit-agent.service` (a hardened unit: `render_unit`) and enables and
  starts it; `service remove` stops, disables and deletes it.
- no systemd (a container, CI): `service start` starts the agent detached, with a pidfile, and
  `service stop` stops it by that pidfile (audit_agent/detached.py).

`service start`, `stop` and `status` go through systemd where it manages the unit, and look at the
detached agent too. `uninstall` (audit_agent/uninstall.py) removes the service with the rest.

Runs on the servers: Python 3.9 and the standard library only.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

from ombot.audit_agent import detached, hook
from ombot.audit_agent.settings import DEFAULT_STATE_DIR, agent_dirs
from ombot.errors import OmbotError

UNIT_NAME = "ombot-audit-agent.service"
UNIT_PATH = f"etc/systemd/system/{UNIT_NAME}"
DEFAULT_PREFIX = "/opt/ombot-agent"  # where the rollout makes the agent's venv
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
    return done + detached.stop(config, quiet=True)


def _systemctl(*args: str) -> None:
    proc = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise OmbotError(f"systemctl {' '.join(args)}: {(proc.stderr or proc.stdout).strip()}")


def _systemctl_ok(*args: str) -> bool:
    return subprocess.run(["systemctl", *args], capture_output=True, timeout=120).returncode == 0


def _systemd_manages(config: Path) -> bool:
    return systemd_runs(Path("/")) and os.path.isfile(under(Path("/"), UNIT_PATH))


# -- the `service` commands: systemd's unit where it manages the agent, the detached agent too ---------


def start(config: Path) -> list[str]:
    """Start the agent: through systemd when it manages the unit, else detached with a pidfile."""
    config = config.absolute()
    if _systemd_manages(config):
        _systemctl("start", UNIT_NAME)
        return [f"started {UNIT_NAME} (systemd)"]
    return detached.start(config)


def stop(config: Path) -> list[str]:
    """Stop the agent: the systemd unit where systemd manages it, and a detached one by its pidfile."""
    config = config.absolute()
    done = []
    if _systemd_manages(config):
        _systemctl("stop", UNIT_NAME)
        done.append(f"stopped {UNIT_NAME} (systemd)")
    return done + detached.stop(config, quiet=bool(done))


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
    code, line = detached.status(config)
    return code, lines + [line]


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
