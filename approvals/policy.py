"""The access policy: roles by Slack user and user-group ids (never display names), and rules.

A rule matches a (module, host, IDC) triple by globs. For each expanded host the first matching rule
decides; every host must be allowed, or the request is refused naming the rule (or "no rule", deny by
default). When the hosts of one request fall under several rules, the strictest of them applies: the
smallest max_hosts, the most approvals, the shortest expiry, self-approval only if every rule allows
it. Rules whose approvals name different approver roles cannot be combined: such a request is
refused and has to be split, so no host is approved by someone its own rule does not name.

Who may see a job or a schedule (`Viewer`), and how much say someone has over one (`Policy.authority`),
are decided here too, once, for chat, console, CLI and the web view alike.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ombot.tables import TableReader, read_toml
from ombot.globs import matches_any
from ombot.errors import ConfigError


DEFAULT_EXPIRY = 3600
# Ids, never display names (which anyone can change): Slack users U.../W..., user groups S...,
# channels C.../G.../D...; CLI and console identities are prefixed.
USER_ID = re.compile(r"^(?:[UW][A-Z0-9]{2,}|(?:cli|console):\S+)$")
GROUP_ID = re.compile(r"^S[A-Z0-9]{2,}$")
CHANNEL_ID = re.compile(r"^[CGD][A-Z0-9]{2,}$")

# How much say someone has over a job or a schedule, lowest first: a pause by someone with more
# authority than you stays until they, someone with as much, or a fresh approval lifts it.
NO_AUTHORITY, REQUESTER, CANCELLER, APPROVER = 0, 1, 2, 3
AUTHORITY_NAMES = {NO_AUTHORITY: "no say", REQUESTER: "its requester",
                   CANCELLER: "a canceller (one of its approvers or a `cancel` role)",
                   APPROVER: "an approver (a member of its approval roles)"}


@dataclass(frozen=True)
class Role:
    """A named set of users and user groups."""

    name: str
    users: frozenset[str]
    groups: frozenset[str]

    def has(self, user: str, groups: frozenset[str]) -> bool:
        return user in self.users or bool(self.groups & groups)


@dataclass(frozen=True)
class Approval:
    """What a rule asks before a job runs: how many approvers, from which roles, for how long."""

    count: int
    roles: tuple[str, ...]
    expiry: int = DEFAULT_EXPIRY
    self_approval: bool = False
    channel: str | None = None  # where the Approve/Deny message goes; default: the request's channel


@dataclass(frozen=True)
class Rule:
    """Which roles may request which modules on which hosts and IDCs, and on what terms."""

    name: str
    modules: tuple[str, ...]
    targets: tuple[str, ...]
    idcs: tuple[str, ...]
    request: tuple[str, ...]
    max_hosts: int | None = None
    approval: Approval | None = None
    cancel: tuple[str, ...] = ()

    def matches(self, module: str, host: str, idc: str) -> bool:
        return matches_any(module, self.modules) and matches_any(host, self.targets) and matches_any(idc, self.idcs)

    def may_run(self, module: str, idc: str) -> bool:
        """Whether this rule covers the module in the IDC on some host."""
        return matches_any(module, self.modules) and matches_any(idc, self.idcs)


@dataclass(frozen=True)
class Decision:
    """The policy's answer to one request: allowed or not, why, and on what terms."""

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
class Viewer:
    """What one person may see of jobs and schedules: the one rule, for every surface."""

    user: str
    roles: frozenset[str] = frozenset()  # the policy roles the person holds
    everything: bool = False  # a `[jobs] viewers` role, or an admin key on the CLI

    def sees(self, requester: str, approvers: Iterable[str], cancel_roles: Iterable[str]) -> bool:
        """Its requester, its approvers, members of its `cancel` roles, and `[jobs] viewers` see it."""
        return (self.everything or self.user == requester or self.user in approvers
                or not self.roles.isdisjoint(cancel_roles))

    def sees_request(self, requester: str, approvers: Iterable[str], cancel_roles: Iterable[str],
                     approver_roles: Iterable[str]) -> bool:
        """A pending approval request: whoever would see its job, and the roles asked to approve it."""
        return self.sees(requester, approvers, cancel_roles) or not self.roles.isdisjoint(approver_roles)


@dataclass(frozen=True)
class Policy:
    """Roles and rules, read and checked from the policy file."""

    roles: dict[str, Role]
    rules: tuple[Rule, ...]
    console_groups: dict[str, frozenset[str]] = field(default_factory=dict)
    path: Path | None = None
    audit_viewers: tuple[str, ...] = ()  # roles that may search the shell audit trail (`[audit] viewers`)
    job_viewers: tuple[str, ...] = ()  # roles that see every job and schedule (`[jobs] viewers`)

    def in_roles(self, user: str, groups: frozenset[str], roles: Iterable[str]) -> bool:
        return any(self.roles[r].has(user, groups) for r in roles if r in self.roles)

    def viewer(self, user: str, groups: frozenset[str]) -> Viewer:
        """What this person may see of jobs and schedules."""
        held = frozenset(name for name, role in self.roles.items() if role.has(user, groups))
        return Viewer(user, held, not held.isdisjoint(self.job_viewers))

    def authority(self, user: str, groups: frozenset[str], requester: str, approvers: Iterable[str],
                  cancel_roles: Iterable[str], approval: Approval | None) -> int:
        """How much say `user` has over a job or schedule whose rule asks `approval` now: APPROVER
        (may approve it: the requester only under self_approval), CANCELLER, REQUESTER or NO_AUTHORITY."""
        if approval is not None and self.in_roles(user, groups, approval.roles) and (
                user != requester or approval.self_approval):
            return APPROVER
        if user in approvers or self.in_roles(user, groups, cancel_roles):
            return CANCELLER
        return REQUESTER if user == requester else NO_AUTHORITY

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
        gated = [(r.name, r.approval) for r in rules if r.approval is not None]
        if len({frozenset(a.roles) for _, a in gated}) > 1:
            shown = "; ".join(f"`{name}`: {', '.join(a.roles)}" for name, a in gated)
            return Decision(False, f"these hosts need approvers from different roles ({shown}); "
                                   f"ask for them in separate requests", names, max_hosts)
        cancel = tuple(dict.fromkeys(role for r in rules for role in r.cancel))
        rule_text = ", ".join(f"`{n}`" for n in names)
        return Decision(True, f"allowed by rule {rule_text}", names, max_hosts,
                        _strictest([a for _, a in gated]), cancel)



def _strictest(approvals: list[Approval]) -> Approval | None:
    """One approval at least as strict as each given one (they name the same roles)."""
    if not approvals:
        return None
    most = max(approvals, key=lambda a: a.count)  # the first of equals: its channel is used
    return Approval(most.count, most.roles, min(a.expiry for a in approvals),
                    all(a.self_approval for a in approvals), most.channel)


def load_policy(path: Path) -> Policy:
    return parse_policy(path, read_toml(path, "an existing policy file"))


def parse_policy(path: Path, raw: dict[str, Any]) -> Policy:
    top = TableReader(path, raw, "")
    roles = {name: _role(top.sub("roles").sub(name, True), name) for name in top.sub("roles").table}
    rules_raw = top.get("rules", list, [], what="an array of [[rules]] tables")
    rules = tuple(_rule(TableReader(path, r, f"rules[{i}]"), roles, i) for i, r in enumerate(rules_raw))
    names = [r.name for r in rules]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(path, "rules", f"unique rule names; {name!r} is used twice")
    groups = top.sub("console_groups")
    console_groups = {_id(groups, g, GROUP_ID, "Slack user-group ids (S...) as keys", g):
                      frozenset(_ids(groups, g, USER_ID, "user ids (U..., W..., cli:NAME or console:NAME)"))
                      for g in groups.table}
    audit = top.sub("audit")
    audit_viewers = _known_roles(audit, "viewers", roles)
    audit.done()
    jobs = top.sub("jobs")
    job_viewers = _known_roles(jobs, "viewers", roles)
    jobs.done()
    top.done()
    return Policy(roles, rules, console_groups, path, audit_viewers, job_viewers)


def _id(r: TableReader, key: str, pattern: re.Pattern[str], what: str, value: str) -> str:
    if not pattern.match(value):
        raise ConfigError(r.path, r.key(key), what, value)
    return value


def _ids(r: TableReader, key: str, pattern: re.Pattern[str], what: str) -> tuple[str, ...]:
    return tuple(_id(r, key, pattern, what, v) for v in r.strings(key, ()))


def _role(r: TableReader, name: str) -> Role:
    users = _ids(r, "users", USER_ID, "Slack user ids (U... or W...) or cli:NAME / console:NAME identities, "
                                      "never display names")
    groups = _ids(r, "groups", GROUP_ID, "Slack user-group ids (S...)")
    r.done()
    return Role(name, frozenset(users), frozenset(groups))


def _known_roles(r: TableReader, key: str, roles: dict[str, Role]) -> tuple[str, ...]:
    names = r.strings(key, ())
    for name in names:
        if name not in roles:
            raise ConfigError(r.path, r.key(key), f"role names defined under [roles] ({', '.join(roles) or 'none'})", name)
    return names


def _patterns(r: TableReader, key: str) -> tuple[str, ...]:
    globs = r.strings(key, ("*",))
    if not globs:
        raise ConfigError(r.path, r.key(key), "at least one glob (leave the key out to match everything)", [])
    return globs


def _rule(r: TableReader, roles: dict[str, Role], index: int) -> Rule:
    name = r.get("name", str, f"rule {index + 1}")
    r.prefix = f"{r.prefix} ({name!r})"  # errors name the rule, not only its place in the file
    max_hosts = r.get("max_hosts", int, None)
    if max_hosts is not None and max_hosts < 1:
        raise ConfigError(r.path, r.key("max_hosts"), "a positive number of hosts", max_hosts)
    approval = _approval(r.sub("approval"), roles) if "approval" in r.table else None
    rule = Rule(
        name=name,
        modules=_patterns(r, "modules"),
        targets=_patterns(r, "targets"),
        idcs=_patterns(r, "idcs"),
        request=_known_roles(r, "request", roles),
        max_hosts=max_hosts,
        approval=approval,
        cancel=_known_roles(r, "cancel", roles),
    )
    r.done()  # a misspelt `module` or `target` must not silently widen the rule to everything
    return rule


def _approval(a: TableReader, roles: dict[str, Role]) -> Approval:
    count = a.get("count", int)
    if count < 1:
        raise ConfigError(a.path, a.key("count"), "at least 1 approval (remove the table for none)", count)
    expiry = a.get("expiry_seconds", int, DEFAULT_EXPIRY)
    if not 1 <= expiry <= 7 * 86400:
        raise ConfigError(a.path, a.key("expiry_seconds"), "1 to 604800 seconds", expiry)
    channel = a.get("channel", str, None)
    if channel is not None:
        _id(a, "channel", CHANNEL_ID, "a Slack channel id (C..., G...), not a channel name", channel)
    approval = Approval(count, _known_roles(a, "roles", roles) or _missing(a, "roles"), expiry,
                        a.get("self_approval", bool, False), channel)
    a.done()
    return approval


def _missing(r: TableReader, key: str) -> tuple[str, ...]:
    raise ConfigError(r.path, r.key(key), "at least one approver role")
