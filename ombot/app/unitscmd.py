"""`ombot install-units`: the systemd units of the master and the bot (ombot/app/units.py) under
ROOT/etc/systemd/system, with the directories each writes taken from the site's ombot.toml."""

from __future__ import annotations

import os
import pwd
import sys
from pathlib import Path, PurePosixPath
from typing import Annotated, Optional

import typer

from ombot import config as cfg
from ombot.app import units
from ombot.errors import OmbotError
from ombot.storage import sqlite_file

DEFAULT_CONFIG = "/etc/ombot/ombot.toml"
DEFAULT_USER = "ombot"

RootOpt = Annotated[Path, typer.Option(help="Write under this root (an image, a test) instead of /")]
UserOpt = Annotated[str, typer.Option(help="The dedicated user (and group) the processes run as")]
ConfigOpt = Annotated[Optional[str], typer.Option(
    "--config", "-c", help=f"ombot.toml as the host sees it, read under ROOT [default: {DEFAULT_CONFIG}]")]
BinOpt = Annotated[Optional[str], typer.Option("--bin", help="The ombot command the units run [default: this install's]")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace units that differ from these")]


def install_units(ctx: typer.Context, root: RootOpt = Path("/"), user: UserOpt = DEFAULT_USER,
                  config: ConfigOpt = None, bin_path: BinOpt = None, force: ForceOpt = False) -> None:
    """Write the systemd units ombot-master@.service (one instance per master id) and ombot-bot.service."""
    named = config or (ctx.obj or {}).get("config") or DEFAULT_CONFIG
    host_config = _absolute(str(named), root)
    conf = cfg.load(_under(root, host_config))
    masters, extra, bot = _writable_dirs(conf, root)
    settings = units.UnitSettings(command=_command(bin_path), config=host_config, user=user, group=user,
                                  master_dirs=masters, extra_master_dirs=extra, bot_dirs=bot)
    texts = {units.MASTER_UNIT: units.render_master(settings), units.BOT_UNIT: units.render_bot(settings)}
    if not force:  # both or neither: never a new master unit beside an old bot unit
        for name, text in texts.items():
            _refuse_a_changed(root / units.UNIT_DIR / name, text)
    for name, text in texts.items():
        typer.echo(_write(root / units.UNIT_DIR / name, text))
    for path in _made_dirs(root, settings, user):
        typer.echo(f"made {path}")
    for line in _next_steps(conf, root, user):
        typer.echo(line)


def _absolute(path: str, root: Path) -> str:
    if PurePosixPath(path).is_absolute():
        return path
    if root != Path("/"):
        raise OmbotError(f"--config {path}: give the absolute path the host will see under --root {root}")
    return str(Path(path).absolute())


def _under(root: Path, host_path: str) -> Path:
    return root / host_path.lstrip("/")


def _on_host(root: Path, path: Path) -> str:
    """A path read under ROOT, as the host sees it."""
    try:
        return "/" + str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _command(bin_path: str | None) -> tuple[str, ...]:
    """--bin; else the ombot script beside this Python (a venv's), else this Python with -m ombot."""
    if bin_path is not None:
        return (bin_path,)
    script = Path(sys.executable).parent / "ombot"  # not resolved: a venv's python is a symlink
    return (str(script),) if os.access(script, os.X_OK) else (sys.executable, "-m", "ombot")


def _writable_dirs(conf: cfg.Config, root: Path) -> tuple[dict[str, str], tuple[str, ...], tuple[str, ...]]:
    """Each master's state directory, the directories of SQLite databases kept elsewhere, and the bot's."""
    from ombot.bot import BotSettings

    masters = {mid: _on_host(root, m.state_dir) for mid, m in conf.masters.items()}
    extra = {d for m in conf.masters.values() if (d := _sqlite_dir(m.database_url, root)) and d not in masters.values()}
    bot = BotSettings.from_config(conf)
    bot_dirs = {_on_host(root, bot.state_dir)} | ({d} if (d := _sqlite_dir(bot.database_url, root)) else set())
    return masters, tuple(sorted(extra)), tuple(sorted(bot_dirs))


def _sqlite_dir(url: str, root: Path) -> str | None:
    path = sqlite_file(url)
    return _on_host(root, path.parent) if path is not None and path.is_absolute() else None


def _refuse_a_changed(path: Path, text: str) -> None:
    if path.exists() and path.read_text() != text:
        raise OmbotError(f"{path} differs from the unit this version writes (edited by hand?); keep your changes "
                         f"in a drop-in (systemctl edit {path.name}) and run again with --force to replace it")


def _write(path: Path, text: str) -> str:
    if path.exists() and path.read_text() == text:
        return f"unchanged {path}"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.chmod(0o644)  # systemd's files are world-readable: which is why no secret goes into them
    partial.replace(path)
    return f"wrote {path}"


def _made_dirs(root: Path, settings: units.UnitSettings, user: str) -> list[Path]:
    """ReadWritePaths= must exist before the unit starts: make those outside /var/lib (0700, the user's)."""
    made = []
    for host_path in sorted({*settings.master_dirs.values(), *settings.extra_master_dirs, *settings.bot_dirs}):
        if host_path.startswith("/var/lib/"):
            continue  # StateDirectory=: systemd makes it at each start
        path = _under(root, host_path)
        if not path.exists():
            path.mkdir(parents=True, mode=0o700)
            _give(path, user)
            made.append(path)
    return made


def _give(path: Path, user: str) -> None:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return  # the user is made later (the next steps say how); chown then
    if os.geteuid() == 0:
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _next_steps(conf: cfg.Config, root: Path, user: str) -> list[str]:
    steps = ["next, as root (docs/production.md):"]
    if root == Path("/"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            steps.append(f"  useradd --system --home-dir /var/lib/ombot --shell /usr/sbin/nologin {user}")
    steps.append("  systemctl daemon-reload")
    for mid in conf.masters:
        steps.append(f"  systemctl enable --now ombot-master@{mid}.service   # on {mid}'s host")
    steps.append(f"  systemctl enable --now {units.BOT_UNIT}   # on the bot's host")
    return steps
