"""What every `ombot` subcommand shares: the options that name the config and the IDC, and the
config and router they lead to (kept apart from cli.py so that each group of commands has its file)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ombot import config as cfg
from ombot.errors import OmbotError
from ombot.logs import FORMAT_ENV

# After the subcommand: no envvar here, or $OMBOT_CONFIG would beat a --config given before it.
ConfigOpt = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help="Path to ombot.toml (also accepted before the subcommand)"),
]
IdcOpt = Annotated[Optional[str], typer.Option("--idc", help="IDC to act in [default: the client's default_idc]")]
MasterOpt = Annotated[Optional[str], typer.Option("--master", help="Only this master")]


class LogFormat(str, Enum):
    """How log lines are written to stderr (docs/logging.md)."""

    text = "text"
    json = "json"


LogFormatOpt = Annotated[LogFormat, typer.Option(
    "--log-format", envvar=FORMAT_ENV, case_sensitive=False,
    help="Log lines as text, or as one JSON object per line (docs/logging.md)")]


def config_of(ctx: typer.Context, local: Path | None) -> cfg.Config:
    """The config named after the subcommand, else before it (--config / $OMBOT_CONFIG), else ./ombot.toml."""
    return cfg.load(local or (ctx.obj or {}).get("config"))


def router_for(conf: cfg.Config, origin: str = "cli") -> Any:
    """The CLI speaks as its registration; the master fixes who that is (cli:USER), never the environment."""
    from ombot.masters import Identity, Router

    client = conf.require_client()
    return Router(conf, Identity.load(client.key_file), conf.clients[client.id].identity, origin)


def admin_router(conf: cfg.Config) -> Any:
    """A router speaking with the CLI's key, which must be an admin's to change registrations."""
    client = conf.require_client()
    if not conf.clients[client.id].admin:
        raise OmbotError(f"client {client.id} is not an admin: only a cli key with `admin = true` under "
                         f"[clients.{client.id}] of the masters' ombot.toml may list, add or revoke registrations "
                         "(pick one with --client NAME)")
    return router_for(conf)


def masters_named(conf: cfg.Config, idc: str | None, master: str | None) -> list[str]:
    """One master, an IDC's masters, or (neither given) every master in ombot.toml."""
    if master is not None:
        if master not in conf.masters:
            raise OmbotError(f"no master {master!r} in {conf.path} (known: {', '.join(conf.masters)})")
        return [master]
    if idc is not None:
        if idc not in conf.idcs:
            raise OmbotError(f"no IDC {idc!r} in {conf.path} (known: {', '.join(conf.idcs)})")
        return list(conf.idcs[idc])
    return list(conf.masters)


def plain_names(targets: str) -> list[str] | None:
    """The host names of a comma list of plain names (no ranges, groups' patterns, `!`, `&` or `~`), each
    once; None when TARGETS is more than that (only a master can expand it)."""
    names = [t.strip() for t in targets.split(",")]
    if not all(cfg.HOST_NAME.fullmatch(n) for n in names):
        return None
    return list(dict.fromkeys(names))


def targets_in(router: Any, idc: str, targets: str) -> tuple[list[str], str]:
    """The hosts TARGETS names in IDC, expanded by its first master that answers, as chat's are; and a
    note when they were taken as written instead: plain names its inventory does not hold (a server not,
    or no longer, in it), or that no master of the IDC was there to expand."""
    from ombot.masters import NoMasterAvailable, Refused

    try:
        return router.expand(idc, targets), ""
    except (Refused, NoMasterAvailable) as exc:
        names = plain_names(targets)
        if names is None or (isinstance(exc, Refused) and exc.code != "bad_targets"):
            raise
        why = exc.message if isinstance(exc, Refused) else "no master of it answered"
        return names, f"taken as host names, not expanded in {idc} ({why})"
