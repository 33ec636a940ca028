"""`python -m audit_agent` (and `ombot audit-agent`): print or install the hook, run the agent.

Its own entry point on purpose: a server runs the agent without the ombot CLI and its libraries
(typer, Slack, Ansible, databases). Only the standard library, PyNaCl and rpyc are needed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from audit_agent import hook
from audit_agent.settings import DEFAULT_CONFIG
from ombot.errors import OmbotError


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="ombot audit-agent",
                                  description="OMBot shell audit: the bash hook and the agent that ships its records.")
    sub = top.add_subparsers(dest="command", required=True)
    show = sub.add_parser("hook", help="print the bash hook")
    show.add_argument("--spool-dir", default=hook.DEFAULT_SPOOL_DIR)
    install = sub.add_parser("install", help="install the hook for login and interactive shells")
    install.add_argument("--root", type=Path, default=Path("/"), help="install under this directory (tests)")
    install.add_argument("--spool-dir", default=hook.DEFAULT_SPOOL_DIR)
    run = sub.add_parser("run", help="run the agent: ship spooled records to a master of this IDC")
    run.add_argument("--config", type=Path, default=Path(os.environ.get("OMBOT_AGENT_CONFIG", DEFAULT_CONFIG)))
    run.add_argument("--verbose", "-v", action="store_true")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "hook":
            sys.stdout.write(hook.hook_text(args.spool_dir))
        elif args.command == "install":
            for path in hook.install(args.root, args.spool_dir):
                print(f"wrote {path}")
        else:
            return _run(args.config, args.verbose)
    except (OmbotError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _run(config: Path, verbose: bool) -> int:
    from audit_agent.agent import Agent
    from audit_agent.settings import load

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.umask(0o077)
    Agent(load(config)).run()
    return 0
