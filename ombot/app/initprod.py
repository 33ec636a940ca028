"""`ombot init --production DIR --idc bj,sh --masters-per-idc 2`: a complete, commented configuration
for several IDCs, each master on a host of its own (docs/production.md walks through it).

Every line to edit says EDIT. Nothing secret goes into the files: keys are 0600 files (a master's
only on its own host), database URLs and Slack tokens come from root-only environment files that
systemd reads (bot.env, master-ID.env; examples written here).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from ombot.app import starter
from ombot.app.starter import POLICY_RULES
from ombot.errors import OmbotError

if TYPE_CHECKING:
    from ombot.keys import Identity

MASTER_PORT = 18861
BOT_OPS_PORT = 9464  # Prometheus scrapes /metrics here (docs/monitoring.md), on loopback
MASTER_OPS_PORT = 9465
STATE_ROOT = "/var/lib/ombot"  # the units' StateDirectory=ombot/...: made by systemd, 0700, the service user's
MAX_MASTERS_PER_IDC = 9
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")

HEAD = """\
# OMBot for production: IDCs {idcs}, written by `ombot init --production`
# (docs/production.md). Check it with `ombot --config ombot.toml policy check`.
#
# This one file serves every OMBot host: copy this directory to /etc/ombot on the bot's host and on
# each master's host, with only that host's private key (keys/NAME.key) in keys/. Edit every line
# marked EDIT. Paths are relative to this file. Secrets never go here:
#   - private keys are 0600 files named by key_file, owned by the service user;
#   - Slack tokens and database URLs with passwords go in /etc/ombot/bot.env and
#     /etc/ombot/master-ID.env (root, 0600), which systemd reads before it starts the process
#     (bot.env.example and master.env.example show what they hold), or in a 0600 database_url_file.
# Logs go to journald (stderr); for a log pipeline, one JSON object per line:
# Environment=OMBOT_LOG_FORMAT=json in the units (docs/logging.md).

# The operator's CLI key: `ombot run`, `ombot audit enroll`, `ombot clients` speak as it.
[client]
id = "{cli_id}"
default_idc = "{first_idc}"

# Every client key the masters accept (docs/configuration.md). key_file is needed only where that
# client runs: keys/bot.key on the bot's host, the CLI's on the operator's machine.
[clients.bot]
kind = "chat"                      # the Slack bot: attests Slack users as requesters and approvers
public_key = "{bot_public}"
key_file = "keys/bot.key"
modules = ["*"]
hosts = ["*"]

[clients.console]
kind = "console"                   # `ombot console` acts as console:{unix_user}, never as a Slack user
user = "{unix_user}"
public_key = "{console_public}"
key_file = "keys/console.key"
modules = ["*"]
hosts = ["*"]

[clients.{cli_id}]
kind = "cli"
user = "{unix_user}"               # EDIT: the operator's login name (cli:USER in the policy)
admin = true                       # may enrol agents and revoke clients at every master
public_key = "{cli_public}"
key_file = "keys/{cli_id}.key"
modules = ["*"]
hosts = ["*"]
"""

IDC = """
# IDC {idc}: its masters in failover order. Each runs on a host of its own; the bot, the CLI and the
# audit agents of {idc}'s servers connect to them on TCP {port}.
[idcs.{idc}]
masters = [{masters}]
"""

MASTER = """
[masters.{mid}]
idc = "{idc}"
address = "{host}:{port}"  # EDIT: {mid}'s host; it listens there and everyone connects there
public_key = "{public}"
key_file = "keys/{mid}.key"        # only on {mid}'s host: copy keys/{mid}.key there, nowhere else
inventory = "inventory/{idc}.ini"  # the servers of {idc} (Ansible INI or YAML)
backend = "ansible"                # over ssh as the service user (docs/backends.md); "salt": a salt-master's
accept = ["bot", "console", "{cli_id}"]  # agents are enrolled at run time: ombot audit enroll
state_dir = "{state_root}/{mid}"   # the unit's StateDirectory; SQLite here unless a database URL is set:
# OMBOT_MASTER_DATABASE_URL=mysql://... or postgresql://... in /etc/ombot/master-{mid}.env (docs/configuration.md)
ops_listen = "127.0.0.1:{ops_port}"  # /metrics, /healthz, /readyz for Prometheus (docs/monitoring.md)

[masters.{mid}.limits]
job_timeout_seconds = 600
max_parallel_hosts = 16
max_jobs = 8

# The master's own approval floor, whatever the bot says: module glob -> approvals the job must carry.
[masters.{mid}.approvals]
"shell.exec" = 1
"script.run" = 1
"file.push" = 1
"ansible.playbook" = 1
"salt.state" = 1
"audit.*" = 1

[masters.{mid}.ansible]
playbooks = "playbooks"            # what ansible.playbook may run (docs/backends.md, "Playbooks")
"""

TAIL = """
# The Slack bot, on a host of its own (or beside a master). Choose how Slack reaches it:
#   Socket Mode: SLACK_APP_TOKEN in bot.env; the bot connects out to Slack on 443, nothing listens;
#   HTTP mode:   SLACK_SIGNING_SECRET in bot.env; Slack posts to https://YOUR-PROXY/slack/events,
#                a TLS reverse proxy in front of `listen` below.
[bot]
team_id = "T0123456"               # EDIT: the one Slack workspace this bot serves
listen = "127.0.0.1:3000"          # HTTP mode only
workers = 8
client = "bot"
console_client = "console"
policy = "policy.toml"             # who may run what; check edits with `ombot policy check`
audit_rules = "audit-rules.toml"   # shell audit alerts; check edits with `ombot audit test-rules`
# audit_alert_channel = "C0123AUDIT"  # EDIT: silent agents, and rules naming no channel
state_dir = "{state_root}/bot"     # the unit's StateDirectory; SQLite here unless OMBOT_BOT_DATABASE_URL is set
ops_listen = "127.0.0.1:{ops_port}"  # /metrics, /healthz, /readyz for Prometheus (docs/monitoring.md)

# The shell audit's events and alerts for the SIEM, one ECS JSON object a line (docs/audit.md,
# "SIEM export"): a file for Filebeat, Vector or Fluent Bit to read, and/or a syslog collector.
# [bot.audit_export]
# file = "{state_root}/bot/audit-export.jsonl"
# syslog = "127.0.0.1:601"         # RFC 5424 over TCP, octet counting
# syslog_tls = true                # over TLS to a remote collector (port 6514), its certificate verified
# syslog_ca = "/etc/ombot/siem-ca.pem"

[modules]
dirs = []                          # directories of your own task modules (docs/writing-a-module.md)
"""

INVENTORY = """\
# Ansible INI inventory for IDC {idc} (EDIT): the servers its masters run jobs on, over ssh as the
# service user, with host key checking on (docs/backends.md, "The Ansible backend").
[web]
# web01.{idc}.example.internal

[db]
# db01.{idc}.example.internal
"""

POLICY = """\
# OMBot access policy for production (docs/policy.md). Deny by default: a request no rule allows is
# refused. Roles name Slack user ids (U...), Slack user-group ids (S...) and CLI identities (cli:NAME),
# never display names. EDIT the ids below.

[roles.ops]
users = ["U0123OPS1", "cli:{unix_user}"]
groups = []                            # e.g. ["S0123OPS"]: every member of that Slack user group

[roles.leads]
users = ["U0123LEAD1", "U0123LEAD2"]

# Who may search shell audit events with /om audit: nobody unless named here.
[audit]
viewers = ["leads"]

# Who sees every job and schedule; everyone else sees what they asked for, approved or may cancel.
[jobs]
viewers = ["leads"]

""" + POLICY_RULES

BOT_ENV = """\
# /etc/ombot/bot.env: root-owned, mode 0600. systemd reads it before it starts the bot (EnvironmentFile=).
SLACK_BOT_TOKEN=xoxb-EDIT
# Socket Mode:
SLACK_APP_TOKEN=xapp-EDIT
# or HTTP mode (then drop SLACK_APP_TOKEN):
# SLACK_SIGNING_SECRET=EDIT
# The bot's database, when not SQLite in its state_dir:
# OMBOT_BOT_DATABASE_URL=postgresql://ombot:PASSWORD@db.example.internal/ombot_bot
"""

MASTER_ENV = """\
# /etc/ombot/master-ID.env (one per master, on its host): root-owned, mode 0600; read by systemd.
# The master's database, when not SQLite in its state_dir:
# OMBOT_MASTER_DATABASE_URL=mysql://ombot:PASSWORD@db.example.internal/ombot_bj_1
"""


def idc_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    bad = [name for name in names if not _NAME.fullmatch(name)]
    if not names or bad or len(set(names)) != len(names):
        raise OmbotError(f"--idc {text!r}: a comma list of distinct IDC names (lowercase letters, digits, '-'), "
                         "e.g. bj,sh")
    return names


def master_ids(idcs: list[str], per_idc: int) -> dict[str, list[str]]:
    if not 1 <= per_idc <= MAX_MASTERS_PER_IDC:
        raise OmbotError(f"--masters-per-idc {per_idc}: from 1 to {MAX_MASTERS_PER_IDC}")
    return {idc: [f"{idc}-{n}" for n in range(1, per_idc + 1)] for idc in idcs}


def init_production(directory: Path, idcs: list[str], per_idc: int, unix_user: str) -> tuple[Path, list[str]]:
    """Write the set; return ombot.toml's path and each master's key file (each for its own host only)."""
    from ombot.audit import SAMPLE_RULES

    config = directory / "ombot.toml"
    if config.exists():
        raise OmbotError(f"{config} exists; refusing to overwrite it")
    masters = master_ids(idcs, per_idc)
    cli_id = starter.cli_id(unix_user)
    keys = starter.make_keys(directory, ["bot", "console", cli_id, *(mid for ids in masters.values() for mid in ids)])
    (directory / "inventory").mkdir(parents=True, exist_ok=True)
    for idc in idcs:
        (directory / "inventory" / f"{idc}.ini").write_text(INVENTORY.format(idc=idc))
    (directory / "policy.toml").write_text(POLICY.format(unix_user=unix_user))
    (directory / "audit-rules.toml").write_text(SAMPLE_RULES)
    (directory / "bot.env.example").write_text(BOT_ENV)
    (directory / "master.env.example").write_text(MASTER_ENV)
    config.write_text(_config_text(masters, keys, cli_id, unix_user))
    return config, [f"keys/{mid}.key" for ids in masters.values() for mid in ids]


def _config_text(masters: dict[str, list[str]], keys: dict[str, Identity], cli_id: str, unix_user: str) -> str:
    def public(name: str) -> str:
        return keys[name].public

    text = HEAD.format(idcs=", ".join(masters), cli_id=cli_id, first_idc=next(iter(masters)), unix_user=unix_user,
                       bot_public=public("bot"), console_public=public("console"), cli_public=public(cli_id))
    for idc, ids in masters.items():
        text += IDC.format(idc=idc, port=MASTER_PORT, masters=", ".join(f'"{mid}"' for mid in ids))
        for n, mid in enumerate(ids, 1):
            text += MASTER.format(mid=mid, idc=idc, host=f"{idc}-master-{n}.example.internal", port=MASTER_PORT,
                                  public=public(mid), cli_id=cli_id, state_root=STATE_ROOT, ops_port=MASTER_OPS_PORT)
    return text + TAIL.format(state_root=STATE_ROOT, ops_port=BOT_OPS_PORT)
