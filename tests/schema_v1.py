"""A database as the schema before epoch milliseconds left it (version 1 of each component: seconds,
a float trail time, JSON as text), for the migration tests (test_storage, test_host_locks)."""

from __future__ import annotations

import json

import peewee

from ombot.storage import connect_url, create_tables, migrate

T = 1_700_000_000  # 2023-11-14 22:13:20 UTC; a whole multiple of 128, so even a 32-bit float holds it exactly
JOB_ID = "0b5c7a52-6f7e-4a57-9a51-3f0d7c1b2a10"

_old = peewee.DatabaseProxy()  # what the version-1 models are bound to: create_schema_v1 points it at its database


def schema_v1() -> dict[str, type[peewee.Model]]:
    """The models as version 1 defined them, under their own class names: peewee names indexes after those."""

    class BaseModel(peewee.Model):
        class Meta:
            database = _old

    class SeenNonce(BaseModel):
        nonce = peewee.CharField(max_length=32, primary_key=True)
        keep_until = peewee.BigIntegerField(index=True)

        class Meta:
            table_name = "seennonce"

    class Job(BaseModel):
        id = peewee.CharField(max_length=36, primary_key=True)
        sender = peewee.CharField(max_length=64)
        requester = peewee.CharField(max_length=256)
        origin = peewee.CharField(max_length=16)
        approvers = peewee.TextField()
        module = peewee.CharField(max_length=128)
        params = peewee.TextField()
        hosts = peewee.TextField()
        idc = peewee.CharField(max_length=64)
        timeout = peewee.IntegerField()
        state = peewee.CharField(max_length=16, index=True)
        created_at = peewee.BigIntegerField()
        finished_at = peewee.BigIntegerField(null=True)
        signed_request = peewee.BlobField()

        class Meta:
            table_name = "job"

    class JobEvent(BaseModel):
        job = peewee.ForeignKeyField(Job, backref="events", on_delete="CASCADE")
        seq = peewee.IntegerField()
        kind = peewee.CharField(max_length=32)
        at = peewee.DoubleField()
        data = peewee.TextField()

        class Meta:
            table_name = "jobevent"
            indexes = ((("job", "seq"), True),)

    class BotJob(BaseModel):
        number = peewee.AutoField()
        job_id = peewee.CharField(max_length=36, unique=True)
        requester = peewee.CharField(max_length=64, index=True)
        origin = peewee.CharField(max_length=16)
        channel = peewee.CharField(max_length=64)
        card_ts = peewee.CharField(max_length=32, null=True)
        reply_url = peewee.TextField(null=True)
        idc = peewee.CharField(max_length=64)
        master_id = peewee.CharField(max_length=64, null=True)
        module = peewee.CharField(max_length=128)
        params = peewee.TextField()
        host_count = peewee.IntegerField()
        state = peewee.CharField(max_length=16, index=True)
        approvers = peewee.TextField(default="[]")
        cancel_roles = peewee.TextField(default="[]")
        reported = peewee.BooleanField(default=False)
        created_at = peewee.IntegerField()
        finished_at = peewee.IntegerField(null=True)

        class Meta:
            table_name = "bot_job"

    class ApprovalRequest(BaseModel):
        number = peewee.AutoField()
        request_id = peewee.CharField(max_length=36, unique=True)
        requester = peewee.CharField(max_length=64)
        origin = peewee.CharField(max_length=16)
        channel = peewee.CharField(max_length=64)
        reply_url = peewee.TextField(null=True)
        idc = peewee.CharField(max_length=64)
        module = peewee.CharField(max_length=128)
        params = peewee.TextField()
        hosts = peewee.TextField()
        timeout = peewee.IntegerField(null=True)
        rules = peewee.TextField()
        needed = peewee.IntegerField()
        approver_roles = peewee.TextField()
        self_approval = peewee.BooleanField(default=False)
        cancel_roles = peewee.TextField()
        state = peewee.CharField(max_length=16, index=True, default="pending")
        created_at = peewee.IntegerField()
        expires_at = peewee.IntegerField(index=True)
        decided_at = peewee.IntegerField(null=True)
        decided_by = peewee.CharField(max_length=64, null=True)
        reason = peewee.TextField(null=True)
        message_channel = peewee.CharField(max_length=64, null=True)
        message_ts = peewee.CharField(max_length=32, null=True)

        class Meta:
            table_name = "approval_request"

    class ApprovalVote(BaseModel):
        request = peewee.ForeignKeyField(ApprovalRequest, backref="votes", on_delete="CASCADE")
        approver = peewee.CharField(max_length=64)
        at = peewee.IntegerField()

        class Meta:
            table_name = "approval_vote"
            indexes = ((("request", "approver"), True),)

    class TrailEntry(BaseModel):
        at = peewee.FloatField(index=True)
        user = peewee.CharField(max_length=64, index=True)
        channel = peewee.CharField(max_length=64)
        origin = peewee.CharField(max_length=16)
        action = peewee.CharField(max_length=32)
        detail = peewee.TextField()
        outcome = peewee.TextField()

        class Meta:
            table_name = "chat_trail"

    return {m.__name__: m for m in (SeenNonce, Job, JobEvent, BotJob, ApprovalRequest, ApprovalVote, TrailEntry)}


def create_schema_v1(url: str) -> None:
    """A database as today's code leaves it: every component at version 1, with rows."""
    old = schema_v1()
    db = connect_url(url)
    try:
        migrate(db, "master", [create_tables(old["SeenNonce"], old["Job"], old["JobEvent"])])
        migrate(db, "bot", [create_tables(old["BotJob"])])
        migrate(db, "approvals", [create_tables(old["ApprovalRequest"], old["ApprovalVote"], old["TrailEntry"])])
        _old.initialize(db)
        old["SeenNonce"].create(nonce="n" * 32, keep_until=T + 60)
        old["Job"].create(id=JOB_ID, sender="bot", requester="slack:U1", origin="slack", approvers='["U2"]',
                      module="echo", params='{"message":"h\\u00e9"}', hosts='["web01"]', idc="local", timeout=60,
                      state="ok", created_at=T, finished_at=T + 5, signed_request=b"\x00signed")
        old["JobEvent"].create(job=JOB_ID, seq=1, kind="accepted", at=T + 0.123, data='{"hosts":["web01"]}')
        old["JobEvent"].create(job=JOB_ID, seq=2, kind="finished", at=T + 4.9996, data='{"state":"ok"}')
        old["BotJob"].create(job_id=JOB_ID, requester="U1", origin="slack", channel="C1", idc="local", module="echo",
                         params=json.dumps({"message": "hé 🚀"}), host_count=1, state="ok", approvers='["U2"]',
                         cancel_roles='["leads"]', reported=True, created_at=T, finished_at=T + 6)
        old["BotJob"].create(job_id="still-running", requester="U1", origin="slack", channel="C1", idc="local",
                         module="echo", params="{}", host_count=1, state="queued", created_at=T + 1)
        request = old["ApprovalRequest"].create(
            request_id=JOB_ID, requester="U1", origin="slack", channel="C1", idc="local", module="echo",
            params='{"message":"hé"}', hosts='["web01"]', rules='["r"]', needed=1, approver_roles='["leads"]',
            cancel_roles='[]', state="approved", created_at=T - 100, expires_at=T + 3500, decided_at=T - 1)
        old["ApprovalRequest"].create(
            request_id="pending-one", requester="U1", origin="slack", channel="C1", idc="local", module="echo",
            params="{}", hosts='["web01"]', rules='["r"]', needed=1, approver_roles='["leads"]', cancel_roles='[]',
            created_at=T, expires_at=T + 3600)
        old["ApprovalVote"].create(request=request.number, approver="U2", at=T - 1)
        old["TrailEntry"].create(at=float(T), user="U2", channel="C1", origin="slack", action="approve", detail="#1",
                             outcome="ok")
    finally:
        db.close()
