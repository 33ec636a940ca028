"""The rigs every suite that talks to OMBot as a person would stands on (docs/testing.md, "Writing a
Slack-facing suite"): one door, four rooms.

- `slack`: a site's masters, our fake Slack and real `ombot bot` processes; signed slash commands and
  clicks in, the channel and the answers out (SlackRig, slack_rig; the fixtures `make_slack_rig` and
  `make_module_slack_rig` in tests/conftest.py).
- `console`: `ombot console` in a real terminal on such a site (console_site, console).
- `audit`: agent keys, the audit agent process, and the rig whose bot pulls the audit (AuditRig; the
  fixture `make_rig` in tests/conftest.py builds one on ALERT_RULES); the events an agent sends
  (event), what a master stored (stored), a record as the alert poster gets it (record).
- `policies`: access policies built from roles and rules, spelled once.
"""

from tests.rigs.audit import (
    AGENT, AGENT_CLIENTS, ALERT_RULES, AUDIT_CHANNEL, HOST, OTHER_AUDIT_CHANNEL, UID, AgentProcess, AuditRig,
    agent_cluster, audit_site, event, ingest, record, stored, with_agent_hosts, write_records,
)
from tests.rigs.console import (
    CONSOLE_TIMEOUT, SHOWN_PROMPT, TERMINAL_ENV, ConsoleLog, console, console_site, quit_console, say, spawn_console,
)
from tests.rigs.policies import approval, policy, role, rule, table
from tests.rigs.slack import (
    ALICE, CHANNEL, REPLY_WAIT, SECRET, SITE_MODULES, ApprovalRig, Pending, Reply, SlackRig, floor, slack_env, slack_rig,
    state_of,
)

__all__ = [
    "AGENT", "AGENT_CLIENTS", "ALERT_RULES", "ALICE", "AUDIT_CHANNEL", "CHANNEL", "CONSOLE_TIMEOUT", "HOST",
    "OTHER_AUDIT_CHANNEL", "REPLY_WAIT", "SECRET", "SHOWN_PROMPT", "SITE_MODULES", "TERMINAL_ENV", "UID", "AgentProcess",
    "ApprovalRig", "Pending",
    "AuditRig", "ConsoleLog", "Reply", "SlackRig", "agent_cluster", "approval", "audit_site", "console", "console_site",
    "event", "floor", "ingest", "policy", "quit_console", "record", "role", "rule", "say", "slack_env", "slack_rig",
    "spawn_console", "state_of", "stored", "table", "with_agent_hosts", "write_records",
]
