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

import hashlib
import logging
import re
import threading
from collections.abc import Mapping
from typing import Any

import peewee
from playhouse.migrate import SchemaMigrator
from playhouse.migrate import migrate as run_migration

from ombot.envelope import Refused, Request, dumps
from ombot.masters.store import BaseModel, db
from ombot.clock import now_ms
from ombot.masters.ingest_budget import IngestBudget
from ombot.masters import metrics
from ombot.config import ClientRegistration, MasterSettings
from ombot.storage import JSONField, create_tables, migrate

log = logging.getLogger("ombot.master")

MAX_BATCH_EVENTS = 1000
MAX_EVENT_BYTES = 32 * 1024  # one event as JSON; the agent truncates command text well below this
EVENT_KINDS = ("command", "dropped", "notice")
# host:boot-id:source:sequence; the host part is checked against the sender's registration
_EVENT_ID_TAIL = re.compile(r"^[0-9a-f-]{1,64}:[a-z][a-z0-9_.-]{0,31}:[0-9]{1,19}$")
_STATUS_FIELDS = ("spool_depth", "dropped_total", "sent_total")
MAX_PROBLEM_CHARS = 500  # a heartbeat's `problem`: what the agent says is wrong with it
_VERSION = re.compile(r"[ -~]{1,64}")  # a heartbeat's `version`: printable ASCII
_SOURCE = re.compile(r"[a-z][a-z0-9_-]{0,15}")  # a capture layer's name in a heartbeat's `sources`
MAX_SOURCES = 8
FUTURE_MS = 60_000  # an event dated later than its arrival by more than this is stored at its arrival
PULLED_MARGIN_MS = 3_600_000  # events every reader pulled are deleted this long after (a reader behind it)
PRUNE_SECONDS = 60.0  # at most; more often for a retention under four minutes
RATE_NOTICE_MS = 60_000  # at most one "ingest limit hit" notice per host this often
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
    problem = peewee.TextField(null=True)  # what the agent says is wrong with it; None when nothing is
    version = peewee.CharField(max_length=64, null=True)  # the agent's software ("ombot-agent 0.2.0"); None: older
    sources = JSONField(null=True)  # what it captures: ["spool"] or ["spool", "auditd"]; None: an older agent


class AuditReader(BaseModel):
    """How far each reading client (the bot, one per bot database) has pulled this master's events:
    what every reader has read is deleted here (masters keep events only until the bot has them)."""

    reader = peewee.CharField(max_length=64, primary_key=True)  # the client id that reads
    after = peewee.BigIntegerField()  # its cursor: it holds every event received before this (epoch ms)
    read_at = peewee.BigIntegerField()


def _index_received(db: peewee.Database) -> None:
    """audit_read pages through (received_at, id)."""
    run_migration(SchemaMigrator.from_database(db).add_index("auditevent", ("received_at", "id")))


def _agent_problem_and_readers(db: peewee.Database) -> None:
    """Heartbeats say what is wrong with an agent (a database made since has the column: step 1
    creates the current model); readers' cursors let the master prune."""
    columns = [d[0] for d in db.execute_sql("SELECT * FROM auditagent WHERE 1 = 0").description]
    if "problem" not in columns:
        run_migration(SchemaMigrator.from_database(db).add_column("auditagent", "problem",
                                                                  peewee.TextField(null=True)))
    with db.bind_ctx([AuditReader]):
        db.create_tables([AuditReader])


def _agent_version_and_sources(db: peewee.Database) -> None:
    """Heartbeats say which agent software sends them and what it captures (`ombot audit agents`); a
    database made since has the columns (step 1 creates the current model)."""
    columns = [d[0] for d in db.execute_sql("SELECT * FROM auditagent WHERE 1 = 0").description]
    migrator = SchemaMigrator.from_database(db)
    if "version" not in columns:
        run_migration(migrator.add_column("auditagent", "version", peewee.CharField(max_length=64, null=True)))
    if "sources" not in columns:
        run_migration(migrator.add_column("auditagent", "sources", JSONField(null=True)))


# Append-only: a new step goes at the end, never edit one that has shipped.
MIGRATIONS = [create_tables(AuditEvent, AuditAgent), _index_received, _agent_problem_and_readers,
              _agent_version_and_sources]


class AuditIngest:
    """Checks and stores agents' batches; the database must be open (masters.store.open_store).

    `clients` is read live (the master's registry): the audit tables are made when the first agent is
    accepted, at start or when an admin adds one; masters that never had an agent keep none."""

    def __init__(self, clients: Mapping[str, ClientRegistration], settings: MasterSettings) -> None:
        self.clients, self.settings = clients, settings
        self.budget = IngestBudget(settings.limits)
        self._readers: dict[str, int] = {}  # reader -> the cursor last kept (saves a write per poll)
        self._rate_noticed: dict[str, int] = {}  # host -> when its last "ingest limit" notice was stored
        # this master's own notices: a source name unique to it, within the event id grammar
        self._source = "master." + hashlib.sha256(settings.id.encode()).hexdigest()[:12]
        self._enabled = False
        self._lock = threading.Lock()
        self.enabled()  # the tables now, if an agent is registered

    def enabled(self) -> bool:
        """Whether this master has the audit tables: once an agent was accepted here, for good."""
        if not self._enabled and any(c.kind == "agent" for c in self.clients.values()):
            with self._lock:
                if not self._enabled:
                    migrate(db.obj, "audit", MIGRATIONS)
                    self._enabled = True
        return self._enabled

    def ingest(self, client: ClientRegistration, request: Request) -> dict[str, Any]:
        host, events = self._batch(client, request.args)
        if not self.enabled():  # an agent revoked since its frame opened: nothing to store it in
            raise Refused("revoked", f"client {client.id} was revoked at this master")
        status = _status(request.args.get("status"), getattr(request, "software", ""))
        kept, rejected = _checked(events, host)
        taken, wait = self.budget.take(host, [size for _, size in kept])
        stored = self._store(client, host, [event for event, _ in kept[:taken]])
        metrics.audit_batch(stored, taken - stored, len(rejected), len(kept) - taken)
        if status is not None:
            self._heartbeat(host, status)
        reply: dict[str, Any] = {"acked": [event["id"] for event, _ in kept[:taken]], "stored": stored,
                                 "rejected": rejected}
        if taken < len(kept):  # the rest waits in the agent's queue; one notice a minute says so
            reply |= {"retry_after": wait, "deferred": len(kept) - taken}
            self._rate_notice(client, host, len(kept) - taken)
        return reply

    def read(self, request: Request) -> dict[str, Any]:
        """audit_read: a page of what this master stored, for the bot (masters.clients lets only chat
        clients). Its cursor is the reader's word that it holds every event before it: kept, for pruning."""
        page = read_page(self.enabled(), request.args)
        if self.enabled():
            self._reader_at(request.sender, min(int(request.args.get("after", 0)), page["now"]))
        return page

    def _reader_at(self, reader: str, after: int) -> None:
        if self._readers.get(reader, -1) >= after:
            return  # not moved: no write
        values = {"after": after, "read_at": now_ms()}
        with db.atomic():
            if not AuditReader.update(**values).where(AuditReader.reader == reader).execute():
                AuditReader.insert(reader=reader, **values).on_conflict_ignore().execute()
        self._readers[reader] = after

    def prune(self) -> None:
        """Delete what every reader has pulled (an hour behind the slowest), and whatever is older than
        `audit_retention_days`, pulled or not (saying how many were never pulled)."""
        if not self._enabled:
            return
        try:
            deleted, unpulled = prune_events(now_ms(), int(self.settings.audit_retention_days * 86_400_000))
        except Exception:  # the database may be away a moment: the next run tries again
            log.exception("could not prune the audit tables")
            return
        if unpulled:
            log.warning("deleted %d audit event(s) past audit_retention_days that no reader had pulled", unpulled)
        elif deleted:
            log.debug("deleted %d audit event(s) the bot has", deleted)

    def _rate_notice(self, client: ClientRegistration, host: str, deferred: int) -> None:
        """A notice of this master's own in the host's stream: its agent sends faster than it may."""
        now = now_ms()
        if now - self._rate_noticed.get(host, 0) < RATE_NOTICE_MS:
            return
        self._rate_noticed[host] = now
        limits = self.settings.limits
        problem = (f"{host}'s agent sends faster than master {self.settings.id} takes ({limits.ingest_events_per_second} "
                   f"events and {limits.ingest_bytes_per_second} bytes a second): {deferred} event(s) wait on {host}")
        log.warning("audit ingest limit: %s", problem)
        event = {"id": f"{host}:0:{self._source}:{now}", "kind": "notice", "at": now,
                 "data": {"code": "ingest_rate", "problem": problem, "deferred": deferred, "master": self.settings.id}}
        self._store(client, host, [event])

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
        rows = [{"id": e["id"], "host": host, "kind": e["kind"], "received_at": received, "sender": client.id,
                 **({"at": e["at"], "data": e["data"]} if e["at"] <= received + FUTURE_MS else  # else: its arrival
                    {"at": received, "data": {**e["data"], "agent_at": e["at"]}})} for e in events]
        stored = 0
        with db.atomic():
            for start in range(0, len(rows), 100):  # bounded statements, whatever the backend's limits
                query = AuditEvent.insert_many(rows[start:start + 100]).on_conflict_ignore().as_rowcount()
                stored += query.execute()
        return stored

    @staticmethod
    def _heartbeat(host: str, status: dict[str, Any]) -> None:
        values = {f: status[f] for f in _STATUS_FIELDS} | {"last_seen": now_ms(), "problem": status.get("problem"),
                                                           "version": status.get("version"),
                                                           "sources": status.get("sources")}
        with db.atomic():  # update, else insert: portable across SQLite, MariaDB and PostgreSQL
            if not AuditAgent.update(**values).where(AuditAgent.host == host).execute():
                AuditAgent.insert(host=host, **values).on_conflict_ignore().execute()
        with HEARD:
            HEARD.notify_all()


HEARD = threading.Condition()  # notified whenever a heartbeat is stored: a rollout waits on it


def wait_for_heartbeat(host: str, since_ms: int, timeout: float) -> int | None:
    """When this master heard `host`'s agent at `since_ms` or later, waiting up to `timeout` seconds."""
    found: int | None = None

    def heard() -> bool:
        nonlocal found
        found = heartbeat_since(host, since_ms)
        return found is not None

    with HEARD:
        HEARD.wait_for(heard, timeout)
    return found


def heartbeat_since(host: str, since_ms: int) -> int | None:
    """When this master last heard `host`'s agent, if that was at `since_ms` or later (a rollout waits on it)."""
    try:
        row = AuditAgent.get_or_none(AuditAgent.host == host)
    except peewee.DatabaseError:  # no audit tables yet: the first agent's first batch makes them
        return None
    return int(row.last_seen) if row is not None and row.last_seen >= since_ms else None


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
        {"host": a.host, "last_seen": a.last_seen, "problem": a.problem, **{f: getattr(a, f) for f in _STATUS_FIELDS}}
        for a in AuditAgent.select().where(AuditAgent.last_seen >= agents_since).order_by(AuditAgent.host)]
    return {"now": now, "events": events, "more": len(events) == limit or size >= MAX_READ_BYTES, "agents": agents}


def prune_events(now: int, retention_ms: int, margin_ms: int = PULLED_MARGIN_MS) -> tuple[int, int]:
    """Delete events every recent reader has pulled (`margin_ms` behind the slowest) and those older
    than the retention; (deleted, of those never pulled). Readers silent for longer than the
    retention no longer hold anything back."""
    retained = now - retention_ms
    AuditReader.delete().where(AuditReader.read_at < retained).execute()
    cursors = [r.after for r in AuditReader.select(AuditReader.after)]
    pulled = min(cursors) - margin_ms if cursors else None
    cutoff = retained if pulled is None else max(retained, pulled)
    unpulled = AuditEvent.select().where((AuditEvent.received_at < retained)
                                         & (AuditEvent.received_at >= (pulled or 0))).count()
    deleted = AuditEvent.delete().where(AuditEvent.received_at < cutoff).execute()
    return int(deleted), int(unpulled)


def _status(status: Any, software: str = "") -> dict[str, Any] | None:
    """The heartbeat: counters, what the agent says is wrong with it (a short text), if anything, and,
    from agents since 0.2.0, its `version` and `sources` (older agents send neither: still accepted).
    `software` is the envelope's "sw", where the sender gave one: the version when the status has none."""
    if status is None:
        return None
    if not (isinstance(status, dict) and all(_count(status.get(f)) for f in _STATUS_FIELDS)):
        raise Refused("bad_request", f"status needs non-negative integers {', '.join(_STATUS_FIELDS)}")
    problem = status.get("problem")
    if problem is not None and not (isinstance(problem, str) and len(problem) <= MAX_PROBLEM_CHARS):
        raise Refused("bad_request", f"status.problem must be text of at most {MAX_PROBLEM_CHARS} characters")
    version = status.get("version") or software or None
    if version is not None and not (isinstance(version, str) and _VERSION.fullmatch(version)):
        raise Refused("bad_request", "status.version must be printable text of at most 64 characters")
    sources = status.get("sources")
    if sources is not None and not (isinstance(sources, list) and len(sources) <= MAX_SOURCES
                                    and all(isinstance(s, str) and _SOURCE.fullmatch(s) for s in sources)):
        raise Refused("bad_request", f"status.sources must be a list of at most {MAX_SOURCES} short names "
                                     "(spool, auditd)")
    return {**status, "version": version, "sources": sources}


def _checked(events: list[Any], host: str) -> tuple[list[tuple[dict[str, Any], int]], list[dict[str, Any]]]:
    """The batch's events that may be stored, each with its size, and the reasoned refusals."""
    kept: dict[str, tuple[dict[str, Any], int]] = {}
    rejected: list[dict[str, Any]] = []
    for index, event in enumerate(events):
        size = len(dumps(event)) if isinstance(event, dict) else 0
        reason = event_problem(event, host, size)
        if reason is None and event["id"] in kept:
            reason = "the same id twice in one batch"
        if reason is None:
            kept[event["id"]] = (event, size)
        else:
            event_id = event.get("id") if isinstance(event, dict) and isinstance(event.get("id"), str) else None
            rejected.append({"index": index, "id": event_id[:255] if event_id else None, "reason": reason})
    return list(kept.values()), rejected


def event_problem(event: Any, host: str, size: int | None = None) -> str | None:
    """Why this event cannot be stored, or None when it can; `size` is its JSON length, if known."""
    if not isinstance(event, dict):
        return "an event must be an object"
    size = len(dumps(event)) if size is None else size
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
