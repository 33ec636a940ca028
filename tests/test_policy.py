"""The access policy: parsing (errors name the rule and the key path), deciding, and the CLI that
checks and explains it (`ombot policy check|explain`) or obeys it (`ombot run`)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from ombot.approvals import Decision, Gate, operator_viewer, viewer_of
from ombot.approvals.policy import (
    APPROVER, CANCELLER, NO_AUTHORITY, REQUESTER, Approval, Policy, Role, Viewer, load_policy, parse_policy,
)
from ombot.errors import ConfigError
from ombot.app.initdir import init
from tests.support import Cluster, bot_table, child_env

CLI_USER = "cli:test"  # who `ombot run` acts as: the CLI registration of tests.support.Cluster, whoever runs it


def policy(text: str) -> Policy:
    return parse_policy(Path("policy.toml"), tomllib.loads(text))


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        policy(text)
    return str(caught.value)


ROLES = """\
[roles.ops]
users = ["U0ALICE", "cli:deploy"]
groups = ["S0OPS"]

[roles.leads]
users = ["U0LEAD1", "W0LEAD2"]

[roles.dbas]
users = ["U0DBA"]
"""


# -- parsing ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rules, key, expected", [
    ('[[rules]]\nname = "web"\nrequest = ["opps"]', "rules[0] ('web').request",
     "[roles] (ops, leads, dbas), got 'opps'"),
    ('[[rules]]\nname = "web"\nrequest = ["ops"]\ncancel = ["oncall"]', "rules[0] ('web').cancel", "got 'oncall'"),
    ('[[rules]]\nname = "web"\nrequest = ["ops"]\napproval = { count = 1, roles = ["boss"] }',
     "rules[0] ('web').approval.roles", "got 'boss'"),
])
def test_unknown_roles_are_named_with_the_rule(rules: str, key: str, expected: str) -> None:
    message = error_of(ROLES + rules)
    assert message.startswith(f"policy.toml: {key}: expected role names defined under [roles]")
    assert message.endswith(expected)


@pytest.mark.parametrize("users, groups, key, got", [
    ('["alice"]', "[]", "roles.ops.users", "'alice'"),
    ('["Ursula"]', "[]", "roles.ops.users", "'Ursula'"),  # a display name that happens to start with U
    ('["@alice"]', "[]", "roles.ops.users", "'@alice'"),
    ('["U0ALICE"]', '["ops-team"]', "roles.ops.groups", "'ops-team'"),
    ('["U0ALICE"]', '["U0ALICE"]', "roles.ops.groups", "'U0ALICE'"),
])
def test_roles_take_ids_never_display_names(users: str, groups: str, key: str, got: str) -> None:
    message = error_of(f"[roles.ops]\nusers = {users}\ngroups = {groups}\n")
    assert f"{key}: expected" in message and message.endswith(f"got {got}")


def test_valid_identities() -> None:
    p = policy(ROLES)
    assert p.roles["ops"].users == {"U0ALICE", "cli:deploy"} and p.roles["ops"].groups == {"S0OPS"}
    assert p.roles["leads"].users == {"U0LEAD1", "W0LEAD2"}  # Enterprise Grid ids start with W


@pytest.mark.parametrize("approval, key, expected", [
    ("{ count = 1 }", "approval.roles", "expected at least one approver role"),
    ("{ count = 1, roles = [] }", "approval.roles", "expected at least one approver role"),
    ('{ roles = ["leads"] }', "approval.count", "expected an integer (missing)"),
    ('{ count = 0, roles = ["leads"] }', "approval.count", "at least 1 approval"),
    ('{ count = 1, roles = ["leads"], expiry_seconds = 0 }', "approval.expiry_seconds", "1 to 604800 seconds"),
    ('{ count = 1, roles = ["leads"], channel = "#approvals" }', "approval.channel", "a Slack channel id"),
    ('{ count = 1, roles = ["leads"], self_approve = true }', "approval.self_approve",
     "did you mean 'self_approval'?"),
    ('"two leads"', "approval", "expected a table"),
])
def test_approval_errors(approval: str, key: str, expected: str) -> None:
    message = error_of(ROLES + f'[[rules]]\nname = "gated"\nrequest = ["ops"]\napproval = {approval}\n')
    assert f"rules[0] ('gated').{key}: " in message and expected in message


def test_rule_names_must_be_unique() -> None:
    rule = '[[rules]]\nname = "same"\nrequest = ["ops"]\n'
    assert error_of(ROLES + rule + rule).endswith("rules: expected unique rule names; 'same' is used twice")


@pytest.mark.parametrize("value, got", [("0", "0"), ("-3", "-3"), ('"5"', "'5'"), ("true", "True"), ("2.5", "2.5")])
def test_bad_max_hosts(value: str, got: str) -> None:
    message = error_of(ROLES + f'[[rules]]\nname = "capped"\nrequest = ["ops"]\nmax_hosts = {value}\n')
    assert "rules[0] ('capped').max_hosts: expected" in message and message.endswith(f"got {got}")


def test_misspelt_keys_are_errors_not_wider_rules() -> None:
    """`module` instead of `modules` would otherwise leave the default: every module."""
    message = error_of(ROLES + '[[rules]]\nname = "echo only"\nmodule = ["echo"]\nrequest = ["ops"]\n')
    assert "rules[0] ('echo only').module: expected a known key (did you mean 'modules'?" in message
    assert "roles.ops.user: expected a known key" in error_of('[roles.ops]\nuser = ["U0ALICE"]\n')
    assert "policy.toml: rule: expected a known key (did you mean 'rules'?" in error_of(
        ROLES + '[[rule]]\nrequest = ["ops"]\n')


def test_unnamed_rules_are_named_by_position() -> None:
    message = error_of(ROLES + '[[rules]]\nrequest = ["ops"]\n[[rules]]\nrequest = ["nobody"]\n')
    assert "rules[1] ('rule 2').request" in message
    assert [r.name for r in policy(ROLES + '[[rules]]\nrequest = ["ops"]\n').rules] == ["rule 1"]


def test_other_shapes() -> None:
    assert "rules[0] ('x').targets: expected at least one glob" in error_of(
        ROLES + '[[rules]]\nname = "x"\ntargets = []\nrequest = ["ops"]\n')
    assert "rules[0]: expected a table" in error_of('rules = ["x"]')
    assert "console_groups.ops: expected Slack user-group ids" in error_of('[console_groups]\nops = ["U0A"]\n')
    assert "console_groups.S0OPS: expected user ids" in error_of('[console_groups]\nS0OPS = ["alice"]\n')


def test_load_policy_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="an existing policy file"):
        load_policy(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[roles.ops\n")
    with pytest.raises(ConfigError, match=r"broken.toml: expected valid TOML"):
        load_policy(broken)


RULE = '[[rules]]\nname = "r"\nrequest = ["ops"]\n'


@pytest.mark.parametrize("text, message", [
    ('[roles.ops]\nusers = ["alice"]\n', "roles.ops.users: expected Slack user ids (U... or W...) or cli:NAME / "
                                         "console:NAME identities, never display names, got 'alice'"),
    ('[roles.ops]\ngroups = ["ops-team"]\n', "roles.ops.groups: expected Slack user-group ids (S...), got 'ops-team'"),
    ('[[rules]]\nname = "web"\nrequest = ["ops"]\n',
     "rules[0] ('web').request: expected role names defined under [roles] (none), got 'ops'"),
    (ROLES + RULE + "targets = []\n",
     "rules[0] ('r').targets: expected at least one glob (leave the key out to match everything), got []"),
    (ROLES + RULE + "max_hosts = 0\n", "rules[0] ('r').max_hosts: expected a positive number of hosts, got 0"),
    (ROLES + RULE + 'approval = { count = 0, roles = ["leads"] }\n',
     "rules[0] ('r').approval.count: expected at least 1 approval (remove the table for none), got 0"),
    (ROLES + RULE + 'approval = { count = 1, roles = ["leads"], expiry_seconds = 604801 }\n',
     "rules[0] ('r').approval.expiry_seconds: expected 1 to 604800 seconds, got 604801"),
    (ROLES + RULE + 'approval = { count = 1, roles = ["leads"], channel = "#approvals" }\n',
     "rules[0] ('r').approval.channel: expected a Slack channel id (C..., G...), not a channel name, got '#approvals'"),
    (ROLES + RULE + "approval = { count = 1 }\n", "rules[0] ('r').approval.roles: expected at least one approver role"),
    ('rules = "x"\n', "rules: expected an array of [[rules]] tables, got 'x'"),
    (ROLES + RULE + RULE, "rules: expected unique rule names; 'r' is used twice"),
    ('[console_groups]\nops = ["U0A"]\n', "console_groups.ops: expected Slack user-group ids (S...) as keys, got 'ops'"),
    ('[console_groups]\nS0OPS = ["alice"]\n',
     "console_groups.S0OPS: expected user ids (U..., W..., cli:NAME or console:NAME), got 'alice'"),
])
def test_errors_are_whole_sentences_naming_file_key_and_value(text: str, message: str) -> None:
    assert error_of(text) == f"policy.toml: {message}"


def test_limits_are_inclusive_and_defaults_are_plain() -> None:
    p = policy(ROLES + RULE + 'max_hosts = 1\napproval = { count = 1, roles = ["leads"], expiry_seconds = 1 }\n'
               + '[[rules]]\nname = "week"\nrequest = ["ops"]\n'
               + 'approval = { count = 1, roles = ["leads"], expiry_seconds = 604800, channel = "C0APPROVE" }\n')
    assert p.rules[0].max_hosts == 1 and p.rules[0].approval == Approval(1, ("leads",), 1, False, None)
    assert p.rules[0].approval.self_approval is False
    assert p.rules[1].approval == Approval(1, ("leads",), 604800, False, "C0APPROVE")
    assert p.roles["ops"] == Role("ops", frozenset({"U0ALICE", "cli:deploy"}), frozenset({"S0OPS"}))
    assert p.path == Path("policy.toml") and p.console_groups == {}
    grouped = policy('[console_groups]\nS0OPS = ["U0A", "cli:x"]\n')
    assert grouped.console_groups == {"S0OPS": frozenset({"U0A", "cli:x"})}


def test_load_policy_keeps_its_path(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as caught:
        load_policy(missing)
    assert str(caught.value) == f"{missing}: expected an existing policy file"
    written = tmp_path / "policy.toml"
    written.write_text(ROLES)
    assert load_policy(written).path == written and set(load_policy(written).roles) == {"ops", "leads", "dbas"}


def test_audit_viewers_are_known_roles_and_nobody_by_default() -> None:
    assert policy(ROLES).audit_viewers == ()  # no [audit] table: nobody may search
    assert policy(ROLES + "[audit]\nviewers = []\n").audit_viewers == ()
    assert policy(ROLES + '[audit]\nviewers = ["leads", "ops"]\n').audit_viewers == ("leads", "ops")


@pytest.mark.parametrize("text, message", [
    (ROLES + '[audit]\nviewers = ["auditors"]\n',
     "audit.viewers: expected role names defined under [roles] (ops, leads, dbas), got 'auditors'"),
    (ROLES + '[audit]\nviewers = ["U0ALICE"]\n',  # a user id is not a role
     "audit.viewers: expected role names defined under [roles] (ops, leads, dbas), got 'U0ALICE'"),
    ('[audit]\nviewers = ["leads"]\n', "audit.viewers: expected role names defined under [roles] (none), got 'leads'"),
    (ROLES + '[audit]\nviewers = "leads"\n', "audit.viewers: expected a list of strings, got 'leads'"),
    (ROLES + "[audit]\nviewers = [1]\n", "audit.viewers: expected a list of strings, got [1]"),
    (ROLES + '[audit]\nviewer = ["leads"]\n',
     "audit.viewer: expected a known key (did you mean 'viewers'? known: viewers)"),
    ('audit = ["leads"]\n', "audit: expected a table, got ['leads']"),
])
def test_audit_viewer_errors(text: str, message: str) -> None:
    assert error_of(text) == f"policy.toml: {message}"


def test_job_viewers_are_known_roles_and_nobody_by_default() -> None:
    assert policy(ROLES).job_viewers == ()  # no [jobs] table: each sees only what they are part of
    assert policy(ROLES + "[jobs]\nviewers = []\n").job_viewers == ()
    assert policy(ROLES + '[jobs]\nviewers = ["leads", "dbas"]\n').job_viewers == ("leads", "dbas")
    assert policy(ROLES + '[jobs]\nviewers = ["leads"]\n').audit_viewers == ()  # the two never mix


@pytest.mark.parametrize("text, message", [
    (ROLES + '[jobs]\nviewers = ["auditors"]\n',
     "jobs.viewers: expected role names defined under [roles] (ops, leads, dbas), got 'auditors'"),
    (ROLES + '[jobs]\nviewers = ["U0LEAD1"]\n',
     "jobs.viewers: expected role names defined under [roles] (ops, leads, dbas), got 'U0LEAD1'"),
    ('[jobs]\nviewers = ["leads"]\n', "jobs.viewers: expected role names defined under [roles] (none), got 'leads'"),
    (ROLES + '[jobs]\nviewers = "leads"\n', "jobs.viewers: expected a list of strings, got 'leads'"),
    (ROLES + '[jobs]\nviewer = ["leads"]\n', "jobs.viewer: expected a known key (did you mean 'viewers'? known: viewers)"),
    ('jobs = ["leads"]\n', "jobs: expected a table, got ['leads']"),
])
def test_job_viewer_errors(text: str, message: str) -> None:
    assert error_of(text) == f"policy.toml: {message}"


def test_who_sees_a_job_or_schedule() -> None:
    """Its requester, its approvers, members of its `cancel` roles (by group too), `[jobs] viewers`."""
    p = policy(ROLES + '[jobs]\nviewers = ["dbas"]\n')
    job = ("U0ALICE", ["U0LEAD1"], ["ops"])  # requester, approvers, cancel roles
    assert p.viewer("U0ALICE", NO_GROUPS) == Viewer("U0ALICE", frozenset({"ops"}), False)
    assert p.viewer("U0DBA", NO_GROUPS) == Viewer("U0DBA", frozenset({"dbas"}), True)
    assert p.viewer("U0NOBODY", NO_GROUPS) == Viewer("U0NOBODY", frozenset(), False)
    seen = [(user, bool(groups), p.viewer(user, groups).sees(*job)) for user, groups in [
        ("U0ALICE", NO_GROUPS), ("U0LEAD1", NO_GROUPS), ("W0LEAD2", NO_GROUPS), ("U0BOB", frozenset({"S0OPS"})),
        ("U0BOB", NO_GROUPS), ("U0DBA", NO_GROUPS), ("U0NOBODY", NO_GROUPS)]]
    assert seen == [("U0ALICE", False, True), ("U0LEAD1", False, True), ("W0LEAD2", False, False),
                    ("U0BOB", True, True), ("U0BOB", False, False), ("U0DBA", False, True), ("U0NOBODY", False, False)]
    assert not p.viewer("U0BOB", frozenset({"S0OPS"})).sees("U0ALICE", [], ["leads"])
    assert Viewer("U0X", everything=True).sees("U0ALICE", [], [])


def test_what_the_cli_and_a_policy_less_bot_see() -> None:
    p = policy(ROLES.replace('groups = ["S0OPS"]', 'groups = ["S0OPS"]\n[console_groups]\nS0OPS = ["cli:ops"]\n')
               + '[jobs]\nviewers = ["ops"]\n')
    assert operator_viewer(p, "cli:root", admin=True) == Viewer("cli:root", frozenset(), True)
    assert operator_viewer(p, "cli:ops", admin=False) == Viewer("cli:ops", frozenset({"ops"}), True)  # by its group
    assert operator_viewer(p, "cli:deploy", admin=False) == Viewer("cli:deploy", frozenset({"ops"}), True)
    assert operator_viewer(p, "cli:other", admin=False) == Viewer("cli:other", frozenset(), False)
    assert operator_viewer(None, "cli:other", admin=False) == Viewer("cli:other")
    assert viewer_of(None, "U0ALICE") == Viewer("U0ALICE")
    assert viewer_of(Gate(p, lambda group: frozenset({"U0BOB"})), "U0BOB") == Viewer("U0BOB", frozenset({"ops"}), True)


def test_authority_over_a_job_or_schedule() -> None:
    """Approvers of its rule (the requester only under self_approval) > its approvers and `cancel`
    roles > its requester > anyone else."""
    p = policy(ROLES)
    lead = Approval(1, ("leads",))

    def say(user: str, approval: Approval | None = lead, groups: frozenset[str] = NO_GROUPS,
            approvers: tuple[str, ...] = ("U0LEAD1",), cancel: tuple[str, ...] = ("dbas",)) -> int:
        return p.authority(user, groups, "U0ALICE", approvers, cancel, approval)

    assert (NO_AUTHORITY, REQUESTER, CANCELLER, APPROVER) == (0, 1, 2, 3)
    assert say("U0LEAD1") == say("W0LEAD2") == APPROVER  # approved it, or could have
    assert say("U0LEAD1", approval=None) == CANCELLER  # no approval asked now: one of its approvers still
    assert say("W0LEAD2", approval=None) == NO_AUTHORITY
    assert say("U0DBA") == CANCELLER and say("U0DBA", cancel=()) == NO_AUTHORITY
    assert say("U0ALICE") == REQUESTER and say("U0BOB") == NO_AUTHORITY
    assert say("U0BOB", approval=Approval(1, ("ops",)), groups=frozenset({"S0OPS"})) == APPROVER
    # the requester approves their own only under self_approval
    own = Approval(1, ("ops",), self_approval=True)
    assert say("U0ALICE", approval=Approval(1, ("ops",))) == REQUESTER
    assert say("U0ALICE", approval=own) == APPROVER
    assert say("U0ALICE", approval=Approval(1, ("ops",)), cancel=("ops",)) == CANCELLER
    assert say("U0ALICE", approval=Approval(1, ("ops",)), approvers=("U0ALICE",)) == CANCELLER
    gate = Gate(p, lambda group: frozenset({"U0BOB"}) if group == "S0OPS" else frozenset())
    assert gate.authority("U0BOB", "U0ALICE", [], [], Approval(1, ("ops",))) == APPROVER
    assert gate.authority("U0BOB", "U0ALICE", [], ["ops"], None) == CANCELLER


# -- deciding -----------------------------------------------------------------------------------------


RULES = ROLES + """
[[rules]]
name = "db is for dbas"
targets = ["db*"]
request = ["dbas"]
approval = { count = 1, roles = ["leads"] }

[[rules]]
name = "never far hosts"
targets = ["far*"]

[[rules]]
name = "web shell"
modules = ["shell.exec"]
targets = ["web*"]
request = ["ops"]
max_hosts = 5
approval = { count = 2, roles = ["leads"], expiry_seconds = 600, self_approval = true }
cancel = ["leads"]

[[rules]]
name = "local shell"
modules = ["shell.exec"]
targets = ["localhost"]
request = ["ops"]
approval = { count = 1, roles = ["leads"], expiry_seconds = 60 }
cancel = ["dbas"]

[[rules]]
name = "everyday"
modules = ["echo", "ping"]
idcs = ["bj*", "local"]
request = ["ops"]
max_hosts = 3
"""

NO_GROUPS: frozenset[str] = frozenset()


def decide(user: str, module: str, hosts: list[str], idc: str = "local",
           groups: frozenset[str] = NO_GROUPS) -> Decision:
    return policy(RULES).decide(user, groups, module, hosts, idc)


def test_deny_by_default() -> None:
    d = decide("U0ALICE", "facts", ["web01"])
    assert not d.allowed and d.reason == "no rule allows `facts` on web01 in local (deny by default)"
    assert not policy(ROLES).decide("U0ALICE", NO_GROUPS, "echo", ["web01"], "local").allowed
    assert not decide("U0ALICE", "echo", ["web01"], idc="sh").allowed  # idcs globs
    assert decide("U0ALICE", "echo", ["web01"], idc="bj2").allowed
    assert decide("U0ALICE", "echo", []).reason == "no hosts"


def test_first_matching_rule_wins() -> None:
    # "db is for dbas" matches every module on db hosts first, so "everyday" never sees them
    d = decide("U0ALICE", "echo", ["db01"])
    assert not d.allowed and d.rules == ("db is for dbas",)
    assert d.reason == "rule `db is for dbas` does not let you run `echo` on db01 (requesters: dbas)"
    # a rule without requesters is an explicit deny
    assert decide("U0ALICE", "echo", ["far01"]).reason.endswith("on far01 (requesters: nobody)")
    allowed = decide("U0DBA", "echo", ["db01"])
    assert allowed.allowed and allowed.needs_approval and allowed.rules == ("db is for dbas",)


def test_every_host_must_be_allowed() -> None:
    assert decide("U0ALICE", "echo", ["web01", "web02"]).allowed
    d = decide("U0ALICE", "echo", ["web01", "db01", "web02"])
    assert not d.allowed and "on db01" in d.reason and "`db is for dbas`" in d.reason


def test_roles_by_user_group() -> None:
    assert not decide("U0BOB", "echo", ["web01"]).allowed
    assert decide("U0BOB", "echo", ["web01"], groups=frozenset({"S0OPS"})).allowed


def test_max_hosts_is_the_smallest_and_named() -> None:
    assert decide("U0ALICE", "echo", ["web01", "web02", "web03"]).allowed
    d = decide("U0ALICE", "echo", ["web01", "web02", "web03", "web04"])
    assert not d.allowed and d.reason == "4 hosts is over the limit of 3 set by rule `everyday`"
    d = decide("U0ALICE", "shell.exec", ["localhost"] + [f"web{i:02d}" for i in range(1, 6)])
    assert not d.allowed and "6 hosts is over the limit of 5 set by rule `web shell`" in d.reason


def test_strictest_approval_across_rules() -> None:
    web = decide("U0ALICE", "shell.exec", ["web01"])
    assert web.approval == Approval(2, ("leads",), 600, True, None)
    both = decide("U0ALICE", "shell.exec", ["web01", "localhost"])
    assert both.allowed and both.rules == ("web shell", "local shell")
    # the most approvals, the shortest expiry, self-approval only if every rule allows it
    assert both.approval == Approval(2, ("leads",), 60, False, None)
    assert both.max_hosts == 5 and set(both.cancel_roles) == {"leads", "dbas"}
    assert both.reason == "allowed by rule `web shell`, `local shell`"
    mixed = decide("U0ALICE", "echo", ["web01"])
    assert mixed.allowed and not mixed.needs_approval and mixed.approval is None


def test_approvals_from_different_roles_are_not_merged() -> None:
    p = policy(ROLES + """
[[rules]]
name = "web"
targets = ["web*"]
request = ["ops"]
approval = { count = 1, roles = ["leads"] }

[[rules]]
name = "db"
targets = ["db*"]
request = ["ops"]
approval = { count = 1, roles = ["dbas"] }
""")
    d = p.decide("U0ALICE", NO_GROUPS, "echo", ["web01", "db01"], "local")
    assert not d.allowed and "different roles (`web`: leads; `db`: dbas)" in d.reason
    assert p.decide("U0ALICE", NO_GROUPS, "echo", ["db01"], "local").approval.roles == ("dbas",)


def test_refusals_are_whole_decisions() -> None:
    """`allowed` is False (not merely falsy), and a refusal names the rules and limit it came from."""
    assert decide("U0ALICE", "facts", ["web01"]) == Decision(
        False, "no rule allows `facts` on web01 in local (deny by default)")
    assert decide("U0ALICE", "echo", ["db01"]) == Decision(
        False, "rule `db is for dbas` does not let you run `echo` on db01 (requesters: dbas)", ("db is for dbas",))
    assert decide("U0ALICE", "echo", []) == Decision(False, "no hosts")
    assert decide("U0ALICE", "echo", ["web01", "web02", "web03", "web04"]) == Decision(
        False, "4 hosts is over the limit of 3 set by rule `everyday`", ("everyday",), 3)
    p = policy(ROLES + """
[[rules]]
name = "web"
targets = ["web*"]
request = ["ops", "dbas"]
max_hosts = 4
approval = { count = 2, roles = ["leads", "dbas"], channel = "C0WEB" }

[[rules]]
name = "web again"
targets = ["web*"]
request = ["ops"]

[[rules]]
name = "db"
targets = ["db*"]
request = ["ops"]
approval = { count = 1, roles = ["dbas"] }

[[rules]]
name = "app"
targets = ["app*"]
request = ["ops"]
approval = { count = 2, roles = ["dbas", "leads"], channel = "C0APP" }
""")
    assert p.decide("U0ALICE", NO_GROUPS, "echo", ["web01", "db01"], "local") == Decision(
        False, "these hosts need approvers from different roles (`web`: leads, dbas; `db`: dbas); "
               "ask for them in separate requests", ("web", "db"), 4)
    assert p.decide("U0MALLORY", NO_GROUPS, "echo", ["web01"], "local").reason == (
        "rule `web` does not let you run `echo` on web01 (requesters: ops, dbas)")
    # Equal counts: the first rule's channel is where the approval goes.
    both = p.decide("U0ALICE", NO_GROUPS, "echo", ["web01", "app01"], "local")
    assert both.allowed is True and both.approval == Approval(2, ("leads", "dbas"), 3600, False, "C0WEB")


def test_gate_fails_closed_when_groups_cannot_be_read() -> None:
    def broken(group: str) -> frozenset[str]:
        raise RuntimeError("ratelimited")

    p = policy(RULES)
    assert not Gate(p, broken).decide("U0BOB", "echo", ["web01"], "local").allowed
    working = Gate(p, lambda group: frozenset({"U0BOB"}) if group == "S0OPS" else frozenset())
    assert working.decide("U0BOB", "echo", ["web01"], "local").allowed
    assert working.may_run("U0BOB", "shell.exec", "local") and not working.may_run("U0BOB", "facts", "local")


# -- the CLI ----------------------------------------------------------------------------------------------


CLI_POLICY = f"""\
[roles.ops]
users = ["U0ALICE", "{CLI_USER}"]

[roles.leads]
users = ["U0LEAD1"]

[roles.grouped]
groups = ["S0CONSOLE"]

[console_groups]
S0CONSOLE = ["U0CAROL"]

[[rules]]
name = "shell needs a lead"
modules = ["shell.exec"]
request = ["ops"]
max_hosts = 2
approval = {{ count = 1, roles = ["leads"], expiry_seconds = 900 }}
cancel = ["leads"]

[[rules]]
name = "everyday"
modules = ["echo", "facts"]
request = ["ops", "grouped"]
max_hosts = 4
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    shared = Cluster(tmp_path_factory.mktemp("policy"), {"local": ["m1"]}, policy=CLI_POLICY,
                     extra_toml=bot_table())
    shared.start("m1")
    yield shared
    shared.stop_all()


def test_policy_check_exit_codes(cluster: Cluster, tmp_path: Path) -> None:
    ok = cluster.ombot("policy", "check")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"{cluster.root / 'policy.toml'}: ok, 3 roles, 2 rules (1 with approval)"

    bad = tmp_path / "bad.toml"
    bad.write_text(CLI_POLICY.replace('request = ["ops", "grouped"]', 'request = ["ops", "groupd"]'))
    failed = cluster.ombot("policy", "check", "--file", str(bad))
    assert failed.returncode == 2 and not failed.stdout
    assert failed.stderr.strip() == (f"error: {bad}: rules[1] ('everyday').request: expected role names defined "
                                     f"under [roles] (ops, leads, grouped), got 'groupd'")


def test_policy_check_without_a_policy(tmp_path: Path) -> None:
    bare = Cluster(tmp_path / "bare", {"local": ["m1"]}, extra_toml=bot_table(policy=None))
    result = bare.ombot("policy", "check")
    assert result.returncode == 2 and "no [bot] policy configured (or give --file)" in result.stderr


def test_sample_policy_of_init_is_valid(tmp_path: Path) -> None:
    config = init(tmp_path / "site")
    result = subprocess.run([sys.executable, "-m", "ombot", "--config", str(config), "policy", "check"],
                            capture_output=True, text=True, timeout=60, env=child_env())
    assert result.returncode == 0, result.stderr
    assert "ok, 2 roles, 3 rules (2 with approval)" in result.stdout


def test_policy_explain(cluster: Cluster) -> None:
    allowed = cluster.ombot("policy", "explain", "U0ALICE", "echo", "web[01-02]")
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.splitlines() == ["2 host(s) in local: web01, web02",
                                           "ALLOWED: allowed by rule `everyday`", "max hosts: 4"]

    gated = cluster.ombot("policy", "explain", "U0ALICE", "shell.exec", "localhost", "local")
    assert gated.returncode == 0, gated.stderr
    assert gated.stdout.splitlines()[1:] == [
        "ALLOWED: allowed by rule `shell needs a lead`", "max hosts: 2",
        "needs 1 approval(s) from leads, expiring after 900 s; not by the requester",
        "may cancel: the requester, its approvers, leads"]

    refused = cluster.ombot("policy", "explain", "U0MALLORY", "echo", "web01")
    assert refused.returncode == 1
    assert refused.stdout.splitlines()[1] == ("REFUSED: rule `everyday` does not let you run `echo` on web01 "
                                              "(requesters: ops, grouped)")
    over = cluster.ombot("policy", "explain", "U0ALICE", "shell.exec", "web")
    assert over.returncode == 1 and "REFUSED: 3 hosts is over the limit of 2 set by rule `shell needs a lead`" in over.stdout
    nothing = cluster.ombot("policy", "explain", "U0ALICE", "ping", "db01")
    assert nothing.returncode == 1 and "REFUSED: no rule allows `ping` on db01 in local (deny by default)" in nothing.stdout
    # user groups come from [console_groups] here: the CLI has no Slack to ask
    grouped = cluster.ombot("policy", "explain", "U0CAROL", "echo", "db01")
    assert grouped.returncode == 0 and "ALLOWED" in grouped.stdout


def test_run_obeys_the_policy(cluster: Cluster) -> None:
    ran = cluster.ombot("run", "echo", "localhost", "message=allowed")
    assert ran.returncode == 0, ran.stderr
    assert "allowed" in ran.stdout

    gated = cluster.ombot("run", "shell.exec", "localhost", "cmd=true")
    assert gated.returncode == 2
    assert gated.stderr.strip().splitlines()[-1] == (
        "error: shell.exec needs approval (allowed by rule `shell needs a lead`); approval-gated modules cannot be "
        "started from the CLI: ask in Slack or the console")
    assert "job " not in gated.stdout  # nothing was submitted

    refused = cluster.ombot("run", "ping", "localhost")
    assert refused.returncode == 2
    assert "error: refused by policy: no rule allows `ping` on localhost in local (deny by default)" in refused.stderr
