"""`ombot audit enroll|revoke|agents|wheelhouse|test-rules`: servers' audit agents at the masters, and the rules check.

Enrolment and revocation take TARGETS as chat does (host names, ranges `web[01-99]`, inventory groups,
comma lists), expanded by a master of the IDC and shown before anything is changed; each master then
gets one `registry` call per MAX_PER_CALL hosts, and the answers are summarised per master (counts,
then the exceptions), not a line per host.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ombot import config as cfg
from ombot.app import exits
from ombot.app.options import ConfigOpt, admin_router, config_of, masters_named, plain_names, targets_in
from ombot.app.registrycmd import MAX_PER_CALL, failure, registry_calls, report_revocations, summary
from ombot.errors import OmbotError

audit_app = typer.Typer(no_args_is_help=True, help="Enrol, list and revoke servers' audit agents; check audit rules.")

TargetsArg = Annotated[str, typer.Argument(help="The servers, as in chat: host names, ranges (web[01-10]), "
                                                "inventory groups, comma lists")]
SHOWN_HOSTS = 20  # hosts named when a list is shown; the rest are counted


@audit_app.command("enroll")
def audit_enroll(ctx: typer.Context, targets: TargetsArg,
                 idc: Annotated[str, typer.Option("--idc", help="The IDC whose masters collect their events")],
                 out: Annotated[Optional[Path], typer.Option(
                     "--out", help="Hand install: make each host's key and agent.toml here (agent-HOST.key, "
                                   "agent-HOST.toml) and register the keys. Without it each host is enrolled "
                                   "pending: it makes its own key when the agent is rolled out")] = None,
                 print_only: Annotated[bool, typer.Option("--print-only", help="Register nowhere: write the files "
                                                          "(to --out, else here) and print the [clients] tables to "
                                                          "add to ombot.toml by hand")] = False,
                 config: ConfigOpt = None) -> None:
    """Enrol servers' audit agents at every master of the IDC (the `registry` operation of an admin key: no
    restart). Without --out each host is enrolled pending and makes its own key when the agent is rolled
    out; with --out their keys are made here. Exit 0 only if every master has every host; safe to re-run."""
    conf = config_of(ctx, config)
    if idc not in conf.idcs:
        raise OmbotError(f"no IDC {idc!r} in {conf.path} (known: {', '.join(conf.idcs)})")
    if print_only:
        _print_only(conf, targets, idc, out or Path("."))
        return
    router = admin_router(conf)
    try:
        hosts = _shown(targets_in(router, idc, targets), idc)
        masters = list(conf.idcs[idc])
        code = _with_keys(conf, router, idc, masters, hosts, out) if out is not None else \
            _pending(router, masters, hosts)
    finally:
        router.close()
    raise typer.Exit(code)


@audit_app.command("revoke")
def audit_revoke(ctx: typer.Context, targets: TargetsArg,
                 idc: Annotated[Optional[str], typer.Option("--idc", help="Only this IDC's masters [default: every "
                                                                          "master; TARGETS expanded in the client's "
                                                                          "default IDC]")] = None,
                 config: ConfigOpt = None) -> None:
    """Revoke the servers' agent keys (and pending enrolments) at every master (of the IDC): refused from their
    next frame, no restart. Exit 0 only if every master answered and, for each host, one of them knew an
    agent of it."""
    conf = config_of(ctx, config)
    masters = masters_named(conf, idc, None)
    router = admin_router(conf)
    try:
        hosts = _shown(targets_in(router, idc or conf.require_client().default_idc, targets), idc)
        replies = registry_calls(router, masters, _revocations(conf, hosts))
    finally:
        router.close()
    raise typer.Exit(report_revocations(replies, hosts))


@audit_app.command("agents")
def audit_agents(ctx: typer.Context,
                 idc: Annotated[Optional[str], typer.Option("--idc", help="Only this IDC's masters "
                                                                          "[default: every master]")] = None,
                 as_json: Annotated[bool, typer.Option("--json", help="One JSON document: every host, "
                                                       "with each master's view")] = False,
                 config: ConfigOpt = None) -> None:
    """Every enrolled agent host at every master (of the IDC): its state (pending, bound, revoked; mixed when
    the masters disagree), last contact, queue depth, capture layers and agent version. Exit 0, or 4 when a
    master could not be asked (its view is then missing)."""
    conf = config_of(ctx, config)
    masters = masters_named(conf, idc, None)
    router = admin_router(conf)
    try:
        views, errors = _agent_views(router, masters)
    finally:
        router.close()
    merged = [_merged(host_idc, per_master) for host_idc, per_master in sorted(views.items())]
    if as_json:
        typer.echo(json.dumps({"agents": merged, "errors": {m: str(e) for m, e in errors.items()}}, sort_keys=True))
    else:
        for line in _agents_table(merged, time.time()):
            typer.echo(line)
        for master_id, exc in errors.items():
            typer.echo(f"{master_id}: {failure(exc)}: its agents are not shown", err=True)
    raise typer.Exit(exits.NOT_SENT if errors else exits.OK)


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


@audit_app.command("wheelhouse")
def audit_wheelhouse(
        directory: Annotated[Path, typer.Argument(help="Where the wheels go: a master's STATE_DIR/wheelhouse")],
        python: Annotated[Optional[list[str]], typer.Option("--python", help="A Python version the servers run "
                                                            "(repeat) [default: 3.9 to 3.13]")] = None,
        agent_wheel: Annotated[Optional[Path], typer.Option("--agent-wheel", help="The ombot-agent wheel to carry "
                                                            "[default: built from this checkout]")] = None,
        machine: Annotated[Optional[str], typer.Option("--machine", help="The servers' architecture "
                                                       "[default: this machine's]")] = None) -> None:
    """Fill the wheelhouse a master carries for `audit.rollout`: the agent's wheel and its dependencies'
    for each Python the servers run (pip downloads them here; the servers need no index)."""
    from ombot.app import wheelhouse

    names = wheelhouse.build(directory, python or list(wheelhouse.PYTHONS), agent_wheel,
                             machine or wheelhouse.default_machine())
    typer.echo(f"{directory}: {len(names)} wheels: {', '.join(names)}")


# -- enrolment ------------------------------------------------------------------------------------------


def _shown(found: tuple[list[str], str], idc: str | None) -> list[str]:
    """Say which hosts TARGETS named (and how, when taken as written), before anything changes."""
    hosts, note = found
    for host in hosts:
        _agent_id(host)  # every name checked before any master is told anything
    if note:
        typer.echo(note)
    typer.echo(f"{len(hosts)} host(s){f' in {idc}' if idc else ''}: {_names(hosts)}")
    return hosts


def _names(items: list[str], shown: int = SHOWN_HOSTS) -> str:
    return ", ".join(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown else "")


def _print_only(conf: cfg.Config, targets: str, idc: str, out: Path) -> None:
    """The offline way: no master is asked, so TARGETS must name the hosts plainly."""
    hosts = plain_names(targets)
    if hosts is None:
        raise OmbotError(f"--print-only asks no master, so it cannot expand {targets!r}: name the hosts "
                         "(web01,web02)")
    for host in hosts:
        client_id = _agent_id(host)
        identity = _agent_files(conf, host, idc, out, len(hosts) == 1)
        typer.echo(f'\n[clients.{client_id}]\nkind = "agent"\nhost = "{host}"\npublic_key = "{identity.public}"')
    ids = ", ".join(f'"{_agent_id(h)}"' for h in hosts)
    typer.echo(f"\nadd these to {conf.path}, then add {ids} to the accept list of {', '.join(conf.idcs[idc])} "
               "and restart them")


def _pending(router: Any, masters: list[str], hosts: list[str]) -> int:
    """Enrol the hosts pending (no key yet) under one enrolment id each, the same at every master: the one
    a master holds already (a re-run, or one master missed before), else a new one."""
    known, failed = _known_enrolments(router, masters, hosts)
    chosen, unsure = _enrolment_ids(known, hosts)
    for host, why in unsure.items():
        typer.echo(f"{host}: not enrolled: {why}", err=True)
    wanted = [{"host": h, "enrolment": chosen[h]} for h in hosts if h in chosen]
    calls = [{"action": "enroll", "hosts": wanted[i:i + MAX_PER_CALL]} for i in range(0, len(wanted), MAX_PER_CALL)]
    replies = registry_calls(router, [m for m in masters if m not in failed], calls) if calls else {}
    replies.update(failed)
    bad = _report(replies, [h for h in hosts if h in chosen], {"pending": "enrolled pending", "already": "already pending",
                                                             "bound": "bound already"})
    if not bad and not unsure:
        typer.echo("each host makes its own key when the agent is rolled out to it; `ombot audit agents` shows them")
    return 1 if bad or unsure else 0


def _known_enrolments(router: Any, masters: list[str],
                      hosts: list[str]) -> tuple[dict[str, dict[str, set[str]]], dict[str, Exception]]:
    """host -> {"live": enrolment ids pending or bound somewhere, "dead": ids revoked somewhere}, and the
    masters that could not be asked."""
    from ombot.masters import ConnectFailed, MasterLost, Refused

    known: dict[str, dict[str, set[str]]] = {h: {"live": set(), "dead": set()} for h in hosts}
    failed: dict[str, Exception] = {}
    for master_id in masters:
        for start in range(0, len(hosts), MAX_PER_CALL):
            try:
                reply = router.registry(master_id, {"action": "agents", "hosts": hosts[start:start + MAX_PER_CALL],
                                                    "limit": MAX_PER_CALL})
            except (ConnectFailed, MasterLost, Refused) as exc:
                failed[master_id] = exc
                break
            for row in reply["agents"]:
                if row["host"] in known:
                    known[row["host"]]["live"].update([row["enrolment"]] if row.get("enrolment") else [])
                    known[row["host"]]["dead"].update([row["revoked_enrolment"]] if row.get("revoked_enrolment") else [])
    return known, failed


def _enrolment_ids(known: dict[str, dict[str, set[str]]], hosts: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """The enrolment id for each host, and the hosts whose masters disagree (left alone, with why)."""
    chosen: dict[str, str] = {}
    unsure: dict[str, str] = {}
    for host in hosts:
        live = known[host]["live"] - known[host]["dead"]
        if len(live) > 1:
            unsure[host] = (f"its masters hold different enrolments ({', '.join(sorted(i[:8] for i in live))}): "
                            f"revoke it (ombot audit revoke {host}) and enrol it again")
        else:
            chosen[host] = next(iter(live)) if live else uuid.uuid4().hex
    return chosen, unsure


def _with_keys(conf: cfg.Config, router: Any, idc: str, masters: list[str], hosts: list[str], out: Path) -> int:
    """Hand install: each host's key and agent.toml in `out`, the keys registered at every master."""
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for host in hosts:
        identity = _agent_files(conf, host, idc, out, len(hosts) == 1)
        entries.append({"id": _agent_id(host), "kind": "agent", "host": host, "public_key": identity.public,
                        "modules": [], "hosts": []})
    if len(hosts) > 1:
        typer.echo(f"wrote agent-HOST.key and agent-HOST.toml for {len(hosts)} hosts in {out}; on each host, install "
                   "them as /etc/ombot/agent.key (0600) and /etc/ombot/agent.toml")
    calls = [{"action": "add", "clients": entries[i:i + MAX_PER_CALL]} for i in range(0, len(entries), MAX_PER_CALL)]
    replies = registry_calls(router, masters, calls)
    return 1 if _report(replies, [_agent_id(h) for h in hosts], {"added": "accepted", "already": "already"}) else 0


def _report(replies: dict[str, Any], names: list[str], words: dict[str, str]) -> list[str]:
    """Each master's answer for `names` (a word alone for one name, else counts), then the exceptions; the
    masters that do not have every name now (run the command again for them)."""
    bad: list[str] = []
    for master_id, reply in replies.items():
        if isinstance(reply, Exception):
            typer.echo(f"{master_id}: {failure(reply)}")
            bad.append(master_id)
            continue
        results, problems = reply["results"], reply.get("problems", {})
        if len(names) == 1 and names[0] in results and not problems:
            typer.echo(f"{master_id}: {words.get(results[names[0]], results[names[0]])}")
        else:
            typer.echo(f"{master_id}: {summary(results, words)}")
        for name, why in list(problems.items())[:SHOWN_HOSTS]:
            typer.echo(f"{master_id}: {name}: refused ({results.get(name)}): {why}")
        if len(problems) > SHOWN_HOSTS:
            typer.echo(f"{master_id}: ... and {len(problems) - SHOWN_HOSTS} more refused")
        if problems:
            bad.append(master_id)
    if bad:
        what = f"{names[0]} is" if len(names) == 1 else "the hosts are not all"
        typer.echo(f"{what} not registered at {', '.join(bad)} (see above): run the same command again once "
                   "they answer (it is safe to repeat)", err=True)
    return bad


def _revocations(conf: cfg.Config, hosts: list[str]) -> list[dict[str, Any]]:
    """`revoke` calls naming each host and its agents' ids (agent-HOST, and any ombot.toml registers for
    it), at most MAX_PER_CALL names a call. Each master finds every agent of a host by the host too."""
    calls: list[dict[str, Any]] = []
    ids: list[str] = []
    named: list[str] = []
    for host in hosts:
        mine = [i for i in dict.fromkeys([_agent_id(host), *(c.id for c in conf.clients.values()
                                                             if c.kind == "agent" and c.host == host)]) if len(i) <= 63]
        if len(ids) + len(named) + len(mine) + 1 > MAX_PER_CALL:
            calls.append({"action": "revoke", "ids": ids, "hosts": named})
            ids, named = [], []
        ids += mine
        named.append(host)
    calls.append({"action": "revoke", "ids": ids, "hosts": named})
    return calls


def _agent_id(host: str) -> str:
    """The client id an agent of HOST is enrolled as: agent-HOST, a name as ombot.toml's are."""
    client_id = f"agent-{host}"
    if not cfg.HOST_NAME.fullmatch(host) or len(client_id) > 63:
        raise OmbotError(f"{host!r} is not a host name an agent can be enrolled for (letters, digits, '-', '_', "
                         "dots; at most 57 characters)")
    return client_id


def _agent_files(conf: cfg.Config, host: str, idc: str, out: Path, say: bool = True) -> Any:
    """HOST's agent key (made once: a re-run reuses it) and agent.toml, written to `out`."""
    from ombot.audit_agent.settings import render
    from ombot.masters import Identity

    key = out / f"{_agent_id(host)}.key"
    if key.exists():
        identity = Identity.load(key)
        if say:
            typer.echo(f"reusing the key in {key}")
    else:
        identity = Identity.generate()
        identity.save(key)
    masters = [(m.id, m.host, m.port, m.public_key) for m in (conf.masters[mid] for mid in conf.idcs[idc])]
    (out / f"{_agent_id(host)}.toml").write_text(render(host, idc, "agent.key", masters))
    if say:
        typer.echo(f"wrote {key} and {key.with_suffix('.toml')}; on {host}, install them as /etc/ombot/agent.key "
                   "(0600) and /etc/ombot/agent.toml")
    return identity


# -- the list of agents ---------------------------------------------------------------------------------


def _agent_views(router: Any, masters: list[str]) -> tuple[dict[tuple[str, str], dict[str, dict[str, Any]]],
                                                             dict[str, Exception]]:
    """(host, idc) -> master -> what that master says of the host, every page of each; and the masters
    that could not be asked."""
    from ombot.masters import ConnectFailed, MasterLost, Refused

    views: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    errors: dict[str, Exception] = {}
    for master_id in masters:
        idc = router.config.masters[master_id].idc
        after = ""
        try:
            while True:
                reply = router.registry(master_id, {"action": "agents", "after": after, "limit": MAX_PER_CALL})
                for row in reply["agents"]:
                    views.setdefault((row["host"], idc), {})[master_id] = row
                if not reply["more"] or not reply["agents"]:
                    break
                after = reply["agents"][-1]["host"]
        except (ConnectFailed, MasterLost, Refused) as exc:
            errors[master_id] = exc
    return views, errors


def _merged(host_idc: tuple[str, str], per_master: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One host over its masters: its state, and the newest heartbeat any of them has."""
    host, idc = host_idc
    states = {row["state"] for row in per_master.values()}
    state = states.pop() if len(states) == 1 else "bound" if states == {"bound", "pending"} else "mixed"
    beats = [row for row in per_master.values() if row.get("last_seen") is not None]
    newest = max(beats, key=lambda row: row["last_seen"]) if beats else {}
    fields = ("last_seen", "spool_depth", "dropped_total", "sent_total", "problem", "version", "sources")
    return {"host": host, "idc": idc, "state": state, **{f: newest.get(f) for f in fields},
            "masters": {m: {k: v for k, v in row.items() if k != "host"} for m, row in sorted(per_master.items())}}


def _agents_table(merged: list[dict[str, Any]], now: float) -> Iterable[str]:
    if not merged:
        yield "no agent is enrolled at these masters"
        return
    rows = [("HOST", "IDC", "STATE", "LAST CONTACT", "QUEUE", "SOURCES", "VERSION", "MASTERS")]
    for a in merged:
        rows.append((a["host"], a["idc"], a["state"], _contact(a["last_seen"], now),
                     "-" if a["spool_depth"] is None else str(a["spool_depth"]),
                     ",".join(a["sources"]) if a["sources"] else "-", a["version"] or "-",
                     " ".join(f"{m}:{v['state']}" for m, v in a["masters"].items())))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        yield "  ".join(f"{cell:<{w}}" for cell, w in zip(r, widths)) + "  " + r[-1]
    problems = [a for a in merged if a["problem"]]
    for a in problems:
        yield f"{a['host']}: problem: {a['problem']}"


def _contact(last_seen: int | None, now: float) -> str:
    """A heartbeat's time in UTC and how long ago; "never" without one."""
    if last_seen is None:
        return "never"
    ago = max(0, int(now - last_seen / 1000))
    age = f"{ago}s" if ago < 120 else f"{ago // 60}m" if ago < 7200 else f"{ago // 3600}h" if ago < 172800 \
        else f"{ago // 86400}d"
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(last_seen / 1000))} UTC ({age} ago)"
