"""`ombot clients list|add|revoke`, and the registry calls `ombot audit enroll|revoke|agents` share: the
`registry` operation at each master in turn (at most MAX_PER_CALL names a call), and the report of
what each one answered."""

from __future__ import annotations

import json
from typing import Annotated, Any, Optional

import typer

from ombot.app.options import ConfigOpt, MasterOpt, admin_router, config_of, masters_named

MAX_PER_CALL = 1000  # names one registry call may carry (the masters refuse more: masters.registrations.MAX_CLIENTS)
clients_app = typer.Typer(no_args_is_help=True, help="List, add and revoke the clients the masters accept (admin keys).")


@clients_app.command("list")
def clients_list(ctx: typer.Context, master: MasterOpt = None, config: ConfigOpt = None,
                 as_json: Annotated[bool, typer.Option("--json", help="Print each master's answer as JSON")] = False) -> None:
    """Every client each master accepts now (from ombot.toml or added since) and the keys it revoked."""
    conf = config_of(ctx, config)
    replies = registry_everywhere(admin_router(conf), masters_named(conf, None, master), {"action": "list"})
    for mid, reply in replies.items():
        if isinstance(reply, Exception):
            typer.echo(f"{mid}: {failure(reply)}")
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


def registry_calls(router: Any, masters: list[str], calls: list[dict[str, Any]]) -> dict[str, Any]:
    """Every call (one action, in chunks of at most MAX_PER_CALL names) at each master in turn: per master
    the results (and problems) of all its calls merged, or the error that stopped them there (the calls
    after it are not sent to that master; every action is idempotent, so running it all again is safe)."""
    from ombot.masters import ConnectFailed, MasterLost, Refused

    replies: dict[str, Any] = {}
    for mid in masters:
        merged: dict[str, Any] = {"results": {}, "problems": {}, "hosts": {}}
        try:
            for args in calls:
                reply = router.registry(mid, args)
                for part in merged:
                    merged[part].update(reply.get(part, {}))
        except (ConnectFailed, MasterLost, Refused) as exc:
            replies[mid] = exc
            continue
        replies[mid] = merged
    return replies


def failure(exc: Exception) -> str:
    """How a master's refusal, or the error that kept it from answering, is shown."""
    code = getattr(exc, "code", None)
    return f"refused ({code}): {getattr(exc, 'message', exc)}" if code else f"error: {exc}"


def summary(results: dict[str, str], words: dict[str, str]) -> str:
    """Verdicts counted: "97 accepted, 3 already" (in the order of `words`, which names them)."""
    counts: dict[str, int] = {}
    for verdict in results.values():
        counts[verdict] = counts.get(verdict, 0) + 1
    order = [*words, *sorted(set(counts) - set(words))]
    return ", ".join(f"{counts[v]} {words.get(v, v)}" for v in order if v in counts) or "nothing"


def report_additions(replies: dict[str, Any], client_id: str) -> int:
    """Print each master's answer to an `add` of one client; 0 only if every master has it now."""
    for mid, reply in replies.items():
        typer.echo(f"{mid}: " + (failure(reply) if isinstance(reply, Exception) else
                                 "accepted" if reply["results"][client_id] == "added" else "already"))
    failed = [mid for mid, reply in replies.items() if isinstance(reply, Exception)]
    if failed:
        typer.echo(f"{client_id} is not registered at {', '.join(failed)} (see above): run the same command "
                   "again once they answer (it is safe to repeat)", err=True)
    return 1 if failed else 0


REVOKED_WORDS = {"revoked": "revoked", "already": "revoked before", "unknown": "not registered here"}
DETAILED = 10  # up to this many ids, a revocation's verdicts are printed one a line; more are counted


def report_revocations(replies: dict[str, Any], hosts: list[str] | None) -> int:
    """Print each master's verdicts (per id, or counted when many); 0 only if every master answered and
    each id (or, for `hosts`, some agent of each host) was revoked at one of them, now or before."""
    known: dict[str, bool] = {}
    for mid, reply in replies.items():
        if isinstance(reply, Exception):
            typer.echo(f"{mid}: {failure(reply)}")
            continue
        results = reply["results"]
        for client_id, verdict in results.items():
            known[client_id] = known.get(client_id, False) or verdict != "unknown"
        if len(results) <= DETAILED:
            for client_id, verdict in results.items():
                typer.echo(f"{mid}: {client_id}: {REVOKED_WORDS.get(verdict, verdict)}")
        else:
            typer.echo(f"{mid}: {summary(results, REVOKED_WORDS)}")
    failed = [mid for mid, reply in replies.items() if isinstance(reply, Exception)]
    if failed:
        typer.echo(f"not confirmed by {', '.join(failed)} (see above): run the same command again once they "
                   "answer (it is safe to repeat)", err=True)
    nowhere = _unknown_hosts(replies, hosts, known) if hosts is not None else \
        [cid for cid, found in known.items() if not found]
    if nowhere and (hosts is None or not failed):
        what = "an audit agent of " if hosts is not None else ""
        typer.echo(f"no master knows {what}{_listed(nowhere)}: nothing was revoked for it", err=True)
    return 1 if failed or nowhere else 0


def _unknown_hosts(replies: dict[str, Any], hosts: list[str], known: dict[str, bool]) -> list[str]:
    """The hosts no master knew an agent (or enrolment) of: by the ids each master found for the host,
    or, from a master that does not say, by agent-HOST's verdict."""
    found = {h for reply in replies.values() if not isinstance(reply, Exception)
             for h, ids in reply.get("hosts", {}).items() if ids}
    return [h for h in hosts if h not in found and not known.get(f"agent-{h}", False)]


def _listed(names: list[str], shown: int = 20) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _listing(master_id: str, reply: dict[str, Any]) -> list[str]:
    """One master's registrations as a table, then the keys it revoked."""
    import time

    def when(ms: int) -> str:
        return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ms / 1000))

    def who(c: dict[str, Any]) -> str:
        return f"agent:{c['host']}" if c["kind"] == "agent" else f"{c['kind']}:{c['user']}"

    lines = [f"== {master_id}", f"{'ID':<24} {'KIND':<8} {'SOURCE':<9} {'ACTS AS':<28} NOTE"]
    for p in reply.get("pending", []):  # enrolled with no key yet: bound when the host makes its own
        lines.append(f"{p['id']:<24} {'agent':<8} {'registry':<9} {'agent:' + p['host']:<28} PENDING (no key yet) "
                     f"enrolled {when(p['enrolled_at'])} by {p['enrolled_by']}")
    for c in reply["clients"]:
        note = "admin" if c["admin"] else f"added {when(c['added_at'])} by {c['added_by']}" if "added_at" in c else ""
        lines.append(f"{c['id']:<24} {c['kind']:<8} {c['source']:<9} {who(c):<28} {note}".rstrip())
    for r in reply["revoked"]:
        lines.append(f"{r['id']:<24} {r['kind']:<8} {r['source']:<9} {who(r):<28} REVOKED {when(r['revoked_at'])} "
                     f"by {r['revoked_by']}")
    return lines
