"""`python -m ombot.audit_agent` (and `ombot audit-agent`): print or install the hook, run the agent.

Its own entry point on purpose: a server runs the agent without the ombot CLI and its libraries
(typer, Slack, Ansible, databases). Only the standard library, PyNaCl and rpyc are needed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ombot.audit_agent import auditd_rules, hook
from ombot.audit_agent.settings import DEFAULT_CONFIG
from ombot.errors import OmbotError


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="ombot audit-agent",
                                  description="OMBot shell audit: the bash hook and the agent that ships its records.")
    sub = top.add_subparsers(dest="command", required=True)
    show = sub.add_parser("hook", help="print the shell hook")
    show.add_argument("--shell", choices=("bash", "zsh"), default="bash")
    show.add_argument("--spool-dir", default=hook.DEFAULT_SPOOL_DIR)
    install = sub.add_parser("install", help="install the hooks for login and interactive shells (bash, and zsh "
                                             "where it is installed); with --auditd, the auditd rules instead")
    install.add_argument("--root", type=Path, default=Path("/"), help="install under this directory (tests)")
    install.add_argument("--spool-dir", default=hook.DEFAULT_SPOOL_DIR)
    install.add_argument("--auditd", action="store_true",
                         help=f"write {auditd_rules.RULES_FILE} (execve of login sessions, key {auditd_rules.KEY}) and load it")
    install.add_argument("--remove", action="store_true", help="with --auditd: delete the rules file and unload them")
    install.add_argument("--no-load", action="store_true", help="with --auditd: only write (or remove) the file")
    run = sub.add_parser("run", help="run the agent: ship spooled records to a master of this IDC")
    run.add_argument("--config", type=Path, default=Path(os.environ.get("OMBOT_AGENT_CONFIG", DEFAULT_CONFIG)))
    run.add_argument("--verbose", "-v", action="store_true")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "hook":
            sys.stdout.write(hook.hook_text(args.spool_dir, args.shell))
        elif args.command == "install" and (args.auditd or args.remove or args.no_load):
            if not args.auditd:
                raise OmbotError("--remove and --no-load go with --auditd")
            change = auditd_rules.remove_rules if args.remove else auditd_rules.install_rules
            for line in change(args.root, not args.no_load):
                print(line)
        elif args.command == "install":
            for path in hook.install(args.root, args.spool_dir):
                print(f"wrote {path}")
        else:
            return _run(args.config, args.verbose)
    except (OmbotError, OSError, auditd_rules.AuditdError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _run(config: Path, verbose: bool) -> int:
    from ombot.audit_agent.agent import Agent
    from ombot.audit_agent.settings import load

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.umask(0o077)
    Agent(load(config)).run()
    return 0
