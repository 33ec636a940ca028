"""What one spool line means: the hook's record parsed into an event, the trusted time, the kernel's
word on the claimed login, and the agent's own notices. Pure of any reading: audit_agent.spool reads.

A record's fields are the user's to forge (docs/audit.md, "Fields and where they come from"): the uid
comes from the caller (the owner of the spool file, as the kernel says), the time is clamped into the
window the agent could have seen the line in, and the login is checked against /proc while the shell
that wrote it lives.
"""

from __future__ import annotations

import os
import pwd
import time
from typing import Any

from ombot.audit_agent.hook import RECORD_VERSION

Event = tuple[str, int, dict[str, Any]]  # (kind, trusted time in epoch ms, data)

SHOWN_BYTES = 1024  # of a line that is not a record, kept in its notice
_FIELDS = 14
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def printable(name: str) -> str:
    """A file name as text any store takes: bytes that are not UTF-8 become \\xNN escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def escape_free(text: str) -> str:
    """The hook's escaping undone: \\\\, \\n, \\t and \\r."""
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            out.append({"\\": "\\", "n": "\n", "t": "\t", "r": "\r"}.get(text[i + 1], "\\" + text[i + 1]))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def trusted_time(claimed: int | None, since_ms: int, read_ms: int) -> int:
    """The claimed time clamped into (since_ms, read_ms]: when the line can have been written."""
    if claimed is None:
        return read_ms
    return max(min(since_ms, read_ms), min(claimed, read_ms))


def parse_record(line: str, uid: int, since_ms: int = 0, read_ms: int | None = None) -> Event:
    """One spool line as an event; a line that is not a record becomes a `notice` holding its text.
    `since_ms` and `read_ms` bound when the agent could have seen it (see trusted_time)."""
    read_ms = now_ms() if read_ms is None else read_ms
    fields = line.split("\t")
    if len(fields) != _FIELDS or fields[0] != RECORD_VERSION:
        return notice("spool_line", "a spool line that is not a record", uid=uid, line=line[:SHOWN_BYTES],
                      length=len(line), at=read_ms)
    _, when, pid, hist, status, seen, loginuid, sudo_user, logname, tty, ssh, cwd, command, length = fields
    login_uid = _int(loginuid)
    if login_uid == 4294967295:  # (uid_t)-1: no login session (a console started before pam_loginuid)
        login_uid = None
    claimed = int(float(when) * 1000) if _is_float(when) else None
    text = escape_free(command)
    data = {
        "uid": uid, "user": user_name(uid), "login_uid": login_uid, "login_user": user_name(login_uid),
        "sudo_user": escape_free(sudo_user), "logname": escape_free(logname), "tty": escape_free(tty),
        "ssh_client": escape_free(ssh), "cwd": escape_free(cwd), "command": text, "exit": _int(status),
        "pid": _int(pid), "history": _int(hist), "seen": seen if seen in ("history", "debug", "missed", "exec") else "?",
        "truncated": (_int(length) or 0) > len(text), "claimed_at": claimed,
    }
    return "command", trusted_time(claimed, since_ms, read_ms), data


def check_login(data: dict[str, Any]) -> dict[str, Any]:
    """Hold the record's claimed login against the kernel's: while the shell that wrote it is alive
    (it waits at its prompt when the agent reads the line), /proc/PID tells its real uid, login uid
    and audit session, which its user cannot change. `login_check` says what was found:
    `kernel` (the claim is the kernel's), `mismatch` (the kernel says otherwise: `kernel_login_uid`),
    or `unverified` (no live process of that uid with that pid)."""
    kernel = _kernel_login(data.get("pid"), data.get("uid"))
    if kernel is None:
        return data | {"login_check": "unverified"}
    login_uid, session = kernel
    checked = "kernel" if login_uid == data.get("login_uid") else "mismatch"
    return data | {"login_check": checked, "kernel_login_uid": login_uid, "kernel_login_user": user_name(login_uid),
                   "session": session}


def _kernel_login(pid: Any, uid: Any) -> tuple[int | None, int | None] | None:
    """(login uid, audit session) of process `pid` if it is alive and runs as `uid`; else None."""
    if not isinstance(pid, int) or pid <= 0 or not isinstance(uid, int):
        return None
    try:
        dfd = os.open(f"/proc/{pid}", _DIR_FLAGS)
    except OSError:
        return None
    try:
        if os.fstat(dfd).st_uid != uid:  # /proc/PID is owned by the process's effective uid
            return None
        values = []
        for name in ("loginuid", "sessionid"):
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dfd)
            try:
                values.append(_int(os.read(fd, 32).decode("ascii", "replace").strip()))
            finally:
                os.close(fd)
    except OSError:
        return None
    finally:
        os.close(dfd)
    login_uid, session = values
    return (None if login_uid == 4294967295 else login_uid), (None if session == 4294967295 else session)


def notice(code: str, problem: str, uid: int | None = None, path: str | None = None, at: int | None = None,
           **more: Any) -> Event:
    """A `notice` event: something in the spool the agent cannot take as records, or a problem of the
    agent's own. `code` names the kind (docs/audit.md lists them); `uid` is whose entry it is."""
    data: dict[str, Any] = {"code": code, "problem": problem, **more}
    if uid is not None:
        data |= {"uid": uid, "user": user_name(uid)}
    if path is not None:
        data["path"] = printable(path)
    return "notice", now_ms() if at is None else at, data


def account_of(uid: int) -> pwd.struct_passwd | None:
    """The passwd entry of a uid, or None."""
    try:
        return pwd.getpwuid(uid)
    except KeyError:
        return None


def user_name(uid: int | None) -> str | None:
    """The account name of a uid, or None (no uid, or none in the passwd database)."""
    if uid is None:
        return None
    account = account_of(uid)
    return None if account is None else account.pw_name


def _int(text: str) -> int | None:
    return int(text) if text.isascii() and text.isdigit() and len(text) < 19 else None


def _is_float(text: str) -> bool:
    try:
        return 0 <= float(text) < 2**40
    except ValueError:
        return False


def now_ms() -> int:
    """The wall clock in epoch ms (the agent's own, which users cannot set)."""
    return time.time_ns() // 1_000_000
