"""The `ombot` command. User-facing errors are caught in one place (`main`) and printed plainly."""

from __future__ import annotations

import json
import os
import logging
import shlex
import shutil
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ombot import config as cfg
from ombot.app import backupcmd, exits, initdir
from ombot.app.auditcmd import audit_app
from ombot.app.healthcmd import health
from ombot.app.options import ConfigOpt, IdcOpt, LogFormat, LogFormatOpt, config_of, masters_named, router_for
from ombot.app.policycmd import cli_gate, policy_app
from ombot.app.registrycmd import clients_app
from ombot.app.unitscmd import install_units
from ombot.errors import OmbotError
from ombot.logs import FORMAT_ENV, setup_logging
from ombot.proc import exit_cleanly_on

# rich_markup_mode=None: help text is printed as written; Rich markup would eat `[client] id` and `[bot]`.
# Without a subcommand `_root` prints the help to stdout (click's no_args_is_help would use stderr).
app = typer.Typer(invoke_without_command=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="OMBot: run and audit Linux clusters from chat.")

RootConfigOpt = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", envvar=cfg.CONFIG_ENV, help="Path to ombot.toml [default: ./ombot.toml]"),
]


def _print_version(wanted: bool) -> None:
    """--version: eager, so it answers before any subcommand or config is looked at."""
    if wanted:
        import ombot

        typer.echo(f"ombot {ombot.__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(ctx: typer.Context, config: RootConfigOpt = None,
          client: Annotated[Optional[str], typer.Option(
              "--client", envvar=cfg.CLIENT_ENV, help="The [clients.NAME] registration to speak as [default: [client] id]")] = None,
          verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug detail")] = False,
          log_format: LogFormatOpt = LogFormat.text,
          version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                                help="Print the version (ombot X.Y.Z) and exit")] = False) -> None:
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(exits.REFUSED)  # as a usage error: nothing was asked
    ctx.obj = {"config": config}
    if client:  # read by Config.require_client; only a key this user can read can be used
        os.environ[cfg.CLIENT_ENV] = client
    os.environ[FORMAT_ENV] = log_format.value  # the masters `ombot up` starts log alike
    setup_logging(logging.DEBUG if verbose else logging.INFO, log_format.value)


@app.command()
def init(directory: Annotated[Path, typer.Argument(help="Directory to create")],
         master_port: Annotated[int, typer.Option(help="Port for the local master", min=1, max=65535)] = initdir.DEFAULT_PORT,
         production: Annotated[bool, typer.Option("--production", help="A configuration for several IDCs, each "
                                                  "master on its own host (docs/production.md)")] = False,
         idc: Annotated[Optional[str], typer.Option("--idc", help="With --production: the IDCs, e.g. bj,sh")] = None,
         masters_per_idc: Annotated[int, typer.Option(help="With --production: masters per IDC")] = 2) -> None:
    """Write a working starter set: ombot.toml, fresh keys, an inventory, a sample policy; with
    --production, a commented configuration for several IDCs to deploy from."""
    if production or idc:
        for line in initdir.init_production(directory, idc, masters_per_idc):
            typer.echo(line)
        return
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

    conf = config_of(ctx, config)
    serve_master(conf, conf.master(master_id), ready_file)


@app.command()
def up(ctx: typer.Context, config: ConfigOpt = None,
       directory: Annotated[Path, typer.Argument(help="Demo directory, created on first use")] = Path("demo"),
       master_port: Annotated[int, typer.Option(help="Port for the demo's master, on first use", min=1, max=65535)] = initdir.DEFAULT_PORT) -> None:
    """Start OMBot on the embedded default: a local master on SQLite (configured on first use) and
    the chat front end: Slack when its tokens are set, else the console, which then also prints the
    shell audit's alerts while no Slack bot pulls them (docs/audit.md, "Quickstart")."""
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
    """The /om grammar in this terminal, through the same handlers as Slack; with a chat key (the
    demo's), audit alerts too, while no Slack bot pulls the audit feed."""
    _serve_console(config_of(ctx, config))


@app.command()
def bot(ctx: typer.Context, config: ConfigOpt = None) -> None:
    """Serve the Slack app: Socket Mode when SLACK_APP_TOKEN is set, else HTTP on [bot] listen."""
    _serve_slack(config_of(ctx, config))


@app.command("slack-manifest")
def slack_manifest(ctx: typer.Context, config: ConfigOpt = None,
                   http_url: Annotated[Optional[str], typer.Option(help="Public URL for HTTP mode; omit for Socket Mode")] = None) -> None:
    """Print the Slack app manifest (JSON) to create the app with."""
    from ombot.bot import slack_manifest

    typer.echo(json.dumps(slack_manifest(http_url), indent=2))


def _serve_console(conf: cfg.Config) -> None:
    from ombot.bot import BotService, run_console

    service = BotService(conf, origin="console")
    exit_cleanly_on(signal.SIGTERM, signal.SIGHUP)  # `kill` or a closed terminal: the terminal and leases set back
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
    conf = config_of(ctx, config)
    router = router_for(conf)
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

    conf = config_of(ctx, config)
    client = conf.require_client()
    code = run_module(router_for(conf), cli_gate(conf), conf.clients[client.id].identity, idc or client.default_idc,
                      module, targets, params or [], dry_run, timeout, as_json, check)
    raise typer.Exit(code)


@app.command()
def masters(ctx: typer.Context, config: ConfigOpt = None) -> None:
    """Health of every configured master; exit 1 if any is down."""
    conf = config_of(ctx, config)
    report = router_for(conf).health()
    for m in report:
        if m["ok"]:
            typer.echo(f"{m['master']:<16} {m['idc']:<10} up    {m['rtt_ms']:>7} ms  backend={m['backend']} "
                       f"running={m['running_jobs']} catalog={m['catalog_version']} version={m.get('version', '?')}")
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

    conf = config_of(ctx, config)
    router = router_for(conf)
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

    conf = config_of(ctx, config)
    router = router_for(conf)
    try:
        code = show_status(router, job, masters_named(conf, idc, master), as_json)
    finally:
        router.close()
    raise typer.Exit(code)


@app.command("schedules")
def schedules(ctx: typer.Context, config: ConfigOpt = None) -> None:
    """The schedules in the bot's database (made with /om schedule)."""
    from ombot.bot import list_schedules

    rows = list_schedules(config_of(ctx, config))
    typer.echo("\n".join(rows) if rows else "No schedules.")


@app.command("audit-agent", add_help_option=False,
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def audit_agent_command(ctx: typer.Context) -> None:
    """The shell audit hook and agent: hook | install [--root DIR] | run [--config agent.toml] (see --help)."""
    from ombot.audit_agent import main as agent_main

    raise typer.Exit(agent_main(list(ctx.args)))


app.add_typer(policy_app, name="policy")
app.add_typer(audit_app, name="audit")
app.add_typer(clients_app, name="clients")
app.command("install-units")(install_units)
app.command("health")(health)
backupcmd.register(app)


def main() -> None:
    from ombot.masters import ConnectFailed, MasterLost, NoMasterAvailable, Refused
    from ombot.proc import make_undumpable
    from ombot.sdnotify import claim

    os.umask(0o077)  # databases, logs, keys, state: every file OMBot writes is its user's alone
    make_undumpable()  # jobs of the same uid must not read our secrets from /proc/PID/{environ,mem}
    claim()  # systemd's notify socket and watchdog: this process's alone, never a child's
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
