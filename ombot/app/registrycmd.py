"""`ombot clients list|add|revoke`, and the registry calls `ombot audit enroll|revoke` share: one
`registry` operation at each master in turn, and the report of what each one answered."""

from __future__ import annotations

import json
from typing import Annotated, Any, Optional

import typer

from ombot.app.options import ConfigOpt, MasterOpt, admin_router, config_of, masters_named

clients_app = typer.Typer(no_args_is_help=True, help="List, add and revoke the clients the masters accept (admin keys).")


@clients_app.command("list")
def clients_list(ctx: typer.Context, master: MasterOpt = None, config: ConfigOpt = None,
                 as_json: Annotated[bool, typer.Option("--json", help="Print each master's answer as JSON")] = False) -> None:
    """Every client each master accepts now (from ombot.toml or added since) and the keys it revoked."""
    conf = config_of(ctx, config)
    replies = registry_everywhere(admin_router(conf), masters_named(conf, None, master), {"action": "list"})
    for mid, reply in replies.items():
        if isinstance(reply, Exception):
            typer.echo(f"{mid}: {_failure(reply)}")
        elif as_json:
            typer.echo(json.dumps(reply, sort_keys=True))
        else:
            typer.echo("\n".join(_listing(mid, reply)))
    raise typer.Exit(1 if any(isinstance(r, Exception) for r in replies.values()) else 0)


@clients_app.command("revoke")
def clients_revoke(ctx: typer.Context, ids: Annotated[list[str], typer.Argument(help="Client ids to revoke")],
                   idc: Annotated[Optional[str], typer.Option("--idc", help="Only this IDC's masters")] = None,
                   master: MasterOpt = None, config: ConfigOpt = None) -> None:
    """Revoke clients of any kind at every master (of the IDC, or one): their keys are refused from the
    next frame, for good, though ombot.toml may still list them. Exit 0 only if every master answered
    and each id was known to one of them."""
    conf = config_of(ctx, config)
    replies = registry_everywhere(admin_router(conf), masters_named(conf, idc, master),
                                   {"action": "revoke", "ids": list(dict.fromkeys(ids))})
    raise typer.Exit(report_revocations(replies, None))


@clients_app.command("add")
def clients_add(ctx: typer.Context, client_id: Annotated[str, typer.Argument(help="The new client's id")],
                kind: Annotated[str, typer.Option("--kind", help="cli or console")],
                user: Annotated[str, typer.Option("--user", help="Who it acts as: cli:USER / console:USER")],
                public_key: Annotated[str, typer.Option("--public-key", help="As `ombot keygen` printed it")],
                modules: Annotated[Optional[list[str]], typer.Option("--module", help="A module glob it may run "
                                                                     "(repeat)")] = None,
                hosts: Annotated[Optional[list[str]], typer.Option("--host", help="A host glob it may run on "
                                                                   "(repeat)")] = None,
                idc: Annotated[Optional[str], typer.Option("--idc", help="Only this IDC's masters")] = None,
                master: MasterOpt = None, config: ConfigOpt = None) -> None:
    """Register an operator's key at every master (of the IDC, or one), accepted at once, no restart.
    Agents: `ombot audit enroll`. Exit 0 only if every master has it; safe to re-run."""
    conf = config_of(ctx, config)
    entry = {"id": client_id, "kind": kind, "user": user, "public_key": public_key,
             "modules": modules or [], "hosts": hosts or []}
    replies = registry_everywhere(admin_router(conf), masters_named(conf, idc, master),
                                   {"action": "add", "clients": [entry]})
    raise typer.Exit(report_additions(replies, client_id))



def registry_everywhere(router: Any, masters: list[str], args: dict[str, Any]) -> dict[str, Any]:
    """The `registry` operation at each master in turn: its reply, or the error that kept it from one."""
    from ombot.masters import ConnectFailed, MasterLost, Refused

    replies: dict[str, Any] = {}
    try:
        for mid in masters:
            try:
                replies[mid] = router.registry(mid, args)
            except (ConnectFailed, MasterLost, Refused) as exc:
                replies[mid] = exc
    finally:
        router.close()
    return replies


def _failure(exc: Exception) -> str:
    code = getattr(exc, "code", None)
    return f"refused ({code}): {getattr(exc, 'message', exc)}" if code else f"error: {exc}"


def report_additions(replies: dict[str, Any], client_id: str) -> int:
    """Print each master's answer to an `add` of one client; 0 only if every master has it now."""
    for mid, reply in replies.items():
        typer.echo(f"{mid}: " + (_failure(reply) if isinstance(reply, Exception) else
                                 "accepted" if reply["results"][client_id] == "added" else "already"))
    failed = [mid for mid, reply in replies.items() if isinstance(reply, Exception)]
    if failed:
        typer.echo(f"{client_id} is not registered at {', '.join(failed)} (see above): run the same command "
                   "again once they answer (it is safe to repeat)", err=True)
    return 1 if failed else 0


def report_revocations(replies: dict[str, Any], what: str | None) -> int:
    """Print each master's verdict per id; 0 only if every master answered and each id (or, for a
    host, some agent of it) was revoked at one of them, now or before."""
    known: dict[str, bool] = {}
    for mid, reply in replies.items():
        if isinstance(reply, Exception):
            typer.echo(f"{mid}: {_failure(reply)}")
            continue
        for client_id, verdict in reply["results"].items():
            known[client_id] = known.get(client_id, False) or verdict != "unknown"
            typer.echo(f"{mid}: {client_id}: " + {"revoked": "revoked", "already": "revoked before",
                                                  "unknown": "not registered here"}.get(verdict, verdict))
    failed = [mid for mid, reply in replies.items() if isinstance(reply, Exception)]
    nowhere = [cid for cid, found in known.items() if not found]
    if failed:
        typer.echo(f"not confirmed by {', '.join(failed)} (see above): run the same command again once they "
                   "answer (it is safe to repeat)", err=True)
    if what is not None and not failed and not any(known.values()):
        typer.echo(f"no master knows {what}: nothing was revoked", err=True)
        return 1
    if what is None and nowhere:
        typer.echo(f"no master knows {', '.join(nowhere)}: nothing was revoked for it", err=True)
    return 1 if failed or (what is None and nowhere) else 0


def _listing(master_id: str, reply: dict[str, Any]) -> list[str]:
    """One master's registrations as a table, then the keys it revoked."""
    import time

    def when(ms: int) -> str:
        return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ms / 1000))

    def who(c: dict[str, Any]) -> str:
        return f"agent:{c['host']}" if c["kind"] == "agent" else f"{c['kind']}:{c['user']}"

    lines = [f"== {master_id}", f"{'ID':<24} {'KIND':<8} {'SOURCE':<9} {'ACTS AS':<28} NOTE"]
    for c in reply["clients"]:
        note = "admin" if c["admin"] else f"added {when(c['added_at'])} by {c['added_by']}" if "added_at" in c else ""
        lines.append(f"{c['id']:<24} {c['kind']:<8} {c['source']:<9} {who(c):<28} {note}".rstrip())
    for r in reply["revoked"]:
        lines.append(f"{r['id']:<24} {r['kind']:<8} {r['source']:<9} {who(r):<28} REVOKED {when(r['revoked_at'])} "
                     f"by {r['revoked_by']}")
    return lines
