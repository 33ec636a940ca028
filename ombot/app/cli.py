"""The `ombot` command. User-facing errors are caught in one place (`main`) and printed plainly."""

from __future__ import annotations

import json
import os
import logging
import shlex
import shutil
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ombot import config as cfg
from ombot.app import exits, initdir
from ombot.errors import OmbotError
from ombot.logs import setup_logging

# rich_markup_mode=None: help text is printed as written; Rich markup would eat `[client] id` and `[bot]`.
# Without a subcommand `_root` prints the help to stdout (click's no_args_is_help would use stderr).
app = typer.Typer(invoke_without_command=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="OMBot: run and audit Linux clusters from chat.")

RootConfigOpt = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", envvar=cfg.CONFIG_ENV, help="Path to ombot.toml [default: ./ombot.toml]"),
]
# After the subcommand: no envvar here, or $OMBOT_CONFIG would beat a --config given before it.
ConfigOpt = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help="Path to ombot.toml (also accepted before the subcommand)"),
]
IdcOpt = Annotated[Optional[str], typer.Option("--idc", help="IDC to act in [default: the client's default_idc]")]


@app.callback()
def _root(ctx: typer.Context, config: RootConfigOpt = None,
          client: Annotated[Optional[str], typer.Option(
              "--client", envvar=cfg.CLIENT_ENV, help="The [clients.NAME] registration to speak as [default: [client] id]")] = None,
          verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug detail")] = False) -> None:
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(exits.REFUSED)  # as a usage error: nothing was asked
    ctx.obj = {"config": config}
    if client:  # read by Config.require_client; only a key this user can read can be used
        os.environ[cfg.CLIENT_ENV] = client
    setup_logging(logging.DEBUG if verbose else logging.INFO)


def _config(ctx: typer.Context, local: Path | None) -> cfg.Config:
    return cfg.load(local or (ctx.obj or {}).get("config"))


def _router(conf: cfg.Config, origin: str = "cli") -> Any:
    """The CLI speaks as its registration; the master fixes who that is (cli:USER), never the environment."""
    from ombot.masters import Identity, Router

    client = conf.require_client()
    return Router(conf, Identity.load(client.key_file), conf.clients[client.id].identity, origin)


@app.command()
def init(directory: Annotated[Path, typer.Argument(help="Directory to create")],
         master_port: Annotated[int, typer.Option(help="Port for the local master")] = initdir.DEFAULT_PORT) -> None:
    """Write a working starter set: ombot.toml, fresh keys, an inventory, a sample policy."""
    path = initdir.init(directory, master_port)
    typer.echo(f"wrote {path}")
    typer.echo(f"start a master:  {self_command()} --config {shlex.quote(str(path))} master")
    typer.echo(f"run a module:    {self_command()} --config {shlex.quote(str(path))} run facts localhost")


@app.command()
def keygen(name: Annotated[str, typer.Argument(help="Key name, e.g. bot or bj-master-1")],
           directory: Annotated[Path, typer.Option("--dir", help="Where to write NAME.key and NAME.pub")] = Path("keys")) -> None:
    """Make a key pair (private file 0600, never overwritten) and print the public key."""
    from ombot.masters import Identity

    identity = Identity.generate()
    identity.save(directory / f"{name}.key")
    typer.echo(identity.public)


@app.command()
def master(ctx: typer.Context, config: ConfigOpt = None,
           master_id: Annotated[Optional[str], typer.Option("--id", help="Which [masters.NAME] to serve")] = None,
           ready_file: Annotated[Optional[Path], typer.Option(help="Write host:port here once listening")] = None) -> None:
    """Serve one master of an IDC (rpyc on its configured address)."""
    from ombot.masters import serve_master

    conf = _config(ctx, config)
    serve_master(conf, conf.master(master_id), ready_file)


@app.command()
def up(ctx: typer.Context, config: ConfigOpt = None,
       directory: Annotated[Path, typer.Argument(help="Demo directory, created on first use")] = Path("demo"),
       master_port: Annotated[int, typer.Option(help="Port for the demo's master, on first use")] = initdir.DEFAULT_PORT) -> None:
    """Start OMBot on the embedded default: a local master on SQLite (configured on first use) and
    the chat front end: Slack when its tokens are set, else the console."""
    from ombot.bot import SlackSecrets
    from ombot.app.launch import local_masters

    path = Path(config or (ctx.obj or {}).get("config") or directory / "ombot.toml")
    if not path.exists():
        initdir.init(path.parent, master_port, demo=True)
        typer.echo(f"wrote a demo configuration to {path}")
    conf = cfg.load(path)
    with local_masters(conf) as started:
        for line in started:
            typer.echo(line)
        typer.echo(f"from another terminal: {self_command()} --config {shlex.quote(str(path))} run facts localhost")
        if SlackSecrets.from_env().configured:
            _serve_slack(conf)
        else:
            _serve_console(conf)


def self_command() -> str:
    """`ombot` as this shell can run it: the bare name when PATH finds this install, else this
    install's script (relative when below the current directory: `.venv/bin/ombot` in a fresh
    clone), else this interpreter with `-m ombot`."""
    script = Path(sys.executable).parent / "ombot"  # not resolved: a venv's python is a symlink
    found = shutil.which("ombot")
    if found and script.exists() and Path(found).resolve() == script.resolve():
        return "ombot"
    return shlex.quote(_from_here(script)) if script.exists() else f"{shlex.quote(_from_here(Path(sys.executable)))} -m ombot"


def _from_here(path: Path) -> str:
    """`path` relative to the current directory when it lies below it, else absolute."""
    absolute = path.absolute()
    try:
        relative = str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)
    return relative if "/" in relative else f"./{relative}"  # a bare name would be looked up on PATH


@app.command()
def console(ctx: typer.Context, config: ConfigOpt = None) -> None:
    """The /om grammar in this terminal, through the same handlers as Slack."""
    _serve_console(_config(ctx, config))


@app.command()
def bot(ctx: typer.Context, config: ConfigOpt = None) -> None:
    """Serve the Slack app: Socket Mode when SLACK_APP_TOKEN is set, else HTTP on [bot] listen."""
    _serve_slack(_config(ctx, config))


@app.command("slack-manifest")
def slack_manifest(ctx: typer.Context, config: ConfigOpt = None,
                   http_url: Annotated[Optional[str], typer.Option(help="Public URL for HTTP mode; omit for Socket Mode")] = None) -> None:
    """Print the Slack app manifest (JSON) to create the app with."""
    from ombot.bot import slack_manifest

    typer.echo(json.dumps(slack_manifest(http_url), indent=2))


def _serve_console(conf: cfg.Config) -> None:
    from ombot.bot import BotService, run_console

    service = BotService(conf, origin="console")
    try:
        run_console(service)
    finally:
        service.close()


def _serve_slack(conf: cfg.Config) -> None:
    from ombot.bot import serve_slack

    serve_slack(conf)


@app.command("modules")
def list_modules(ctx: typer.Context, config: ConfigOpt = None, idc: IdcOpt = None) -> None:
    """List the modules the IDC's master offers."""
    conf = _config(ctx, config)
    router = _router(conf)
    catalog = router.catalog(idc or conf.require_client().default_idc)
    width = max((len(n) for n in catalog.modules), default=4)
    for spec in catalog.modules.values():
        typer.echo(f"{spec.name:<{width}}  {spec.risk:<6}  {spec.description}")


@app.command()
def run(ctx: typer.Context,
        module: Annotated[str, typer.Argument(help="Module name, e.g. facts")],
        targets: Annotated[str, typer.Argument(help="Hosts, groups, ranges: web[01-03],db")],
        params: Annotated[Optional[list[str]], typer.Argument(help="key=value parameters")] = None,
        config: ConfigOpt = None, idc: IdcOpt = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the hosts and what would run, and stop")] = False,
        timeout: Annotated[Optional[int], typer.Option(help="Job timeout in seconds")] = None,
        check: Annotated[bool, typer.Option("--check", help="A check run: show what would change, change nothing")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print events as JSON lines")] = False) -> None:
    """Run a module on hosts and print a per-host table; exit 0 only if every host succeeded."""
    from ombot.app.runcmd import run_module

    conf = _config(ctx, config)
    client = conf.require_client()
    code = run_module(_router(conf), _cli_gate(conf), conf.clients[client.id].identity, idc or client.default_idc,
                      module, targets, params or [], dry_run, timeout, as_json, check)
    raise typer.Exit(code)


@app.command()
def masters(ctx: typer.Context, config: ConfigOpt = None) -> None:
    """Health of every configured master; exit 1 if any is down."""
    conf = _config(ctx, config)
    report = _router(conf).health()
    for m in report:
        if m["ok"]:
            typer.echo(f"{m['master']:<16} {m['idc']:<10} up    {m['rtt_ms']:>7} ms  backend={m['backend']} "
                       f"running={m['running_jobs']} catalog={m['catalog_version']}")
        else:
            typer.echo(f"{m['master']:<16} {m['idc']:<10} DOWN  {m['error']}")
    raise typer.Exit(0 if all(m["ok"] for m in report) else 1)


@app.command("jobs")
def jobs(ctx: typer.Context, config: ConfigOpt = None,
         idc: Annotated[Optional[str], typer.Option("--idc", help="IDC, list (bj,sh) or '*' [default: the client's "
                                                    "default_idc]")] = None,
         limit: Annotated[int, typer.Option(min=1, max=200, help="At most this many jobs per IDC")] = 20,
         as_json: Annotated[bool, typer.Option("--json", help="One JSON object per job")] = False) -> None:
    """This client's recent jobs at the masters of an IDC, newest first, with their state.
    Exit 0, or 4 when a master could not be asked (its jobs may be missing)."""
    from ombot.app.jobscmd import list_jobs
    from ombot.config import named_idcs

    conf = _config(ctx, config)
    router = _router(conf)
    try:
        code = list_jobs(router, named_idcs(conf, idc or conf.require_client().default_idc), limit, as_json)
    finally:
        router.close()
    raise typer.Exit(code)


@app.command("status")
def status(ctx: typer.Context, job: Annotated[str, typer.Argument(help="The job id `ombot run` printed")],
           idc: Annotated[Optional[str], typer.Option("--idc", help="Ask only this IDC's masters")] = None,
           master: Annotated[Optional[str], typer.Option("--master", help="Ask only this master")] = None,
           config: ConfigOpt = None,
           as_json: Annotated[bool, typer.Option("--json", help="Print the job as one JSON object")] = False) -> None:
    """One job's state and per-host results [default: asking every master]. Exit 0 ok; 1 failed, partial,
    cancelled or timed out; 2 no master asked has it (so it did not run there); 3 unknown; 4 a master
    could not be asked; 5 still queued or running."""
    from ombot.app.jobscmd import show_status

    conf = _config(ctx, config)
    router = _router(conf)
    try:
        code = show_status(router, job, _masters_named(conf, idc, master), as_json)
    finally:
        router.close()
    raise typer.Exit(code)


@app.command("schedules")
def schedules(ctx: typer.Context, config: ConfigOpt = None) -> None:
    """The schedules in the bot's database (made with /om schedule)."""
    from ombot.bot import list_schedules

    rows = list_schedules(_config(ctx, config))
    typer.echo("\n".join(rows) if rows else "No schedules.")


policy_app = typer.Typer(no_args_is_help=True, help="Check and explain the access policy.")
app.add_typer(policy_app, name="policy")


def _policy_path(conf: cfg.Config, file: Path | None) -> Path:
    from ombot.bot import BotSettings

    path = file or BotSettings.from_config(conf).policy
    if path is None:
        raise OmbotError(f"{conf.path}: no [bot] policy configured (or give --file)")
    return path


def _cli_gate(conf: cfg.Config) -> Any:
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

    path = _policy_path(_config(ctx, config), file) if file is None else file
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

    conf = _config(ctx, config)
    policy = load_policy(_policy_path(conf, file))
    idc = idc or conf.require_client().default_idc
    hosts = _router(conf).expand(idc, targets)
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


@app.command("audit-agent", add_help_option=False,
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def audit_agent_command(ctx: typer.Context) -> None:
    """The shell audit hook and agent: hook | install [--root DIR] | run [--config agent.toml] (see --help)."""
    from ombot.audit_agent import main as agent_main

    raise typer.Exit(agent_main(list(ctx.args)))


audit_app = typer.Typer(no_args_is_help=True, help="Enrol and revoke servers' audit agents; check audit rules.")
app.add_typer(audit_app, name="audit")


@audit_app.command("enroll")
def audit_enroll(ctx: typer.Context, host: Annotated[str, typer.Argument(help="The server's host name")],
                 idc: Annotated[str, typer.Option("--idc", help="The IDC whose masters collect its events")],
                 out: Annotated[Path, typer.Option("--out", help="Where to write agent-HOST.key and .toml")] = Path("."),
                 print_only: Annotated[bool, typer.Option("--print-only", help="Register nowhere: print the "
                                                          "[clients] table to add to ombot.toml by hand")] = False,
                 config: ConfigOpt = None) -> None:
    """Make HOST's agent key and agent.toml, and register the key at every master of the IDC (`registry
    add`, an admin key's operation: no restart). Exit 0 only if every master accepted it; safe to re-run."""
    conf = _config(ctx, config)
    if idc not in conf.idcs:
        raise OmbotError(f"no IDC {idc!r} in {conf.path} (known: {', '.join(conf.idcs)})")
    client_id = _agent_id(host)
    router = None if print_only else _admin_router(conf)
    identity = _agent_files(conf, host, idc, out)
    if router is None:
        typer.echo(f"add to {conf.path}, then add \"{client_id}\" to the accept list of "
                   f"{', '.join(conf.idcs[idc])} and restart them:\n")
        typer.echo(f'[clients.{client_id}]\nkind = "agent"\nhost = "{host}"\npublic_key = "{identity.public}"')
        return
    entry = {"id": client_id, "kind": "agent", "host": host, "public_key": identity.public, "modules": [], "hosts": []}
    replies = _registry_everywhere(router, list(conf.idcs[idc]), {"action": "add", "clients": [entry]})
    raise typer.Exit(_report_additions(replies, client_id))


@audit_app.command("revoke")
def audit_revoke(ctx: typer.Context, host: Annotated[str, typer.Argument(help="The server's host name")],
                 idc: Annotated[Optional[str], typer.Option("--idc", help="Only this IDC's masters "
                                                                          "[default: every master]")] = None,
                 config: ConfigOpt = None) -> None:
    """Revoke HOST's agent key(s) at every master (of the IDC): refused from their next frame, no restart.
    Exit 0 only if every master answered and one of them knew an agent of HOST."""
    conf = _config(ctx, config)
    if not cfg.HOST_NAME.fullmatch(host):
        raise OmbotError(f"{host!r} is not a host name (letters, digits, '-', '_', dots)")
    # By host, each master finds every agent of it it knows, enrolled or from its ombot.toml.
    ids = [f"agent-{host}", *(c.id for c in conf.clients.values() if c.kind == "agent" and c.host == host)]
    args = {"action": "revoke", "ids": [i for i in dict.fromkeys(ids) if len(i) <= 63], "hosts": [host]}
    replies = _registry_everywhere(_admin_router(conf), _masters_named(conf, idc, None), args)
    raise typer.Exit(_report_revocations(replies, f"an audit agent of {host}"))


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


clients_app = typer.Typer(no_args_is_help=True, help="List, add and revoke the clients the masters accept (admin keys).")
app.add_typer(clients_app, name="clients")
MasterOpt = Annotated[Optional[str], typer.Option("--master", help="Only this master")]


@clients_app.command("list")
def clients_list(ctx: typer.Context, master: MasterOpt = None, config: ConfigOpt = None,
                 as_json: Annotated[bool, typer.Option("--json", help="Print each master's answer as JSON")] = False) -> None:
    """Every client each master accepts now (from ombot.toml or added since) and the keys it revoked."""
    conf = _config(ctx, config)
    replies = _registry_everywhere(_admin_router(conf), _masters_named(conf, None, master), {"action": "list"})
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
    conf = _config(ctx, config)
    replies = _registry_everywhere(_admin_router(conf), _masters_named(conf, idc, master),
                                   {"action": "revoke", "ids": list(dict.fromkeys(ids))})
    raise typer.Exit(_report_revocations(replies, None))


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
    conf = _config(ctx, config)
    entry = {"id": client_id, "kind": kind, "user": user, "public_key": public_key,
             "modules": modules or [], "hosts": hosts or []}
    replies = _registry_everywhere(_admin_router(conf), _masters_named(conf, idc, master),
                                   {"action": "add", "clients": [entry]})
    raise typer.Exit(_report_additions(replies, client_id))


def _admin_router(conf: cfg.Config) -> Any:
    """A router speaking with the CLI's key, which must be an admin's to change registrations."""
    client = conf.require_client()
    if not conf.clients[client.id].admin:
        raise OmbotError(f"client {client.id} is not an admin: only a cli key with `admin = true` under "
                         f"[clients.{client.id}] of the masters' ombot.toml may list, add or revoke registrations "
                         "(pick one with --client NAME)")
    return _router(conf)


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


def _masters_named(conf: cfg.Config, idc: str | None, master: str | None) -> list[str]:
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


def _registry_everywhere(router: Any, masters: list[str], args: dict[str, Any]) -> dict[str, Any]:
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


def _report_additions(replies: dict[str, Any], client_id: str) -> int:
    """Print each master's answer to an `add` of one client; 0 only if every master has it now."""
    for mid, reply in replies.items():
        typer.echo(f"{mid}: " + (_failure(reply) if isinstance(reply, Exception) else
                                 "accepted" if reply["results"][client_id] == "added" else "already"))
    failed = [mid for mid, reply in replies.items() if isinstance(reply, Exception)]
    if failed:
        typer.echo(f"{client_id} is not registered at {', '.join(failed)} (see above): run the same command "
                   "again once they answer (it is safe to repeat)", err=True)
    return 1 if failed else 0


def _report_revocations(replies: dict[str, Any], what: str | None) -> int:
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


def main() -> None:
    from ombot.masters import ConnectFailed, MasterLost, NoMasterAvailable, Refused
    from ombot.proc import make_undumpable

    os.umask(0o077)  # databases, logs, keys, state: every file OMBot writes is its user's alone
    make_undumpable()  # jobs of the same uid must not read our secrets from /proc/PID/{environ,mem}
    try:
        app()
    except Refused as exc:
        typer.echo(f"refused ({exc.code}): {exc.message}", err=True)
        sys.exit(exits.REFUSED)
    except (NoMasterAvailable, ConnectFailed) as exc:  # connecting failed everywhere: the request never left
        typer.echo(f"error: {exc}; nothing was sent", err=True)
        sys.exit(exits.NOT_SENT)
    except MasterLost as exc:  # sent, then the link broke: what it did is not known
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exits.UNKNOWN)
    except OmbotError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exits.REFUSED)
    except OSError as exc:  # a taken port, an unwritable directory: say so, without a traceback
        where = f": {exc.filename}" if exc.filename else ""
        typer.echo(f"error: {exc.strerror or exc}{where}", err=True)
        sys.exit(exits.REFUSED)
