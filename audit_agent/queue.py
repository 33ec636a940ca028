"""The agent's bounded on-disk queue (SQLite in its state directory).

Spool lines become events and the spool offsets advance in one transaction, so a crash neither
loses nor repeats a line. An event leaves the queue only when a master acknowledged (or, for a
malformed one, rejected) its id. Past `max_events` the oldest command events go first and one
`dropped` event says how many; dropped records are never themselves dropped.
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
        if "eid" not in {row[1] for row in self.db.execute("PRAGMA table_info(events)")}:
            self.db.execute("ALTER TABLE events ADD COLUMN eid TEXT")  # an id the source gave (auditd's serial)
        self.db.execute("CREATE UNIQUE INDEX IF NOT EXISTS events_eid ON events (eid)")
        # The queue's instance names the event source: a wiped state directory never reuses an id.
        self.instance = self._meta("instance") or self._set_meta("instance", os.urandom(6).hex())
        self.boot_id = _boot_id()

    # -- meta ------------------------------------------------------------------------------

    def _meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set_meta(self, key: str, value: str) -> str:
        self.db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = ?",
                        (key, value, value))
        return value

    def counter(self, key: str) -> int:
        return int(self._meta(key) or 0)

    def _bump(self, key: str, by: int) -> None:
        self._set_meta(key, str(self.counter(key) + by))

    # -- adding ----------------------------------------------------------------------------

    def offset(self, file: str) -> int:
        row = self.db.execute("SELECT offset FROM offsets WHERE file = ?", (file,)).fetchone()
        return 0 if row is None else int(row[0])

    def add(self, events: Iterable[tuple[str, int, dict[str, Any]]], file: str | None = None,
            offset: int | None = None) -> None:
        """Queue (kind, at, data) events and, in the same transaction, record how far `file` was read."""
        with self._transaction():
            for kind, at, data in events:
                self.db.execute("INSERT INTO events (kind, at, data, boot) VALUES (?, ?, ?, ?)",
                                (kind, at, json.dumps(data, ensure_ascii=False), self.boot_id))
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
                self.db.execute("INSERT OR IGNORE INTO events (kind, at, data, boot, eid) VALUES (?, ?, ?, ?, ?)",
                                (kind, at, json.dumps(data, ensure_ascii=False), self.boot_id, eid))
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
        rows = self.db.execute("SELECT seq, at FROM events WHERE kind != 'dropped' ORDER BY seq LIMIT ?",
                               (over + 1,)).fetchall()  # +1: room for the dropped record itself
        if not rows:
            return
        self.db.execute("DELETE FROM events WHERE seq <= ? AND kind != 'dropped'", (rows[-1][0],))
        self._bump("dropped_total", len(rows))
        open_seq = self._meta("open_drop")  # a dropped record not yet sent: add to it
        if open_seq and self.db.execute("SELECT 1 FROM events WHERE seq = ?", (int(open_seq),)).fetchone():
            data = json.loads(self.db.execute("SELECT data FROM events WHERE seq = ?", (int(open_seq),)).fetchone()[0])
            data["count"] += len(rows)
            data["newest_at"] = rows[-1][1]
            self.db.execute("UPDATE events SET data = ? WHERE seq = ?", (json.dumps(data), int(open_seq)))
            return
        data = {"count": len(rows), "oldest_at": rows[0][1], "newest_at": rows[-1][1],
                "reason": f"the agent's queue was full ({self.max_events} events)"}
        cursor = self.db.execute("INSERT INTO events (kind, at, data, boot) VALUES ('dropped', ?, ?, ?)",
                                 (now_ms(), json.dumps(data), self.boot_id))
        self._set_meta("open_drop", str(cursor.lastrowid))

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
        if self._meta("open_drop") and any(e["kind"] == "dropped" for e in batch):
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


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().lower() or "0"
    except OSError:
        return "0"
