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

from ombot import __version__, context
from ombot.audit_agent import auditd_rules, hook
from ombot.audit_agent.settings import DEFAULT_CONFIG, DEFAULT_KEY
from ombot.errors import OmbotError
from ombot.keys import Identity, KeyFileError
from ombot.logs import FORMAT_ENV, FORMATS, setup_logging


def parser() -> argparse.ArgumentParser:
    # `ombot-agent` where the ombot-agent distribution installed it (docs/packaging.md), else run through ombot
    prog = "ombot-agent" if Path(sys.argv[0]).name == "ombot-agent" else "ombot audit-agent"
    top = argparse.ArgumentParser(prog=prog,
                                  description="OMBot shell audit: the bash hook and the agent that ships its records.")
    top.add_argument("--version", action="version", version=f"ombot-agent {__version__}")
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
    run.add_argument("--log-format", choices=FORMATS, default=os.environ.get(FORMAT_ENV) or "text",
                     help=f"log lines as text or one JSON object per line [default: ${FORMAT_ENV}, else text]")
    keygen = sub.add_parser("keygen", help="make this server's agent key (0600) unless it has one, and print "
                                           "its public key (the rollout runs it on the server)")
    keygen.add_argument("--key", type=Path, default=Path(DEFAULT_KEY), help=f"the key file [default: {DEFAULT_KEY}]")
    _service_parsers(sub)
    return top


def main(argv: list[str] | None = None) -> int:
    top = parser()
    args = top.parse_args(argv)
    if args.command == "run" and args.log_format not in FORMATS:  # a default from the environment is not checked
        top.error(f"${FORMAT_ENV} must be one of {', '.join(FORMATS)}, not {args.log_format!r}")
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
        elif args.command == "keygen":
            print(keygen(args.key).public)
        elif args.command in ("uninstall", "service"):
            return _service_command(args)
        else:
            return _run(args.config, args.verbose, args.log_format)
    except (OmbotError, OSError, auditd_rules.AuditdError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def keygen(path: Path) -> Identity:
    """The key in `path`, made first (0600, its .pub beside it) if there is none: run again, it prints the
    same public key. The private key never leaves the server; only the public one is registered."""
    os.umask(0o077)
    if not path.exists():
        try:
            Identity.generate().save(path)
        except KeyFileError:  # made meanwhile by another run: use that one
            pass
    return Identity.load(path)


def _run(config: Path, verbose: bool, log_format: str) -> int:
    from ombot.audit_agent.agent import Agent
    from ombot.audit_agent.settings import load

    setup_logging(logging.DEBUG if verbose else logging.INFO, log_format, quiet=())  # UTC, redacted, to stderr
    os.umask(0o077)
    settings = load(config)
    context.for_process(host=settings.host, idc=settings.idc)  # every line says which server it comes from
    Agent(settings).run()
    return 0


def _service_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`uninstall` and `service`: the agent's removal (audit_agent/uninstall.py) and its service
    (audit_agent/service.py)."""
    from ombot.audit_agent import service

    remove = sub.add_parser("uninstall", help="undo install: the hooks and their lines, the service; with --auditd "
                                              "the auditd rules; with --purge the spool, the state and /etc/ombot/agent.*")
    remove.add_argument("--root", type=Path, default=Path("/"), help="uninstall under this directory (tests)")
    remove.add_argument("--spool-dir", default=hook.DEFAULT_SPOOL_DIR)
    remove.add_argument("--auditd", action="store_true", help=f"also delete {auditd_rules.RULES_FILE} and unload the "
                        f"rules keyed {auditd_rules.KEY} (the kernel's only when --root is /)")
    remove.add_argument("--purge", action="store_true", help="also the spool and state directories (records not "
                        "sent yet, the queue) and the agent's agent.toml, agent.key, agent.pub and agent.binding")
    run = sub.add_parser("service", help="the agent as a service: a systemd unit where systemd is PID 1, else a "
                                         "detached process with a pidfile")
    run.add_argument("action", choices=("install", "remove", "start", "stop", "status"))
    run.add_argument("--root", type=Path, default=Path("/"), help="install/remove: the unit under this directory")
    run.add_argument("--prefix", default=service.DEFAULT_PREFIX,
                     help=f"install: the agent's venv, whose bin/ombot-agent the unit runs [default: {service.DEFAULT_PREFIX}]")
    run.add_argument("--config", type=Path, default=Path(os.environ.get("OMBOT_AGENT_CONFIG", DEFAULT_CONFIG)))


def _service_command(args: argparse.Namespace) -> int:
    from ombot.audit_agent import service
    from ombot.audit_agent.uninstall import uninstall

    if args.command == "uninstall":
        code, lines = uninstall(args.root, args.spool_dir, args.auditd, args.purge)
    elif args.action == "status":
        code, lines = service.status(args.config)
    else:
        code, lines = 0, {"install": lambda: service.install_unit(args.root, args.prefix, str(args.config)),
                          "remove": lambda: service.remove_unit(args.root, service.under(args.root, str(args.config))),
                          "start": lambda: service.start(args.config),
                          "stop": lambda: service.stop(args.config)}[args.action]()
    for line in lines or ["nothing to do"]:
        print(line, file=sys.stderr if line.startswith("error: ") else sys.stdout)
    return code
