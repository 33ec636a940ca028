"""The agent's bounded on-disk queue (SQLite in its state directory).

Spool lines become events and the spool offsets advance in one transaction, so a crash neither
loses nor repeats a line. An event leaves the queue only when a master acknowledged (or, for a
malformed one, rejected) its id. Past `max_events` command events go, oldest first, of the user
with the most queued (so one user flooding their own spool while the masters are away cannot push
another user's records out), and one `dropped` event says how many of whose; dropped records are
never themselves dropped.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL,
                                   at INTEGER NOT NULL, data TEXT NOT NULL, boot TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS offsets (file TEXT PRIMARY KEY, offset INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class EventQueue:
    """The queue of one host's events and its spool offsets, in `state_dir/queue.db`."""

    def __init__(self, state_dir: Path, host: str, max_events: int) -> None:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.host, self.max_events = host, max_events
        self.db = sqlite3.connect(state_dir / "queue.db", isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # durable across a crash of the agent
        self.db.executescript(_SCHEMA)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(events)")}
        if "eid" not in columns:
            self.db.execute("ALTER TABLE events ADD COLUMN eid TEXT")  # an id the source gave (auditd's serial)
        if "uid" not in columns:
            self.db.execute("ALTER TABLE events ADD COLUMN uid INTEGER")  # whose record: the queue's bound is fair
        self.db.execute("CREATE UNIQUE INDEX IF NOT EXISTS events_eid ON events (eid)")
        self.db.execute("CREATE INDEX IF NOT EXISTS events_uid ON events (uid, seq)")
        # The queue's instance names the event source: a wiped state directory never reuses an id.
        self.instance = self.meta("instance") or self.set_meta("instance", os.urandom(6).hex())
        self.boot_id = _boot_id()

    # -- meta ------------------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        """A value the agent keeps across restarts (the queue's instance, counters, the last scan)."""
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> str:
        """Keep `value` under `key`; returns it."""
        self.db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = ?",
                        (key, value, value))
        return value

    def counter(self, key: str) -> int:
        return int(self.meta(key) or 0)

    def _bump(self, key: str, by: int) -> None:
        self.set_meta(key, str(self.counter(key) + by))

    # -- adding ----------------------------------------------------------------------------

    def offset(self, file: str) -> int:
        row = self.db.execute("SELECT offset FROM offsets WHERE file = ?", (file,)).fetchone()
        return 0 if row is None else int(row[0])

    def add(self, events: Iterable[tuple[str, int, dict[str, Any]]], file: str | None = None,
            offset: int | None = None) -> None:
        """Queue (kind, at, data) events and, in the same transaction, record how far `file` was read."""
        with self._transaction():
            for kind, at, data in events:
                self.db.execute("INSERT INTO events (kind, at, data, boot, uid) VALUES (?, ?, ?, ?, ?)",
                                (kind, at, _json(data), self.boot_id, _uid_of(kind, data)))
            if file is not None and offset is not None:
                self.db.execute("INSERT INTO offsets (file, offset) VALUES (?, ?) "
                                "ON CONFLICT(file) DO UPDATE SET offset = ?", (file, offset, offset))
            self._bound()

    def add_identified(self, events: Iterable[tuple[str, str, int, dict[str, Any]]], file: str | None = None,
                       offset: int | None = None) -> None:
        """Queue (id, kind, at, data) events whose source gave them stable ids; an id already queued
        is skipped (a log re-read after a restart)."""
        with self._transaction():
            for eid, kind, at, data in events:
                self.db.execute("INSERT OR IGNORE INTO events (kind, at, data, boot, eid, uid) VALUES (?, ?, ?, ?, ?, ?)",
                                (kind, at, _json(data), self.boot_id, eid, _uid_of(kind, data)))
            if file is not None and offset is not None:
                self.db.execute("INSERT INTO offsets (file, offset) VALUES (?, ?) "
                                "ON CONFLICT(file) DO UPDATE SET offset = ?", (file, offset, offset))
            self._bound()

    def forget_file(self, file: str) -> None:
        self.db.execute("DELETE FROM offsets WHERE file = ?", (file,))

    def _bound(self) -> None:
        over = self.depth() - self.max_events
        if over <= 0:
            return
        rows = self._evict(over + 1)  # +1: room for the dropped record itself
        if not rows:
            return
        self._bump("dropped_total", len(rows))
        whose: dict[str, int] = {}
        for _, _, owner in rows:
            whose[str(owner)] = whose.get(str(owner), 0) + 1
        oldest, newest = min(at for _, at, _ in rows), max(at for _, at, _ in rows)
        open_seq = self.meta("open_drop")  # a dropped record not yet sent: add to it
        if open_seq and self.db.execute("SELECT 1 FROM events WHERE seq = ?", (int(open_seq),)).fetchone():
            data = json.loads(self.db.execute("SELECT data FROM events WHERE seq = ?", (int(open_seq),)).fetchone()[0])
            data["count"] += len(rows)
            data["oldest_at"], data["newest_at"] = min(data["oldest_at"], oldest), max(data["newest_at"], newest)
            for owner_uid, count in whose.items():
                data.setdefault("uids", {})[owner_uid] = data["uids"].get(owner_uid, 0) + count
            self.db.execute("UPDATE events SET data = ? WHERE seq = ?", (json.dumps(data), int(open_seq)))
            return
        data = {"count": len(rows), "oldest_at": oldest, "newest_at": newest, "uids": whose,
                "reason": f"the agent's queue was full ({self.max_events} events)"}
        cursor = self.db.execute("INSERT INTO events (kind, at, data, boot) VALUES ('dropped', ?, ?, ?)",
                                 (now_ms(), json.dumps(data), self.boot_id))
        self.set_meta("open_drop", str(cursor.lastrowid))

    def _evict(self, count: int) -> list[tuple[int, int, int | None]]:
        """Delete `count` events (never `dropped` records), the oldest of whoever has the most
        queued first; (seq, at, uid) of each."""
        gone: list[tuple[int, int, int | None]] = []
        while len(gone) < count:
            top = self.db.execute("SELECT uid, COUNT(*) AS n FROM events WHERE kind != 'dropped' "
                                  "GROUP BY uid ORDER BY n DESC LIMIT 1").fetchone()
            if top is None:
                break
            uid = top[0]
            rows = self.db.execute("SELECT seq, at, uid FROM events WHERE kind != 'dropped' AND uid IS ? "
                                   "ORDER BY seq LIMIT ?", (uid, count - len(gone))).fetchall()
            self.db.executemany("DELETE FROM events WHERE seq = ?", [(seq,) for seq, _, _ in rows])
            gone += rows
        return gone

    # -- shipping --------------------------------------------------------------------------

    def depth(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def event_id(self, seq: int, boot: str) -> str:
        """Stable across retries and restarts: the boot it was queued in, this queue, its number."""
        return f"{self.host}:{boot}:q{self.instance}:{seq}"

    def batch(self, max_events: int, max_bytes: int) -> list[dict[str, Any]]:
        """The oldest events, as the master takes them, within the batch's bounds."""
        batch: list[dict[str, Any]] = []
        size = 0
        for seq, kind, at, data, boot, eid in self.db.execute(
                "SELECT seq, kind, at, data, boot, eid FROM events ORDER BY seq LIMIT ?", (max_events,)):
            size += len(data) + 200
            if batch and size > max_bytes:
                break
            batch.append({"id": eid or self.event_id(seq, boot), "kind": kind, "at": at, "data": json.loads(data)})
        if self.meta("open_drop") and any(e["kind"] == "dropped" for e in batch):
            self.db.execute("DELETE FROM meta WHERE key = 'open_drop'")  # on its way: later drops get a new record
        return batch

    def done(self, event_ids: Iterable[str]) -> int:
        """Delete acknowledged (or rejected) events; ids of other queues are ignored."""
        prefix = f"{self.host}:"
        ids = [i for i in event_ids if i.startswith(prefix)]
        seqs = [int(i.rsplit(":", 1)[1]) for i in ids if i.split(":")[-2] == f"q{self.instance}"]
        given = [i for i in ids if i.split(":")[-2] != f"q{self.instance}"]  # ids a source gave
        with self._transaction():
            for seq in seqs:
                self.db.execute("DELETE FROM events WHERE seq = ?", (seq,))
            done = len(seqs)
            for eid in given:
                done += self.db.execute("DELETE FROM events WHERE eid = ?", (eid,)).rowcount
            self._bump("sent_total", done)
        return done

    def status(self) -> dict[str, int]:
        return {"spool_depth": self.depth(), "dropped_total": self.counter("dropped_total"),
                "sent_total": self.counter("sent_total")}

    def _transaction(self) -> Any:
        return _Transaction(self.db)

    def close(self) -> None:
        self.db.close()


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: Any, *rest: Any) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")


def _json(data: dict[str, Any]) -> str:
    """JSON any SQLite text column takes: a lone surrogate (a file name that is not UTF-8) stays escaped."""
    text = json.dumps(data, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(data)
    return text


def _uid_of(kind: str, data: dict[str, Any]) -> int | None:
    uid = data.get("uid") if kind == "command" else None
    return uid if isinstance(uid, int) and not isinstance(uid, bool) else None


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().lower() or "0"
    except OSError:
        return "0"
