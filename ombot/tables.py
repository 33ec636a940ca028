"""Reading checked TOML: one table at a time with typed keys, unknown keys refused, and the values
every settings file shares (addresses, public keys, database URLs, secret files). A ConfigError names
the file, the key path and what was expected. ombot.config (ombot.toml), the bot's and the agent's
settings, the policy and the audit rules all read through it.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import os
import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ombot.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # the audit agent runs on the servers' own Python, 3.9 and later: tomli is the same parser
    import tomli as tomllib

# A host name as inventories, agents and enrolments write it.
HOST_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_-]{1,63}){0,20}$")

SECRET_FILE_MODE_MASK = 0o077


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """A TOML file's contents; a missing or broken file is a ConfigError naming it."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(path, "", what) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"valid TOML ({exc})") from None


class TableReader:
    """Typed access to one table of the TOML document, naming the key path on errors."""

    def __init__(self, path: Path, table: Any, prefix: str) -> None:
        if not isinstance(table, dict):
            raise ConfigError(path, prefix, "a table", table)
        self.path, self.table, self.prefix = path, table, prefix
        self.known: set[str] = set()  # every key asked for, present or not

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = ..., what: str = "") -> Any:
        self.known.add(name)
        if name not in self.table:
            if default is ...:
                raise ConfigError(self.path, self.key(name), f"{what or _kind_name(kind)} (missing)")
            return default
        value = self.table[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(self.path, self.key(name), what or _kind_name(kind), value)
        return value

    def sub(self, name: str, required: bool = False) -> TableReader:
        self.known.add(name)
        if name not in self.table and not required:
            return TableReader(self.path, {}, self.key(name))
        return TableReader(self.path, self.get(name, dict, what="a table"), self.key(name))

    def file(self, name: str, default: Any = ...) -> Path | None:
        value = self.get(name, str, default, what="a file path")
        return None if value is None else (self.path.parent / value)

    def strings(self, name: str, default: Any = ...) -> tuple[str, ...]:
        value = self.get(name, list, default, what="a list of strings")
        if not all(isinstance(v, str) for v in value):
            raise ConfigError(self.path, self.key(name), "a list of strings", value)
        return tuple(value)

    def done(self) -> None:
        """Refuse keys nobody asked for: a misspelt key must not silently fall back to its default."""
        for name in self.table:
            if name not in self.known:
                close = difflib.get_close_matches(name, self.known, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ConfigError(self.path, self.key(name), f"a known key ({hint}known: {', '.join(sorted(self.known))})")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", bool: "true or false", list: "a list", dict: "a table"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def public_key(r: TableReader, name: str) -> str:
    """A base64 Ed25519 public key, as `ombot keygen` prints it."""
    value = r.get(name, str, what="a base64 public key (as printed by `ombot keygen`)")
    try:
        ok = len(base64.b64decode(value, validate=True)) == 32
    except (binascii.Error, ValueError):
        ok = False
    if not ok:
        raise ConfigError(r.path, r.key(name), "a base64 public key of 32 bytes (as printed by `ombot keygen`)", value)
    return value


def parse_address(r: TableReader, name: str) -> tuple[str, int]:
    what = "'host:port' (an IPv6 address in brackets: '[::1]:7001')"
    value = r.get(name, str, what=what)
    host, sep, port = value.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    if not sep or not host or (":" in host) != bracketed or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(r.path, r.key(name), what, value)
    return host, int(port)


def database_url(r: TableReader, env_name: str, default: str) -> str:
    """A database URL from $ENV, a 0600 file (`database_url_file`), or `database` if it holds no password.

    Both keys are always read, so neither is reported as unknown. A relative SQLite path in
    `database` is relative to the config file, like every other path in it.
    """
    secret_file = r.file("database_url_file", None)
    url = r.get("database", str, default)
    if _has_password(url):
        raise ConfigError(r.path, r.key("database"),
                          f"a URL without a password (put it in ${env_name} or a 0600 database_url_file)")
    if os.environ.get(env_name):
        return os.environ[env_name]
    if secret_file is not None:
        return read_secret_file(secret_file, r.path, r.key("database_url_file"))
    return _anchor_sqlite(url, r.path.parent)


def _has_password(url: str) -> bool:
    try:
        return bool(urlsplit(url).password)
    except ValueError:  # e.g. a bad port: still refuse anything that looks like user:password@
        return "@" in url and ":" in url.split("@", 1)[0].split("://", 1)[-1]


def _anchor_sqlite(url: str, base: Path) -> str:
    scheme, sep, rest = url.partition(":///")
    if sep and scheme.lower().startswith("sqlite") and rest and not rest.startswith(("/", ":memory:")):
        return f"{scheme}:///{base / rest}"
    return url


def read_secret_file(secret: Path, config: Path | None = None, key: str = "") -> str:
    """Read a secret from a file that only its owner can read."""
    try:
        mode = secret.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(config or secret, key, f"an existing file: {secret}") from None
    if mode & SECRET_FILE_MODE_MASK:
        raise ConfigError(config or secret, key, f"a file only its owner can read (chmod 600 {secret})")
    return secret.read_text(encoding="utf-8").strip()
