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
registrations accepted now. Readers never lock: each change builds a new snapshot
(masters.registrations) and swaps it in. `on_revoke` lets the transport learn which client ids were
just revoked (to close their connections).

Keys made on the host (issue 20: `enroll`, `bind`, the binding certificates) are the registry's other
half, masters.enrolment, which ClientRegistry inherits: a revoke here ends their enrolments too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, ItemsView, Iterator, Mapping, ValuesView
from dataclasses import replace
from pathlib import Path
from typing import Any

import peewee

from ombot.clock import now_ms
from ombot.config import ClientRegistration, parse_registration
from ombot.envelope import Refused, Request
from ombot.errors import ConfigError
from ombot.keys import KeyFileError, box_public, decode_public
from ombot.masters.audit import AuditAgent
from ombot.masters.enrolment import Enrolments, Signer, enrolment_of, enrolments_ending
from ombot.masters.registrations import (MAX_CLIENTS, PENDING, REVOKED, AgentEnrolment, Enrolment, RegisteredClient,
                                         Revocation, RevokedKey, Snapshot, names, raw_key)
from ombot.masters.store import db
from ombot.storage import create_tables, migrate

log = logging.getLogger("ombot.master")

ADDABLE_KINDS = ("agent", "cli", "console")  # never `chat`, never admin: those only through ombot.toml
ENTRY_FIELDS = ("id", "kind", "public_key", "host", "user", "modules", "hosts")
MAX_PROBLEMS = 100  # problems listed in one refusal's details

# Append-only: a new step goes at the end, never edit one that has shipped.
MIGRATIONS = [create_tables(RegisteredClient, RevokedKey), create_tables(AgentEnrolment)]


class ClientRegistry(Enrolments, Mapping[str, ClientRegistration]):
    """The registrations this master accepts now, by client id; the database must be open
    (masters.store.open_store). Thread-safe: changes are serialised, reads see one snapshot."""

    def __init__(self, master_id: str, configured: Mapping[str, ClientRegistration],
                 signer: Signer | None = None) -> None:
        """`signer`: what binding keys made on hosts needs (masters.enrolment.Enrolments)."""
        super().__init__(master_id, signer)
        self.configured = dict(configured)
        self._listeners: list[Callable[[set[str]], None]] = []
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
        ids, hosts = names(ids, "ids"), names(hosts, "hosts")
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
            ended = enrolments_ending(state, set(ids), set(hosts), {c.host for c in gone if c.kind == "agent"}, results)
            if gone or ended:
                self._state = self._store_revoked(state, gone, by, ended)
        if gone:
            self._tell({c.id for c in gone})
        return results

    def agent_counts(self) -> dict[str, int]:
        """Agents by state, for /metrics: accepted (from ombot.toml, added or bound), pending (enrolled, no key
        bound yet), revoked (keys refused for good)."""
        state = self._state
        hosts = [c.host for c in state.accepted.values() if c.kind == "agent"]
        served = set(hosts)  # one pass, not one per enrolment: a scrape of 10,000 agents stays cheap
        return {"accepted": len(hosts),
                "pending": sum(e.state == PENDING and e.host not in served for e in state.enrolments.values()),
                "revoked": sum(r.kind == "agent" for r in state.revoked.values())}

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

    def _load(self) -> Snapshot:
        mine = RevokedKey.master_id == self.master_id
        revoked = {raw_key(row.public_key): _revocation(row) for row in RevokedKey.select().where(mine)}
        state = Snapshot(revoked=revoked)
        for registration in self.configured.values():
            if raw_key(registration.public_key) not in revoked:
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
            state.enrolments[e.host] = enrolment_of(e)
        return state

    def _store_added(self, state: Snapshot, new: list[ClientRegistration], by: str) -> Snapshot:
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

    def _store_revoked(self, state: Snapshot, gone: list[ClientRegistration], by: str,
                       ended: list[Enrolment]) -> Snapshot:
        at = now_ms()
        revocations = {raw_key(c.public_key): Revocation(c.id, c.public_key, c.kind, c.user, c.host,
                                                         state.source(c.id), at, by) for c in gone}
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
        accepted = {cid: c for cid, c in state.accepted.items() if raw_key(c.public_key) not in revocations}
        return Snapshot(accepted, {cid: a for cid, a in state.added.items() if cid in accepted},
                        {**state.revoked, **revocations}, {k: cid for k, cid in state.by_key.items() if cid in accepted},
                        {**state.enrolments, **closed})

    def _tell(self, client_ids: set[str]) -> None:
        for callback in list(self._listeners):
            try:
                callback(client_ids)
            except Exception:
                log.exception("an on_revoke callback failed for %s", ", ".join(sorted(client_ids)))


# -- helpers --------------------------------------------------------------------------------------------


def _verdict(state: Snapshot, wanted: ClientRegistration) -> str | tuple[str, str]:
    """`added` (it may be), `already` (the same registration is accepted), or (code, reason) refusing it."""
    key = raw_key(wanted.public_key)
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


def _targets(state: Snapshot, ids: list[str], hosts: list[str]) -> list[str]:
    """The client ids a revoke names: those given, and every agent (accepted or revoked) of each host."""
    wanted = set(hosts)
    agents = [c.id for c in state.accepted.values() if c.kind == "agent" and c.host in wanted]
    agents += [r.client_id for r in state.revoked.values() if r.kind == "agent" and r.host in wanted]
    return list(dict.fromkeys([*ids, *agents]))


def _ids_by_host(state: Snapshot, hosts: list[str]) -> dict[str, list[str]]:
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


def _added(state: Snapshot, client_id: str) -> dict[str, Any]:
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
