"""The clients a master accepts, live: ombot.toml's `accept` list at start, overlaid by what the
`registry` operation added and revoked since, which each master keeps in its own database.

Why a signed operation each master persists: masters usually run on their own hosts, with their
own databases, so a file edited where `ombot` runs cannot reach them; an admin key's envelope can,
and each master records what it was told (keyed by its own id, so masters sharing a database keep
their own lists). ombot.toml is still read at start; what a master stored overlays it:

- a revoked key is refused for good, from the very next frame (open connections included), whether
  ombot.toml or `registry add` registered it, and even though ombot.toml still lists it;
- a client added here is accepted at once, and again after a restart;
- a stored registration that collides with one of ombot.toml's (same id or same key) is ignored,
  with a warning: the operator's file wins.

`ClientRegistry` is the one live map: the envelope's Opener asks it for every frame's sender
(`sender`), and the core, the submit checks and the audit ingest read it as a Mapping of the
registrations accepted now. Readers never lock: each change builds a new snapshot and swaps it in.
`on_revoke` lets the transport learn which client ids were just revoked (to close their connections).

Keys made on the host (issue 20): an admin may enrol an agent's host *pending* (`enroll`): registered
here with no key yet, under an enrolment id every master of the IDC got from the same command. Its
key is bound later, once, in one of two ways: by this master directly (`bind`, which the rollout job
running on it calls once the host made its key), which returns a *binding certificate* this master
signs; or, on the agent's first contact with another master of the IDC, by the `bind` operation, the
one operation a key the master does not know may send, carrying that certificate: accepted only if a
master of this master's own IDC signed it, for this enrolment of a host pending here, binding the very
key that sent it, never a revoked one (docs/protocol.md, "Keys made on the host").
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
from collections.abc import Callable, ItemsView, Iterator, Mapping, ValuesView
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import peewee
from nacl.exceptions import BadSignatureError

from ombot.ratelimit import TokenBucket
from ombot.masters.audit import AuditAgent
from ombot.envelope import Refused, Request, dumps
from ombot.keys import Identity, KeyFileError, box_public, decode_public, encode_public
from ombot.masters.store import BaseModel, db
from ombot.clock import now_ms
from ombot.config import ClientRegistration, parse_registration
from ombot.errors import ConfigError, OmbotError
from ombot.storage import JSONField, create_tables, migrate
from ombot.tables import HOST_NAME

log = logging.getLogger("ombot.master")

MAX_CLIENTS = 1000  # registrations one `add` may carry, and ids plus hosts one `revoke` may name
ADDABLE_KINDS = ("agent", "cli", "console")  # never `chat`, never admin: those only through ombot.toml
ENTRY_FIELDS = ("id", "kind", "public_key", "host", "user", "modules", "hosts")
MAX_PROBLEMS = 100  # problems listed in one refusal's details
CONFIG, REGISTRY = "config", "registry"  # where an accepted registration comes from
PENDING, BOUND, REVOKED = "pending", "bound", "revoked"  # an enrolment's states (and `agents`' too)
DEFAULT_AGENTS_LISTED, MAX_AGENTS_LISTED = 200, 1000  # one page of the `agents` action
CERTIFICATE_TYPE = "ombot-agent-binding/1"  # what a binding certificate's statement says it is
CERTIFICATE_FIELDS = ("type", "host", "idc", "public_key", "bound_at", "master", "enrolment")
MAX_STATEMENT_CHARS = 1024  # a statement's JSON; a real one is about 250
MAX_BIND_FRAME = 8 * 1024  # a `bind` frame from a key the master does not know (a certificate and little else)
BIND_PER_SECOND, BIND_BURST = 20.0, 100  # binds from unknown keys, all of them together: crypto a stranger can cause
_ENROLMENT_ID = "0123456789abcdef"  # an enrolment id: 32 lowercase hex digits, made by the enrolling CLI


class RegisteredClient(BaseModel):
    """A client one master accepts because an admin added it with `registry` (ombot.toml's are not stored)."""

    master_id = peewee.CharField(max_length=64)
    client_id = peewee.CharField(max_length=64)
    kind = peewee.CharField(max_length=16)
    public_key = peewee.CharField(max_length=64)
    user = peewee.CharField(max_length=64)
    host = peewee.CharField(max_length=255)  # an agent's server; empty for other kinds
    modules = JSONField()
    hosts = JSONField()
    added_at = peewee.BigIntegerField()
    added_by = peewee.CharField(max_length=64)  # the admin client that added it

    class Meta:
        primary_key = peewee.CompositeKey("master_id", "client_id")


class RevokedKey(BaseModel):
    """A key one master refuses for good, and whose it was: never accepted, never added again."""

    master_id = peewee.CharField(max_length=64)
    public_key = peewee.CharField(max_length=64)
    client_id = peewee.CharField(max_length=64)
    kind = peewee.CharField(max_length=16)
    user = peewee.CharField(max_length=64)
    host = peewee.CharField(max_length=255)
    source = peewee.CharField(max_length=16)  # config or registry: where the registration came from
    revoked_at = peewee.BigIntegerField()
    revoked_by = peewee.CharField(max_length=64)

    class Meta:
        primary_key = peewee.CompositeKey("master_id", "public_key")


class AgentEnrolment(BaseModel):
    """An agent host one master was told to expect with a key made on the host (`enroll`): pending until
    its key is bound (then its registration is a RegisteredClient too), revoked when revoked."""

    master_id = peewee.CharField(max_length=64)
    host = peewee.CharField(max_length=255)
    client_id = peewee.CharField(max_length=64)  # agent-HOST
    enrolment = peewee.CharField(max_length=32)  # the same at every master the enrolling command reached
    state = peewee.CharField(max_length=16)  # pending, bound or revoked
    public_key = peewee.CharField(max_length=64, null=True)  # once bound
    enrolled_at = peewee.BigIntegerField()
    enrolled_by = peewee.CharField(max_length=64)
    bound_at = peewee.BigIntegerField(null=True)
    bound_by = peewee.CharField(max_length=64, null=True)  # the master that signed the certificate, or the job's
    revoked_at = peewee.BigIntegerField(null=True)
    revoked_by = peewee.CharField(max_length=64, null=True)

    class Meta:
        primary_key = peewee.CompositeKey("master_id", "host")


# Append-only: a new step goes at the end, never edit one that has shipped.
MIGRATIONS = [create_tables(RegisteredClient, RevokedKey), create_tables(AgentEnrolment)]


@dataclass(frozen=True)
class Enrolment:
    """One host's enrolment at this master, as AgentEnrolment stores it."""

    host: str
    client_id: str
    enrolment: str
    state: str
    enrolled_at: int
    enrolled_by: str
    public_key: str = ""
    bound_at: int | None = None
    bound_by: str = ""
    revoked_at: int | None = None
    revoked_by: str = ""

    def row(self, master_id: str) -> dict[str, Any]:
        """As AgentEnrolment stores it."""
        return {"master_id": master_id, "host": self.host, "client_id": self.client_id, "enrolment": self.enrolment,
                "state": self.state, "public_key": self.public_key or None, "enrolled_at": self.enrolled_at,
                "enrolled_by": self.enrolled_by, "bound_at": self.bound_at, "bound_by": self.bound_by or None,
                "revoked_at": self.revoked_at, "revoked_by": self.revoked_by or None}


@dataclass(frozen=True)
class Signer:
    """What binding needs of the master: its identity (to sign certificates), its IDC, and the public
    keys of its IDC's masters, itself included, from its ombot.toml (to check certificates)."""

    identity: Identity
    idc: str
    masters: Mapping[str, str]  # master id -> public key, this IDC's only


@dataclass(frozen=True)
class Revocation:
    """A revoked key, as `list` shows it."""

    client_id: str
    public_key: str
    kind: str
    user: str
    host: str
    source: str
    revoked_at: int
    revoked_by: str

    def as_dict(self) -> dict[str, Any]:
        """As the `list` reply carries it."""
        return {"id": self.client_id, "public_key": self.public_key, "kind": self.kind, "user": self.user,
                "host": self.host, "source": self.source, "revoked_at": self.revoked_at, "revoked_by": self.revoked_by}


@dataclass(frozen=True)
class _Snapshot:
    """What the master accepts at one moment. Built privately, then published whole and never changed:
    readers hold a reference, never a lock."""

    accepted: dict[str, ClientRegistration] = field(default_factory=dict)
    added: dict[str, tuple[int, str]] = field(default_factory=dict)  # registry ids -> (added_at, added_by)
    revoked: dict[bytes, Revocation] = field(default_factory=dict)  # by raw key
    by_key: dict[bytes, str] = field(default_factory=dict)  # raw key -> accepted client id
    enrolments: dict[str, Enrolment] = field(default_factory=dict)  # host -> its enrolment here, if any

    def source(self, client_id: str) -> str:
        return REGISTRY if client_id in self.added else CONFIG

    def revoked_ids(self) -> set[str]:
        return {r.client_id for r in self.revoked.values()}

    def agent_of(self, host: str) -> ClientRegistration | None:
        """The agent registration accepted now for `host`, however it came."""
        return next((c for c in self.accepted.values() if c.kind == "agent" and c.host == host), None)

    def copy(self) -> _Snapshot:
        """A private copy to build the next snapshot in."""
        return _Snapshot(dict(self.accepted), dict(self.added), dict(self.revoked), dict(self.by_key),
                         dict(self.enrolments))

    def accept(self, registration: ClientRegistration, added: tuple[int, str] | None = None) -> None:
        """Add a registration (from the registry when `added` says when and by whom); before publishing only."""
        self.accepted[registration.id] = registration
        self.by_key[_raw(registration.public_key)] = registration.id
        if added is not None:
            self.added[registration.id] = added


def _raw(public_key: str) -> bytes:
    return bytes(decode_public(public_key))


class ClientRegistry(Mapping[str, ClientRegistration]):
    """The registrations this master accepts now, by client id; the database must be open
    (masters.store.open_store). Thread-safe: changes are serialised, reads see one snapshot."""

    def __init__(self, master_id: str, configured: Mapping[str, ClientRegistration],
                 signer: Signer | None = None) -> None:
        """`signer`: what binding keys made on hosts needs (a master always has one; without it
        `bind` and the `bind` operation are refused)."""
        self.master_id = master_id
        self.configured = dict(configured)
        self.signer = signer
        self._lock = threading.Lock()  # one change at a time
        self._listeners: list[Callable[[set[str]], None]] = []
        self._strangers = TokenBucket(BIND_PER_SECOND, BIND_BURST)  # binds of unknown keys, all together
        self._strangers_lock = threading.Lock()
        migrate(db.obj, "registry", MIGRATIONS)
        self._state = self._load()

    # -- what the envelope, the core, the submit checks and the audit ingest read --------------------

    def sender(self, key: bytes) -> str | None:
        """The client id a sender key is accepted as now; None for a key never accepted here, and
        Refused `revoked` for a key revoked here (ombot.envelope.Opener asks for every frame)."""
        state = self._state
        client_id = state.by_key.get(key)
        if client_id is None and key in state.revoked:
            raise Refused("revoked", "the sender's key was revoked at this master")
        return client_id

    def __getitem__(self, client_id: str) -> ClientRegistration:
        """The registration of a client accepted now; KeyError for one revoked or never registered here."""
        return self._state.accepted[client_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._state.accepted)

    def __len__(self) -> int:
        return len(self._state.accepted)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._state.accepted

    def values(self) -> ValuesView[ClientRegistration]:
        """The registrations accepted now, from one snapshot: never changed under the reader."""
        return self._state.accepted.values()

    def items(self) -> ItemsView[str, ClientRegistration]:
        """(id, registration) of those accepted now, from one snapshot."""
        return self._state.accepted.items()

    def on_revoke(self, callback: Callable[[set[str]], None]) -> None:
        """Call `callback(client ids)` after each revocation is stored and in force (the transport may
        close those clients' open connections; their next frame is refused anyway). It runs on the
        thread of the revoking request, outside the registry's lock; an exception is logged, not raised."""
        self._listeners.append(callback)

    # -- the `registry` operation -----------------------------------------------------------------

    def operation(self, request: Request) -> dict[str, Any]:
        """`registry`: {"action": "add", "clients": [...]} | {"action": "enroll", "hosts": [...]} |
        {"action": "revoke", "ids": [...], "hosts": [...]} | {"action": "list"} | {"action": "agents", ...}
        (docs/protocol.md). masters.clients lets only admin keys call it."""
        action = request.args.get("action")
        if action == "list":
            return self.listing()
        if action == "agents":
            return self.agents(request.args)
        if action == "add":
            return {"master": self.master_id, "results": self.add(request.args.get("clients"), request.sender)}
        if action == "enroll":
            results, problems = self.enroll(request.args.get("hosts"), request.sender)
            return {"master": self.master_id, "results": results, "problems": problems}
        if action == "revoke":
            ids, hosts = request.args.get("ids", []), request.args.get("hosts", [])
            results = self.revoke(ids, hosts, request.sender)
            return {"master": self.master_id, "results": results, "hosts": _ids_by_host(self._state, hosts)}
        raise Refused("bad_request", "registry needs action \"add\", \"enroll\", \"revoke\", \"list\" or \"agents\"")

    def add(self, entries: Any, by: str) -> dict[str, str]:
        """Register clients here, all or none: per id `added`, or `already` (the same registration is
        accepted already). Refused, changing nothing, if any is malformed (`bad_request`), collides with
        another id or key (`conflict`) or reuses a revoked key (`revoked_key`)."""
        wanted, problems = _parse_entries(entries)
        with self._lock:
            state = self._state
            results: dict[str, str] = {}
            for index, registration in wanted:
                verdict = _verdict(state, registration)
                if verdict in ("added", "already"):
                    results[registration.id] = verdict
                else:
                    problems.append({"index": index, "id": registration.id, "code": verdict[0], "reason": verdict[1]})
            _refuse_if(problems, len(entries))
            new = [registration for _, registration in wanted if results[registration.id] == "added"]
            if new:
                self._state = self._store_added(state, new, by)
        return results

    def revoke(self, ids: Any, hosts: Any, by: str) -> dict[str, str]:
        """Revoke clients here, named by id or by an agent's host: per id `revoked`, `already` (revoked
        before) or `unknown`. An admin may not revoke itself. Revoking an agent forgets its host's heartbeat."""
        ids, hosts = _names(ids, "ids"), _names(hosts, "hosts")
        if not 0 < len(ids) + len(hosts) <= MAX_CLIENTS:
            raise Refused("bad_request", f"revoke needs 1 to {MAX_CLIENTS} ids and hosts in all")
        with self._lock:
            state = self._state
            targets = _targets(state, ids, hosts)
            if by in targets:
                raise Refused("not_permitted", f"client {by} may not revoke itself: revoke an admin key with another")
            gone = [state.accepted[cid] for cid in targets if cid in state.accepted]
            revoked_before = state.revoked_ids()
            results = {cid: "revoked" if cid in state.accepted else "already" if cid in revoked_before else "unknown"
                       for cid in targets}
            ended = _enrolments_ending(state, set(ids), set(hosts), {c.host for c in gone if c.kind == "agent"}, results)
            if gone or ended:
                self._state = self._store_revoked(state, gone, by, ended)
        if gone:
            self._tell({c.id for c in gone})
        return results

    # -- keys made on the host: pending enrolments, binding, certificates ---------------------------

    def enroll(self, entries: Any, by: str) -> tuple[dict[str, str], dict[str, str]]:
        """Expect agents whose hosts make their own keys: per host `pending` (enrolled now), `already`
        (pending here under this enrolment), `bound` (an agent key of it is accepted here: nothing to
        do), or a refusal code with its reason in the second map (`conflict`, `revoked`): per host, the
        others go on. A malformed request changes nothing (`bad_request`, `batch_too_large`)."""
        wanted = _parse_enrolments(entries)
        with self._lock:
            state = self._state
            results: dict[str, str] = {}
            problems: dict[str, str] = {}
            new: list[Enrolment] = []
            at = now_ms()
            for host, enrolment in wanted:
                verdict = _enrol_verdict(state, host, enrolment)
                results[host] = verdict if isinstance(verdict, str) else verdict[0]
                if isinstance(verdict, tuple):
                    problems[host] = verdict[1]
                elif verdict == PENDING:
                    new.append(Enrolment(host, _agent_id(host), enrolment, PENDING, at, by))
            if new:
                self._state = self._store_enrolments(state, new)
        return results, problems

    def bind(self, host: str, public_key: str, by: str) -> dict[str, str]:
        """Bind the key `host` made itself (the rollout job, on this master, once the host printed it):
        only for a host pending here, or bound here to this very key already; never a revoked key.
        Returns the binding certificate this master signs (the rollout writes it to the host as
        /etc/ombot/agent.binding: it is not secret). Refused, with the reason, otherwise."""
        signer = self._signer()
        _usable(public_key)
        with self._lock:
            row, already = _bindable(self._state, host, public_key, None, signer.idc)
            if not already:
                self._state = self._store_bound(self._state, row, public_key, by)
            row = self._state.enrolments[host]
        if not already:
            log.info("bound %s's key (made on the host) for %s", host, by)
        return certificate(signer, self.master_id, row)

    def admit_bind(self, frame: object) -> None:
        """Before a `bind` frame is opened: one from a key this master does not know costs crypto anyone
        can cause, so all of those together get BIND_PER_SECOND after a burst (`busy`, `retry_after`)."""
        if type(frame) is not bytes or len(frame) < 36:
            return  # the opener refuses it, at no cost
        try:
            if self.sender(frame[4:36]) is not None:
                return  # an agent bound already: no stranger
        except Refused:
            return  # revoked: the opener refuses it
        with self._strangers_lock:
            wait = self._strangers.take()
        if wait:
            raise Refused("busy", "too many binds from unregistered keys at this master: try again later",
                          retry_after=round(max(wait, 0.1), 1))

    def bind_request(self, request: Request, sender_key: bytes) -> dict[str, Any]:
        """The `bind` operation: bind the sending key to the host of the certificate it carries (see
        `_verified`); `already` when it is bound to it here. The sender's registration, if it has one,
        was checked by the caller (masters.core)."""
        signer = self._signer()
        statement = _verified(request.args.get("certificate"), signer)
        host, public_key = statement["host"], encode_public(_verify_key(sender_key))
        if statement["public_key"] != public_key:
            raise Refused("wrong_key", "the certificate binds another key than the one that sent it")
        if request.requester != f"agent:{host}" or request.origin != "agent":
            raise Refused("bad_requester", f"a bind for {host} comes from agent:{host}, origin agent")
        with self._lock:
            row, already = _bindable(self._state, host, public_key, statement["enrolment"], signer.idc)
            if not already:
                self._state = self._store_bound(self._state, row, public_key, f"certificate:{statement['master']}"[:64])
        if not already:
            log.info("bound %s's key on its first contact (certificate of %s)", host, statement["master"])
        return {"master": self.master_id, "host": host, "id": row.client_id, "result": "already" if already else BOUND}

    def agents(self, args: dict[str, Any]) -> dict[str, Any]:
        """The `agents` action: every agent host this master knows (accepted, pending or revoked), in host
        order after `after`, at most `limit`, or only `hosts`; with its last heartbeat here, if any."""
        after, limit, hosts = _agents_query(args)
        state = self._state
        rows = _agent_rows(state)
        names = sorted(h for h in rows if h > after and (hosts is None or h in hosts))
        page = names[:limit]
        beats = _heartbeats(page)
        agents = [{**rows[h], **beats.get(h, {})} for h in page]
        return {"master": self.master_id, "agents": agents, "more": len(names) > limit}

    def binding_of(self, request: Request) -> dict[str, Any]:
        """The `binding` operation: the certificate of the asking agent's own key, bound here through its
        enrolment, for the agent to show the IDC's other masters (a rollout binds the key at the master
        that ran it). A key enrolled with `--out` is registered at every master already: it has none."""
        client = self._state.accepted.get(request.sender)
        with self._lock:
            row = self._state.enrolments.get(client.host) if client is not None and client.host else None
        if client is None or row is None or row.state != BOUND or row.public_key != client.public_key:
            raise Refused("no_binding", "this key was not bound here through an enrolment: it needs no certificate")
        return {"certificate": certificate(self._signer(), self.master_id, row)}

    def _signer(self) -> Signer:
        if self.signer is None:
            raise OmbotError(f"master {self.master_id}'s registry has no identity to sign binding certificates with")
        return self.signer

    def listing(self) -> dict[str, Any]:
        """Every registration accepted now, with its source, and the keys revoked here, with when and by whom."""
        state = self._state
        clients = [{"id": c.id, "kind": c.kind, "source": state.source(c.id), "user": c.user, "host": c.host,
                    "admin": c.admin, "public_key": c.public_key, "modules": list(c.modules), "hosts": list(c.hosts),
                    **_added(state, c.id)} for c in sorted(state.accepted.values(), key=lambda c: c.id)]
        revoked = sorted((r.as_dict() for r in state.revoked.values()), key=lambda r: (r["revoked_at"], r["id"]))
        pending = [{"id": e.client_id, "host": e.host, "enrolment": e.enrolment, "enrolled_at": e.enrolled_at,
                    "enrolled_by": e.enrolled_by} for e in sorted(state.enrolments.values(), key=lambda e: e.host)
                   if e.state == PENDING and state.agent_of(e.host) is None]
        return {"master": self.master_id, "clients": clients, "revoked": revoked, "pending": pending}

    # -- storage ------------------------------------------------------------------------------------

    def _load(self) -> _Snapshot:
        mine = RevokedKey.master_id == self.master_id
        revoked = {_raw(row.public_key): _revocation(row) for row in RevokedKey.select().where(mine)}
        state = _Snapshot(revoked=revoked)
        for registration in self.configured.values():
            if _raw(registration.public_key) not in revoked:
                state.accept(registration)
        stored = RegisteredClient.select().where(RegisteredClient.master_id == self.master_id)
        for row in stored.order_by(RegisteredClient.added_at, RegisteredClient.client_id):
            registration = _registration(row)
            clash = _verdict(state, registration)
            if clash != "added":
                log.warning("ignoring client %s added with `registry`: %s", row.client_id,
                            "ombot.toml registers it already" if clash == "already" else clash[1])
                continue
            state.accept(registration, (row.added_at, row.added_by))
        for e in AgentEnrolment.select().where(AgentEnrolment.master_id == self.master_id):
            state.enrolments[e.host] = _enrolment(e)
        return state

    def _store_added(self, state: _Snapshot, new: list[ClientRegistration], by: str) -> _Snapshot:
        at = now_ms()
        rows = [{"master_id": self.master_id, "client_id": c.id, "kind": c.kind, "public_key": c.public_key,
                 "user": c.user, "host": c.host, "modules": list(c.modules), "hosts": list(c.hosts),
                 "added_at": at, "added_by": by} for c in new]
        with db.atomic():
            for start in range(0, len(rows), 100):  # bounded statements, whatever the backend's limits
                RegisteredClient.insert_many(rows[start:start + 100]).execute()
        state = state.copy()
        for registration in new:
            state.accept(registration, (at, by))
        return state

    def _store_revoked(self, state: _Snapshot, gone: list[ClientRegistration], by: str,
                       ended: list[Enrolment]) -> _Snapshot:
        at = now_ms()
        revocations = {_raw(c.public_key): Revocation(c.id, c.public_key, c.kind, c.user, c.host, state.source(c.id),
                                                      at, by) for c in gone}
        closed = {e.host: replace(e, state=REVOKED, revoked_at=at, revoked_by=by) for e in ended}
        with db.atomic():
            for revocation in revocations.values():
                RevokedKey.insert(master_id=self.master_id, **_row(revocation)).on_conflict_ignore().execute()
            if gone:
                RegisteredClient.delete().where((RegisteredClient.master_id == self.master_id)
                                                & RegisteredClient.client_id.in_([c.id for c in gone])).execute()
            for e in closed.values():
                AgentEnrolment.update(state=REVOKED, revoked_at=at, revoked_by=by).where(
                    (AgentEnrolment.master_id == self.master_id) & (AgentEnrolment.host == e.host)).execute()
            _forget_heartbeats({c.host for c in gone if c.kind == "agent"})
        accepted = {cid: c for cid, c in state.accepted.items() if _raw(c.public_key) not in revocations}
        return _Snapshot(accepted, {cid: a for cid, a in state.added.items() if cid in accepted},
                         {**state.revoked, **revocations}, {k: cid for k, cid in state.by_key.items() if cid in accepted},
                         {**state.enrolments, **closed})

    def _store_enrolments(self, state: _Snapshot, new: list[Enrolment]) -> _Snapshot:
        """Pending enrolments, each replacing a revoked one of its host (a host enrolled anew)."""
        hosts = [e.host for e in new]
        with db.atomic():
            for start in range(0, len(new), 100):  # bounded statements, whatever the backend's limits
                chunk = hosts[start:start + 100]
                AgentEnrolment.delete().where((AgentEnrolment.master_id == self.master_id)
                                              & AgentEnrolment.host.in_(chunk)).execute()
                AgentEnrolment.insert_many([e.row(self.master_id) for e in new[start:start + 100]]).execute()
        state = state.copy()
        state.enrolments.update({e.host: e for e in new})
        return state

    def _store_bound(self, state: _Snapshot, row: Enrolment, public_key: str, by: str) -> _Snapshot:
        """A pending host's key, now accepted (a registration like an `add`'s) and its enrolment bound."""
        at = now_ms()
        registration = ClientRegistration(id=row.client_id, public_key=public_key, kind="agent", user=row.client_id,
                                          host=row.host)
        bound = replace(row, state=BOUND, public_key=public_key, bound_at=at, bound_by=by)
        with db.atomic():
            RegisteredClient.insert(master_id=self.master_id, client_id=row.client_id, kind="agent",
                                    public_key=public_key, user=row.client_id, host=row.host, modules=[], hosts=[],
                                    added_at=at, added_by=by).execute()
            AgentEnrolment.update(state=BOUND, public_key=public_key, bound_at=at, bound_by=by).where(
                (AgentEnrolment.master_id == self.master_id) & (AgentEnrolment.host == row.host)).execute()
        state = state.copy()
        state.accept(registration, (at, by))
        state.enrolments[row.host] = bound
        return state

    def _tell(self, client_ids: set[str]) -> None:
        for callback in list(self._listeners):
            try:
                callback(client_ids)
            except Exception:
                log.exception("an on_revoke callback failed for %s", ", ".join(sorted(client_ids)))


# -- helpers --------------------------------------------------------------------------------------------


def _verdict(state: _Snapshot, wanted: ClientRegistration) -> str | tuple[str, str]:
    """`added` (it may be), `already` (the same registration is accepted), or (code, reason) refusing it."""
    key = _raw(wanted.public_key)
    if key in state.revoked:
        gone = state.revoked[key]
        return "revoked_key", (f"{wanted.id}: this key was revoked here (as {gone.client_id}, by {gone.revoked_by}); "
                               "a revoked key is never accepted again: make a new one")
    existing = state.accepted.get(wanted.id)
    if existing is not None:
        if existing.public_key != wanted.public_key:
            return "conflict", f"{wanted.id} is registered here with another key: revoke it first"
        if _settings(existing) != _settings(wanted):
            return "conflict", f"{wanted.id} is registered here with other settings: revoke it first"
        return "already"
    owner = state.by_key.get(key)
    if owner is not None:
        return "conflict", f"{wanted.id}: this key is already {owner}'s here"
    return "added"


def _settings(c: ClientRegistration) -> tuple[Any, ...]:
    return c.kind, c.user, c.host, tuple(c.modules), tuple(c.hosts), c.admin


def _parse_entries(entries: Any) -> tuple[list[tuple[int, ClientRegistration]], list[dict[str, Any]]]:
    """The registrations an `add` asks for, and the problems of those that cannot be registrations."""
    if not isinstance(entries, list) or not entries:
        raise Refused("bad_request", "add needs clients: a non-empty list of registrations")
    if len(entries) > MAX_CLIENTS:
        raise Refused("batch_too_large", f"{len(entries)} registrations in one request; at most {MAX_CLIENTS}",
                      cap=MAX_CLIENTS)
    wanted: list[tuple[int, ClientRegistration]] = []
    problems: list[dict[str, Any]] = []
    for index, entry in enumerate(entries):
        try:
            wanted.append((index, _entry(entry)))
        except Refused as refused:
            client_id = entry.get("id") if isinstance(entry, dict) and isinstance(entry.get("id"), str) else None
            problems.append({"index": index, "id": client_id and client_id[:64], "code": refused.code,
                             "reason": refused.message})
    for what, seen in (("id", [c.id for _, c in wanted]), ("public key", [c.public_key for _, c in wanted])):
        twice = sorted({v for v in seen if seen.count(v) > 1}) if len(set(seen)) != len(seen) else []
        if twice:
            problems.append({"index": None, "id": None, "code": "bad_request",
                             "reason": f"the same {what} twice in one request: {', '.join(twice[:5])[:300]}"})
    return wanted, problems


def _entry(entry: Any) -> ClientRegistration:
    """One registration of an `add`, checked by ombot.toml's `[clients.ID]` rules, and more: kinds an
    admin may add, a user for cli and console keys, and a key the master can use."""
    if not isinstance(entry, dict):
        raise Refused("bad_request", "a registration must be an object")
    unknown = sorted(str(k)[:32] for k in entry if k not in ENTRY_FIELDS)
    if unknown:  # key_file, admin...: nothing else is ever registered this way
        raise Refused("bad_request", f"unknown field(s) {', '.join(unknown)}; known: {', '.join(ENTRY_FIELDS)}")
    client_id, kind = entry.get("id"), entry.get("kind")
    if not isinstance(client_id, str):
        raise Refused("bad_request", "a registration needs an id (a name, as in ombot.toml)")
    if kind not in ADDABLE_KINDS:
        raise Refused("bad_request", f"{client_id[:64]}: kind must be one of {', '.join(ADDABLE_KINDS)}; chat clients "
                                     "(the bot) and admin keys are registered only in ombot.toml")
    if kind != "agent" and "user" not in entry:
        raise Refused("bad_request", f"{client_id[:64]}: a {kind} registration needs its user")
    try:
        registration = parse_registration(Path("registry add"), client_id, {k: v for k, v in entry.items() if k != "id"})
        box_public(decode_public(registration.public_key))
    except ConfigError as exc:
        raise Refused("bad_request", str(exc)[:500]) from None
    except (KeyFileError, ValueError, RuntimeError) as exc:  # not a point the master can encrypt to
        raise Refused("bad_request", f"{client_id}: not a usable Ed25519 public key ({type(exc).__name__})") from None
    return registration


def _refuse_if(problems: list[dict[str, Any]], count: int) -> None:
    if problems:
        first = problems[0]
        raise Refused(first["code"], f"{len(problems)} problem(s) in {count} registration(s), nothing changed: "
                                     f"{first['reason']}", problems=problems[:MAX_PROBLEMS])


def _names(values: Any, what: str) -> list[str]:
    if not isinstance(values, list) or not all(isinstance(v, str) and 0 < len(v) <= 255 for v in values):
        raise Refused("bad_request", f"{what} must be a list of names")
    return values


def _targets(state: _Snapshot, ids: list[str], hosts: list[str]) -> list[str]:
    """The client ids a revoke names: those given, and every agent (accepted or revoked) of each host."""
    wanted = set(hosts)
    agents = [c.id for c in state.accepted.values() if c.kind == "agent" and c.host in wanted]
    agents += [r.client_id for r in state.revoked.values() if r.kind == "agent" and r.host in wanted]
    return list(dict.fromkeys([*ids, *agents]))


def _ids_by_host(state: _Snapshot, hosts: list[str]) -> dict[str, list[str]]:
    """For a revoke's reply: the ids of the agents (and enrolments) each named host had here."""
    found: dict[str, set[str]] = {host: set() for host in hosts}
    agents = [(c.host, c.id) for c in state.accepted.values() if c.kind == "agent"]
    agents += [(r.host, r.client_id) for r in state.revoked.values() if r.kind == "agent"]
    agents += [(e.host, e.client_id) for e in state.enrolments.values()]
    for host, client_id in agents:
        if host in found:
            found[host].add(client_id)
    return {host: sorted(ids) for host, ids in found.items()}


def _forget_heartbeats(hosts: set[str]) -> None:
    """A revoked agent's host is no longer watched: its heartbeat row goes, so the bot does not judge
    it silent. Masters that never had an agent have no such table: a savepoint keeps the transaction."""
    if not hosts:
        return
    try:
        with db.atomic():
            AuditAgent.delete().where(AuditAgent.host.in_(sorted(hosts))).execute()
    except peewee.DatabaseError:
        log.debug("no audit heartbeat table to forget %s in", ", ".join(sorted(hosts)))


def _added(state: _Snapshot, client_id: str) -> dict[str, Any]:
    added = state.added.get(client_id)
    return {"added_at": added[0], "added_by": added[1]} if added else {}


def _registration(row: RegisteredClient) -> ClientRegistration:
    return ClientRegistration(id=row.client_id, public_key=row.public_key, kind=row.kind, user=row.user,
                              modules=tuple(row.modules), hosts=tuple(row.hosts), host=row.host)


def _revocation(row: RevokedKey) -> Revocation:
    return Revocation(row.client_id, row.public_key, row.kind, row.user, row.host, row.source, row.revoked_at,
                      row.revoked_by)


def _row(revocation: Revocation) -> dict[str, Any]:
    return {"public_key": revocation.public_key, "client_id": revocation.client_id, "kind": revocation.kind,
            "user": revocation.user, "host": revocation.host, "source": revocation.source,
            "revoked_at": revocation.revoked_at, "revoked_by": revocation.revoked_by}


# -- keys made on the host ----------------------------------------------------------------------------


def _agent_id(host: str) -> str:
    return f"agent-{host}"


def _parse_enrolments(entries: Any) -> list[tuple[str, str]]:
    """(host, enrolment id) of an `enroll`; the whole request refused if any is malformed."""
    if not isinstance(entries, list) or not entries:
        raise Refused("bad_request", "enroll needs hosts: a non-empty list of {\"host\", \"enrolment\"}")
    if len(entries) > MAX_CLIENTS:
        raise Refused("batch_too_large", f"{len(entries)} hosts in one request; at most {MAX_CLIENTS}", cap=MAX_CLIENTS)
    wanted: list[tuple[str, str]] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) != {"host", "enrolment"}:
            raise Refused("bad_request", f"hosts[{index}] must be exactly {{\"host\", \"enrolment\"}}")
        host, enrolment = entry["host"], entry["enrolment"]
        if not isinstance(host, str) or not HOST_NAME.fullmatch(host) or len(_agent_id(host)) > 63:
            raise Refused("bad_request", f"hosts[{index}]: {str(host)[:64]!r} is not a host name an agent can be "
                                         "enrolled for (letters, digits, '-', '_', dots; at most 57 characters)")
        if not _is_enrolment_id(enrolment):
            raise Refused("bad_request", f"hosts[{index}]: the enrolment id must be 32 lowercase hex digits")
        wanted.append((host, enrolment))
    twice = sorted({h for h, _ in wanted if [w for w, _ in wanted].count(h) > 1}) if len({h for h, _ in wanted}) \
        != len(wanted) else []
    if twice:
        raise Refused("bad_request", f"the same host twice in one request: {', '.join(twice[:5])[:300]}")
    return wanted


def _is_enrolment_id(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 32 and all(c in _ENROLMENT_ID for c in value)


def _enrol_verdict(state: _Snapshot, host: str, enrolment: str) -> str | tuple[str, str]:
    """`pending` (it may be enrolled now), `already`, `bound`, or (code, reason) refusing this host."""
    if state.agent_of(host) is not None:
        return BOUND
    other = state.accepted.get(_agent_id(host))
    if other is not None:
        return "conflict", f"{other.id} is a {other.kind} client here, not {host}'s agent"
    row = state.enrolments.get(host)
    if row is not None and row.state == PENDING:
        if row.enrolment == enrolment:
            return "already"
        return "conflict", (f"{host} is pending here under another enrolment ({row.enrolment[:8]}): revoke it "
                            f"(ombot audit revoke {host}) and enrol it again")
    if row is not None and row.enrolment == enrolment:  # revoked, or its key gone: an enrolment never comes back
        return REVOKED, f"{host}'s enrolment {enrolment[:8]} was revoked here: a new enrolment is needed"
    return PENDING


def _enrolments_ending(state: _Snapshot, ids: set[str], hosts: set[str], gone_hosts: set[str],
                       results: dict[str, str]) -> list[Enrolment]:
    """The enrolments a revoke ends (pending ones named by host or id, bound ones whose key it revokes),
    recording each pending one's id as revoked, and a revoked one's as revoked before, in `results`."""
    ended = []
    for e in state.enrolments.values():
        named = e.host in hosts or e.client_id in ids
        if e.state == PENDING and named:
            ended.append(e)
            results[e.client_id] = "revoked"
        elif e.state == BOUND and (e.host in gone_hosts or (named and state.agent_of(e.host) is None)):
            ended.append(e)
        elif e.state == REVOKED and named and results.get(e.client_id, "unknown") == "unknown":
            results[e.client_id] = "already"
    return ended


def _bindable(state: _Snapshot, host: str, public_key: str, enrolment: str | None,
              idc: str) -> tuple[Enrolment, bool]:
    """The host's enrolment, and whether it is bound to this key already; Refused with the reason when
    this key may not be bound to it here (a certificate names its `enrolment`; a direct bind none)."""
    key = _raw(public_key)
    gone = state.revoked.get(key)
    if gone is not None:
        raise Refused("revoked_key", f"this key was revoked here (as {gone.client_id}, by {gone.revoked_by}); "
                                     "a revoked key is never accepted again: the host must make a new one")
    row = state.enrolments.get(host)
    if row is None:
        raise Refused("not_enrolled", f"{host} is not enrolled here for a key made on the host: ombot audit enroll "
                                      f"{host} --idc {idc}")
    if enrolment is not None and row.enrolment != enrolment:
        raise Refused("wrong_enrolment", f"the certificate is for another enrolment of {host} ({enrolment[:8]}); "
                                         f"this master holds enrolment {row.enrolment[:8]}: an old certificate, or "
                                         "one the host was given before it was enrolled anew")
    if row.state == REVOKED:
        raise Refused("revoked", f"{host}'s enrolment was revoked here (by {row.revoked_by}): enrol it anew")
    if row.state == BOUND:
        if row.public_key == public_key:
            return row, True
        raise Refused("conflict", f"{host} is bound here to another key: revoke it first")
    owner = state.by_key.get(key)
    if owner is not None:
        raise Refused("conflict", f"this key is already {owner}'s here")
    agent = state.agent_of(host) or state.accepted.get(row.client_id)
    if agent is not None:
        raise Refused("conflict", f"{host} has a key registered here already ({agent.id}): revoke it first")
    return row, False


def certificate(signer: Signer, master_id: str, row: Enrolment) -> dict[str, str]:
    """The binding certificate of a bound enrolment: a canonical JSON statement and this master's
    Ed25519 signature of its exact bytes (docs/protocol.md, "Keys made on the host")."""
    statement = {"type": CERTIFICATE_TYPE, "host": row.host, "idc": signer.idc, "public_key": row.public_key,
                 "bound_at": row.bound_at, "master": master_id, "enrolment": row.enrolment}
    text = dumps(statement).decode()
    signature = signer.identity.signing_key.sign(text.encode()).signature
    return {"statement": text, "signature": base64.b64encode(signature).decode()}


def _verified(cert: Any, signer: Signer) -> dict[str, Any]:
    """The statement of a certificate a master of this IDC signed, or Refused saying what is wrong."""
    if not isinstance(cert, dict) or set(cert) != {"statement", "signature"} \
            or not isinstance(cert["statement"], str) or not isinstance(cert["signature"], str):
        raise Refused("bad_certificate", "certificate must be {\"statement\": TEXT, \"signature\": BASE64}")
    text, signature = cert["statement"], cert["signature"]
    if len(text) > MAX_STATEMENT_CHARS or len(signature) > 128:
        raise Refused("bad_certificate", f"a certificate's statement is at most {MAX_STATEMENT_CHARS} characters")
    try:
        raw_signature = base64.b64decode(signature, validate=True)
        statement = json.loads(text)
    except (binascii.Error, ValueError, RecursionError):
        raise Refused("bad_certificate", "the certificate is not a JSON statement with a base64 signature") from None
    if not isinstance(statement, dict) or sorted(statement) != sorted(CERTIFICATE_FIELDS) \
            or statement["type"] != CERTIFICATE_TYPE:
        raise Refused("bad_certificate", f"the statement must hold exactly {', '.join(CERTIFICATE_FIELDS)}, "
                                         f"type {CERTIFICATE_TYPE!r}")
    if not all(isinstance(statement[k], str) for k in CERTIFICATE_FIELDS if k != "bound_at") \
            or type(statement["bound_at"]) is not int or not _is_enrolment_id(statement["enrolment"]):
        raise Refused("bad_certificate", "the statement's fields have the wrong types")
    if statement["idc"] != signer.idc:
        raise Refused("wrong_idc", f"the certificate is from IDC {statement['idc'][:64]!r}; this master is in "
                                   f"{signer.idc!r}: only a master of this IDC binds its agents' keys")
    key = signer.masters.get(statement["master"])
    if key is None:
        raise Refused("wrong_idc", f"{statement['master'][:64]!r} is no master of IDC {signer.idc} in this "
                                   "master's ombot.toml")
    try:
        decode_public(key).verify(text.encode(), raw_signature)
    except (BadSignatureError, ValueError):
        raise Refused("bad_certificate", f"the certificate's signature does not verify with master "
                                         f"{statement['master']}'s key") from None
    return statement


def _verify_key(raw: bytes) -> Any:
    from nacl.signing import VerifyKey

    return VerifyKey(raw)


def _usable(public_key: Any) -> None:
    """Refused unless `public_key` is an Ed25519 public key the master can encrypt to."""
    try:
        if not isinstance(public_key, str):
            raise ValueError("not a string")
        box_public(decode_public(public_key))
    except (KeyFileError, ValueError, RuntimeError) as exc:
        raise Refused("bad_request", f"not a usable Ed25519 public key ({type(exc).__name__})") from None


def _agents_query(args: dict[str, Any]) -> tuple[str, int, set[str] | None]:
    after, limit, hosts = args.get("after", ""), args.get("limit", DEFAULT_AGENTS_LISTED), args.get("hosts")
    if not isinstance(after, str) or len(after) > 255:
        raise Refused("bad_request", "after must be a host name (the last one of the page before)")
    if type(limit) is not int or not 1 <= limit <= MAX_AGENTS_LISTED:
        raise Refused("bad_request", f"limit must be an integer from 1 to {MAX_AGENTS_LISTED}")
    if hosts is not None:
        hosts = _names(hosts, "hosts")
        if len(hosts) > MAX_AGENTS_LISTED:
            raise Refused("batch_too_large", f"at most {MAX_AGENTS_LISTED} hosts at once", cap=MAX_AGENTS_LISTED)
    return after, limit, None if hosts is None else set(hosts)


def _agent_rows(state: _Snapshot) -> dict[str, dict[str, Any]]:
    """Per agent host: its state here (bound: a key accepted; pending; revoked), id, key and enrolment."""
    rows: dict[str, dict[str, Any]] = {}
    for r in state.revoked.values():
        if r.kind == "agent":
            rows[r.host] = {"host": r.host, "state": REVOKED, "id": r.client_id, "public_key": r.public_key}
    for e in state.enrolments.values():
        if e.state != BOUND:
            rows[e.host] = {"host": e.host, "state": e.state, "id": e.client_id, "public_key": e.public_key}
    for c in state.accepted.values():
        if c.kind == "agent":
            rows[c.host] = {"host": c.host, "state": BOUND, "id": c.id, "public_key": c.public_key,
                            "source": state.source(c.id)}
    for host, row in rows.items():  # the enrolment the host's key is (to be) bound under, or the one revoked
        known = state.enrolments.get(host)
        if known is not None:
            row["revoked_enrolment" if known.state == REVOKED else "enrolment"] = known.enrolment
    return rows


def _heartbeats(hosts: list[str]) -> dict[str, dict[str, Any]]:
    """The last heartbeat this master stored of each host, if any (masters that never had an agent have
    no table: a savepoint keeps the transaction)."""
    if not hosts:
        return {}
    try:
        with db.atomic():
            rows = list(AuditAgent.select().where(AuditAgent.host.in_(hosts)))
    except peewee.DatabaseError:  # no audit tables yet, or not yet their newest columns
        return {}
    return {a.host: {"last_seen": a.last_seen, "spool_depth": a.spool_depth, "dropped_total": a.dropped_total,
                     "sent_total": a.sent_total, "problem": a.problem, "version": a.version, "sources": a.sources}
            for a in rows}


def _enrolment(row: AgentEnrolment) -> Enrolment:
    return Enrolment(row.host, row.client_id, row.enrolment, row.state, row.enrolled_at, row.enrolled_by,
                     row.public_key or "", row.bound_at, row.bound_by or "", row.revoked_at, row.revoked_by or "")


