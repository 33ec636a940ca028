"""What a master's live registry holds at one moment, and the tables it is stored in: shared by
masters.registry (registrations added and revoked) and masters.enrolment (agent hosts enrolled
pending, their keys bound), which both build the next `Snapshot` and publish it whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import peewee

from ombot.config import ClientRegistration
from ombot.envelope import Refused
from ombot.keys import decode_public
from ombot.masters.store import BaseModel
from ombot.storage import JSONField

MAX_CLIENTS = 1000  # registrations one `add` may carry, hosts one `enroll`, and ids plus hosts one `revoke` may name
CONFIG, REGISTRY = "config", "registry"  # where an accepted registration comes from
PENDING, BOUND, REVOKED = "pending", "bound", "revoked"  # an enrolment's states (and `agents`' too)


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
class Snapshot:
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

    def copy(self) -> Snapshot:
        """A private copy to build the next snapshot in."""
        return Snapshot(dict(self.accepted), dict(self.added), dict(self.revoked), dict(self.by_key),
                        dict(self.enrolments))

    def accept(self, registration: ClientRegistration, added: tuple[int, str] | None = None) -> None:
        """Add a registration (from the registry when `added` says when and by whom); before publishing only."""
        self.accepted[registration.id] = registration
        self.by_key[raw_key(registration.public_key)] = registration.id
        if added is not None:
            self.added[registration.id] = added


def raw_key(public_key: str) -> bytes:
    return bytes(decode_public(public_key))


def names(values: Any, what: str) -> list[str]:
    """A request's list of ids or host names; Refused `bad_request` if it is anything else."""
    if not isinstance(values, list) or not all(isinstance(v, str) and 0 < len(v) <= 255 for v in values):
        raise Refused("bad_request", f"{what} must be a list of names")
    return values
