"""Reading the users' spool files. The uid of a record is the owner of its directory and file, as
the kernel reports them through the open file descriptors, never anything the record says.

SPOOL_DIR/UID/spool is accepted only when the directory is named by its owner's uid, neither it nor
the file is a symlink, and the file is a regular file with one link owned by that uid. Anything
else in SPOOL_DIR is reported (a `notice` event) and left alone, once per name.
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from audit_agent.hook import MAX_COMMAND_CHARS, RECORD_VERSION

SPOOL_NAME = "spool"
ROTATED_PREFIX = "spool.rotated-"
ROTATE_BYTES = 256 * 1024  # a fully read spool this big is renamed aside, read once more, then removed
ROTATE_GRACE_SECONDS = 2.0  # a shell that opened it just before the rename has written by then
MAX_LINE_BYTES = 4 * MAX_COMMAND_CHARS + 4096
_FIELDS = 14
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@dataclass
class Chunk:
    """New complete lines of one spool file, and where the next read starts."""

    key: str  # uid:dev:inode: offsets are kept per file, whatever its name becomes
    uid: int
    events: list[tuple[str, int, dict[str, Any]]]
    offset: int
    path: Path | None = None  # the spool file, for rotation once the chunk is queued
    size: int = 0
    inode: int = 0
    changed_at: float = 0.0


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


def parse_record(line: str, uid: int) -> tuple[str, int, dict[str, Any]]:
    """One spool line as an event; a line that is not a record becomes a `notice` holding its text."""
    fields = line.split("\t")
    if len(fields) != _FIELDS or fields[0] != RECORD_VERSION:
        return "notice", _now(), {"uid": uid, "user": user_name(uid), "problem": "a spool line that is not a record",
                                  "line": line[:MAX_COMMAND_CHARS]}
    _, when, pid, hist, status, seen, loginuid, sudo_user, logname, tty, ssh, cwd, command, length = fields
    login_uid = _int(loginuid)
    if login_uid == 4294967295:  # (uid_t)-1: no login session (a console started before pam_loginuid)
        login_uid = None
    at = int(float(when) * 1000) if _is_float(when) else _now()
    text = escape_free(command)
    data = {
        "uid": uid, "user": user_name(uid), "login_uid": login_uid, "login_user": user_name(login_uid),
        "sudo_user": escape_free(sudo_user), "logname": escape_free(logname), "tty": escape_free(tty),
        "ssh_client": escape_free(ssh), "cwd": escape_free(cwd), "command": text, "exit": _int(status),
        "pid": _int(pid), "history": _int(hist), "seen": seen if seen in ("history", "debug", "missed", "exec") else "?",
        "truncated": (_int(length) or 0) > len(text),
    }
    return "command", at, data


def scan(spool_dir: Path, offsets: dict[str, int], reported: set[str]) -> Iterator[Chunk]:
    """Every spool file with new lines; `offsets` maps file keys to bytes already queued."""
    try:
        names = sorted(os.listdir(spool_dir))
    except FileNotFoundError:
        return
    for name in names:
        if name.isdigit():
            yield from _user_dir(spool_dir, name, offsets, reported)
        elif name not in reported:
            reported.add(name)
            yield Chunk(f"notice:{name}", -1, [_notice(f"an unexpected entry {name!r} in the spool directory",
                                                       spool_dir / name)], 0)


def _user_dir(spool_dir: Path, name: str, offsets: dict[str, int], reported: set[str]) -> Iterator[Chunk]:
    uid = int(name)
    try:
        dfd = os.open(spool_dir / name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        if name not in reported:
            reported.add(name)
            yield Chunk(f"notice:{name}", -1, [_notice("a spool entry that is not a directory", spool_dir / name)], 0)
        return
    try:
        owner = os.fstat(dfd).st_uid
        if owner != uid:  # someone made another user's directory: that user's shells record nothing
            if name not in reported:
                reported.add(name)
                yield Chunk(f"notice:{name}", -1, [_notice(f"spool directory {name} belongs to uid {owner}",
                                                           spool_dir / name)], 0)
            return
        for entry in sorted(os.listdir(dfd)):
            if entry == SPOOL_NAME or entry.startswith(ROTATED_PREFIX):
                chunk = _read(dfd, entry, uid, offsets, spool_dir / name / entry)
                if chunk is not None:
                    yield chunk
            elif entry.startswith(".scratch."):
                _remove_stale_scratch(dfd, entry)
    finally:
        os.close(dfd)


def _read(dfd: int, entry: str, uid: int, offsets: dict[str, int], path: Path) -> Chunk | None:
    try:
        fd = os.open(entry, _OPEN_FLAGS, dir_fd=dfd)
    except OSError:
        return None  # a symlink (O_NOFOLLOW), or gone
    try:
        st = os.fstat(fd)
        key = f"{uid}:{st.st_dev}:{st.st_ino}"
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != uid:
            return Chunk(key, uid, [_notice(f"{entry} of uid {uid} is not a regular file with one link "
                                            f"owned by that uid", Path(entry))], offsets.get(key, 0)) \
                if key not in offsets else None
        start = offsets.get(key, 0)
        data = os.pread(fd, max(0, st.st_size - start), start) if st.st_size > start else b""
        end = data.rfind(b"\n") + 1  # only complete lines: a shell may be writing the rest now
        if end == 0 and len(data) > MAX_LINE_BYTES:
            end = len(data)  # no newline this far: not a record the hook wrote
        events = [parse_record(line.decode("utf-8", "replace"), uid) for line in data[:end].splitlines() if line]
        offset = start + end
        chunk = Chunk(key, uid, events, offset, path, st.st_size, st.st_ino, st.st_ctime)
        return chunk if events or offset != start or key not in offsets or _rotation_due(chunk) else None
    finally:
        os.close(fd)


def _rotation_due(chunk: Chunk) -> bool:
    import time

    if chunk.path is None or chunk.offset != chunk.size:
        return False
    if chunk.path.name == SPOOL_NAME:
        return chunk.offset >= ROTATE_BYTES
    return time.time() - chunk.changed_at > ROTATE_GRACE_SECONDS


def rotate(chunk: Chunk) -> bool:
    """Once a chunk is queued: a big, fully read spool is renamed aside (shells then start a new
    one), and a renamed one read to its end after the grace period is removed. True if the file
    is gone, so its offset can be forgotten."""
    if not _rotation_due(chunk) or chunk.path is None:
        return False
    try:
        dfd = os.open(chunk.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = os.stat(chunk.path.name, dir_fd=dfd, follow_symlinks=False)
        if st.st_ino != chunk.inode or st.st_size != chunk.size:
            return False  # written to since: read on first
        if chunk.path.name == SPOOL_NAME:
            os.rename(SPOOL_NAME, f"{ROTATED_PREFIX}{chunk.inode}", src_dir_fd=dfd, dst_dir_fd=dfd)
            return False
        os.unlink(chunk.path.name, dir_fd=dfd)
        return True
    except OSError:
        return False
    finally:
        os.close(dfd)


def _remove_stale_scratch(dfd: int, entry: str) -> None:
    pid = entry.rsplit(".", 1)[-1]
    if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
        try:
            os.unlink(entry, dir_fd=dfd)
        except OSError:
            pass


def _notice(problem: str, where: Path) -> tuple[str, int, dict[str, Any]]:
    return "notice", _now(), {"problem": problem, "path": str(where)}


def user_name(uid: int | None) -> str | None:
    """The account name of a uid, or None (no uid, or none in the passwd database)."""
    if uid is None:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _int(text: str) -> int | None:
    return int(text) if text.isascii() and text.isdigit() and len(text) < 19 else None


def _is_float(text: str) -> bool:
    try:
        return 0 <= float(text) < 2**40
    except ValueError:
        return False


def _now() -> int:
    import time

    return time.time_ns() // 1_000_000
