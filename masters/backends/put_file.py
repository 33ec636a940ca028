"""Write a pushed file on a host by descriptors: the one implementation of the `PutFile` step.

The local backend calls `put` in-process. The Ansible and Salt backends run this file's own source on
the target host (`python3 -c SOURCE ARG...`, see `arguments`), the content base64 on stdin, and read
its one line of JSON (`reply`). So it needs only the standard library of Python 3.8 or newer and
imports nothing of OMBot's.

Why descriptors: a check of the path by name and a write by name a moment later let a user who owns a
directory on the way swap a subdirectory for a symlink in between, and root then writes wherever the
symlink leads. Here every directory is opened relative to the one before it with O_NOFOLLOW, starting
at `/`; a symlink met on the way is read (readlinkat) and its target walked the same way, so the
directory written into is exactly the one whose real path was checked against the roots. The file is
a fresh temporary file in that directory (O_EXCL, written, chowned and chmodded by its descriptor),
renamed over the destination within it: a symlink at the destination is replaced, never followed.
"""

from __future__ import annotations

import base64
import difflib
import errno
import grp
import json
import os
import pwd
import secrets
import stat
import sys
from pathlib import Path
from typing import NamedTuple, Sequence

MAX_LINKS = 40  # symlinks (and directories changing under us) one lookup may meet, as the kernel's limit
DIFF_MAX_BYTES = 104448  # Ansible's max_file_size_for_diff: bigger files are not diffed
# O_PATH: a directory that may be searched but not read (0711) can still be walked by a non-root user.
_DIR_FLAGS = os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_PATH", os.O_RDONLY)
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class PutError(Exception):
    """The write was refused or failed; the message names the destination (and its parameter)."""


class _Old(NamedTuple):
    """What the destination name held before: nothing, a symlink, or an inode (with its bytes when read)."""

    link: bool
    info: os.stat_result | None
    data: bytes | None


def put(dest: str, data: bytes, mode: int, owner: str | None = None, group: str | None = None,
        roots: Sequence[str] = ("/",), label: str = "", check: bool = False, after: str = "") -> tuple[bool, str]:
    """Make `dest` hold `data` with `mode` (and owner, group), unless it already does; refuse a `dest`
    whose real location is outside every root. Returns (changed, diff); with `check` nothing is
    written and the diff (headers `before: DEST`, `after: AFTER`) says what would change."""
    uid, gid = _ids(owner, group)
    head, name = os.path.split(dest)
    if not os.path.isabs(dest) or name in ("", ".", ".."):
        raise PutError(f"{label}{dest} is not an absolute path to a file")
    try:
        dir_fd, real_dir = _open_dir(head)
    except OSError as exc:
        raise PutError(f"{label}cannot write {dest}: {exc.strerror}") from None
    try:
        real = real_dir.rstrip("/") + "/" + name
        _require_within(dest, real, roots, label)  # before anything outside the roots is even opened
        old = _old(dir_fd, name, len(data), check)
        if old.link:  # only a refusal, as before: the rename replaces a symlink, never writes through it
            _require_within(dest, os.path.realpath(real), roots, label)
        uid, gid = _kept_ids(old, uid, gid)
        if _same(old, data, mode, uid, gid):
            return False, ""
        if check:
            return True, _diff(dest, after or dest, old, data, mode)
        _write(dir_fd, name, data, mode, uid, gid)
        return True, ""
    except OSError as exc:
        raise PutError(f"{label}cannot write {dest}: {exc.strerror}") from None
    finally:
        os.close(dir_fd)


def _ids(owner: str | None, group: str | None) -> tuple[int, int]:
    """Numeric ids for owner and group (-1: not asked for); an unknown name fails, naming it."""
    try:
        uid = pwd.getpwnam(owner).pw_uid if owner else -1
    except KeyError:
        raise PutError(f"no user named {owner!r} on this host") from None
    try:
        gid = grp.getgrnam(group).gr_gid if group else -1
    except KeyError:
        raise PutError(f"no group named {group!r} on this host") from None
    return uid, gid


def _open_dir(path: str) -> tuple[int, str]:
    """A descriptor of the directory `path` names, and its real path: each component opened below the
    last with O_NOFOLLOW, from `/`; a symlink's target is walked the same way, `..` goes back to the
    directory actually walked through."""
    todo, turns = _parts(path), 0
    fds = [os.open("/", _DIR_FLAGS)]
    names: list[str] = []  # the real path of fds[-1], below /
    try:
        while todo:
            name = todo.pop()
            if _enter(name, fds, names):
                continue
            turns += 1
            if turns > MAX_LINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
            target = _link_target(name, fds[-1])
            if target is None:
                todo.append(name)
            else:
                _follow(target, fds, names, todo)
        return fds.pop(), "/" + "/".join(names)
    finally:
        for fd in fds:
            os.close(fd)


def _enter(name: str, fds: list[int], names: list[str]) -> bool:
    """Go one directory down (`..`: up) from fds[-1]; False if `name` is not a directory there."""
    if name == "..":
        if names:
            names.pop()
            os.close(fds.pop())
        return True
    try:
        fds.append(os.open(name, _DIR_FLAGS, dir_fd=fds[-1]))
    except OSError as exc:
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP):  # a symlink, or not a directory at all
            raise
        return False
    names.append(name)
    return True


def _follow(target: str, fds: list[int], names: list[str], todo: list[str]) -> None:
    """Walk a symlink's target next: from `/` when it is absolute, else from the link's directory."""
    if target.startswith("/"):
        for fd in fds[1:]:
            os.close(fd)
        del fds[1:], names[:]
    todo.extend(_parts(target))


def _parts(path: str) -> list[str]:
    """A path's components as a stack: the first to walk last."""
    return [part for part in reversed(path.split("/")) if part not in ("", ".")]


def _link_target(name: str, dir_fd: int) -> str | None:
    """What the symlink `name` points to; None if it changed under us (a directory, or a symlink again
    by now): look again."""
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    kind = stat.S_IFMT(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    if kind in (stat.S_IFDIR, stat.S_IFLNK):
        return None
    raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))


def _old(dir_fd: int, name: str, size: int, check: bool) -> _Old:
    """The destination as it is, never following a symlink; its bytes if they may equal `size` bytes
    or (check runs) be diffed."""
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return _Old(False, None, None)
        if exc.errno == errno.ELOOP:
            return _Old(True, None, None)
        if exc.errno == errno.ENXIO:  # a socket: nothing to read, and rename replaces it
            return _Old(False, os.stat(name, dir_fd=dir_fd, follow_symlinks=False), None)
        raise
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        wanted = stat.S_ISREG(info.st_mode) and (info.st_size == size or (check and info.st_size <= DIFF_MAX_BYTES))
        return _Old(False, info, f.read() if wanted else None)


def _within(path: str, root: str) -> bool:
    root = os.path.normpath(root)
    return path == root or path.startswith(root.rstrip("/") + "/")


def _require_within(dest: str, real: str, roots: Sequence[str], label: str) -> None:
    if not any(_within(real, root) for root in roots):
        raise PutError(f"{label}{dest} resolves to {real}, outside {', '.join(roots)}")


def _kept_ids(old: _Old, uid: int, gid: int) -> tuple[int, int]:
    """As root, a replaced regular file keeps its owner and group unless others are asked for (as
    Ansible's copy and Salt's file.managed do); another user cannot give a file away anyway."""
    if old.info is None or not stat.S_ISREG(old.info.st_mode) or os.geteuid() != 0:
        return uid, gid
    return (old.info.st_uid if uid == -1 else uid), (old.info.st_gid if gid == -1 else gid)


def _same(old: _Old, data: bytes, mode: int, uid: int, gid: int) -> bool:
    info = old.info
    return (info is not None and stat.S_ISREG(info.st_mode) and old.data == data
            and stat.S_IMODE(info.st_mode) == mode and uid in (-1, info.st_uid) and gid in (-1, info.st_gid))


def _write(dir_fd: int, name: str, data: bytes, mode: int, uid: int, gid: int) -> None:
    """A fresh file beside the destination (nothing planted there can redirect it), renamed over it
    when complete: readers see the old file or the new one, never half."""
    partial = f".{name[:100]}.{secrets.token_hex(6)}.ombot-partial"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if uid != -1 or gid != -1:
                os.fchown(f.fileno(), uid, gid)
            os.fchmod(f.fileno(), mode)  # after chown, which clears set-id bits
        os.rename(partial, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(partial, dir_fd=dir_fd)
        except OSError:
            pass
        raise


def _diff(dest: str, after: str, old: _Old, data: bytes, mode: int) -> str:
    """What a check run shows: a unified diff of text, or why there is none; then a mode change."""
    before, why = _before_text(old)
    lines = [f"({why}: its contents are not shown)\n"] if why else []
    try:
        text = data.decode("utf-8") if len(data) <= DIFF_MAX_BYTES else None
    except UnicodeDecodeError:
        text = None
    if text is None:
        lines.append(f"(the new file is binary or over {DIFF_MAX_BYTES} bytes: no diff)\n")
    elif before is not None:
        diff = difflib.unified_diff(before.splitlines(True), text.splitlines(True), f"before: {dest}", f"after: {after}")
        lines += [line if line.endswith("\n") else line + "\n" for line in diff]
    if old.info is not None and stat.S_ISREG(old.info.st_mode) and stat.S_IMODE(old.info.st_mode) != mode:
        lines.append(f"mode {stat.S_IMODE(old.info.st_mode):04o} -> {mode:04o}\n")
    return "".join(lines)


def _before_text(old: _Old) -> tuple[str | None, str]:
    """The old file's text for a diff, or None and why not."""
    info = old.info
    if old.link:
        return None, "a symlink, which the file replaces"
    if info is None:
        return "", ""
    if not stat.S_ISREG(info.st_mode):
        return None, "not a regular file"
    if info.st_nlink != 1:  # a hardlink may name a file elsewhere (/etc/shadow): never shown
        return None, f"a file with {info.st_nlink} links"
    if old.data is None or len(old.data) > DIFF_MAX_BYTES:
        return None, f"over {DIFF_MAX_BYTES} bytes"
    try:
        return old.data.decode("utf-8"), ""
    except UnicodeDecodeError:
        return None, "binary"


# -- how the remote backends run it --------------------------------------------------------------


def source() -> str:
    """This file's text: what the remote backends run with `python3 -c`."""
    return Path(__file__).read_text(encoding="utf-8")


def arguments(mode: int, owner: str | None, group: str | None, roots: Sequence[str], label: str, check: bool,
              after: str) -> list[str]:
    """The argv items after `-c SOURCE DEST` (see `main`)."""
    return [label, f"{mode:o}", owner or "", group or "", "check" if check else "write", after, *roots]


def stdin(data: bytes) -> str:
    """The content as the helper reads it: base64, never empty (an empty stdin may not be passed at all)."""
    return base64.b64encode(data).decode("ascii") + "\n"


def reply(stdout: str) -> tuple[bool, str]:
    """(changed, diff) from the helper's output."""
    answer = json.loads(stdout)
    return bool(answer["changed"]), str(answer["diff"])


def main(argv: Sequence[str]) -> int:
    """argv: DEST LABEL MODE OWNER GROUP check|write AFTER ROOT... ; the content base64 on stdin. Prints
    {"changed": ..., "diff": ...}; a refusal is one line on stderr and exit status 1."""
    dest, label, mode, owner, group, check, after = argv[:7]
    data = base64.b64decode(sys.stdin.buffer.read().strip(), validate=True)
    try:
        changed, diff = put(dest, data, int(mode, 8), owner or None, group or None, argv[7:] or ("/",), label,
                            check == "check", after)
    except PutError as exc:
        sys.stderr.write(f"{exc}\n")
        return 1
    sys.stdout.write(json.dumps({"changed": changed, "diff": diff}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
