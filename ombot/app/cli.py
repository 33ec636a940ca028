"""The `ombot` command. User-facing errors are caught in one place (`main`) and printed plainly."""

from __future__ import annotations

import json
import os
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ombot import config as cfg
from ombot.app import initdir
from ombot.errors import OmbotError
from ombot.logs import setup_logging

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="OMBot: run and audit Linux clusters from chat.")

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
    ctx.obj = {"config": config}
    if client:  # read by Config.require_client; only a key this user can read can be used
        os.environ[cfg.CLIENT_ENV] = client
    setup_logging(logging.DEBUG if verbose else logging.INFO)


def _config(ctx: typer.Context, local: Path | None) -> cfg.Config:
    return cfg.load(local or (ctx.obj or {}).get("config"))


def _router(conf: cfg.Config, origin: str = "cli") -> Any:
    """The CLI speaks as its registration; the master fixes who that is (cli:USER), never the environment."""
    from masters import Identity, Router

    client = conf.require_client()
    return Router(conf, Identity.load(client.key_file), conf.clients[client.id].identity, origin)


@app.command()
def init(directory: Annotated[Path, typer.Argument(help="Directory to create")],
         master_port: Annotated[int, typer.Option(help="Port for the local master")] = initdir.DEFAULT_PORT) -> None:
    """Write a working starter set: ombot.toml, fresh keys, an inventory, a sample policy."""
    path = initdir.init(directory, master_port)
    typer.echo(f"wrote {path}")
    typer.echo(f"start a master:  ombot --config {path} master")
    typer.echo(f"run a module:    ombot --config {path} run facts localhost")


@app.command()
def keygen(name: Annotated[str, typer.Argument(help="Key name, e.g. bot or bj-master-1")],
           directory: Annotated[Path, typer.Option("--dir", help="Where to write NAME.key and NAME.pub")] = Path("keys")) -> None:
    """Make a key pair (private file 0600, never overwritten) and print the public key."""
    from masters import Identity

    identity = Identity.generate()
    identity.save(directory / f"{name}.key")
    typer.echo(identity.public)


@app.command()
def master(ctx: typer.Context, config: ConfigOpt = None,
           master_id: Annotated[Optional[str], typer.Option("--id", help="Which [masters.NAME] to serve")] = None,
           ready_file: Annotated[Optional[Path], typer.Option(help="Write host:port here once listening")] = None) -> None:
    """Serve one master of an IDC (rpyc on its configured address)."""
    from masters import serve_master

    conf = _config(ctx, config)
    serve_master(conf, conf.master(master_id), ready_file)


@app.command()
def up(ctx: typer.Context, config: ConfigOpt = None,
       directory: Annotated[Path, typer.Argument(help="Demo directory, created on first use")] = Path("demo"),
       master_port: Annotated[int, typer.Option(help="Port for the demo's master, on first use")] = initdir.DEFAULT_PORT) -> None:
    """Start OMBot on the embedded default: a local master on SQLite (configured on first use) and
    the chat front end: Slack when its tokens are set, else the console."""
    from bot import SlackSecrets
    from ombot.app.launch import local_masters

    path = Path(config or (ctx.obj or {}).get("config") or directory / "ombot.toml")
    if not path.exists():
        initdir.init(path.parent, master_port, demo=True)
        typer.echo(f"wrote a demo configuration to {path}")
    conf = cfg.load(path)
    with local_masters(conf) as started:
        for line in started:
            typer.echo(line)
        typer.echo(f"from another terminal: ombot --config {path} run facts localhost")
        if SlackSecrets.from_env().configured:
            _serve_slack(conf)
        else:
            _serve_console(conf)


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
    from bot import slack_manifest

    typer.echo(json.dumps(slack_manifest(http_url), indent=2))


def _serve_console(conf: cfg.Config) -> None:
    from bot import BotService, run_console

    service = BotService(conf, origin="console")
    try:
        run_console(service)
    finally:
        service.close()


def _serve_slack(conf: cfg.Config) -> None:
    from bot import serve_slack

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


@app.command("schedules")
def schedules(ctx: typer.Context, config: ConfigOpt = None) -> None:
    """The schedules in the bot's database (made with /om schedule)."""
    from bot import list_schedules

    rows = list_schedules(_config(ctx, config))
    typer.echo("\n".join(rows) if rows else "No schedules.")


policy_app = typer.Typer(no_args_is_help=True, help="Check and explain the access policy.")
app.add_typer(policy_app, name="policy")


def _policy_path(conf: cfg.Config, file: Path | None) -> Path:
    from bot import BotSettings

    path = file or BotSettings.from_config(conf).policy
    if path is None:
        raise OmbotError(f"{conf.path}: no [bot] policy configured (or give --file)")
    return path


def _cli_gate(conf: cfg.Config) -> Any:
    """The policy gate for CLI requests, when the config names a policy; CLI ids are in no user group."""
    from approvals import Gate, load_policy
    from bot import BotSettings

    path = BotSettings.from_config(conf).policy
    return None if path is None else Gate(load_policy(path), lambda group: frozenset())


@policy_app.command("check")
def policy_check(ctx: typer.Context, config: ConfigOpt = None,
                 file: Annotated[Optional[Path], typer.Option(help="Policy file [default: [bot] policy]")] = None) -> None:
    """Validate the policy file; errors name the rule and key path."""
    from approvals import load_policy

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
    from approvals import Gate, load_policy

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
    from audit_agent import main as agent_main

    raise typer.Exit(agent_main(list(ctx.args)))


audit_app = typer.Typer(no_args_is_help=True, help="Enrol and revoke servers' audit agents; check audit rules.")
app.add_typer(audit_app, name="audit")


@audit_app.command("enroll")
def audit_enroll(ctx: typer.Context, host: Annotated[str, typer.Argument(help="The server's host name")],
                 idc: Annotated[str, typer.Option("--idc", help="The IDC whose masters collect its events")],
                 out: Annotated[Path, typer.Option("--out", help="Where to write agent-HOST.key and .toml")] = Path("."),
                 config: ConfigOpt = None) -> None:
    """Make HOST's agent key and agent.toml, and print the registration to add to ombot.toml."""
    from audit_agent.settings import render
    from masters import Identity

    conf = _config(ctx, config)
    if idc not in conf.idcs:
        raise OmbotError(f"no IDC {idc!r} in {conf.path} (known: {', '.join(conf.idcs)})")
    if not cfg.HOST_NAME.fullmatch(host):
        raise OmbotError(f"{host!r} is not a host name (letters, digits, '-', '_', dots)")
    client_id = f"agent-{host}"
    identity = Identity.generate()
    identity.save(out / f"{client_id}.key")
    masters = [(m.id, m.host, m.port, m.public_key) for m in (conf.masters[mid] for mid in conf.idcs[idc])]
    (out / f"{client_id}.toml").write_text(render(host, idc, "agent.key", masters))
    typer.echo(f"wrote {out / f'{client_id}.key'} and {out / f'{client_id}.toml'}; on {host}, install them as "
               f"/etc/ombot/agent.key (0600) and /etc/ombot/agent.toml")
    typer.echo(f"add to {conf.path}, then add \"{client_id}\" to the accept list of "
               f"{', '.join(conf.idcs[idc])} and restart them:\n")
    typer.echo(f'[clients.{client_id}]\nkind = "agent"\nhost = "{host}"\npublic_key = "{identity.public}"')


@audit_app.command("revoke")
def audit_revoke(ctx: typer.Context, host: Annotated[str, typer.Argument(help="The server's host name")],
                 config: ConfigOpt = None) -> None:
    """Say exactly what to remove from ombot.toml so no master accepts HOST's agent key any more."""
    conf = _config(ctx, config)
    found = [c.id for c in conf.clients.values() if c.kind == "agent" and c.host == host]
    if not found:
        typer.echo(f"no agent registration for {host} in {conf.path}: nothing accepts it")
        raise typer.Exit(1)
    for client_id in found:
        accepting = [m.id for m in conf.masters.values() if client_id in m.accept]
        typer.echo(f"remove the [clients.{client_id}] table from {conf.path}")
        for mid in accepting:
            typer.echo(f"remove \"{client_id}\" from [masters.{mid}] accept")
        typer.echo(f"then restart {', '.join(accepting) or 'nothing (no master accepts it)'}: a master reads its "
                   "accept list at start")


@audit_app.command("test-rules")
def audit_test_rules(file: Annotated[Path, typer.Argument(help="The audit rules file (TOML)")]) -> None:
    """Check an audit rules file: its syntax, its regexes, and every rule's inline examples."""
    from bot import check_examples, load_rules
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


def main() -> None:
    from masters import ConnectFailed, MasterLost, NoMasterAvailable, Refused
    from ombot.proc import make_undumpable

    os.umask(0o077)  # databases, logs, keys, state: every file OMBot writes is its user's alone
    make_undumpable()  # jobs of the same uid must not read our secrets from /proc/PID/{environ,mem}
    try:
        app()
    except Refused as exc:
        typer.echo(f"refused ({exc.code}): {exc.message}", err=True)
        sys.exit(2)
    except (NoMasterAvailable, ConnectFailed, MasterLost) as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(3)
    except OmbotError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:  # a taken port, an unwritable directory: say so, without a traceback
        where = f": {exc.filename}" if exc.filename else ""
        typer.echo(f"error: {exc.strerror or exc}{where}", err=True)
        sys.exit(2)
