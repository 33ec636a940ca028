"""Who may run what, and the approval flow: the bot's door to policy. It imports no chat code.

`authorize` is the one policy check (chat, console and CLI); a `Gate` holds the policy and does
everything with approval requests; `record_trail` writes the trail of chat actions. The tables
behind them stay inside this package.
"""

import peewee

from ombot.approvals import store
from ombot.approvals.gate import (
    NO_POLICY, ApprovalError, Gate, PolicyRefusal, Vote, authorize, operator_viewer, record_trail, require_requester,
    viewer_of,
)
from ombot.approvals.parts import authorize_parts
from ombot.approvals.policy import (
    APPROVER, AUTHORITY_NAMES, CANCELLER, NO_AUTHORITY, REQUESTER, Approval, Decision, Policy, Viewer, load_policy,
)
from ombot.approvals.store import APPROVED, DENIED, EXPIRED, PENDING, ApprovalRequest, forget_trail_before
from ombot.storage import migrate

__all__ = ["APPROVED", "APPROVER", "AUTHORITY_NAMES", "CANCELLER", "DENIED", "EXPIRED", "NO_AUTHORITY", "NO_POLICY",
           "PENDING", "REQUESTER", "Approval", "ApprovalError", "ApprovalRequest", "Decision", "Gate", "Policy",
           "PolicyRefusal", "Viewer", "Vote", "authorize", "authorize_parts", "bind", "forget_trail_before",
           "load_policy", "operator_viewer", "record_trail", "require_requester", "viewer_of"]


def bind(db: peewee.Database) -> None:
    """Use the bot's database for requests, votes and the trail."""
    store.db.initialize(db)
    migrate(db, "approvals", store.MIGRATIONS)
