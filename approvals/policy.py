"""The access policy: roles by Slack user and user-group ids (never display names), and rules.

A rule matches a (module, host, IDC) triple by globs. For each expanded host the first matching rule
decides; every host must be allowed, or the request is refused naming the rule (or "no rule", deny by
default). When the hosts of one request fall under several rules, the strictest of them applies: the
smallest max_hosts and the approval that needs the most approvers.
"""

from __future__ import annotations

import fnmatch
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ombot.config import _Reader
from ombot.errors import ConfigError

GroupsOf = Callable[[str], frozenset[str]]  # user id -> the user-group ids they belong to

DEFAULT_EXPIRY = 3600


@dataclass(frozen=True)
class Role:
    name: str
    users: frozenset[str]
    groups: frozenset[str]

    def has(self, user: str, groups: frozenset[str]) -> bool:
        return user in self.users or bool(self.groups & groups)


@dataclass(frozen=True)
class Approval:
    count: int
    roles: tuple[str, ...]
    expiry: int = DEFAULT_EXPIRY
    self_approval: bool = False
    channel: str | None = None  # where the Approve/Deny message goes; default: the request's channel


@dataclass(frozen=True)
class Rule:
    name: str
    modules: tuple[str, ...]
    targets: tuple[str, ...]
    idcs: tuple[str, ...]
    request: tuple[str, ...]
    max_hosts: int | None = None
    approval: Approval | None = None
    cancel: tuple[str, ...] = ()

    def matches(self, module: str, host: str, idc: str) -> bool:
        return (_any(module, self.modules) and _any(host, self.targets) and _any(idc, self.idcs))


def _any(value: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(value, p) for p in patterns)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    rules: tuple[str, ...] = ()
    max_hosts: int | None = None
    approval: Approval | None = None
    cancel_roles: tuple[str, ...] = ()

    @property
    def needs_approval(self) -> bool:
        return self.allowed and self.approval is not None and self.approval.count > 0


@dataclass(frozen=True)
class Policy:
    roles: dict[str, Role]
    rules: tuple[Rule, ...]
    console_groups: dict[str, frozenset[str]] = field(default_factory=dict)
    path: Path | None = None

    def roles_of(self, user: str, groups: frozenset[str]) -> set[str]:
        return {name for name, role in self.roles.items() if role.has(user, groups)}

    def in_roles(self, user: str, groups: frozenset[str], roles: Iterable[str]) -> bool:
        return any(self.roles[r].has(user, groups) for r in roles if r in self.roles)

    def decide(self, user: str, groups: frozenset[str], module: str, hosts: list[str], idc: str) -> Decision:
        used: dict[str, Rule] = {}
        for host in hosts:
            rule = next((r for r in self.rules if r.matches(module, host, idc)), None)
            if rule is None:
                return Decision(False, f"no rule allows `{module}` on {host} in {idc} (deny by default)")
            if not self.in_roles(user, groups, rule.request):
                return Decision(False, f"rule `{rule.name}` does not let you run `{module}` on {host} "
                                       f"(requesters: {', '.join(rule.request) or 'nobody'})", (rule.name,))
            used[rule.name] = rule
        if not used:
            return Decision(False, "no hosts")
        return self._combine(list(used.values()), len(hosts))

    def _combine(self, rules: list[Rule], host_count: int) -> Decision:
        names = tuple(r.name for r in rules)
        limits = [r.max_hosts for r in rules if r.max_hosts is not None]
        max_hosts = min(limits) if limits else None
        if max_hosts is not None and host_count > max_hosts:
            return Decision(False, f"{host_count} hosts is over the limit of {max_hosts} set by rule "
                                   f"`{next(r.name for r in rules if r.max_hosts == max_hosts)}`", names, max_hosts)
        approvals = [r.approval for r in rules if r.approval is not None]
        approval = max(approvals, key=lambda a: a.count) if approvals else None
        cancel = tuple(dict.fromkeys(role for r in rules for role in r.cancel))
        rule_text = ", ".join(f"`{n}`" for n in names)
        return Decision(True, f"allowed by rule {rule_text}", names, max_hosts, approval, cancel)

    def may_approve(self, user: str, groups: frozenset[str], approval: Approval) -> bool:
        return self.in_roles(user, groups, approval.roles)


def load_policy(path: Path) -> Policy:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(path, "", "an existing policy file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"valid TOML ({exc})") from None
    return parse_policy(path, raw)


def parse_policy(path: Path, raw: dict[str, Any]) -> Policy:
    top = _Reader(path, raw, "")
    roles = {name: _role(top.sub("roles").sub(name, True), name) for name in top.sub("roles").table}
    rules_raw = top.get("rules", list, [], what="an array of [[rules]] tables")
    rules = tuple(_rule(_Reader(path, r, f"rules[{i}]"), roles, i) for i, r in enumerate(rules_raw))
    names = [r.name for r in rules]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(path, "rules", f"unique rule names; {name!r} is used twice")
    groups = top.sub("console_groups")
    console_groups = {g: frozenset(groups.strings(g)) for g in groups.table}
    return Policy(roles, rules, console_groups, path)


def _role(r: _Reader, name: str) -> Role:
    users = r.strings("users", ())
    for user in users:
        if not (user[:1] in ("U", "W") or user.startswith(("cli:", "console:"))):
            raise ConfigError(r.path, r.key("users"), "Slack user ids (U... or W...) or cli:NAME identities", user)
    groups = r.strings("groups", ())
    for group in groups:
        if not group.startswith("S"):
            raise ConfigError(r.path, r.key("groups"), "Slack user-group ids (S...)", group)
    return Role(name, frozenset(users), frozenset(groups))


def _known_roles(r: _Reader, key: str, roles: dict[str, Role]) -> tuple[str, ...]:
    names = r.strings(key, ())
    for name in names:
        if name not in roles:
            raise ConfigError(r.path, r.key(key), f"role names defined under [roles] ({', '.join(roles) or 'none'})", name)
    return names


def _rule(r: _Reader, roles: dict[str, Role], index: int) -> Rule:
    max_hosts = r.get("max_hosts", int, None)
    if max_hosts is not None and max_hosts < 1:
        raise ConfigError(r.path, r.key("max_hosts"), "a positive number of hosts", max_hosts)
    approval = None
    if "approval" in r.table:
        a = r.sub("approval")
        count = a.get("count", int)
        if count < 1:
            raise ConfigError(r.path, a.key("count"), "at least 1 approval (remove the table for none)", count)
        expiry = a.get("expiry_seconds", int, DEFAULT_EXPIRY)
        if not 1 <= expiry <= 7 * 86400:
            raise ConfigError(r.path, a.key("expiry_seconds"), "1 to 604800 seconds", expiry)
        approval = Approval(count, _known_roles(a, "roles", roles) or _missing(a, "roles"), expiry,
                            a.get("self_approval", bool, False), a.get("channel", str, None))
    return Rule(
        name=r.get("name", str, f"rule {index + 1}"),
        modules=r.strings("modules", ("*",)),
        targets=r.strings("targets", ("*",)),
        idcs=r.strings("idcs", ("*",)),
        request=_known_roles(r, "request", roles),
        max_hosts=max_hosts,
        approval=approval,
        cancel=_known_roles(r, "cancel", roles),
    )


def _missing(r: _Reader, key: str) -> tuple[str, ...]:
    raise ConfigError(r.path, r.key(key), "at least one approver role")
