"""The systemd units of the master and the bot, as `ombot install-units` writes them (docs/production.md).

They follow the agent's unit (audit_agent/service.py): a dedicated user, the filesystem read-only but
for the state directories, no capabilities, journald for the log. Both are `Type=notify`: the process
says READY=1 once it serves and feeds the watchdog from its scheduler (ombot.sdnotify).

The master runs each job's commands in a cgroup of their own below its own (masters/backends/cgroup.py),
so its unit has `Delegate=yes` and leaves /sys/fs/cgroup writable: no `ProtectControlGroups=`
(`ProtectKernelTunables=` keeps /sys/fs/cgroup as it is). Without them jobs fall back to the weaker
subreaper sweep, and the master says so in its log.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath

from ombot.errors import OmbotError

MASTER_UNIT = "ombot-master@.service"  # the instance is the master's id: ombot-master@bj-1.service
BOT_UNIT = "ombot-bot.service"
UNIT_DIR = "etc/systemd/system"
WATCHDOG_SECONDS = 120  # pinged every 60 s from the scheduler; a stall this long restarts the process
# What a word in a unit may hold: anything else would need systemd's quoting (%, $, spaces, quotes).
_UNIT_SAFE = re.compile(r"[A-Za-z0-9_./+:@=,-]+")
_STATE_ROOT = PurePosixPath("/var/lib")

# Shared by both units: @NAME@ fields are filled in by `_render`.
_HARDENING = """\
# The filesystem is read-only but for the state directories above; no capabilities at all.
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
PrivateMounts=yes
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
UMask=0077
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
RemoveIPC=yes
# TCP to masters, Slack, servers and the database; AF_UNIX for journald, the notify socket, sssd/nscd.
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM
Environment=PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# Environment=OMBOT_LOG_FORMAT=json   # one JSON object per line for the log pipeline (docs/logging.md)
StandardOutput=journal
StandardError=journal
"""

_MASTER = """\
# Written by `ombot install-units` (docs/production.md). Change it with a drop-in
# (`systemctl edit ombot-master@ID`), or run `ombot install-units --force` again.
[Unit]
Description=OMBot master %i (runs its IDC's jobs)
Wants=network-online.target
After=network-online.target
StartLimitIntervalSec=300
StartLimitBurst=10

[Service]
Type=notify
NotifyAccess=main
ExecStart=@EXEC@ --config @CONFIG@ master --id %i
User=@USER@
Group=@GROUP@
# A database URL with a password: OMBOT_MASTER_DATABASE_URL=... in this root-only file (or a 0600
# database_url_file named in the config). Never in this unit, which every user can read.
EnvironmentFile=-@ENVDIR@/master-%i.env
WatchdogSec=@WATCHDOG@s
TimeoutStartSec=180s
Restart=on-failure
RestartSec=5s
# SIGTERM to the master alone: it ends its jobs and records how they ended; what is left after
# TimeoutStopSec (a command that ignores SIGTERM) is killed.
KillMode=mixed
TimeoutStopSec=60s
LimitNOFILE=65536
@WRITABLE@
# Each job's commands run in a cgroup of their own below the unit's, and `cgroup.kill` ends everything
# they started. Keep Delegate=yes, and never add ProtectControlGroups=: /sys/fs/cgroup must stay writable.
Delegate=yes
@HARDENING@SyslogIdentifier=ombot-master-%i

[Install]
WantedBy=multi-user.target
"""

_BOT = """\
# Written by `ombot install-units` (docs/production.md). Change it with a drop-in
# (`systemctl edit ombot-bot`), or run `ombot install-units --force` again.
[Unit]
Description=OMBot Slack bot
Wants=network-online.target
After=network-online.target
StartLimitIntervalSec=300
StartLimitBurst=10

[Service]
Type=notify
NotifyAccess=main
ExecStart=@EXEC@ --config @CONFIG@ bot
User=@USER@
Group=@GROUP@
# SLACK_BOT_TOKEN, and SLACK_APP_TOKEN (Socket Mode) or SLACK_SIGNING_SECRET (HTTP mode), and a database
# URL with a password (OMBOT_BOT_DATABASE_URL): in this root-only file, read by systemd before it
# starts the bot as @USER@. Never in this unit, which every user can read.
EnvironmentFile=@ENVDIR@/bot.env
WatchdogSec=@WATCHDOG@s
TimeoutStartSec=180s
Restart=on-failure
RestartSec=5s
TimeoutStopSec=30s
@WRITABLE@
@HARDENING@# Unlike the master, the bot starts no commands: it needs no cgroups, no other users, no chown(2) and
# no resource limits (after @system-service: the deny list narrows it). Not ProcSubset=pid: its
# process metrics read /proc/stat (the boot time).
PrivateUsers=yes
ProtectControlGroups=yes
SystemCallFilter=~@privileged @resources
SyslogIdentifier=ombot-bot

[Install]
WantedBy=multi-user.target
"""


@dataclass(frozen=True)
class UnitSettings:
    """What the units name: the command (`ombot`, or python -m ombot), the config as the host sees it,
    the user and group, and the directories each process writes (state, SQLite databases)."""

    command: tuple[str, ...]
    config: str
    user: str
    group: str
    master_dirs: dict[str, str]  # master id -> a directory it writes (one entry per directory)
    bot_dirs: tuple[str, ...]
    extra_master_dirs: tuple[str, ...] = ()  # e.g. a SQLite database outside a state_dir


def render_master(settings: UnitSettings) -> str:
    return _render(_MASTER, settings, _master_writable(settings))


def render_bot(settings: UnitSettings) -> str:
    return _render(_BOT, settings, writable_lines(settings.bot_dirs))


def _render(template: str, settings: UnitSettings, writable: str) -> str:
    for word in (*settings.command, settings.config, settings.user, settings.group):
        unit_safe(word)
    if not all(word.startswith("/") for word in (settings.command[0], settings.config)):
        raise OmbotError("the command and --config must be absolute paths")
    fields = {"@HARDENING@": _HARDENING, "@EXEC@": " ".join(settings.command), "@CONFIG@": settings.config,
              "@USER@": settings.user, "@GROUP@": settings.group, "@WATCHDOG@": str(WATCHDOG_SECONDS),
              "@ENVDIR@": str(PurePosixPath(settings.config).parent), "@WRITABLE@": writable}
    for name, value in fields.items():
        template = template.replace(name, value)
    return template


def _master_writable(settings: UnitSettings) -> str:
    """`StateDirectory=ombot/%i` when every master's state is /var/lib/ombot/ID (systemd makes it, 0700,
    the user's, at each start); else every directory any master writes, named one by one."""
    dirs = settings.master_dirs
    parents = {PurePosixPath(path).parent for path in dirs.values()}
    pattern = (len(parents) == 1 and all(PurePosixPath(path).name == mid for mid, path in dirs.items())
               and _state_relative(PurePosixPath(next(iter(dirs.values()))).parent))
    if dirs and pattern and not settings.extra_master_dirs:
        return f"StateDirectory={pattern}/%i\nStateDirectoryMode=0700"
    return writable_lines([*dirs.values(), *settings.extra_master_dirs])


def writable_lines(paths: Iterable[str]) -> str:
    """StateDirectory= for directories under /var/lib (made by systemd, 0700), ReadWritePaths= for the
    others (they must exist: `ombot install-units` makes them)."""
    state: list[str] = []
    other: list[str] = []
    for path in sorted(set(paths)):
        unit_safe(path)
        relative = _state_relative(PurePosixPath(path))
        (state if relative else other).append(relative or path)
    lines = []
    if state:
        lines += [f"StateDirectory={' '.join(state)}", "StateDirectoryMode=0700"]
    if other:
        lines.append(f"ReadWritePaths={' '.join(other)}")
    return "\n".join(lines)


def _state_relative(path: PurePosixPath) -> str:
    """`ombot/bj-1` for /var/lib/ombot/bj-1; empty for a path outside /var/lib (or /var/lib itself)."""
    if path.is_absolute() and path != _STATE_ROOT and path.is_relative_to(_STATE_ROOT):
        return str(path.relative_to(_STATE_ROOT))
    return ""


def unit_safe(word: str) -> str:
    if not _UNIT_SAFE.fullmatch(word) or "%" in word:
        raise OmbotError(f"{word!r} cannot go into a systemd unit as it is: use a path of letters, digits "
                         "and ._/+:@=,- only")
    return word

