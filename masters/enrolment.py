"""Keys made on the host (issue 20): the half of a master's live registry that enrols agent hosts
pending and binds the keys they make; masters.registry's ClientRegistry is the whole, and the only
one to build (it owns the snapshot and loads it).

An admin may enrol an agent's host *pending* (`enroll`): registered here with no key yet, under an
enrolment id every master of the IDC got from the same command. Its key is bound later, once, in one
of two ways: by this master directly (`bind`, which the rollout job running on it calls once the host
made its key), which returns a *binding certificate* this master signs; or, on the agent's first
contact with another master of the IDC, by the `bind` operation, the one operation a key the master
does not know may send, carrying that certificate: accepted only if a master of this master's own IDC
signed it, for this enrolment of a host pending here, binding the very key that sent it, never a
revoked one (docs/protocol.md, "Keys made on the host").
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import peewee
from nacl.exceptions import BadSignatureError

from ombot.clock import now_ms
from ombot.config import ClientRegistration
from ombot.envelope import Refused, Request, dumps
from ombot.errors import OmbotError
from ombot.keys import Identity, KeyFileError, box_public, decode_public, encode_public
from ombot.masters.audit import AuditAgent
from ombot.masters.registrations import (BOUND, MAX_CLIENTS, PENDING, REVOKED, AgentEnrolment, Enrolment,
                                         RegisteredClient, Snapshot, names, raw_key)
from ombot.masters.store import db
from ombot.ratelimit import TokenBucket
from ombot.tables import HOST_NAME

log = logging.getLogger("ombot.master")

DEFAULT_AGENTS_LISTED, MAX_AGENTS_LISTED = 200, 1000  # one page of the `agents` action
CERTIFICATE_TYPE = "ombot-agent-binding/1"  # what a binding certificate's statement says it is
CERTIFICATE_FIELDS = ("type", "host", "idc", "public_key", "bound_at", "master", "enrolment")
MAX_STATEMENT_CHARS = 1024  # a statement's JSON; a real one is about 250
MAX_BIND_FRAME = 8 * 1024  # a `bind` frame from a key the master does not know (a certificate and little else)
BIND_PER_SECOND, BIND_BURST = 20.0, 100  # binds from unknown keys, all of them together: crypto a stranger can cause
_ENROLMENT_ID = "0123456789abcdef"  # an enrolment id: 32 lowercase hex digits, made by the enrolling CLI


@dataclass(frozen=True)
class Signer:
    """What binding needs of the master: its identity (to sign certificates), its IDC, and the public
    keys of its IDC's masters, itself included, from its ombot.toml (to check certificates)."""

    identity: Identity
    idc: str
    masters: Mapping[str, str]  # master id -> public key, this IDC's only


class Enrolments:
    """Enrolling agent hosts and binding their keys, on the registry's snapshot: ClientRegistry
    (masters.registry) inherits this and publishes `_state`, the snapshot in force; changes to it
    hold `_lock`, whichever half makes them."""

    _state: Snapshot

    def __init__(self, master_id: str, signer: Signer | None) -> None:
        """`signer`: what binding keys made on hosts needs (a master always has one; without it
        `bind` and the `bind` operation are refused)."""
        self.master_id = master_id
        self.signer = signer
        self._lock = threading.Lock()  # one change at a time
        self._strangers = TokenBucket(BIND_PER_SECOND, BIND_BURST)  # binds of unknown keys, all together
        self._strangers_lock = threading.Lock()

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
        key, state = frame[4:36], self._state
        if key in state.by_key or key in state.revoked:
            return  # an agent bound already (no stranger), or a revoked key (the opener refuses it)
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
        listed = sorted(h for h in rows if h > after and (hosts is None or h in hosts))
        page = listed[:limit]
        beats = _heartbeats(page)
        agents = [{**rows[h], **beats.get(h, {})} for h in page]
        return {"master": self.master_id, "agents": agents, "more": len(listed) > limit}

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

    def _store_enrolments(self, state: Snapshot, new: list[Enrolment]) -> Snapshot:
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

    def _store_bound(self, state: Snapshot, row: Enrolment, public_key: str, by: str) -> Snapshot:
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


def enrolments_ending(state: Snapshot, ids: set[str], hosts: set[str], gone_hosts: set[str],
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


def enrolment_of(row: AgentEnrolment) -> Enrolment:
    return Enrolment(row.host, row.client_id, row.enrolment, row.state, row.enrolled_at, row.enrolled_by,
                     row.public_key or "", row.bound_at, row.bound_by or "", row.revoked_at, row.revoked_by or "")


def certificate(signer: Signer, master_id: str, row: Enrolment) -> dict[str, str]:
    """The binding certificate of a bound enrolment: a canonical JSON statement and this master's
    Ed25519 signature of its exact bytes (docs/protocol.md, "Keys made on the host")."""
    statement = {"type": CERTIFICATE_TYPE, "host": row.host, "idc": signer.idc, "public_key": row.public_key,
                 "bound_at": row.bound_at, "master": master_id, "enrolment": row.enrolment}
    text = dumps(statement).decode()
    signature = signer.identity.signing_key.sign(text.encode()).signature
    return {"statement": text, "signature": base64.b64encode(signature).decode()}


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


def _enrol_verdict(state: Snapshot, host: str, enrolment: str) -> str | tuple[str, str]:
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


def _bindable(state: Snapshot, host: str, public_key: str, enrolment: str | None,
              idc: str) -> tuple[Enrolment, bool]:
    """The host's enrolment, and whether it is bound to this key already; Refused with the reason when
    this key may not be bound to it here (a certificate names its `enrolment`; a direct bind none)."""
    key = raw_key(public_key)
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
        hosts = names(hosts, "hosts")
        if len(hosts) > MAX_AGENTS_LISTED:
            raise Refused("batch_too_large", f"at most {MAX_AGENTS_LISTED} hosts at once", cap=MAX_AGENTS_LISTED)
    return after, limit, None if hosts is None else set(hosts)


def _agent_rows(state: Snapshot) -> dict[str, dict[str, Any]]:
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
