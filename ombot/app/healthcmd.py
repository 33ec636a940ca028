"""`ombot health`: ask the ops listeners ombot.toml configures (`ops_listen`) whether each process is ready.

For scripts and for people: one line per process (or --json), and an exit code that says the worst
found (docs/monitoring.md): 0 every process asked is ready, 1 one answered not ready, 2 one did not
answer (or has no `ops_listen`). It reads /readyz over plain HTTP from this machine: a listener on
loopback answers only on its own host.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Optional

import typer

from ombot import config as cfg
from ombot.app.options import ConfigOpt, config_of
from ombot.errors import OmbotError
from ombot.tables import TableReader, parse_address

READY, NOT_READY, UNREACHABLE = 0, 1, 2  # the exit codes, worst wins
DEFAULT_TIMEOUT = 5.0  # above the listener's own bound on its checks (ombot.opsweb.CHECK_SECONDS)
MAX_BODY = 64 * 1024
ANY_ADDRESS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # a wildcard listener is asked on loopback


@dataclass
class Probe:
    """What one process's /readyz said."""

    process: str  # "bot" or "master ID"
    address: str
    status: str = "unreachable"  # ready, not_ready or unreachable
    checks: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    @property
    def code(self) -> int:
        return {"ready": READY, "not_ready": NOT_READY}.get(self.status, UNREACHABLE)

    def line(self) -> str:
        if self.status == "unreachable":
            return f"{self.process:<16} {self.address:<22} unreachable: {self.error}"
        failed = [f"{name}: {c.get('detail', '')}" for name, c in self.checks.items() if not c.get("ok")]
        passed = ", ".join(name for name, c in self.checks.items() if c.get("ok"))
        said = "; ".join(failed) if failed else (f"{passed} ok" if passed else "no checks")
        return f"{self.process:<16} {self.address:<22} {self.status.replace('_', ' ')}: {said}"


def health(ctx: typer.Context, config: ConfigOpt = None,
           bot: Annotated[bool, typer.Option("--bot", help="Ask the bot ([bot] ops_listen)")] = False,
           master: Annotated[Optional[list[str]], typer.Option("--master", metavar="ID", help="Ask this master (repeatable)")] = None,
           timeout: Annotated[float, typer.Option(metavar="SECONDS", help="Seconds to wait for each answer")] = DEFAULT_TIMEOUT,
           as_json: Annotated[bool, typer.Option("--json", help="One JSON list of what each answered")] = False) -> None:
    """Is each OMBot process ready? Asks the /readyz of the bot and the masters ombot.toml names (all of
    them, or those picked with --bot and --master). Exit 0: all ready; 1: one is not; 2: one did not answer."""
    conf = config_of(ctx, config)
    probes = [ask(name, address, timeout) for name, address in targets(conf, bot, master or [])]
    if as_json:
        typer.echo(json.dumps([asdict(p) for p in probes], indent=2))
    else:
        for probe in probes:
            typer.echo(probe.line())
    raise typer.Exit(max(p.code for p in probes))


def targets(conf: cfg.Config, bot: bool, masters: list[str]) -> list[tuple[str, tuple[str, int] | None]]:
    """(process, its ops_listen) for each process to ask: those picked, else the bot (if configured) and every master."""
    unknown = [m for m in masters if m not in conf.masters]
    if unknown:
        raise OmbotError(f"no master {', '.join(map(repr, unknown))} in {conf.path} (known: {', '.join(conf.masters)})")
    everything = not bot and not masters
    picked: list[tuple[str, tuple[str, int] | None]] = []
    if bot or (everything and "bot" in conf.raw):
        picked.append(("bot", _bot_address(conf)))
    for master_id in conf.masters if everything else masters:
        picked.append((f"master {master_id}", conf.masters[master_id].ops_listen))
    if not picked:
        raise OmbotError(f"{conf.path} configures no bot and no master to ask")
    return picked


def _bot_address(conf: cfg.Config) -> tuple[str, int] | None:
    """`[bot] ops_listen` alone: the rest of [bot] (its database's secret file) is none of a probe's business."""
    bot = TableReader(conf.path, conf.raw, "").sub("bot")
    return parse_address(bot, "ops_listen") if "ops_listen" in bot.table else None


def ask(process: str, address: tuple[str, int] | None, timeout: float) -> Probe:
    """GET /readyz: 200 ready, 503 not ready (the body says which check failed), anything else unreachable."""
    if address is None:
        return Probe(process, "-", error="no ops_listen configured for it")
    host = ANY_ADDRESS.get(address[0], address[0])
    where = f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    probe = Probe(process, where)
    try:
        with urllib.request.urlopen(f"http://{where}/readyz", timeout=timeout) as reply:
            return _read(probe, reply.status, reply.read(MAX_BODY))
    except urllib.error.HTTPError as exc:
        return _read(probe, exc.code, exc.read(MAX_BODY))
    except (OSError, ValueError) as exc:  # refused, timed out, not HTTP at all
        probe.error = str(getattr(exc, "reason", None) or exc)
        return probe


def _read(probe: Probe, status: int, body: bytes) -> Probe:
    try:
        answer = json.loads(body)
        checks = answer["checks"]
    except (ValueError, KeyError, TypeError):
        probe.error = f"HTTP {status} without OMBot's readiness answer: another service on this port?"
        return probe
    if status not in (200, 503) or not isinstance(checks, dict):
        probe.error = f"HTTP {status}"
        return probe
    probe.status, probe.checks = ("ready" if status == 200 else "not_ready"), checks
    return probe
