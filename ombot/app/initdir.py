"""`ombot init DIR`: a working starter set with fresh keys. Nothing secret goes into ombot.toml."""

from __future__ import annotations

import os
import pwd
import re
from pathlib import Path

from ombot.app import starter
from ombot.app.starter import POLICY_RULES
from ombot.errors import OmbotError

DEFAULT_PORT = 18861
BOT_OPS_PORT, MASTER_OPS_PORT = 9464, 9465  # the ops listeners (docs/monitoring.md): loopback, for a local scraper

CONFIG_TEMPLATE = """\
# OMBot settings. Secrets never go in this file: private keys are 0600 files named below;
# database URLs with passwords come from the environment (OMBOT_MASTER_DATABASE_URL) or a
# 0600 file named by `database_url_file`. Paths are relative to this file.

# The IDC front ends act in by default, and the registration `ombot run` speaks as
# (another with --client NAME or $OMBOT_CLIENT).
[client]
id = "{cli_id}"
default_idc = "local"

# Every client key the masters may accept. Each has its own key and registration; the master maps
# the key to who is asking and never takes the request's word for it:
#   kind = "chat"     the bot: may name Slack users as requesters and approvers
#   kind = "console"  `ombot console`: always acts as console:USER
#   kind = "cli"      `ombot run`: always acts as cli:USER
# modules and hosts are globs of what the key may run at all; the policy decides the rest.
# key_file is needed only on the machine where that client runs. `admin = true` (cli keys only)
# lets that key add and revoke registrations at the masters at once, without a restart
# (`ombot audit enroll`, `ombot clients revoke`): the masters keep them in their databases.
[clients.bot]
kind = "chat"
public_key = "{bot_public}"
key_file = "keys/bot.key"
modules = ["*"]
hosts = ["*"]

[clients.console]
kind = "{console_kind}"{console_comment}
user = "{unix_user}"
public_key = "{console_public}"
key_file = "keys/console.key"
modules = ["*"]
hosts = ["*"]

[clients.{cli_id}]
kind = "cli"
user = "{unix_user}"
admin = true                       # the operator's key: may enrol and revoke clients
public_key = "{cli_public}"
key_file = "keys/{cli_id}.key"
modules = ["*"]
hosts = ["*"]

# Each IDC lists its masters in failover order.
[idcs.local]
masters = ["local-1"]

[masters.local-1]
idc = "local"
address = "127.0.0.1:{port}"
public_key = "{master_public}"
key_file = "keys/local-1.key"      # needed only where this master runs
inventory = "inventory/local.ini"  # Ansible INI or YAML
backend = "local"
accept = ["bot", "console", "{cli_id}"]  # read at start; revoke at once: ombot clients revoke ID
state_dir = "state"                # SQLite database, file store; or set OMBOT_MASTER_DATABASE_URL
ops_listen = "127.0.0.1:{master_ops_port}"      # /metrics, /healthz, /readyz (docs/monitoring.md); `ombot health`

[masters.local-1.limits]
max_frame_bytes = 1048576
clock_skew_seconds = 60
output_cap_bytes = 65536
job_timeout_seconds = 600

# The master's own approval floor, checked on every job whatever the bot says: module glob ->
# approvals (by people other than the requester) the envelope must carry.
[masters.local-1.approvals]
"shell.exec" = 1
"script.run" = 1
"file.push" = 1
"ansible.playbook" = 1
"salt.state" = 1
"audit.*" = 1

# With backend = "ansible": the directory ansible.playbook runs playbooks from, each with its
# typed vars in NAME.params.toml beside it (docs/backends.md, "Playbooks"); playbooks/ holds
# OMBot's example, ntp-check.yml.
# [masters.local-1.ansible]
# playbooks = "playbooks"

# The chat bot. Slack tokens come from the environment: SLACK_BOT_TOKEN, and SLACK_APP_TOKEN
# (Socket Mode) or SLACK_SIGNING_SECRET (HTTP mode). Its database: state/bot.db, or
# OMBOT_BOT_DATABASE_URL / database_url_file.
[bot]
# team_id = "T0123456"             # the one Slack workspace this bot serves
listen = "127.0.0.1:3000"          # HTTP mode: Slack posts to http://HOST:PORT/slack/events
workers = 8
ops_listen = "127.0.0.1:{bot_ops_port}"      # /metrics, /healthz, /readyz (docs/monitoring.md); `ombot health`
client = "bot"                     # the registration `ombot bot` speaks as
console_client = "console"         # the registration `ombot console` speaks as
policy = "policy.toml"             # who may run what; without it every request is refused
audit_rules = "audit-rules.toml"   # shell audit alerts (docs/audit.md); check edits: ombot audit test-rules
# audit_alert_channel = "C0123AUDIT"  # silent audit agents, and rules naming no channel
{demo_console}
# Extra directories of task modules, loaded after the built-ins.
[modules]
dirs = []
"""

# Only `ombot up`'s demo: the console attests chat users, so /as can play requester and approver alone.
DEMO_CONSOLE = """\
console_user = "U0DEMO"            # demo: the console acts as this chat user...
console_allow_as = true            # ...and /as USER switches to another (never in production)
"""
DEMO_CONSOLE_COMMENT = "  # demo only: the console may act as the demo's chat users (/as)"

INVENTORY = """\
# Ansible INI inventory for IDC "local". The local backend runs only on hosts marked
# ansible_connection=local, i.e. on the master host itself.
[local]
localhost ansible_connection=local
"""

POLICY = """\
# OMBot access policy (docs/policy.md). Deny by default: a request no rule allows is refused.
# Roles name Slack user ids (U.../W...), Slack user-group ids (S...) and CLI identities
# (cli:NAME) -- never display names, which change. For each target host the first matching
# rule decides; every host must be allowed.

[roles.ops]
users = [{ops_users}]
groups = []                            # e.g. ["S0123OPS"]: every member of that Slack user group

[roles.leads]
users = ["U0LEAD1", "U0LEAD2"]         # in `ombot up`'s demo, try approvals alone: /as U0LEAD1

# Who may search shell audit events with /om audit (docs/audit.md): nobody unless named here.
[audit]
viewers = ["leads"]

# Who sees every job and schedule in /om jobs, /om schedules and /om status (docs/policy.md);
# everyone else sees what they asked for, approved or may cancel.
[jobs]
viewers = ["leads"]

# The console has no Slack to ask for group members: it reads them here.
[console_groups]
# S0123OPS = ["U0DEMO"]

""" + POLICY_RULES


def init(directory: Path, port: int = DEFAULT_PORT, demo: bool = False) -> Path:
    """Write a starter set. `demo` (for `ombot up`) lets the console play the demo's chat users."""
    from ombot.audit import SAMPLE_RULES

    config = directory / "ombot.toml"
    if config.exists():
        raise OmbotError(f"{config} exists; refusing to overwrite it")
    unix_user = _unix_user()
    cli_id = starter.cli_id(unix_user)
    keys = starter.make_keys(directory, ["bot", "console", cli_id, "local-1"])
    (directory / "inventory").mkdir(parents=True, exist_ok=True)
    (directory / "inventory" / "local.ini").write_text(INVENTORY)
    (directory / "state" / "files").mkdir(parents=True, exist_ok=True)
    ops = ['"U0DEMO"' if demo else f'"console:{unix_user}"', f'"cli:{unix_user}"']
    (directory / "policy.toml").write_text(POLICY.format(ops_users=", ".join(ops)))
    _copy_example_playbooks(directory / "playbooks")
    (directory / "audit-rules.toml").write_text(SAMPLE_RULES)  # check edits with `ombot audit test-rules`
    config.write_text(CONFIG_TEMPLATE.format(
        cli_id=cli_id, unix_user=unix_user, port=port, bot_ops_port=BOT_OPS_PORT, master_ops_port=MASTER_OPS_PORT,
        bot_public=keys["bot"].public,
        console_public=keys["console"].public, cli_public=keys[cli_id].public, master_public=keys["local-1"].public,
        console_kind="chat" if demo else "console", console_comment=DEMO_CONSOLE_COMMENT if demo else "",
        demo_console=DEMO_CONSOLE if demo else ""))
    return config


def init_production(directory: Path, idcs: str | None, masters_per_idc: int) -> list[str]:
    """`ombot init --production` (ombot/app/initprod.py); what to tell the user."""
    from ombot.app import initprod

    if idcs is None:
        raise OmbotError("--production needs the IDCs: --idc bj,sh")
    config, master_keys = initprod.init_production(directory, initprod.idc_names(idcs), masters_per_idc, _unix_user())
    _copy_example_playbooks(directory / "playbooks")
    return [f"wrote {config}", "edit every line marked EDIT, then on each host (docs/production.md):",
            "  a master's host: this directory as /etc/ombot, keeping of the private keys only that master's "
            f"(one of {', '.join(master_keys)})",
            "  the bot's host: the same with keys/bot.key only, and /etc/ombot/bot.env (root, 0600) made from "
            "bot.env.example",
            "  then: ombot install-units"]


def _copy_example_playbooks(target: Path) -> None:
    """OMBot's example playbooks (examples/playbooks in the source tree), for `playbooks = "playbooks"`."""
    examples = Path(__file__).resolve().parents[2] / "examples" / "playbooks"
    if not examples.is_dir():  # installed without the source tree: nothing to copy
        return
    target.mkdir(exist_ok=True)
    for example in sorted(examples.iterdir()):
        if example.is_file() and example.suffix in (".yml", ".toml"):
            (target / example.name).write_text(example.read_text())


def _unix_user() -> str:
    """This machine's user, as a registration user name (lowercase letters, digits, '_', '.', '-')."""
    name = re.sub(r"[^a-z0-9_.-]", "_", pwd.getpwuid(os.getuid()).pw_name.lower())
    return name if re.match(r"^[a-z_]", name) else f"_{name}"[:32]
