"""`ombot policy check` and `ombot policy explain`; the policy gate the CLI's own requests pass."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ombot import config as cfg
from ombot.app.options import ConfigOpt, config_of, router_for
from ombot.errors import OmbotError

policy_app = typer.Typer(no_args_is_help=True, help="Check and explain the access policy.")


def _policy_path(conf: cfg.Config, file: Path | None) -> Path:
    from ombot.bot import BotSettings

    path = file or BotSettings.from_config(conf).policy
    if path is None:
        raise OmbotError(f"{conf.path}: no [bot] policy configured (or give --file)")
    return path


def cli_gate(conf: cfg.Config) -> Any:
    """The policy gate for CLI requests, when the config names a policy; CLI ids are in no user group."""
    from ombot.approvals import Gate, load_policy
    from ombot.bot import BotSettings

    path = BotSettings.from_config(conf).policy
    return None if path is None else Gate(load_policy(path), lambda group: frozenset())


@policy_app.command("check")
def policy_check(ctx: typer.Context, config: ConfigOpt = None,
                 file: Annotated[Optional[Path], typer.Option(help="Policy file [default: [bot] policy]")] = None) -> None:
    """Validate the policy file; errors name the rule and key path."""
    from ombot.approvals import load_policy

    path = _policy_path(config_of(ctx, config), file) if file is None else file
    policy = load_policy(path)
    approvals = sum(1 for r in policy.rules if r.approval)
    typer.echo(f"{path}: ok, {len(policy.roles)} roles, {len(policy.rules)} rules ({approvals} with approval)")


@policy_app.command("explain")
def policy_explain(ctx: typer.Context,
                   user: Annotated[str, typer.Argument(help="Slack user id (U...), cli:NAME or console user")],
                   module: Annotated[str, typer.Argument(help="Module name")],
                   targets: Annotated[str, typer.Argument(help="Hosts, groups, ranges")],
                   idc: Annotated[Optional[str], typer.Argument(help="IDC [default: the client's default_idc]")] = None,
                   config: ConfigOpt = None,
                   file: Annotated[Optional[Path], typer.Option(help="Policy file [default: [bot] policy]")] = None) -> None:
    """Say what would happen if USER asked to run MODULE on TARGETS, and why."""
    from ombot.approvals import Gate, load_policy

    conf = config_of(ctx, config)
    policy = load_policy(_policy_path(conf, file))
    idc = idc or conf.require_client().default_idc
    hosts = router_for(conf).expand(idc, targets)
    decision = Gate(policy, lambda group: policy.console_groups.get(group, frozenset())).decide(user, module, hosts, idc)
    typer.echo(f"{len(hosts)} host(s) in {idc}: {', '.join(hosts)}")
    if not decision.allowed:
        typer.echo(f"REFUSED: {decision.reason}")
        raise typer.Exit(1)
    typer.echo(f"ALLOWED: {decision.reason}")
    if decision.max_hosts:
        typer.echo(f"max hosts: {decision.max_hosts}")
    if decision.needs_approval and decision.approval:
        a = decision.approval
        typer.echo(f"needs {a.count} approval(s) from {', '.join(a.roles)}, expiring after {a.expiry} s"
                   + ("; the requester may approve" if a.self_approval else "; not by the requester"))
    if decision.cancel_roles:
        typer.echo(f"may cancel: the requester, its approvers, {', '.join(decision.cancel_roles)}")
