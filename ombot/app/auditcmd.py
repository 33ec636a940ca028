"""`ombot audit enroll|revoke|test-rules`: servers' audit agents at the masters, and the rules check."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ombot import config as cfg
from ombot.app.options import ConfigOpt, admin_router, config_of, masters_named
from ombot.app.registrycmd import registry_everywhere, report_additions, report_revocations
from ombot.errors import OmbotError

audit_app = typer.Typer(no_args_is_help=True, help="Enrol and revoke servers' audit agents; check audit rules.")


@audit_app.command("enroll")
def audit_enroll(ctx: typer.Context, host: Annotated[str, typer.Argument(help="The server's host name")],
                 idc: Annotated[str, typer.Option("--idc", help="The IDC whose masters collect its events")],
                 out: Annotated[Path, typer.Option("--out", help="Where to write agent-HOST.key and .toml")] = Path("."),
                 print_only: Annotated[bool, typer.Option("--print-only", help="Register nowhere: print the "
                                                          "[clients] table to add to ombot.toml by hand")] = False,
                 config: ConfigOpt = None) -> None:
    """Make HOST's agent key and agent.toml, and register the key at every master of the IDC (`registry
    add`, an admin key's operation: no restart). Exit 0 only if every master accepted it; safe to re-run."""
    conf = config_of(ctx, config)
    if idc not in conf.idcs:
        raise OmbotError(f"no IDC {idc!r} in {conf.path} (known: {', '.join(conf.idcs)})")
    client_id = _agent_id(host)
    router = None if print_only else admin_router(conf)
    identity = _agent_files(conf, host, idc, out)
    if router is None:
        typer.echo(f"add to {conf.path}, then add \"{client_id}\" to the accept list of "
                   f"{', '.join(conf.idcs[idc])} and restart them:\n")
        typer.echo(f'[clients.{client_id}]\nkind = "agent"\nhost = "{host}"\npublic_key = "{identity.public}"')
        return
    entry = {"id": client_id, "kind": "agent", "host": host, "public_key": identity.public, "modules": [], "hosts": []}
    replies = registry_everywhere(router, list(conf.idcs[idc]), {"action": "add", "clients": [entry]})
    raise typer.Exit(report_additions(replies, client_id))


@audit_app.command("revoke")
def audit_revoke(ctx: typer.Context, host: Annotated[str, typer.Argument(help="The server's host name")],
                 idc: Annotated[Optional[str], typer.Option("--idc", help="Only this IDC's masters "
                                                                          "[default: every master]")] = None,
                 config: ConfigOpt = None) -> None:
    """Revoke HOST's agent key(s) at every master (of the IDC): refused from their next frame, no restart.
    Exit 0 only if every master answered and one of them knew an agent of HOST."""
    conf = config_of(ctx, config)
    if not cfg.HOST_NAME.fullmatch(host):
        raise OmbotError(f"{host!r} is not a host name (letters, digits, '-', '_', dots)")
    # By host, each master finds every agent of it it knows, enrolled or from its ombot.toml.
    ids = [f"agent-{host}", *(c.id for c in conf.clients.values() if c.kind == "agent" and c.host == host)]
    args = {"action": "revoke", "ids": [i for i in dict.fromkeys(ids) if len(i) <= 63], "hosts": [host]}
    replies = registry_everywhere(admin_router(conf), masters_named(conf, idc, None), args)
    raise typer.Exit(report_revocations(replies, f"an audit agent of {host}"))


@audit_app.command("test-rules")
def audit_test_rules(file: Annotated[Path, typer.Argument(help="The audit rules file (TOML)")]) -> None:
    """Check an audit rules file: its syntax, its regexes, and every rule's inline examples."""
    from ombot.audit import check_examples, load_rules
    from ombot.errors import ConfigError

    try:
        rules = load_rules(file)
    except ConfigError as exc:  # a broken file is a problem found, like a failing example: exit 1
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    problems = check_examples(rules)
    for problem in problems:
        typer.echo(problem)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"ok: {len(rules.rules)} rules")



def _agent_id(host: str) -> str:
    """The client id an agent of HOST is enrolled as: agent-HOST, a name as ombot.toml's are."""
    client_id = f"agent-{host}"
    if not cfg.HOST_NAME.fullmatch(host) or len(client_id) > 63:
        raise OmbotError(f"{host!r} is not a host name an agent can be enrolled for (letters, digits, '-', '_', "
                         "dots; at most 57 characters)")
    return client_id


def _agent_files(conf: cfg.Config, host: str, idc: str, out: Path) -> Any:
    """HOST's agent key (made once: a re-run reuses it) and agent.toml, written to `out`."""
    from ombot.audit_agent.settings import render
    from ombot.masters import Identity

    key = out / f"{_agent_id(host)}.key"
    if key.exists():
        identity = Identity.load(key)
        typer.echo(f"reusing the key in {key}")
    else:
        identity = Identity.generate()
        identity.save(key)
    masters = [(m.id, m.host, m.port, m.public_key) for m in (conf.masters[mid] for mid in conf.idcs[idc])]
    (out / f"{_agent_id(host)}.toml").write_text(render(host, idc, "agent.key", masters))
    typer.echo(f"wrote {key} and {key.with_suffix('.toml')}; on {host}, install them as /etc/ombot/agent.key (0600) "
               "and /etc/ombot/agent.toml")
    return identity
