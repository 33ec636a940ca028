"""The auditd layer's reader: the records of the execve rules auditd_rules.py installs.

The agent reads those records from the raw audit log (`AuditLog`): it groups each event's records
(SYSCALL, EXECVE, CWD, PATH, PROCTITLE) by the event's serial, decodes hex-encoded values, follows
the log across auditd's rotations (audit.log -> audit.log.1 ...) by inode, and keeps how far it read
per file in the queue, in the same transaction as the events. An event's id is
HOST:BOOT_ID:auditd:SERIAL: the kernel numbers events once per boot, so reading the same lines
again (a restart before the offset was saved) yields the same ids, stored once. The same reader
takes LAUREL's JSON lines (one whole event per line), so `auditd_log` may name LAUREL's log instead.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ombot.audit_agent.auditd_rules import KEY
from ombot.audit_agent.records import user_name

DEFAULT_LOG = "/var/log/audit/audit.log"
UNSET_UID = 4294967295
MAX_COMMAND_CHARS = 4096  # the joined argv; an event must stay well under the master's 32 KiB
MAX_ARGV_CHARS = 1024  # argv is kept as a list too when it is this short (arguments with spaces stay exact)
READ_BYTES = 4 << 20  # per file per scan: memory stays bounded however far behind the agent is
PENDING_SECONDS = 5.0  # an event whose last record never came is taken as it is after this long
MAX_PENDING = 1000
_PATH_MISSES = (-2, -20)  # ENOENT, ENOTDIR: a shell trying each $PATH entry, not a command run

_HEADER = re.compile(r"type=(\w+) msg=audit\((\d+)\.(\d+):(\d+)\):\s?(.*)")
_FIELD = re.compile(r"""([A-Za-z0-9_\[\]-]+)=("[^"]*"|'[^']*'|\S*)""")
_HEX = re.compile(r"(?:[0-9A-Fa-f]{2})+")
_TTY = re.compile(r"(pts|tty)(\d+)")


# -- records -----------------------------------------------------------------------------------------


@dataclass
class Record:
    """One raw auditd record: its type (SYSCALL, EXECVE, ...), the event's time and serial, its fields."""

    type: str
    sec: int
    ms: int
    serial: int
    fields: dict[str, str]


def parse_line(line: str) -> Record | None:
    """One raw log line; None if it is not an audit record. ENRICHED logs append the resolved names
    after a 0x1d separator: only the raw part is read."""
    m = _HEADER.match(line.split("\x1d", 1)[0].rstrip("\n"))
    if m is None:
        return None
    kind, sec, ms, serial, body = m.groups()
    return Record(kind, int(sec), int(ms), int(serial), {k: v for k, v in _FIELD.findall(body)})


def decode(value: str | None) -> str | None:
    """A string field as auditd writes it: "quoted", hex when it holds spaces, quotes, control or
    non-ASCII bytes, or (null)."""
    if value is None or value in ("(null)", "(none)", ""):
        return None
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    if _HEX.fullmatch(value):
        return bytes.fromhex(value).decode("utf-8", "replace")
    return value


def _number(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def argv(execve: list[Record]) -> list[str]:
    """The arguments of one event's EXECVE records (a long argv spans several records, a long
    argument several `aN[i]` pieces)."""
    fields: dict[str, str] = {}
    for record in execve:
        fields.update(record.fields)
    count = _number(fields.get("argc")) or 0
    out = []
    for n in range(count):
        if f"a{n}" in fields:
            out.append(decode(fields[f"a{n}"]) or "")
        elif f"a{n}_len" in fields:
            pieces, i = [], 0
            while f"a{n}[{i}]" in fields:
                pieces.append(decode(fields[f"a{n}[{i}]"]) or "")
                i += 1
            out.append("".join(pieces))
        else:
            break  # the rest was not logged (the kernel gives up on a huge argv)
    return out


@dataclass
class Event:
    """The records of one audit event, as they arrive."""

    serial: int
    sec: int
    ms: int
    file: str
    offset: int  # where its first record starts in `file`
    records: list[Record] = field(default_factory=list)
    since: float = field(default_factory=time.monotonic)


def event_data(event: Event) -> dict[str, Any] | None:
    """What the agent ships for one execve event of the raw log; None for events it does not ship
    (not ours, not an execve, a $PATH lookup miss)."""
    syscall = next((r for r in event.records if r.type == "SYSCALL"), None)
    if syscall is None:
        return None
    s = syscall.fields
    fields: dict[str, Any] = {name: decode(s.get(name)) for name in ("key", "tty", "exe", "comm", "success")}
    fields |= {name: _number(s.get(name)) for name in ("exit", "auid", "uid", "euid", "pid", "ppid", "ses")}
    path = next((decode(r.fields.get("name")) for r in event.records if r.type == "PATH"
                 and r.fields.get("item") == "0"), None)
    cwd = next((decode(r.fields.get("cwd")) for r in event.records if r.type == "CWD"), None)
    return _shipped(event.serial, fields, argv([r for r in event.records if r.type == "EXECVE"]), path, cwd)


def laurel_event(line: str) -> tuple[int, int, int, dict[str, Any]] | None:
    """(serial, sec, ms, data) from one of LAUREL's JSON lines (one whole event each), or None."""
    try:
        event = json.loads(line)
        m = re.fullmatch(r"(\d+)\.(\d+):(\d+)", str(event.get("ID")))
        syscall = event.get("SYSCALL")
    except (ValueError, AttributeError):
        return None
    if m is None or not isinstance(syscall, dict):
        return None
    fields: dict[str, Any] = {name: None if syscall.get(name) is None else str(syscall[name])
                              for name in ("key", "tty", "exe", "comm", "success")}
    if isinstance(syscall.get("key"), list):  # a rule with several keys
        fields["key"] = "\x01".join(str(k) for k in syscall["key"])
    fields |= {name: syscall.get(name) if isinstance(syscall.get(name), int) else _number(str(syscall.get(name)))
               for name in ("exit", "auid", "uid", "euid", "pid", "ppid", "ses")}
    execve = event.get("EXECVE") if isinstance(event.get("EXECVE"), dict) else {}
    args = execve.get("ARGV")
    if not isinstance(args, list):  # LAUREL set to execve-argv = ["string"]: one string
        args = [str(execve["ARGV_STR"])] if "ARGV_STR" in execve else []
    paths = event.get("PATH") if isinstance(event.get("PATH"), list) else []
    path = next((str(p.get("name")) for p in paths if isinstance(p, dict) and p.get("item") == 0), None)
    cwd = event.get("CWD", {}).get("cwd") if isinstance(event.get("CWD"), dict) else None
    data = _shipped(int(m[3]), fields, [str(a) for a in args], path, cwd if isinstance(cwd, str) else None)
    return None if data is None else (int(m[3]), int(m[1]), int(m[2]), data)


def _shipped(serial: int, s: dict[str, Any], args: list[str], path: str | None,
             cwd: str | None) -> dict[str, Any] | None:
    """The event's data from its decoded SYSCALL fields, arguments, path and directory."""
    success = s["success"] == "yes"
    exit_code = s["exit"]
    if KEY not in (s["key"] or "").split("\x01") or (not success and exit_code in _PATH_MISSES):
        return None
    command = " ".join(args) if args else (path or "")
    login_uid = None if s["auid"] == UNSET_UID else s["auid"]
    tty = None if s["tty"] in (None, "(none)") else s["tty"]
    tty_match = _TTY.fullmatch(tty or "")
    data: dict[str, Any] = {
        "source": "auditd", "serial": serial, "command": command[:MAX_COMMAND_CHARS],
        "truncated": len(command) > MAX_COMMAND_CHARS, "exe": s["exe"], "comm": s["comm"], "path": path, "cwd": cwd,
        "uid": s["uid"], "user": user_name(s["uid"]), "euid": s["euid"], "login_uid": login_uid,
        "login_user": user_name(login_uid), "pid": s["pid"], "ppid": s["ppid"], "session": s["ses"],
        "tty": (f"/dev/pts/{tty_match[2]}" if tty_match[1] == "pts" else f"/dev/tty{tty_match[2]}") if tty_match
        else tty,
        "exit": None,  # the command's exit status is not known at execve
        "success": success, "errno": -exit_code if not success and exit_code is not None else None,
    }
    if sum(len(a) for a in args) <= MAX_ARGV_CHARS:
        data["argv"] = args
    return data


class Assembler:
    """Groups records into events by serial. An event is complete at its PROCTITLE (the last record
    auditd writes of a syscall event) or EOE; one that never completes is taken after
    PENDING_SECONDS, or when MAX_PENDING others wait."""

    def __init__(self) -> None:
        self.pending: dict[int, Event] = {}

    def feed(self, record: Record, file: str, offset: int) -> Event | None:
        event = self.pending.get(record.serial)
        if event is None:
            if record.type != "SYSCALL":
                return None  # not part of a syscall event we follow (logins, config changes...)
            event = self.pending[record.serial] = Event(record.serial, record.sec, record.ms, file, offset)
        event.records.append(record)
        if record.type in ("PROCTITLE", "EOE"):
            return self.pending.pop(record.serial)
        return None

    def overdue(self) -> list[Event]:
        now = time.monotonic()
        ordered = sorted(self.pending.values(), key=lambda e: e.since)
        excess = len(ordered) - MAX_PENDING
        late = [e for i, e in enumerate(ordered) if i < excess or now - e.since > PENDING_SECONDS]
        for event in late:
            del self.pending[event.serial]
        return late

    def first_offset(self, file: str) -> int | None:
        """Where the earliest unfinished event of `file` starts: the offset that is safe to keep."""
        offsets = [e.offset for e in self.pending.values() if e.file == file]
        return min(offsets) if offsets else None

    def drop_file(self, file: str) -> None:
        for serial in [s for s, e in self.pending.items() if e.file == file]:
            del self.pending[serial]


# -- the log reader ------------------------------------------------------------------------------------


@dataclass
class LogChunk:
    """Events read from one log file, and the offset to keep for it."""

    key: str  # auditd:DEV:INODE, whatever the file's name becomes through rotations
    events: list[tuple[str, str, int, dict[str, Any]]]  # (id, kind, at, data)
    offset: int | None  # None: nothing to record (events completed late, or the file is gone)
    gone: bool = False  # the file was rotated out of existence: forget its offset


class AuditLog:
    """Tails the raw audit log and its rotated files. `offsets` maps file keys to the offset kept
    last time (the queue's offsets table); files older than the oldest known one were read before."""

    def __init__(self, log: Path, host: str, boot_id: str, offsets: dict[str, int], state_dir: Path) -> None:
        self.log, self.host, self.boot_id = log, host, boot_id
        self.positions = {k: v for k, v in offsets.items() if k.startswith("auditd:")}  # read so far (in memory)
        self.kept = dict(self.positions)  # what the queue holds
        self.assembler = Assembler()
        self.boot_time = boot_time()
        self.previous_boot = _remember_boot(state_dir / "auditd-boot", boot_id)

    def files(self) -> list[tuple[Path, str]]:
        """The log and its rotated files, oldest first, with their keys."""
        try:
            names = os.listdir(self.log.parent)
        except OSError:
            return []
        rotated = re.compile(re.escape(self.log.name) + r"(?:\.([0-9]+))?")
        found = []
        for name in names:
            m = rotated.fullmatch(name)
            if m is None:
                continue
            try:
                st = os.stat(self.log.parent / name, follow_symlinks=False)
            except OSError:
                continue
            if os.path.isfile(self.log.parent / name) and not os.path.islink(self.log.parent / name):
                found.append((-int(m[1] or 0), self.log.parent / name, f"auditd:{st.st_dev}:{st.st_ino}"))
        return [(path, key) for _, path, key in sorted(found)]

    def poll(self) -> Iterator[LogChunk]:
        files = self.files()
        keys = [key for _, key in files]
        known = [i for i, key in enumerate(keys) if key in self.positions]
        for path, key in files[known[0] if known else 0:]:
            events = self._read(path, key)
            offset = self.assembler.first_offset(key)
            offset = self.positions.get(key) if offset is None else offset  # None: not opened yet
            if offset is not None and (events or offset != self.kept.get(key)):
                self.kept[key] = offset
                yield LogChunk(key, events, offset)
        late = [e for e in (self._event(event) for event in self.assembler.overdue()) if e is not None]
        if late:
            yield LogChunk("", late, None)
        for key in [k for k in self.positions if k not in keys]:  # rotated out of existence
            self.assembler.drop_file(key)
            del self.positions[key]
            self.kept.pop(key, None)
            yield LogChunk(key, [], None, gone=True)

    def _read(self, path: Path, key: str) -> list[tuple[str, str, int, dict[str, Any]]]:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return []
        try:
            st = os.fstat(fd)
            if f"auditd:{st.st_dev}:{st.st_ino}" != key:
                return []  # rotated between listing and opening: the next poll sees it under its new name
            start = self.positions.get(key, 0)
            if start > st.st_size:
                start = 0  # a new file on a reused inode
            data = os.pread(fd, min(READ_BYTES, st.st_size - start), start) if st.st_size > start else b""
        except OSError:
            return []  # read again at the next poll
        finally:
            os.close(fd)
        end = data.rfind(b"\n") + 1  # complete lines only: auditd may be writing the rest
        if end == 0 and len(data) == READ_BYTES:
            end = len(data)  # no line is this long: skip it rather than stall
        out = []
        offset = start
        for raw in data[:end].splitlines(keepends=True):
            if raw.startswith(b"{"):  # LAUREL's JSON lines: one whole event each
                found = laurel_event(raw.decode("utf-8", "replace"))
                if found is not None:
                    out.append(self._identified(*found))
                offset += len(raw)
                continue
            record = parse_line(raw.decode("utf-8", "replace"))
            if record is not None:
                done = self.assembler.feed(record, key, offset)
                event = self._event(done) if done is not None else None
                if event is not None:
                    out.append(event)
            offset += len(raw)
        self.positions[key] = start + end
        return out

    def _event(self, event: Event) -> tuple[str, str, int, dict[str, Any]] | None:
        data = event_data(event)
        return None if data is None else self._identified(event.serial, event.sec, event.ms, data)

    def _identified(self, serial: int, sec: int, ms: int, data: dict[str, Any]) -> tuple[str, str, int, dict[str, Any]]:
        boot = self.boot_id if sec >= self.boot_time or self.boot_time == 0 else (self.previous_boot or "0")
        return f"{self.host}:{boot}:auditd:{serial}", "command", sec * 1000 + ms, data


def _remember_boot(path: Path, boot_id: str) -> str | None:
    """The boot id the agent ran in before this boot, if it knows it: records the log still holds
    from before this boot get it. The file holds this boot's id, then the one before."""
    try:
        lines = path.read_text().split()
    except OSError:
        lines = []
    if lines[:1] == [boot_id]:
        return lines[1] if len(lines) > 1 else None
    previous = lines[0] if lines else None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{boot_id}\n{previous or ''}\n")
    except OSError:
        pass
    return previous


def boot_time() -> int:
    """When this boot began (epoch seconds, /proc/stat's btime); 0 if unknown."""
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0

