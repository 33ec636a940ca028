"""The approval gate: decide, open requests, count votes, expire. No chat code here: the bot renders.

Exactly-once start: votes have a unique (request, approver) key, and the move from pending to
approved is one compare-and-set in the database, so two last approvals arriving together start one job.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import peewee

from ombot.approvals import store
from ombot.approvals.policy import Approval, Decision, Policy, Viewer
from ombot.clock import MS_PER_SECOND, now_ms
from ombot.errors import OmbotError
from ombot.timers import Timers

log = logging.getLogger("ombot.approvals")

GROUP_CACHE_SECONDS = 60.0
GROUP_FAILURE_CACHE_SECONDS = 15.0  # fail closed meanwhile; short, so a fixed group is soon seen


class ApprovalError(OmbotError):
    """A click or command on an approval request that cannot be taken; the message says why."""


class PolicyRefusal(OmbotError):
    """The access policy says no; the message names the rule."""


NO_POLICY = "no access policy is configured ([bot] policy in ombot.toml), so nothing may run"


@dataclass(frozen=True)
class Vote:
    """The outcome of one approval vote."""

    request: store.ApprovalRequest
    approved: int  # distinct approvals so far
    start: bool  # this vote completed the approval: start the job now (exactly one caller sees True)


class CachedGroups:
    """User-group membership, cached briefly; when the source fails, membership is empty (fail closed).

    A failure is cached too, for less long: a command checks every policy group several times, and an
    unreadable group must cost one call to Slack, not one (or one rate-limit wait) per check. One lookup
    per group at a time: concurrent commands wait for it instead of repeating it.
    """

    def __init__(self, source: Callable[[str], frozenset[str]], ttl: float = GROUP_CACHE_SECONDS,
                 failure_ttl: float = GROUP_FAILURE_CACHE_SECONDS) -> None:
        self.source, self.ttl, self.failure_ttl = source, ttl, failure_ttl
        self._cache: dict[str, tuple[float, frozenset[str]]] = {}  # group -> (good until, monotonic; members)
        self._lookups: dict[str, threading.Lock] = {}  # one per policy group: bounded by the policy
        self._lock = threading.Lock()

    def members(self, group: str) -> frozenset[str]:
        cached = self._fresh(group)
        if cached is not None:
            return cached
        with self._lookup_lock(group):
            cached = self._fresh(group)  # looked up while this thread waited
            if cached is not None:
                return cached
            try:
                users, ttl = self.source(group), self.ttl
            except Exception as exc:
                reason = " ".join(str(exc).split())[:300]
                log.warning("cannot read members of user group %s, treating it as empty for %.0f s: %s",
                            group, self.failure_ttl, reason)
                users, ttl = frozenset(), self.failure_ttl
            with self._lock:
                self._cache[group] = (time.monotonic() + ttl, users)
            return users

    def _fresh(self, group: str) -> frozenset[str] | None:
        with self._lock:
            hit = self._cache.get(group)
        return hit[1] if hit and time.monotonic() < hit[0] else None

    def _lookup_lock(self, group: str) -> threading.Lock:
        with self._lock:
            return self._lookups.setdefault(group, threading.Lock())


class Gate:
    """The policy at work: decisions, approval requests and their votes, and expiry timers."""

    def __init__(self, policy: Policy, group_members: Callable[[str], frozenset[str]],
                 origin: str | None = None) -> None:
        self.policy = policy
        # A Slack bot and a console may share one database: each decides and expires only the
        # requests made through it, whose cards and jobs it can show.
        self.origin = origin
        self.groups = CachedGroups(group_members)
        self.timers: Timers | None = None  # the process's scheduler, from `start` on: expiries are jobs on it
        self.on_expired: Callable[[store.ApprovalRequest], None] = lambda request: None

    # -- who is who --------------------------------------------------------------------------

    def groups_of(self, user: str) -> frozenset[str]:
        wanted = {g for role in self.policy.roles.values() for g in role.groups}
        return frozenset(g for g in wanted if user in self.groups.members(g))

    def decide(self, user: str, module: str, hosts: list[str], idc: str) -> Decision:
        return self.policy.decide(user, self.groups_of(user), module, hosts, idc)

    def may_run(self, user: str, module: str, idc: str) -> bool:
        """Whether any rule could let this user run the module (for help listings)."""
        groups = self.groups_of(user)
        return any(self.policy.in_roles(user, groups, r.request) and r.may_run(module, idc) for r in self.policy.rules)

    def may_request_anything(self, user: str) -> bool:
        """Whether the user holds a role some rule names under `request`. Checked before a user's
        targets are expanded, so someone who may run nothing never makes a master do work."""
        groups = self.groups_of(user)
        return any(self.policy.in_roles(user, groups, r.request) for r in self.policy.rules)

    def may_cancel(self, user: str, requester: str, approvers: list[str], cancel_roles: list[str]) -> bool:
        return user == requester or user in approvers or self.policy.in_roles(user, self.groups_of(user), cancel_roles)

    def viewer(self, user: str) -> Viewer:
        return self.policy.viewer(user, self.groups_of(user))

    def authority(self, user: str, requester: str, approvers: list[str], cancel_roles: list[str],
                  approval: Approval | None) -> int:
        return self.policy.authority(user, self.groups_of(user), requester, approvers, cancel_roles, approval)

    # -- requests ----------------------------------------------------------------------------

    def open_request(self, *, requester: str, origin: str, channel: str, reply_url: str | None, idc: str,
                     module: str, params: dict[str, Any], hosts: list[str], timeout: int | None,
                     decision: Decision, rid: str = "") -> store.ApprovalRequest:
        approval = decision.approval
        assert approval is not None
        now = now_ms()
        request = store.ApprovalRequest.create(
            request_id=str(uuid.uuid4()), requester=requester, origin=origin, channel=channel, reply_url=reply_url,
            idc=idc, module=module, params=params, hosts=hosts, timeout=timeout, rules=list(decision.rules),
            needed=approval.count, approver_roles=list(approval.roles), self_approval=approval.self_approval,
            cancel_roles=list(decision.cancel_roles), created_at=now, expires_at=now + approval.expiry * MS_PER_SECOND,
            rid=rid or None,
        )
        self._schedule(request)
        return request

    def approve(self, ref: str, user: str) -> Vote:
        request = self._pending(ref)
        groups = self.groups_of(user)
        if not self.policy.in_roles(user, groups, request.approver_roles):
            raise ApprovalError(f"You are not an approver for request #{request.number} "
                                f"(approvers: {', '.join(request.approver_roles)}).")
        if user == request.requester and not request.self_approval:
            raise ApprovalError(f"You asked for request #{request.number}; someone else must approve it.")
        try:
            with store.db.atomic():
                store.ApprovalVote.create(request=request.number, approver=user, at=now_ms())
        except peewee.IntegrityError:
            raise ApprovalError(f"You already approved request #{request.number}.") from None
        count = store.ApprovalVote.select().where(store.ApprovalVote.request == request.number).count()
        start = count >= request.needed and store.transition(request, store.APPROVED, decided_by=user)
        if start:
            self._unschedule(request)
        return Vote(store.reload(request), count, start)

    def check_deny(self, ref: str, user: str) -> store.ApprovalRequest:
        """The open request `user` may deny (an approver, or its requester withdrawing it), or ApprovalError."""
        request = self._pending(ref)
        if not self.policy.in_roles(user, self.groups_of(user), request.approver_roles) and user != request.requester:
            raise ApprovalError(f"Only an approver (or the requester, to withdraw) can deny request #{request.number}.")
        return request

    def deny(self, ref: str, user: str, reason: str) -> store.ApprovalRequest:
        request = self.check_deny(ref, user)
        if not reason.strip():
            raise ApprovalError("A denial needs a reason.")
        if not store.transition(request, store.DENIED, decided_by=user, reason=reason.strip()[:1000]):
            raise ApprovalError(f"Request #{request.number} was already decided: {store.reload(request).state}.")
        self._unschedule(request)
        return request

    def expire(self, request_id: str) -> store.ApprovalRequest | None:
        request = store.ApprovalRequest.get_or_none(store.ApprovalRequest.request_id == request_id)
        if request is None or not store.transition(request, store.EXPIRED):
            return None
        return request

    def withdraw(self, request: store.ApprovalRequest, reason: str) -> bool:
        """Close a pending request nobody may approve any more (a newer one replaces it); False if it
        was decided meanwhile."""
        if not store.transition(request, store.WITHDRAWN, reason=reason[:1000]):
            return False
        self._unschedule(request)
        return True

    def pending(self) -> list[store.ApprovalRequest]:
        query = store.ApprovalRequest.select().where(store.ApprovalRequest.state == store.PENDING)
        if self.origin is not None:
            query = query.where(store.ApprovalRequest.origin == self.origin)
        return list(query.order_by(store.ApprovalRequest.number))

    def find(self, ref: str) -> store.ApprovalRequest | None:
        """A request by number or id, whatever its state."""
        return store.find_request(ref)

    def current(self, request: store.ApprovalRequest) -> store.ApprovalRequest:
        """The request as the database has it now (racing votes may have moved it on)."""
        return store.reload(request)

    def votes(self, request: store.ApprovalRequest) -> list[tuple[str, int]]:
        """(approver, epoch ms) of each vote, in order."""
        return store.votes(request)

    def approvers(self, request: store.ApprovalRequest) -> list[str]:
        return store.approvers(request)

    def vote_count(self, request: store.ApprovalRequest) -> int:
        return store.vote_count(request)

    def place_message(self, request: store.ApprovalRequest, channel: str, ts: str | None) -> None:
        """Where the request's Approve/Deny message is, so it can be updated in place."""
        store.set_message(request, channel, ts)

    def _pending(self, ref: str) -> store.ApprovalRequest:
        request = store.find_request(ref)
        if request is None:
            raise ApprovalError(f"No approval request {ref!r}. `/om approvals` lists pending ones.")
        if self.origin is not None and request.origin != self.origin:
            raise ApprovalError(f"Request #{request.number} was made in {request.origin}; decide it there.")
        if request.state == store.PENDING and request.expires_at <= now_ms():
            self._expired(request.request_id)
            request = store.reload(request)
        if request.state != store.PENDING:
            raise ApprovalError(f"Request #{request.number} is no longer open: it was {request.state}.")
        return request

    # -- expiry ------------------------------------------------------------------------------

    def start(self, timers: Timers) -> None:
        """Rebuild expiry timers on `timers` from the table (the scheduler keeps none of its own);
        overdue ones expire now."""
        self.timers = timers
        for request in self.pending():
            self._schedule(request)

    def _schedule(self, request: store.ApprovalRequest) -> None:
        timers = self.timers
        if timers is None:  # not started (or closed): `start` arms every pending request
            return
        deadline = time.monotonic() + (request.expires_at - now_ms()) / MS_PER_SECOND
        timers.at(request.request_id, deadline, self._due, request.request_id)

    def _unschedule(self, request: store.ApprovalRequest) -> None:
        """A decided request needs no expiry timer (it would find nothing to expire anyway)."""
        if self.timers is not None:
            self.timers.cancel(request.request_id)

    def _due(self, request_id: str) -> None:
        """A request's expiry timer went off."""
        if self.timers is not None:  # else closed: the process is stopping, the next one expires it
            self._expired(request_id)

    def _expired(self, request_id: str) -> None:
        request = self.expire(request_id)
        if request is not None:
            try:
                self.on_expired(request)
            except Exception:
                log.exception("after expiring request %s", request_id)

    def close(self) -> None:
        """Arm and fire no more expiries (the scheduler is the process's: its owner stops it)."""
        self.timers = None


def authorize(gate: Gate | None, user: str, module: str, hosts: list[str], idc: str) -> Decision:
    """The one policy check, for chat, console and CLI alike: the decision, or PolicyRefusal."""
    if gate is None:
        raise PolicyRefusal(NO_POLICY)
    decision = gate.decide(user, module, hosts, idc)
    if not decision.allowed:
        raise PolicyRefusal(decision.reason)
    return decision


def viewer_of(gate: Gate | None, user: str) -> Viewer:
    """What a chat or console user may see of jobs and schedules (without a policy: their own)."""
    return gate.viewer(user) if gate is not None else Viewer(user)


def operator_viewer(policy: Policy | None, user: str, admin: bool) -> Viewer:
    """What the CLI's key may see: everything for an admin key, else what the policy lets its
    `cli:USER` see (groups from `[console_groups]`, as `ombot policy explain` reads them)."""
    if admin:
        return Viewer(user, everything=True)
    if policy is None:
        return Viewer(user)
    return policy.viewer(user, frozenset(g for g, members in policy.console_groups.items() if user in members))


def require_requester(gate: Gate | None, user: str) -> None:
    """Refuse, before any target reaches a master, a user whom no rule lets request anything."""
    if gate is None:
        raise PolicyRefusal(NO_POLICY)
    if not gate.may_request_anything(user):
        raise PolicyRefusal("you hold no role that the access policy lets request jobs; ask your admins for access")


def record_trail(user: str, channel: str, origin: str, action: str, detail: str, outcome: str) -> None:
    """One line of the trail of every chat action: who, where, what, and how it ended."""
    store.record(user, channel, origin, action, detail, outcome)


