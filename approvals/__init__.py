"""Who may run what, and the approval flow. The bot's door to policy; it imports no chat code."""

import peewee

from approvals import store
from approvals.gate import ApprovalError, Gate, Vote, params_text
from approvals.policy import Approval, Decision, Policy, load_policy
from ombot.storage import migrate

__all__ = ["Approval", "ApprovalError", "Decision", "Gate", "Policy", "Vote", "bind", "load_policy",
           "params_text", "store"]


def bind(db: peewee.Database) -> None:
    """Use the bot's database for requests, votes and the trail."""
    store.db.initialize(db)
    migrate(db, "approvals", store.MIGRATIONS)
