"""Access policies for test sites, built from their parts: a suite names its roles and rules, and the
TOML text (what `[bot] policy` reads, docs/policy.md) is spelled here once.

    POLICY = policy(role("ops", ALICE), role("leads", LEAD1),
                    rule("shell needs a lead", modules=["shell.exec"], request=["ops"], approval=approval()),
                    rule("everyday", modules=["echo"], request=["ops"]))

Each part is rendered as a suite would have written it by hand (one key a line, inline tables for
approvals), so a test may still edit the text, e.g. replace `approval = { count = 1, roles = ["leads"] }`.
"""

from __future__ import annotations

import json
from typing import Any


def value(item: Any) -> str:
    """One TOML value: strings and lists of them as JSON spells them, a dict as an inline table."""
    if isinstance(item, bool):
        return "true" if item else "false"
    if isinstance(item, (int, float)):
        return repr(item)
    if isinstance(item, str):
        return json.dumps(item)
    if isinstance(item, dict):
        return "{ " + ", ".join(f"{key} = {value(v)}" for key, v in item.items()) + " }"
    return "[" + ", ".join(value(v) for v in item) + "]"


def table(header: str, **keys: Any) -> str:
    """`[header]` and its keys, one a line (`[jobs]`, `[audit]`, `[console_groups]`...)."""
    return "".join([f"[{header}]\n", *(f"{key} = {value(v)}\n" for key, v in keys.items())])


def role(name: str, *users: str, groups: list[str] | None = None) -> str:
    """`[roles.NAME]`: its users, and the chat user groups that also hold it."""
    keys: dict[str, Any] = {}
    if users or groups is None:  # a role of groups alone has no users line
        keys["users"] = list(users)
    if groups is not None:
        keys["groups"] = groups
    return table(f"roles.{name}", **keys)


def approval(count: int = 1, roles: tuple[str, ...] = ("leads",), **more: Any) -> dict[str, Any]:
    """A rule's `approval` (one lead by default); `more`: expiry_seconds, self_approval."""
    return {"count": count, "roles": list(roles), **more}


def rule(name: str, **keys: Any) -> str:
    """One `[[rules]]` entry: modules, targets, idcs, request, approval, cancel, max_hosts, in the order given."""
    return "[[rules]]\n" + table("", name=name, **keys).split("\n", 1)[1]


def policy(*parts: str) -> str:
    """The policy file: the parts (roles, rules, tables) a blank line apart."""
    return "\n".join(parts)
