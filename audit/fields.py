"""The fields of an audit event, named once, with where each comes from.

A shell hook runs inside the user's shell: what it writes is the user's to forge. The agent (root,
with its own key) adds what the kernel says: the owner of the spool file, the live shell's login
uid and audit session, the time it could have read the line. auditd's records are the kernel's
own. Alerts and search show which is which (docs/audit.md, "Fields and where they come from"),
and later detection rules use these names.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

KERNEL, AGENT, MASTER, SHELL = "kernel", "agent", "master", "shell"
CLOCK_NOTE_MS = 60_000  # a claimed time this far from the trusted one is shown beside it


@dataclass(frozen=True)
class EventField:
    """One field: its name, who vouches for it in a shell hook's record, and what it means. In an
    auditd record every field but `host`, `idc` and `at`'s clamping comes from the kernel."""

    name: str
    source: str
    meaning: str


FIELDS = (
    EventField("host", AGENT, "the server, from the agent key that shipped the event"),
    EventField("idc", MASTER, "the IDC of the master that received it"),
    EventField("at", AGENT, "when it happened: the shell's claim clamped into the window in which the agent "
                            "could have read the line (auditd: the kernel's time)"),
    EventField("claimed_at", SHELL, "the time the shell wrote in its record"),
    EventField("uid", KERNEL, "whose command: the owner of the spool file (auditd: the process's uid)"),
    EventField("user", KERNEL, "the account name of uid"),
    EventField("login_uid", SHELL, "the login session's uid as the shell read it (auditd: the kernel's auid)"),
    EventField("login_user", SHELL, "the account name of login_uid"),
    EventField("login_check", AGENT, "`kernel`: the live shell's /proc/PID/loginuid agrees; `mismatch`: it does "
                                     "not (see kernel_login_uid); `unverified`: the shell was gone"),
    EventField("kernel_login_uid", KERNEL, "the login uid of the live shell that wrote the record"),
    EventField("kernel_login_user", KERNEL, "the account name of kernel_login_uid"),
    EventField("session", KERNEL, "the audit session id of that login (auditd's `ses`), to match auditd events"),
    EventField("ssh_client", SHELL, "the SSH client address from SSH_CLIENT"),
    EventField("tty", SHELL, "the terminal (auditd: the kernel's)"),
    EventField("cwd", SHELL, "the directory the line started in (auditd: the kernel's)"),
    EventField("command", SHELL, "the line as typed (auditd: the program's arguments, the kernel's)"),
    EventField("exit", SHELL, "the exit status"),
    EventField("pid", SHELL, "the shell's pid, as it wrote it (checked against /proc by the agent)"),
    EventField("sudo_user", SHELL, "SUDO_USER"),
    EventField("logname", SHELL, "LOGNAME"),
)
SOURCE = {f.name: f.source for f in FIELDS}
ALWAYS_TRUSTED = frozenset({"host", "idc", "at"})


def source_of(name: str, event: Mapping[str, Any]) -> str:
    """Who vouches for field `name` of this event (its data as the agent sent it)."""
    if event.get("source") == "auditd" and name not in ALWAYS_TRUSTED:
        return KERNEL
    return SOURCE.get(name, SHELL)


def login_status(event: Mapping[str, Any]) -> str:
    """`kernel` (the login is the kernel's word), `mismatch` (the shell claims another) or `claimed`."""
    if event.get("source") == "auditd":
        return "kernel"
    check = event.get("login_check")
    return check if check in ("kernel", "mismatch") else "claimed"


def clock_note(at: int, claimed_at: Any) -> str | None:
    """'claimed <time>' when the shell's own time is far from the trusted one, else None."""
    if not isinstance(claimed_at, int) or isinstance(claimed_at, bool) or abs(claimed_at - at) <= CLOCK_NOTE_MS:
        return None
    return "claimed " + time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(claimed_at / 1000))
