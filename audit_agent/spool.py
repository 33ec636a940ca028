"""Reading the users' spool files. The uid of a record is the owner of its directory and file, as
the kernel reports them through the open file descriptors, never anything the record says.

SPOOL_DIR/UID/spool is accepted only when the directory is named by its owner's uid (ASCII digits),
neither it nor the file is a symlink, and the file is a regular file with one link owned by that
uid. Everything in SPOOL_DIR is written by the users the agent watches, so nothing in it may stop
the agent or another user's records:

- an entry that is not a uid's directory is reported (a `notice` event) and left alone, once;
- a uid's directory owned by someone else (a squat: that uid's shells would record nothing) is, when
  the agent runs as root, moved aside and made again for its uid, and reported;
- reads are bounded per pass (READ_BYTES, MAX_LINES per file): a huge or sparse file is read in
  slices, holes skipped, and a line longer than MAX_LINE_BYTES is cut, never held whole;
- an exception on one entry becomes a notice naming the entry and its owner; the others go on.

Times: a record's own time is what the user's shell claims. The trusted time (`at`) is that claim
clamped into the window in which the agent could have seen the line: after its previous read of
that file (for a new file, its previous scan of the spool) and no later than this read. The claim
is kept as `claimed_at`.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ombot.audit_agent.hook import MAX_COMMAND_CHARS
from ombot.audit_agent.records import SHOWN_BYTES, Event, account_of, check_login, notice, now_ms, parse_record, printable

SPOOL_NAME = "spool"
ROTATED_PREFIX = "spool.rotated-"
SQUATTED_PREFIX = ".squatted-"  # a squatter's directory, moved aside by the agent: kept as evidence, not read
ROTATE_BYTES = 256 * 1024  # a fully read spool this big is renamed aside, read once more, then removed
ROTATE_GRACE_SECONDS = 2.0  # a shell that opened it just before the rename has written by then
MAX_LINE_BYTES = 4 * MAX_COMMAND_CHARS + 4096  # a record the hook writes is shorter; a longer line is cut
READ_BYTES = 1 << 20  # per file and pass: memory stays bounded whatever a user makes of their spool
MAX_LINES = 5000  # per file and pass (a person types a few lines a second)
RELIST_SECONDS = 10.0  # an unchanged directory is listed again at least this often
MAX_REPORTED = 10_000  # entries reported one by one; a user making more gets one notice for the rest
TOO_MANY = "\0too many"  # (no file name holds a NUL)
UID_MAX = 2**32 - 2  # (uid_t)-1 is "no uid"
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC



@dataclass
class Chunk:
    """New complete lines of one spool file, and where the next read starts."""

    key: str  # uid:dev:inode: offsets are kept per file, whatever its name becomes
    uid: int
    events: list[Event]
    offset: int
    path: Path | None = None  # the spool file, for rotation once the chunk is queued
    size: int = 0
    inode: int = 0
    changed_at: float = 0.0


@dataclass
class _Listing:
    """The names of a directory the agent reads every pass, kept while its inode and mtime stay the same."""

    inode: int
    mtime_ns: int
    kept: list[str]
    listed_at: float


def is_uid_name(name: str) -> bool:
    """ASCII digits naming a uid (`²` and `٣` are digits to str.isdigit, not to the kernel)."""
    return name.isascii() and name.isdigit() and len(name) <= 10 and int(name) <= UID_MAX


class SpoolScanner:
    """Reads SPOOL_DIR pass by pass. `offsets` (file key -> bytes queued) is the queue's table,
    shared with the caller, which records each chunk's offset once it is queued. With `repair`
    (the agent runs as root) squatted directories are moved aside and made again for their uid."""

    def __init__(self, spool_dir: Path, offsets: dict[str, int], reported: set[str] | None = None,
                 repair: bool = False, last_scan_ms: int = 0) -> None:
        self.spool_dir, self.offsets, self.repair = spool_dir, offsets, repair
        self.reported: set[str] = set() if reported is None else reported  # what was reported once already
        self.read_at: dict[str, int] = {}  # file key -> when this process last read it (epoch ms)
        self.last_scan_ms = last_scan_ms  # the previous pass: a file new since then was written after it
        self._listings: dict[str, _Listing] = {}

    def scan(self) -> Iterator[Chunk]:
        """Every spool file with new lines, and a notice for everything that is not one."""
        now = now_ms()
        try:
            top = os.open(self.spool_dir, _DIR_FLAGS)
        except FileNotFoundError:
            return
        try:
            users, others = self._names(top, "", is_uid_name)
            for name in others:  # only when the listing changed: junk costs nothing per pass
                if not name.startswith(SQUATTED_PREFIX):
                    yield from self._guarded(top, name, self._junk(top, name))
            for name in users:
                yield from self._guarded(top, name, self._entry(top, name, now))
        finally:
            os.close(top)
            self.last_scan_ms = now

    def _guarded(self, top: int, name: str, work: Iterator[Chunk]) -> Iterator[Chunk]:
        try:
            yield from work
        except Exception as exc:  # one entry's trouble never stops the others
            yield from self._failed(top, name, exc)

    def _names(self, dfd: int, key: str, keep: Callable[[str], bool]) -> tuple[list[str], list[str]]:
        """The directory's names `keep` wants, from the listing kept while the directory is unchanged
        (read again at least every RELIST_SECONDS); and, when it was read now, all the others."""
        st, mono = os.fstat(dfd), time.monotonic()
        listing = self._listings.get(key)
        if listing is not None and (listing.inode, listing.mtime_ns) == (st.st_ino, st.st_mtime_ns) \
                and mono - listing.listed_at <= RELIST_SECONDS:
            return listing.kept, []
        names = sorted(os.listdir(dfd))
        kept = [n for n in names if keep(n)]
        self._listings[key] = _Listing(st.st_ino, st.st_mtime_ns, kept, mono)
        return kept, [n for n in names if not keep(n)]

    def _junk(self, top: int, name: str) -> Iterator[Chunk]:
        yield from self._once(name, lambda: notice(
            "spool_entry", f"an unexpected entry '{printable(name)}' in the spool directory",
            owner_uid=_owner(top, name), path=str(self.spool_dir / name)))

    def _entry(self, top: int, name: str, now: int) -> Iterator[Chunk]:
        uid = int(name)
        try:
            dfd = os.open(name, _DIR_FLAGS, dir_fd=top)
        except FileNotFoundError:
            return
        except OSError:  # a symlink or not a directory: nobody's shells can record there
            yield from self._squatted(top, name, uid)
            return
        try:
            if os.fstat(dfd).st_uid != uid:
                yield from self._squatted(top, name, uid)
                return
            self.reported.discard(name)
            files, others = self._names(dfd, name, _is_spool_file)
            for entry in files:
                chunk = self._read(dfd, entry, uid, self.spool_dir / name / entry, now)
                if chunk is not None:
                    yield chunk
            for entry in others:
                if entry.startswith(".scratch."):
                    _remove_stale_scratch(dfd, entry)
        finally:
            os.close(dfd)

    def forget(self, key: str) -> None:
        """A file that is gone (rotated away): its read time goes too."""
        self.read_at.pop(key, None)

    def _once(self, name: str, make: Callable[[], Event]) -> Iterator[Chunk]:
        """One notice per name, as long as the agent runs; past MAX_REPORTED names, one that says so."""
        if name in self.reported:
            return
        if len(self.reported) >= MAX_REPORTED:
            if TOO_MANY not in self.reported:
                self.reported.add(TOO_MANY)
                yield Chunk("", -1, [notice("spool_entry", f"over {MAX_REPORTED} unexpected entries in the spool "
                                            "directory: the rest are not reported one by one")], 0)
            return
        self.reported.add(name)
        yield Chunk("", -1, [make()], 0)  # no key: nothing to record an offset for

    def _squatted(self, top: int, name: str, uid: int) -> Iterator[Chunk]:
        """SPOOL_DIR/UID is not that uid's own directory: someone made it first, so UID's shells
        record nothing. As root: move it aside, make UID's directory, and say so."""
        owner = _owner(top, name)
        path = str(self.spool_dir / name)
        account = account_of(uid)
        if not self.repair or account is None:
            why = "the agent is not root" if not self.repair else "no account has that uid"
            yield from self._once(name, lambda: notice(
                "spool_squatted", f"spool directory {name} belongs to uid {owner}, so uid {uid}'s shells record "
                f"nothing; left as it is ({why})", uid=uid, owner_uid=owner, path=path))
            return
        aside = f"{SQUATTED_PREFIX}{name}-{owner}-{now_ms()}"
        try:
            os.rename(name, aside, src_dir_fd=top, dst_dir_fd=top)
            os.mkdir(name, 0o700, dir_fd=top)
            os.chown(name, uid, account.pw_gid, dir_fd=top, follow_symlinks=False)
            os.chmod(name, 0o700, dir_fd=top, follow_symlinks=False)
        except OSError as exc:  # raced by the squatter again: the next pass tries again
            failed = os.strerror(exc.errno or 0)
            yield from self._once(name, lambda: notice(
                "spool_squatted", f"spool directory {name} belongs to uid {owner}; moving it aside failed "
                f"({failed}), trying again", uid=uid, owner_uid=owner, path=path))
            return
        self.reported.discard(name)
        yield Chunk("", -1, [notice(
            "spool_squatted", f"spool directory {name} belonged to uid {owner}, not {uid}: moved aside as {aside} "
            f"and made again for uid {uid}", uid=uid, owner_uid=owner, path=path, moved_to=aside)], 0)

    def _failed(self, top: int, name: str, exc: Exception) -> Iterator[Chunk]:
        """Reported once per entry and kind of failure; the entry is tried again every pass."""
        owner = _owner(top, name)
        problem = f"reading spool entry '{printable(name)}' (owner uid {owner}) failed: {type(exc).__name__}: {exc}"
        yield from self._once(f"{name}\0{type(exc).__name__}", lambda: notice(
            "agent_error", problem[:500], owner_uid=owner, path=str(self.spool_dir / name)))

    def _read(self, dfd: int, entry: str, uid: int, path: Path, now: int) -> Chunk | None:
        try:
            fd = os.open(entry, _OPEN_FLAGS, dir_fd=dfd)
        except OSError:
            return None  # a symlink (O_NOFOLLOW), or gone
        try:
            st = os.fstat(fd)
            key = f"{uid}:{st.st_dev}:{st.st_ino}"
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != uid:
                if key in self.offsets:
                    return None
                return Chunk(key, uid, [notice("spool_file", f"{entry} of uid {uid} is not a regular file with one "
                                               "link owned by that uid", uid=uid, path=str(path))], 0)
            return self._slice(fd, st, key, uid, path, now)
        finally:
            os.close(fd)

    def _slice(self, fd: int, st: os.stat_result, key: str, uid: int, path: Path, now: int) -> Chunk | None:
        """What is new in one file, at most READ_BYTES and MAX_LINES of it."""
        known = key in self.offsets
        start = self.offsets.get(key, 0)
        # Lines not read yet were written after the last read that reached the end of this file (for a
        # file new since the last pass: after that pass); the mark moves only once this read reaches it.
        since = self.read_at.setdefault(key, self.last_scan_ms)
        events: list[Event] = []
        if start > st.st_size:  # truncated by its owner: what follows is new
            events.append(notice("spool_truncated", f"{path.name} of uid {uid} shrank from {start} to "
                                 f"{st.st_size} bytes: its owner truncated it", uid=uid, path=str(path)))
            start = 0
        if start and os.pread(fd, 1, start - 1) != b"\n":
            offset = _skip_line(fd, start, st.st_size)  # the rest of a line too long to keep
        else:
            offset = self._lines(fd, start, st.st_size, uid, path, since, now, events)
        if offset >= st.st_size:
            self.read_at[key] = now
        chunk = Chunk(key, uid, events, offset, path, st.st_size, st.st_ino, st.st_ctime)
        return chunk if events or offset != start or not known or _rotation_due(chunk) else None

    @staticmethod
    def _lines(fd: int, start: int, size: int, uid: int, path: Path, since: int, now: int,
               events: list[Event]) -> int:
        data = os.pread(fd, min(READ_BYTES, size - start), start) if size > start else b""
        end = data.rfind(b"\n") + 1  # only complete lines: a shell may be writing the rest now
        if end == 0:
            if len(data) < MAX_LINE_BYTES:
                return start
            events.append(notice("spool_line", f"a line of over {MAX_LINE_BYTES} bytes in {path.name} of uid {uid}: "
                                 "cut, the rest skipped", uid=uid, path=str(path),
                                 line=data[:SHOWN_BYTES].decode("utf-8", "replace"), at=now))
            return start + len(data)
        offset = start
        for count, raw in enumerate(data[:end].splitlines(keepends=True)):
            if count == MAX_LINES:
                break
            offset += len(raw)
            line = raw.rstrip(b"\n")
            if len(line) > MAX_LINE_BYTES:
                events.append(notice("spool_line", f"a line of {len(line)} bytes in {path.name} of uid {uid}",
                                     uid=uid, path=str(path), line=line[:SHOWN_BYTES].decode("utf-8", "replace"),
                                     length=len(line), at=now))
            elif line:
                kind, at, record = parse_record(line.decode("utf-8", "replace"), uid, since, now)
                events.append((kind, at, check_login(record) if kind == "command" else record))
        return offset


def scan(spool_dir: Path, offsets: dict[str, int], reported: set[str]) -> Iterator[Chunk]:
    """One pass over `spool_dir` (a fresh scanner: no read times, no repair)."""
    return SpoolScanner(spool_dir, offsets, reported).scan()


def _skip_line(fd: int, start: int, size: int) -> int:
    """Where the over-long line under way ends: past the next newline within READ_BYTES of data,
    holes (a sparse file's) skipped for free; else as far as was looked."""
    try:
        position = os.lseek(fd, start, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # nothing but a hole up to the end
            return size
        position = start
    data = os.pread(fd, min(READ_BYTES, max(0, size - position)), position)
    newline = data.find(b"\n")
    return position + (newline + 1 if newline >= 0 else len(data))


def _rotation_due(chunk: Chunk) -> bool:
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
        dfd = os.open(chunk.path.parent, _DIR_FLAGS)
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


def ensure_user_dir(spool_dir: Path, uid: int) -> bool:
    """Make SPOOL_DIR/UID for `uid` (0700, its own) if it is missing: the installer and the root agent
    make root's, so no other user can take it first. True if made now."""
    account = account_of(uid)
    if account is None:
        return False
    path = spool_dir / str(uid)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return False
    os.chown(path, uid, account.pw_gid, follow_symlinks=False)
    os.chmod(path, 0o700, follow_symlinks=False)
    return True


def _is_spool_file(name: str) -> bool:
    return name == SPOOL_NAME or name.startswith(ROTATED_PREFIX)


def _remove_stale_scratch(dfd: int, entry: str) -> None:
    pid = entry.rsplit(".", 1)[-1]
    if pid.isascii() and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
        try:
            os.unlink(entry, dir_fd=dfd)
        except OSError:
            pass


def _owner(dfd: int, name: str) -> int | None:
    try:
        return os.stat(name, dir_fd=dfd, follow_symlinks=False).st_uid
    except OSError:
        return None

