"""Who is asking. The master maps the sender's key to its registration ([clients.NAME]) and checks
every identity a request names against it: the request's own word is never enough.

- A `cli` or `console` client is one fixed person: its requester must be `cli:USER` /
  `console:USER` of its registration, and it names no approvers.
- A `chat` client (the bot) attests chat identities: it may name Slack users as requesters and
  approvers, each in canonical form (no spaces, no case variants), or speak as itself.
- Every client may run only the modules and hosts its registration's globs allow.
- An `agent` client (a server's audit agent) speaks as `agent:HOST` and may call only `ingest` (and
  `bind`, which a key not registered yet may send too: masters.enrolment), which no other client may call.
- Only a `chat` client (the bot, whose store holds the audit trail) reads stored audit events.
- Only an `admin` client (a `cli` key marked so in ombot.toml) changes the master's registrations.
"""

from __future__ import annotations

import re
from typing import Any

from ombot.envelope import Refused, Request
from ombot.config import ClientRegistration
from ombot.globs import matches_any

# Slack user ids: U or W, then upper-case letters and digits. Lower case or padding is not the same id.
SLACK_USER = re.compile(r"^[UW][A-Z0-9]{2,31}$")
CHAT_ORIGINS = ("slack", "console")


# bind: an agent's key made on its host, bound by a master's certificate; binding: that certificate, asked
# of the master that bound the key (the rollout binds at one master; the agent shows it to the others)
AGENT_OPS = ("ingest", "bind", "binding")
CHAT_ONLY_OPS = ("audit_read",)
ADMIN_OPS = ("registry",)


def check_operation(client: ClientRegistration, op: str) -> None:
    """An agent key ships audit events and nothing else; only agent keys ship them; only admins
    change registrations."""
    if client.kind == "agent" and op not in AGENT_OPS:
        raise Refused("not_permitted", f"client {client.id} is an audit agent: it may only ingest, not {op}")
    if client.kind != "agent" and op in AGENT_OPS:
        raise Refused("not_permitted", f"client {client.id} is a {client.kind} client: only audit agents {op}")
    if client.kind != "chat" and op in CHAT_ONLY_OPS:
        raise Refused("not_permitted", f"client {client.id} is a {client.kind} client: only the bot reads audit events")
    if op in ADMIN_OPS and not client.admin:
        raise Refused("not_permitted", f"client {client.id} is not an admin: only a cli key with admin = true "
                                       f"in ombot.toml may call {op}")


def check_requester(client: ClientRegistration, request: Request) -> None:
    """Refuse a requester or origin the sender's registration does not vouch for."""
    if client.kind == "chat":
        if request.requester != client.identity and not SLACK_USER.fullmatch(request.requester):
            raise Refused("bad_requester", f"requester {request.requester!r} is not a Slack user id "
                                           "(U... or W..., upper case, nothing else)")
        if request.origin not in CHAT_ORIGINS:
            raise Refused("bad_requester", f"a chat client's requests come from {' or '.join(CHAT_ORIGINS)}, "
                                           f"not {request.origin!r}")
        return
    if request.requester != client.identity:
        raise Refused("bad_requester", f"client {client.id} acts as {client.identity}, not {request.requester!r}")
    if request.origin != client.kind:
        raise Refused("bad_requester", f"client {client.id} is a {client.kind} client, not {request.origin!r}")


def check_approvers(client: ClientRegistration, approvers: Any) -> list[str]:
    """The approvers a job carries: only a chat client attests them, each a canonical Slack id."""
    if approvers is None:
        return []
    if not isinstance(approvers, list) or not all(isinstance(a, str) for a in approvers):
        raise Refused("bad_request", "approvers must be a list of user ids")
    if approvers and client.kind != "chat":
        raise Refused("bad_requester", f"client {client.id} is a {client.kind} client: only a chat client "
                                       "may name approvers")
    for approver in approvers:
        if not SLACK_USER.fullmatch(approver):
            raise Refused("bad_request", f"approver {approver[:64]!r} is not a Slack user id "
                                         "(U... or W..., upper case, nothing else)")
    return approvers


def check_permitted(client: ClientRegistration, module: str, hosts: list[str]) -> None:
    """The registration's module and host globs: what this key may run at all."""
    if not matches_any(module, client.modules):
        raise Refused("not_permitted", f"client {client.id} may not run {module} on this master")
    outside = [h for h in hosts if not matches_any(h, client.hosts)]
    if outside:
        raise Refused("not_permitted", f"client {client.id} may not run on {', '.join(outside[:10])}",
                      hosts=outside[:100])
