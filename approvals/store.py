"""Approval requests, votes, and the trail of every chat action. Bound to the bot's database."""

from __future__ import annotations

from typing import Any

import peewee

from ombot.clock import now_ms
from ombot.storage import JSONField, add_columns, create_tables, epoch_seconds_to_ms, find_by_number_or_id

db = peewee.DatabaseProxy()

PENDING, APPROVED, DENIED, EXPIRED = "pending", "approved", "denied", "expired"
WITHDRAWN = "withdrawn"  # replaced by a newer request for the same schedule: no vote may start it


class BaseModel(peewee.Model):
    """Approval tables live in the bot's database."""

    class Meta:
        database = db


class ApprovalRequest(BaseModel):
    """Timestamps here and in the votes and the trail are UTC epoch milliseconds (ombot.clock)."""

    number = peewee.AutoField()  # for people: /om approve 7
    request_id = peewee.CharField(max_length=36, unique=True)  # becomes the job id once approved
    requester = peewee.CharField(max_length=64)
    origin = peewee.CharField(max_length=16)
    channel = peewee.CharField(max_length=64)  # where the request was made (the job card goes there)
    reply_url = peewee.TextField(null=True)
    idc = peewee.CharField(max_length=64)
    module = peewee.CharField(max_length=128)
    params = JSONField()
    hosts = JSONField()
    timeout = peewee.IntegerField(null=True)
    rules = JSONField()
    needed = peewee.IntegerField()
    approver_roles = JSONField()
    self_approval = peewee.BooleanField(default=False)
    cancel_roles = JSONField()
    state = peewee.CharField(max_length=16, index=True, default=PENDING)
    created_at = peewee.BigIntegerField()
    expires_at = peewee.BigIntegerField(index=True)
    decided_at = peewee.BigIntegerField(null=True)
    decided_by = peewee.CharField(max_length=64, null=True)
    reason = peewee.TextField(null=True)
    message_channel = peewee.CharField(max_length=64, null=True)
    message_ts = peewee.CharField(max_length=32, null=True)
    rid = peewee.CharField(max_length=64, null=True)  # the asking command's request id: its job's too (ombot.context)

    class Meta:
        table_name = "approval_request"


class ApprovalVote(BaseModel):
    """One approver's yes to one request (one each, whatever the race)."""

    id = peewee.AutoField()  # what peewee adds anyway, named: votes are listed in the order they came
    request = peewee.ForeignKeyField(ApprovalRequest, backref="votes", on_delete="CASCADE")
    approver = peewee.CharField(max_length=64)
    at = peewee.BigIntegerField()

    class Meta:
        table_name = "approval_vote"
        indexes = ((("request", "approver"), True),)  # one vote per approver, whatever the race


class TrailEntry(BaseModel):
    """Every chat action: commands, refusals, clicks, approvals, cancels."""

    at = peewee.BigIntegerField(index=True)
    user = peewee.CharField(max_length=64, index=True)
    channel = peewee.CharField(max_length=64)
    origin = peewee.CharField(max_length=16)
    action = peewee.CharField(max_length=32)
    detail = peewee.TextField()
    outcome = peewee.TextField()

    class Meta:
        table_name = "chat_trail"


MIGRATIONS = [
    create_tables(ApprovalRequest, ApprovalVote, TrailEntry),
    # Version 1: seconds in 32-bit INTs, and the trail in a float (15 s off on a Postgres REAL).
    epoch_seconds_to_ms({"approval_request": ("created_at", "expires_at", "decided_at"), "approval_vote": ("at",),
                         "chat_trail": ("at",)}),
    # Version 3: the request id, so the approved job is logged with its command's.
    add_columns("approval_request", {"rid": peewee.CharField(max_length=64, null=True)}),
]


def record(user: str, channel: str, origin: str, action: str, detail: str, outcome: str) -> None:
    TrailEntry.create(at=now_ms(), user=user, channel=channel, origin=origin, action=action,
                      detail=detail[:4000], outcome=outcome[:4000])


def forget_trail_before(cutoff_ms: int) -> int:
    """Delete trail entries older than `cutoff_ms` (the bot's retention); returns how many."""
    return int(TrailEntry.delete().where(TrailEntry.at < cutoff_ms).execute())


def find_request(ref: str) -> ApprovalRequest | None:
    request: ApprovalRequest | None = find_by_number_or_id(ApprovalRequest, ApprovalRequest.number,
                                                           ApprovalRequest.request_id, ref)
    return request


def transition(request: ApprovalRequest, to: str, **fields: Any) -> bool:
    """Compare-and-set from pending: exactly one caller wins, however many race."""
    won = (ApprovalRequest.update(state=to, decided_at=now_ms(), **fields)
           .where((ApprovalRequest.number == request.number) & (ApprovalRequest.state == PENDING)).execute())
    if won:
        request.state = to
        for key, value in fields.items():
            setattr(request, key, value)
    return bool(won)


def votes(request: ApprovalRequest) -> list[tuple[str, int]]:
    """(approver, when in epoch ms) of each vote, in the order they came."""
    votes = ApprovalVote.select().where(ApprovalVote.request == request.number).order_by(ApprovalVote.id)
    return [(vote.approver, vote.at) for vote in votes]


def approvers(request: ApprovalRequest) -> list[str]:
    return [approver for approver, _ in votes(request)]


def vote_count(request: ApprovalRequest) -> int:
    return int(ApprovalVote.select().where(ApprovalVote.request == request.number).count())


def set_message(request: ApprovalRequest, channel: str, ts: str | None) -> None:
    ApprovalRequest.update(message_channel=channel, message_ts=ts).where(
        ApprovalRequest.number == request.number).execute()
    request.message_channel, request.message_ts = channel, ts


def reload(request: ApprovalRequest) -> ApprovalRequest:
    fresh: ApprovalRequest = ApprovalRequest.get_by_id(request.number)
    return fresh
