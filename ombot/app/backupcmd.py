"""`ombot backup DIR [--keys]` and `ombot restore DIR --to SITE_DIR [--replace]` (docs/backup.md).

A backup is taken while the bot and the masters run: each SQLite database through SQLite's online
backup API (one read transaction: a consistent copy, writers carry on), the files the config names
copied, and a manifest (manifest.json, written last: a backup without one is incomplete) listing
every file with its SHA-256. Databases on MariaDB/MySQL or PostgreSQL are listed with the command
that dumps them. Private keys and database URL files only with --keys, with a warning.

A restore checks every file against the manifest before it writes anything, writes ombot.toml into
SITE_DIR and every other file where that config puts it, and refuses while a master or any other
process has a database it would replace open (a master's lock on its state directory, which it
holds while restoring; SQLite's shared-memory lock of every open connection).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import sqlite3
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any

import typer

from ombot import config as cfg
from ombot.app import exits
from ombot.app.options import ConfigOpt, config_of
from ombot.app.sitefiles import CONFIG_NAME, Part, parts, secret_files, target
from ombot.errors import OmbotError
from ombot.tables import read_toml

MANIFEST = "manifest.json"
FORMAT = "ombot-backup/1"
WAL_INDEX_DMS = 128  # the byte of a -shm file every open SQLite connection holds a shared lock on


def register(app: typer.Typer) -> None:
    """Add `backup` and `restore` to the `ombot` command."""
    app.command("backup")(backup)
    app.command("restore")(restore)


def backup(ctx: typer.Context, directory: Annotated[Path, typer.Argument(help="A new or empty directory for the backup")],
           keys: Annotated[bool, typer.Option("--keys", help="Also the private keys and database URL files "
                                              "(the backup then holds secrets)")] = False,
           config: ConfigOpt = None) -> None:
    """Back up this machine's part of the site while it runs: SQLite databases (online, consistent),
    ombot.toml, the policy, the audit rules, inventories and file stores, and a manifest. Exit 0, or 1
    when a copy failed its integrity check."""
    conf = config_of(ctx, config)
    found, skipped, secrets_left = parts(conf, keys)
    _fresh_directory(directory)
    entries = [_take(part, directory) for part in found]
    _write_json(directory / MANIFEST, {
        "format": FORMAT, "created": _utc_now(), "version": _version(), "host": socket.gethostname(),
        "config": str(conf.path), "keys": keys, "files": entries,
        "skipped": [{"of": s.of, "url": s.url, "command": s.command} for s in skipped],
        "secrets_not_included": [str(p.path) for p in secrets_left]})
    for entry in entries:
        typer.echo(f"{entry['name']:<40} {_what(entry)}  {entry['bytes']} bytes"
                   + (f"  integrity {entry['integrity']}" if "integrity" in entry else ""))
    for s in skipped:
        typer.echo(f"skipped the database of {s.of} ({s.url}): not SQLite; take it with\n    {s.command}")
    if keys:
        typer.echo(f"warning: {directory} holds private keys and secrets ({sum(p.secret for p in found)} files): "
                   "whoever reads it can speak as these clients and masters; keep it as you keep the keys", err=True)
    elif secrets_left:
        typer.echo(f"keys not included ({len(secrets_left)}): keep them apart, or back them up with --keys")
    bad = [e["name"] for e in entries if e.get("integrity", "ok") != "ok"]
    typer.echo(f"wrote {directory / MANIFEST}" if not bad else f"integrity check failed: {', '.join(bad)}", err=bool(bad))
    raise typer.Exit(exits.FAILED if bad else exits.OK)


def restore(directory: Annotated[Path, typer.Argument(help="A directory `ombot backup` wrote")],
            to: Annotated[Path, typer.Option("--to", help="The site directory: ombot.toml goes here, every other "
                                             "file where it says")],
            replace: Annotated[bool, typer.Option("--replace", help="Overwrite files that exist (never a database "
                                                  "a running process has open)")] = False) -> None:
    """Restore a backup into SITE_DIR, with the bot and the site's masters on this machine stopped.
    Every file is checked against the manifest first; nothing is written unless all of it can be."""
    manifest = _verified(directory)
    to.mkdir(parents=True, exist_ok=True, mode=0o700)
    conf_path = to.resolve() / CONFIG_NAME
    entries = manifest["files"]
    with ExitStack() as held:
        conf, written = _staged_config(directory, conf_path, entries, replace)
        try:
            plan = [(entry, target(conf, entry["kind"], entry["of"], _rel(entry))) for entry in entries
                    if entry["kind"] != "config"]
            _refuse_existing([path for entry, path in plan if path not in written], replace)
            _refuse_running(conf, [e for e, _ in plan], [p for _, p in plan], held)
        except BaseException:
            for path in written:  # refused: the site is left as it was
                path.unlink(missing_ok=True)
            raise
        os.replace(written[0], conf_path)
        for entry, path in plan:
            _put(directory / entry["name"], path, entry)
            typer.echo(f"{_what(entry):<40} -> {path}")
    for note in _missing_secrets(cfg.load(conf_path)):
        typer.echo(note)
    typer.echo(f"restored {len(entries)} files from {directory} (taken {manifest['created']} on {manifest['host']}); "
               "start the masters, then the bot")


# -- backing up --------------------------------------------------------------------------------------


def _fresh_directory(directory: Path) -> None:
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise OmbotError(f"{directory} exists and is not empty: a backup goes into a new or empty directory")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    directory.chmod(0o700)  # job output, audit trails and (with --keys) keys: the backup's reader is their reader


def _take(part: Part, directory: Path) -> dict[str, Any]:
    copy = directory / part.name
    copy.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    entry: dict[str, Any] = {"name": part.name, "kind": part.kind, "of": part.of, "source": str(part.path)}
    if part.rel:
        entry["rel"] = part.rel
    if part.kind == "database":
        entry["integrity"] = copy_database(part.path, copy)
    else:
        shutil.copyfile(part.path, copy)
    copy.chmod(0o600)
    return entry | {"bytes": copy.stat().st_size, "sha256": _sha256(copy)}


def copy_database(source: Path, copy: Path) -> str:
    """A consistent copy of a live SQLite database (SQLite's online backup, in one step: one read
    transaction, so no writer restarts it), made a single file; its `PRAGMA integrity_check` answer."""
    src = sqlite3.connect(source, timeout=30)
    dst = sqlite3.connect(copy)
    try:
        src.backup(dst)
        dst.execute("PRAGMA journal_mode=DELETE")  # no -wal beside it: the file is the whole copy
        return str(dst.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        dst.close()
        src.close()


# -- restoring ---------------------------------------------------------------------------------------


def _verified(directory: Path) -> dict[str, Any]:
    """The manifest, once every file it lists is there, inside the backup, with its SHA-256."""
    try:
        manifest: dict[str, Any] = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        raise OmbotError(f"{directory} has no {MANIFEST}: not a backup, or one that did not finish") from None
    if manifest.get("format") != FORMAT:
        raise OmbotError(f"{directory / MANIFEST} is not an OMBot backup manifest ({FORMAT})")
    root = directory.resolve()
    for entry in manifest["files"]:
        path = (directory / entry["name"]).resolve()
        if not path.is_relative_to(root) or ".." in Path(_rel(entry)).parts or Path(_rel(entry)).is_absolute():
            raise OmbotError(f"{MANIFEST} names a file outside the backup: {entry['name']!r}")
        if not path.is_file() or _sha256(path) != entry["sha256"]:
            raise OmbotError(f"{entry['name']} is missing or differs from the manifest: the backup is damaged; "
                             "nothing was restored")
    return manifest


def _staged_config(directory: Path, conf_path: Path, entries: list[dict[str, Any]],
                   replace: bool) -> tuple[cfg.Config, list[Path]]:
    """The backup's ombot.toml loaded as if in the site (staged beside it, under another name) and the
    files written for that: the staged config first, then the secret files loading it reads that are
    not there yet (one that is stays as it is until --replace overwrites it with the rest)."""
    staged = conf_path.with_name(f".{CONFIG_NAME}.restoring")
    secrets = secret_files(read_toml(directory / CONFIG_NAME, "the backup's ombot.toml"), conf_path.parent)
    places = [(entry, secrets[entry["of"]]) for entry in entries if entry["kind"] == "secret"]
    _refuse_existing([conf_path, *(path for _, path in places)], replace)
    written = [staged]
    try:
        _put(directory / CONFIG_NAME, staged, {"kind": "config"})
        for entry, path in places:
            if not path.exists():
                _put(directory / entry["name"], path, entry)
                written.append(path)
        return cfg.load(staged), written
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def _refuse_existing(paths: list[Path], replace: bool) -> None:
    there = [str(p) for p in paths if p.exists()]
    if there and not replace:
        raise OmbotError(f"{len(there)} file(s) exist, e.g. {there[0]}: restore into an empty site, or pass --replace")


def _refuse_running(conf: cfg.Config, entries: list[dict[str, Any]], paths: list[Path], held: ExitStack) -> None:
    """Take each restored master's state-directory lock (kept until the restore is done: it cannot
    start meanwhile), and refuse any database a process has open."""
    for mid in sorted({e["of"] for e in entries if e["kind"] in ("database", "file_store") and e["of"] != "bot"}):
        held.callback(os.close, _master_lock(conf.masters[mid]))
    for entry, path in zip(entries, paths):
        if entry["kind"] == "database" and in_use(path):
            raise OmbotError(f"{path} is open in a running process ({_what(entry)}): stop the bot, every console "
                             "and the masters of this site first; nothing was restored")


def _master_lock(master: cfg.MasterSettings) -> int:
    master.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(master.state_dir / f"{master.id}.lock", os.O_RDWR | os.O_CREAT, 0o600)  # masters/server.py's lock
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OmbotError(f"master {master.id} is running on {master.state_dir}: stop it first; nothing was restored") from None
    return fd


def in_use(database: Path) -> bool:
    """Whether a process has the SQLite database open: every connection to a WAL database holds a
    shared lock on one byte of its -shm file for as long as it is open."""
    try:
        fd = os.open(f"{database}-shm", os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, WAL_INDEX_DMS)
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, WAL_INDEX_DMS)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _put(source: Path, path: Path, entry: dict[str, Any]) -> None:
    """Copy `source` to `path` through a temporary file beside it (0600), then rename; a database's
    old journals go first, or SQLite would replay them onto the restored file."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if entry["kind"] == "database":
        for journal in ("-wal", "-shm", "-journal"):
            Path(f"{path}{journal}").unlink(missing_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
            shutil.copyfileobj(src, out)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _missing_secrets(conf: cfg.Config) -> list[str]:
    """A note for each key the restored site names that is not on this machine (a backup without --keys)."""
    named = [(f"master {mid}", m.key_file) for mid, m in conf.masters.items() if m.state_dir.is_dir()]
    named += [(f"client {cid}", c.key_file) for cid, c in conf.clients.items()]
    return [f"note: the key of {who} is not here ({path}): put it back before starting what uses it"
            for who, path in named if path is not None and not path.exists()]


# -- small helpers -----------------------------------------------------------------------------------


def _rel(entry: dict[str, Any]) -> str:
    return str(entry.get("rel", ""))


def _what(entry: dict[str, Any]) -> str:
    kind, of = entry["kind"].replace("_", " "), entry.get("of", "site")
    return kind if of == "site" else f"{kind} of {of}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, value: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value, indent=2) + "\n")
    temporary.chmod(0o600)
    os.replace(temporary, path)


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _version() -> str:
    import ombot

    return ombot.__version__

