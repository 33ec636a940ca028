"""What of a site lives on this machine, for `ombot backup` and `ombot restore` (docs/backup.md).

A site's state is its SQLite databases (the bot's, each master's), the files its ombot.toml names
(the policy, the audit rules, each master's inventory and file store) and, only when asked, its
secrets (private keys, database URL files). Each is a `Part`: what it is, whose, and where the
config puts it. The backup finds them from the config being backed up; the restore puts each
where the restored config (written into the new site directory) says it lives, so a site whose
paths are relative to ombot.toml moves with it, and an absolute path is kept as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ombot import config as cfg
from ombot.errors import OmbotError
from ombot.storage import sqlite_file

CONFIG_NAME = "ombot.toml"


@dataclass(frozen=True)
class Part:
    """One piece of a site: its kind, whose it is (the bot, a master's or a client's id, the site),
    the path below its root for a file store's file (else ""), and where it is on this machine."""

    kind: str  # config, database, policy, audit_rules, inventory, file_store, key, secret
    of: str
    rel: str
    path: Path

    @property
    def name(self) -> str:
        """Its file name inside a backup."""
        if self.kind == "config":
            return CONFIG_NAME
        if self.kind == "database":
            return "bot.db" if self.of == "bot" else f"master-{self.of}.db"
        return f"{self.kind}/{self.of}/{self.rel or self.path.name}"

    @property
    def secret(self) -> bool:
        return self.kind in ("key", "secret")


@dataclass(frozen=True)
class Skipped:
    """A database this command does not copy (not SQLite), and the tool that does."""

    of: str
    url: str  # without its password
    command: str


def dump_command(of: str, url: str) -> str:
    """The tool that takes a consistent copy of a MariaDB/MySQL or PostgreSQL database while it runs."""
    parts = urlsplit(url)
    name = parts.path.lstrip("/") or "ombot"
    host, user = parts.hostname or "localhost", parts.username or "ombot"
    if parts.scheme.startswith(("mysql", "mariadb")):
        return (f"mariadb-dump --single-transaction --quick --routines --host {host} --port {parts.port or 3306} "
                f"--user {user} --databases {name} > {of}.sql")
    if parts.scheme.startswith("postgres"):
        return f"pg_dump --format=custom --host {host} --port {parts.port or 5432} --username {user} --file {of}.dump {name}"
    return f"the database's own backup tool ({parts.scheme})"


def bot_settings(conf: cfg.Config) -> Any:
    from ombot.bot import BotSettings  # the bot's [bot] table: only these commands need it

    return BotSettings.from_config(conf)


def secret_files(raw: dict[str, Any], base: Path) -> dict[str, Path]:
    """Each `database_url_file` an ombot.toml (its tables, in directory `base`) names, for the bot and
    the masters: read from the tables, as loading the config reads the files, which a restore has
    not put back yet."""
    found: dict[str, Path] = {}
    bot = raw.get("bot", {})
    if isinstance(bot, dict) and isinstance(bot.get("database_url_file"), str):
        found["bot"] = base / bot["database_url_file"]
    for mid, table in (raw.get("masters") or {}).items():
        if isinstance(table, dict) and isinstance(table.get("database_url_file"), str):
            found[mid] = base / table["database_url_file"]
    return found


def parts(conf: cfg.Config, secrets: bool) -> tuple[list[Part], list[Skipped], list[Part]]:
    """What of the site exists on this machine: the parts to copy, the databases to dump with their
    own tools, and the secrets left out (all of them unless `secrets`)."""
    found = [Part("config", "site", "", conf.path)]
    skipped: list[Skipped] = []
    settings = bot_settings(conf)
    _database(found, skipped, "bot", settings.database_url)
    found += [Part(kind, "bot", "", path) for kind, path in (("policy", settings.policy), ("audit_rules", settings.audit_rules))
              if path is not None and path.is_file()]
    for mid, master in conf.masters.items():
        if not master.state_dir.is_dir():
            continue  # this master runs on another machine: its backup is taken there
        _database(found, skipped, mid, master.database_url)
        if master.inventory is not None and master.inventory.is_file():
            found.append(Part("inventory", mid, "", master.inventory))
        store = master.state_dir / "files"
        found += [Part("file_store", mid, str(p.relative_to(store)), p) for p in sorted(store.rglob("*")) if p.is_file()]
    keys = _secrets(conf)
    return (found + keys if secrets else found), skipped, ([] if secrets else keys)


def _database(found: list[Part], skipped: list[Skipped], of: str, url: str) -> None:
    from ombot.storage import redact_url

    path = sqlite_file(url)
    if path is None:
        skipped.append(Skipped(of, redact_url(url), dump_command(of, url)))
    elif path.is_file():
        found.append(Part("database", of, "", path))


def _secrets(conf: cfg.Config) -> list[Part]:
    keys = {("key", f"masters.{mid}"): m.key_file for mid, m in conf.masters.items() if m.key_file is not None}
    keys |= {("key", f"clients.{cid}"): c.key_file for cid, c in conf.clients.items() if c.key_file is not None}
    keys |= {("secret", of): path for of, path in secret_files(conf.raw, conf.base_dir).items()}
    seen: set[Path] = set()
    found = []
    for (kind, of), path in keys.items():
        if path.is_file() and path.resolve() not in seen:  # the same key named twice is kept once
            seen.add(path.resolve())
            found.append(Part(kind, of, "", path))
    return found


def target(conf: cfg.Config, kind: str, of: str, rel: str) -> Path:
    """Where the part (kind, of, rel) lives for the config `conf`."""
    if kind == "config":
        return conf.path
    if kind in ("database", "policy", "audit_rules") and of == "bot":
        settings = bot_settings(conf)
        path = sqlite_file(settings.database_url) if kind == "database" else getattr(settings, kind)
    elif kind == "key":
        group, _, name = of.partition(".")
        path = (conf.masters if group == "masters" else conf.clients)[name].key_file
    elif kind == "secret":
        path = secret_files(conf.raw, conf.base_dir).get(of)
    else:
        master = conf.masters[of]
        path = {"database": sqlite_file(master.database_url), "inventory": master.inventory,
                "file_store": master.state_dir / "files" / rel}[kind]
    if path is None:
        raise OmbotError(f"the restored {CONFIG_NAME} has no place for the {kind} of {of} (is its database set "
                         "to a server by OMBOT_BOT_DATABASE_URL / OMBOT_MASTER_DATABASE_URL?)")
    return path
