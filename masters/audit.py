"""The master's side of shell audit: the `ingest` operation and the table it fills.

An audit agent (a client of kind `agent`, one key per server) sends batches of events. The batch
must name the agent's own host, and every event id must start with that host's name, so one
server's key can neither write nor pre-empt (through the insert-ignore) another server's events.
Each event is checked on its own: a malformed or oversized one is rejected with a reason and the
rest of the batch is kept. Stored events are inserted with insert-ignore on their id, and the reply
acknowledges every id the table now holds, new or already there: the agent deletes only those.

The bot reads what the masters stored with `audit_read` (a chat client only): the events received
from a cursor on, in (received_at, id) order, one bounded page at a time, and the heartbeat rows.
Its answer carries the master's clock at the start of the read: a batch committed later may carry
an earlier received_at (it was taken before the insert), so the bot re-reads a short overlap
behind that time, and its insert skips what it already holds.

The tables are their own component ("audit") in the master's database, migrated here, so the
job tables' migrations and these never depend on each other's order.
"""

from __future__ import annotations

import re
from typing import Any

import peewee
from playhouse.migrate import SchemaMigrator
from playhouse.migrate import migrate as run_migration

from masters.envelope import Refused, Request, dumps
from masters.store import BaseModel, db
from ombot.clock import now_ms
from ombot.config import ClientRegistration
from ombot.storage import JSONField, create_tables, migrate

MAX_BATCH_EVENTS = 1000
MAX_EVENT_BYTES = 32 * 1024  # one event as JSON; the agent truncates command text well below this
EVENT_KINDS = ("command", "dropped", "notice")
# host:boot-id:source:sequence; the host part is checked against the sender's registration
_EVENT_ID_TAIL = re.compile(r"^[0-9a-f-]{1,64}:[a-z][a-z0-9_.-]{0,31}:[0-9]{1,19}$")
_STATUS_FIELDS = ("spool_depth", "dropped_total", "sent_total")
MAX_READ_EVENTS = 1000  # one audit_read page
DEFAULT_READ_EVENTS = 500
MAX_READ_BYTES = 512 * 1024  # a page stops growing past this much event data (an event is at most 32 KiB)


class AuditEvent(BaseModel):
    """One audit event as its agent sent it, keyed by its stable id (host, boot id, source, sequence)."""

    id = peewee.CharField(max_length=255, primary_key=True)
    host = peewee.CharField(max_length=255, index=True)
    kind = peewee.CharField(max_length=16)
    at = peewee.BigIntegerField(index=True)  # when it happened, by the server's clock (epoch ms)
    received_at = peewee.BigIntegerField()  # when this master stored it (epoch ms)
    sender = peewee.CharField(max_length=64)  # the agent registration that shipped it
    data = JSONField()


class AuditAgent(BaseModel):
    """The last heartbeat of each host's agent: how deep its spool is and what it had to drop."""

    host = peewee.CharField(max_length=255, primary_key=True)
    last_seen = peewee.BigIntegerField()
    spool_depth = peewee.BigIntegerField()
    dropped_total = peewee.BigIntegerField()
    sent_total = peewee.BigIntegerField()


def _index_received(db: peewee.Database) -> None:
    """audit_read pages through (received_at, id)."""
    run_migration(SchemaMigrator.from_database(db).add_index("auditevent", ("received_at", "id")))


MIGRATIONS = [create_tables(AuditEvent, AuditAgent), _index_received]


class AuditIngest:
    """Checks and stores agents' batches; the database must be open (masters.store.open_store)."""

    def __init__(self, clients: dict[str, ClientRegistration]) -> None:
        self.clients = clients
        self.enabled = any(c.kind == "agent" for c in clients.values())
        if self.enabled:  # masters without agents keep no audit tables
            migrate(db.obj, "audit", MIGRATIONS)

    def ingest(self, client: ClientRegistration, request: Request) -> dict[str, Any]:
        host, events = self._batch(client, request.args)
        status = request.args.get("status")
        if status is not None and not (isinstance(status, dict) and all(_count(status.get(f)) for f in _STATUS_FIELDS)):
            raise Refused("bad_request", f"status needs non-negative integers {', '.join(_STATUS_FIELDS)}")
        kept: dict[str, dict[str, Any]] = {}
        rejected: list[dict[str, Any]] = []
        for index, event in enumerate(events):
            reason = event_problem(event, host)
            if reason is None and event["id"] in kept:
                reason = "the same id twice in one batch"
            if reason is None:
                kept[event["id"]] = event
            else:
                event_id = event.get("id") if isinstance(event, dict) and isinstance(event.get("id"), str) else None
                rejected.append({"index": index, "id": event_id[:255] if event_id else None, "reason": reason})
        stored = self._store(client, host, list(kept.values()))
        if status is not None:
            self._heartbeat(host, status)
        return {"acked": list(kept), "stored": stored, "rejected": rejected}

    def read(self, request: Request) -> dict[str, Any]:
        """audit_read: a page of what this master stored, for the bot (masters.clients lets only chat clients)."""
        return read_page(self.enabled, request.args)

    @staticmethod
    def _batch(client: ClientRegistration, args: dict[str, Any]) -> tuple[str, list[Any]]:
        host, events = args.get("host"), args.get("events", [])
        if host != client.host:  # an agent key ships its own server's events only
            raise Refused("wrong_host", f"client {client.id} ships events of {client.host}, not {str(host)[:64]!r}")
        if not isinstance(events, list):
            raise Refused("bad_request", "events must be a list")
        if len(events) > MAX_BATCH_EVENTS:
            raise Refused("batch_too_large", f"{len(events)} events in one batch; at most {MAX_BATCH_EVENTS}",
                          cap=MAX_BATCH_EVENTS)
        return host, events

    @staticmethod
    def _store(client: ClientRegistration, host: str, events: list[dict[str, Any]]) -> int:
        if not events:
            return 0
        received = now_ms()
        rows = [{"id": e["id"], "host": host, "kind": e["kind"], "at": e["at"], "received_at": received,
                 "sender": client.id, "data": e["data"]} for e in events]
        stored = 0
        with db.atomic():
            for start in range(0, len(rows), 100):  # bounded statements, whatever the backend's limits
                query = AuditEvent.insert_many(rows[start:start + 100]).on_conflict_ignore().as_rowcount()
                stored += query.execute()
        return stored

    @staticmethod
    def _heartbeat(host: str, status: dict[str, Any]) -> None:
        values = {f: status[f] for f in _STATUS_FIELDS} | {"last_seen": now_ms()}
        with db.atomic():  # update, else insert: portable across SQLite, MariaDB and PostgreSQL
            if not AuditAgent.update(**values).where(AuditAgent.host == host).execute():
                AuditAgent.insert(host=host, **values).on_conflict_ignore().execute()


def read_page(enabled: bool, args: dict[str, Any]) -> dict[str, Any]:
    """One page of stored events after the cursor (`after` ms, `after_id`), oldest received first, and
    the heartbeat rows seen since `agents_since` (ms; 0 for all, absent for none).

    `now` is this master's clock before the read: every batch received earlier than `now` minus the
    time a batch takes to commit is in this page or before the cursor. `more` says a page was cut
    short (by `limit` or by size): read again from its last event."""
    after, after_id = args.get("after", 0), args.get("after_id", "")
    limit, agents_since = args.get("limit", DEFAULT_READ_EVENTS), args.get("agents_since")
    if not _count(after) or not isinstance(after_id, str) or len(after_id) > 255:
        raise Refused("bad_request", "after must be epoch milliseconds and after_id an event id")
    if not _count(limit) or not 1 <= limit <= MAX_READ_EVENTS:
        raise Refused("bad_request", f"limit must be 1 to {MAX_READ_EVENTS}")
    if agents_since is not None and not _count(agents_since):
        raise Refused("bad_request", "agents_since must be epoch milliseconds")
    now = now_ms()
    if not enabled:  # no agent registered here: nothing was ever stored
        return {"now": now, "events": [], "more": False, "agents": []}
    query = (AuditEvent.select()
             .where((AuditEvent.received_at > after) | ((AuditEvent.received_at == after) & (AuditEvent.id > after_id)))
             .order_by(AuditEvent.received_at, AuditEvent.id).limit(limit))
    events: list[dict[str, Any]] = []
    size = 0
    for row in query:
        events.append({"id": row.id, "host": row.host, "kind": row.kind, "at": row.at,
                       "received_at": row.received_at, "data": row.data})
        size += len(dumps(row.data))
        if size >= MAX_READ_BYTES:
            break
    agents = [] if agents_since is None else [
        {"host": a.host, "last_seen": a.last_seen, **{f: getattr(a, f) for f in _STATUS_FIELDS}}
        for a in AuditAgent.select().where(AuditAgent.last_seen >= agents_since).order_by(AuditAgent.host)]
    return {"now": now, "events": events, "more": len(events) == limit or size >= MAX_READ_BYTES, "agents": agents}


def event_problem(event: Any, host: str) -> str | None:
    """Why this event cannot be stored, or None when it can."""
    if not isinstance(event, dict):
        return "an event must be an object"
    size = len(dumps(event))
    if size > MAX_EVENT_BYTES:
        return f"oversized: {size} bytes, the cap is {MAX_EVENT_BYTES}"
    event_id = event.get("id")
    if not isinstance(event_id, str) or not event_id.startswith(host + ":") \
            or not _EVENT_ID_TAIL.fullmatch(event_id[len(host) + 1:]):
        return f"id must be {host}:BOOT_ID:SOURCE:SEQUENCE"
    if event.get("kind") not in EVENT_KINDS:
        return f"kind must be one of {', '.join(EVENT_KINDS)}"
    if not _count(event.get("at")):
        return "at must be epoch milliseconds"
    if not isinstance(event.get("data"), dict):
        return "data must be an object"
    if set(event) - {"id", "kind", "at", "data"}:
        return f"unknown fields: {', '.join(sorted(set(event) - {'id', 'kind', 'at', 'data'}))[:200]}"
    return None


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63
