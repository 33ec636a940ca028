"""`ombot init DIR`: a working starter set with fresh keys. Nothing secret goes into ombot.toml."""

from __future__ import annotations

import getpass
from pathlib import Path

from ombot.errors import OmbotError

DEFAULT_PORT = 18861

CONFIG_TEMPLATE = """\
# OMBot settings. Secrets never go in this file: private keys are 0600 files named below;
# database URLs with passwords come from the environment (OMBOT_MASTER_DATABASE_URL) or a
# 0600 file named by `database_url_file`. Paths are relative to this file.

# Who this installation talks as, when it is the bot or the CLI.
[client]
id = "bot"
key_file = "keys/bot.key"
default_idc = "local"

# Clients the masters may accept, by public key.
[clients.bot]
public_key = "{bot_public}"

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
accept = ["bot"]
state_dir = "state"                # SQLite database, file store; or set OMBOT_MASTER_DATABASE_URL

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

# The chat bot. Slack tokens come from the environment: SLACK_BOT_TOKEN, and SLACK_APP_TOKEN
# (Socket Mode) or SLACK_SIGNING_SECRET (HTTP mode). Its database: state/bot.db, or
# OMBOT_BOT_DATABASE_URL / database_url_file.
[bot]
# team_id = "T0123456"             # the one Slack workspace this bot serves
listen = "127.0.0.1:3000"          # HTTP mode: Slack posts to http://HOST:PORT/slack/events
workers = 8
console_user = "U0DEMO"            # who `ombot console` acts as
console_allow_as = true            # demo only: lets the console switch users with /as USER
policy = "policy.toml"             # who may run what; without it every request is refused

# Extra directories of task modules, loaded after the built-ins.
[modules]
dirs = []
"""

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
users = ["U0DEMO", "cli:{unix_user}"]  # the console's demo user and you on the CLI
groups = []                            # e.g. ["S0123OPS"]: every member of that Slack user group

[roles.leads]
users = ["U0LEAD1", "U0LEAD2"]         # try approvals alone in the console: /as U0LEAD1

# The console has no Slack to ask for group members: it reads them here.
[console_groups]
# S0123OPS = ["U0DEMO"]

[[rules]]
name = "risky changes need a lead"
modules = ["shell.exec", "script.run", "file.push"]
request = ["ops"]
max_hosts = 20
approval = {{ count = 1, roles = ["leads"], expiry_seconds = 1800 }}
cancel = ["leads"]

[[rules]]
name = "everyday operations"
modules = ["echo", "ping", "facts", "log.tail", "service"]
request = ["ops"]
max_hosts = 100
cancel = ["leads"]
"""


def init(directory: Path, port: int = DEFAULT_PORT) -> Path:
    from masters.keys import Identity

    config = directory / "ombot.toml"
    if config.exists():
        raise OmbotError(f"{config} exists; refusing to overwrite it")
    bot, master = Identity.generate(), Identity.generate()
    bot.save(directory / "keys" / "bot.key")
    master.save(directory / "keys" / "local-1.key")
    (directory / "inventory").mkdir(parents=True, exist_ok=True)
    (directory / "inventory" / "local.ini").write_text(INVENTORY)
    (directory / "state" / "files").mkdir(parents=True, exist_ok=True)
    (directory / "policy.toml").write_text(POLICY.format(unix_user=getpass.getuser()))
    config.write_text(CONFIG_TEMPLATE.format(bot_public=bot.public, master_public=master.public, port=port))
    return config
