"""Searching the central shell-audit store: what a search asks, who may ask, and what it finds.

Only roles the access policy names under `[audit] viewers` may search. Commands are shown redacted:
the built-in secret patterns and the rules file's own (`redact_patterns`). The chat face's `/om
audit` (bot.audit_search) reads the words into an `AuditQuery` and renders what `find_events` returns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ombot.approvals import NO_POLICY, Gate, PolicyRefusal
from ombot.audit import store
from ombot.audit.rules import load_rules


@dataclass(frozen=True)
class AuditQuery:
    """What `/om audit` looks for; every filter optional. `since_ms` is epoch ms, UTC."""

    host: str | None = None
    user: str | None = None
    grep: str | None = None
    since_ms: int | None = None
    idc: str | None = None

    def describe(self) -> str:
        shown = [f"{k}={getattr(self, k)}" for k in ("host", "user", "grep", "idc") if getattr(self, k)]
        if self.since_ms is not None:
            shown.append(f"since={utc(self.since_ms)}")
        return " ".join(shown) or "everything"


def find_events(query: AuditQuery, limit: int) -> list[store.AuditRecord]:
    """The stored events the query matches, newest first, at most `limit` (audit.store.search)."""
    return store.search(host=query.host, user=query.user, grep=query.grep, since_ms=query.since_ms, idc=query.idc,
                        limit=limit)


def require_audit_viewer(gate: Gate | None, user: str) -> None:
    """Refuse anyone the access policy does not name as an audit viewer."""
    if gate is None:
        raise PolicyRefusal(NO_POLICY)
    policy = gate.policy
    if not policy.in_roles(user, gate.groups_of(user), policy.audit_viewers):
        roles = ", ".join(policy.audit_viewers) or "none are set"
        raise PolicyRefusal(f"the access policy does not let you search the shell audit trail "
                            f"([audit] viewers: {roles})")


def redact_patterns(rules_file: Path | None) -> tuple[str, ...]:
    """The rules file's own redaction patterns (on top of the built-in ones); none without a file."""
    return load_rules(rules_file).redact_patterns if rules_file is not None else ()


def utc(epoch_ms: int) -> str:
    """A stored time as search results show it: `2026-11-20 08:00:00Z`."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch_ms // 1000)) + "Z"
