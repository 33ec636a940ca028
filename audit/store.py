"""The one central store of shell-audit events, in the bot's database, across all IDCs.

The audit feed (one puller per bot database, holding a lease) reads each master's `auditevent`
rows and hands them to `insert_new`, which skips events already here (a lost ack, an event that
reached two masters) and returns only the rows inserted now: the rules run on those, so an event
delivered twice alerts once. `search` serves `/om audit`.

The tables are their own component ("bot_audit"), migrated by `prepare()`, so the job tables'
migrations and these never depend on each other's order. Their models are bound to this room's own
proxy, which `bind` points at the bot's database (bot.store.open_store does, when it opens it);
table and component names are those of before the room existed, so existing databases open as they are.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Sequence
from typing import Any

import peewee

from ombot.clock import now_ms
from ombot.globs import matches_any
from ombot.storage import JSONField, create_tables, migrate

BATCH_ROWS = 500  # rows per statement: 16 columns stay far below every backend's parameter limit
MAX_SEARCH_ROWS = 10_000
_SCAN_PAGES = 20  # pages read past the database's coarse filter (case-blind LIKE) before giving up
LIKE_ESCAPE = "!"  # not a backslash: MySQL reads backslashes in the SQL text itself
_INT32 = 2**31

db = peewee.DatabaseProxy()  # the bot's database, once bound


class AuditRecord(peewee.Model):
    """One audit event as stored centrally; the fields chat searches on are columns, the rest is in `data`.
    Timestamps are UTC epoch milliseconds."""

    id = peewee.CharField(max_length=255, primary_key=True)  # host:boot:source:seq, stable across masters
    idc = peewee.CharField(max_length=64)  # a handful of values: an index would cost inserts, not help searches
    host = peewee.CharField(max_length=255, index=True)
    kind = peewee.CharField(max_length=16)  # command, dropped, notice
    at = peewee.BigIntegerField(index=True)  # when it happened, by the server's clock
    user = peewee.CharField(max_length=64, null=True, index=True)
    login_user = peewee.CharField(max_length=64, null=True)  # the login session's user (SSH, before sudo/su)
    uid = peewee.BigIntegerField(null=True)  # from the kernel (spool owner), never from the record's text
    tty = peewee.CharField(max_length=64, null=True)
    cwd = peewee.TextField(null=True)
    command = peewee.TextField(default="")  # "" for dropped and notice events
    exit_status = peewee.IntegerField(null=True)
    ssh_client = peewee.CharField(max_length=255, null=True)
    source = peewee.CharField(max_length=64)  # the id's source part: the agent's queue (q...) or auditd
    data = JSONField()  # the whole event data as the agent sent it
    stored_at = peewee.BigIntegerField()

    class Meta:
        database = db
        table_name = "bot_audit_event"


class AuditCursor(peewee.Model):
    """How far the puller has read each master's events (the master's received_at, epoch ms)."""

    master = peewee.CharField(max_length=64, primary_key=True)
    received_after = peewee.BigIntegerField()

    class Meta:
        database = db
        table_name = "bot_audit_cursor"


_COLUMNS = tuple(f.name for f in AuditRecord._meta.sorted_fields)
_DATA_INDEX = _COLUMNS.index("data")
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)  # JSONField's own form, built once

# Append-only: a new step goes at the end, never edit one that has shipped.
MIGRATIONS = [create_tables(AuditRecord, AuditCursor)]


def bind(database: peewee.Database) -> None:
    """Keep the audit tables in `database` (the bot's, open)."""
    db.initialize(database)


def prepare() -> None:
    """Create or upgrade the audit tables in the database `bind` named."""
    migrate(db.obj, "bot_audit", MIGRATIONS)


# --- writing ----------------------------------------------------------------------------------


def insert_new(idc: str, events: Sequence[dict[str, Any]]) -> list[AuditRecord]:
    """Store the events that are not here yet; return exactly those, in the order given.

    Each event is a master's row or an agent's event: `id`, `kind`, `at`, `data`, and optionally
    `host` (else taken from the id). An id already stored, or repeated in `events`, is skipped.
    One writer at a time (the feed's lease), so reading the batch's existing ids and then
    inserting the rest is exact; the insert still ignores conflicts, so a second writer could
    never fail the batch, only have its rows reported twice.
    """
    stored_at = now_ms()
    rows: dict[str, dict[str, Any]] = {}
    for event in events:
        row = _row(idc, event, stored_at)
        rows.setdefault(row["id"], row)
    fresh: list[dict[str, Any]] = []
    ordered = list(rows.values())
    with db.atomic():
        for start in range(0, len(ordered), BATCH_ROWS):
            chunk = ordered[start:start + BATCH_ROWS]
            ids = [row["id"] for row in chunk]
            existing = {i for (i,) in db.obj.execute_sql(_existing_sql(type(db.obj).__name__, len(ids)), ids)}
            new = [row for row in chunk if row["id"] not in existing]
            if new:
                _insert(new)
                fresh += new
    return [_record(row) for row in fresh]


def _record(row: dict[str, Any]) -> AuditRecord:
    """The row as a record read back would be, without peewee's per-field setattr (ingest is hot)."""
    record = AuditRecord(__no_default__=True)
    record.__data__ = row
    return record


def _insert(rows: list[dict[str, Any]]) -> None:
    """One multi-row insert-ignore. Built once per size and backend from peewee's own one-row
    statement: peewee's per-value SQL generation would cost more than the ingest budget."""
    params: list[Any] = []
    for row in rows:
        values = [row[name] for name in _COLUMNS]
        values[_DATA_INDEX] = _data_text(row["data"])
        params += values
    db.obj.execute_sql(_insert_sql(type(db.obj).__name__, len(rows)), params)


def _data_text(data: dict[str, Any]) -> str:
    text = _JSON.encode(data)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (JSON "\udXXX"): keep it escaped
            text = json.dumps(data, separators=(",", ":"))
    return text


@functools.lru_cache(maxsize=64)
def _existing_sql(backend: str, count: int) -> str:
    sql, _ = AuditRecord.select(AuditRecord.id).where(AuditRecord.id.in_(["x"] * count)).sql()
    return str(sql)


@functools.lru_cache(maxsize=64)
def _insert_sql(backend: str, count: int) -> str:
    fields = AuditRecord._meta.sorted_fields
    sql, _ = AuditRecord.insert_many([tuple(range(len(fields)))], fields=fields).on_conflict_ignore().sql()
    head, values, tail = sql.partition(" VALUES ")
    one = "(" + ", ".join([db.obj.param] * len(fields)) + ")"
    if not values or not tail.startswith(one):  # peewee changed its spelling: stop, do not guess
        raise RuntimeError(f"unexpected insert statement on {backend}: {sql[:200]}")
    return head + values + ", ".join([one] * count) + tail[len(one):]


def _row(idc: str, event: dict[str, Any], stored_at: int) -> dict[str, Any]:
    event_id = str(event["id"])
    parts = event_id.rsplit(":", 3)  # host:boot:source:seq; a host name never holds a colon, but be safe
    data = event.get("data")
    if not isinstance(data, dict):
        data = {}
    return {
        "id": event_id[:255], "idc": _clip(idc, 64) or "", "kind": _clip(event.get("kind"), 16) or "",
        "host": _clip(event.get("host") or parts[0], 255) or "", "at": int(event["at"]),
        "user": _clip(data.get("user"), 64), "login_user": _clip(data.get("login_user"), 64),
        "uid": _integer(data.get("uid"), 2**63), "tty": _clip(data.get("tty"), 64),
        "cwd": _clip(data.get("cwd"), 65_536), "command": _clip(data.get("command"), 1 << 20) or "",
        "exit_status": _integer(data.get("exit"), _INT32), "ssh_client": _clip(data.get("ssh_client"), 255),
        "source": _clip(parts[2] if len(parts) == 4 else "", 64) or "", "data": data, "stored_at": stored_at,
    }


def _clip(value: Any, length: int) -> str | None:
    """Text fit for a column of `length`: NUL is refused by PostgreSQL, lone surrogates by every driver."""
    if type(value) is str and value.isascii() and "\x00" not in value:  # nearly always: the fast path
        return value[:length]
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    if not text.isascii():
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text[:length]


def _integer(value: Any, bound: int) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and -bound <= value < bound:
        return value
    return None


def received_after(master: str) -> int:
    """The puller's position at this master (0 before its first read)."""
    row = AuditCursor.get_or_none(AuditCursor.master == master)
    return int(row.received_after) if row else 0


def save_position(master: str, received_after: int) -> None:
    """Where the puller's next read of this master starts (its received_at, epoch ms)."""
    with db.atomic():  # update, else insert: portable across SQLite, MariaDB and PostgreSQL
        if not AuditCursor.update(received_after=received_after).where(AuditCursor.master == master).execute():
            AuditCursor.insert(master=master, received_after=received_after).on_conflict_ignore().execute()


def forget_events_before(cutoff_ms: int) -> int:
    """Delete events that happened, and were stored here, before `cutoff_ms` (retention). Both: an
    event's time is the agent's (the shell's claim clamped), and a backlog stored today stays its
    retention whatever its time says."""
    return int(AuditRecord.delete().where((AuditRecord.at < cutoff_ms) & (AuditRecord.stored_at < cutoff_ms)).execute())


# --- searching --------------------------------------------------------------------------------


def search(host: str | None = None, user: str | None = None, grep: str | None = None,
           since_ms: int | None = None, idc: str | None = None, limit: int = 50,
           until_ms: int | None = None) -> list[AuditRecord]:
    """Events newest first. `host` and `user` are case-sensitive globs (`web*`), `grep` a literal,
    case-sensitive substring of the command, `idc` exact; `since_ms`/`until_ms` bound `at` (until
    exclusive).

    The database narrows the rows with LIKE (wildcards escaped), which ignores case on SQLite and
    MySQL; the exact test runs here, so every backend gives the same answer.
    """
    limit = max(1, min(limit, MAX_SEARCH_ROWS))
    query = AuditRecord.select()
    if host:
        query = query.where(_like(AuditRecord.host, glob_to_like(host)))
    if user:
        query = query.where(_like(AuditRecord.user, glob_to_like(user)))
    if grep:
        query = query.where(_like(AuditRecord.command, "%" + escape_like(grep) + "%"))
    if idc:
        query = query.where(AuditRecord.idc == idc)
    if since_ms is not None:
        query = query.where(AuditRecord.at >= since_ms)
    if until_ms is not None:
        query = query.where(AuditRecord.at < until_ms)
    query = query.order_by(AuditRecord.at.desc(), AuditRecord.id.desc())
    found: list[AuditRecord] = []
    for record in _pages(query, limit):
        if _exact(record, host, user, grep, idc):
            found.append(record)
            if len(found) == limit:
                break
    return found


def _pages(query: "peewee.ModelSelect[AuditRecord]", size: int) -> Iterator[AuditRecord]:
    """The query's rows a page at a time (a PostgreSQL cursor would fetch the whole result at once)."""
    for page in range(_SCAN_PAGES):
        rows = list(query.limit(size).offset(page * size))
        yield from rows
        if len(rows) < size:
            return


def _exact(record: AuditRecord, host: str | None, user: str | None, grep: str | None, idc: str | None) -> bool:
    return ((not host or matches_any(record.host, [host]))
            and (not user or (record.user is not None and matches_any(record.user, [user])))
            and (not grep or grep in record.command)
            and (not idc or record.idc == idc))


def _like(field: peewee.Field, pattern: str) -> peewee.NodeList:
    # Spelt out: peewee turns LIKE into GLOB on SQLite and ILIKE is PostgreSQL's only.
    return peewee.NodeList((field, peewee.SQL("LIKE"), peewee.Value(pattern, converter=False),
                            peewee.SQL("ESCAPE"), peewee.Value(LIKE_ESCAPE, converter=False)))


def escape_like(text: str) -> str:
    """`text` as a LIKE pattern that matches only itself (with ESCAPE LIKE_ESCAPE)."""
    e = LIKE_ESCAPE
    return text.replace(e, e + e).replace("%", e + "%").replace("_", e + "_")


def glob_to_like(glob: str) -> str:
    """A LIKE pattern matching at least what the glob matches: `*` -> `%`, `?` and a `[...]` class -> `_`."""
    out: list[str] = []
    i, n = 0, len(glob)
    while i < n:
        char = glob[i]
        i += 1
        if char == "*":
            out.append("%")
        elif char == "?":
            out.append("_")
        elif char == "[":
            end = _class_end(glob, i)
            if end is None:
                out.append("[")
            else:
                out.append("_")
                i = end + 1
        else:
            out.append(escape_like(char))
    return "".join(out)


def _class_end(glob: str, start: int) -> int | None:
    """Where the character class opened before `start` closes, as fnmatch reads it; None when it never does."""
    j = start
    if j < len(glob) and glob[j] == "!":
        j += 1
    if j < len(glob) and glob[j] == "]":
        j += 1
    end = glob.find("]", j)
    return None if end < 0 else end
