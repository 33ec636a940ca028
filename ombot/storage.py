"""Databases by URL (sqlite:///, mysql://, postgresql://) and a small schema-migration runner.

Each component (a master, the bot) binds its peewee models to a `DatabaseProxy` and calls
`open_database(url, proxy, migrations)` once at start.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import peewee
from playhouse.db_url import connect
from playhouse.migrate import SchemaMigrator
from playhouse.migrate import migrate as run_migration

from ombot.errors import OmbotError
from ombot.logs import hide, redact

Migration = Callable[[peewee.Database], None]

_SQLITE_PRAGMAS = {
    "journal_mode": "wal",  # readers are never blocked by the writer
    "synchronous": "normal",  # durable across process crashes; WAL keeps it consistent on power loss
    "busy_timeout": 10_000,
    "foreign_keys": 1,
}
# MySQL's TEXT and BLOB stop at 64 KiB; envelopes and captured output can be larger.
_MYSQL_FIELD_TYPES = {"TEXT": "LONGTEXT", "BLOB": "LONGBLOB"}


class StorageError(OmbotError):
    """A database URL that cannot be used, or a database that cannot be reached."""


class JSONField(peewee.TextField):
    """JSON in a text column: the same on SQLite, MySQL and Postgres. The one JSON type of every table."""

    def db_value(self, value: Any) -> str:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)

    def python_value(self, value: str | None) -> Any:
        return None if value is None else json.loads(value)


class SchemaVersion(peewee.Model):
    """Which migration each component's tables are at."""

    component = peewee.CharField(max_length=64, primary_key=True)
    version = peewee.IntegerField()

    class Meta:
        table_name = "ombot_schema_version"


def find_by_number_or_id(model: type[peewee.Model], number: peewee.Field, uuid_field: peewee.Field,
                         ref: str) -> Any:
    """A row by the short number people type (`12`, `#12`) or by its UUID; None when there is none."""
    ref = ref.lstrip("#")
    if ref.isascii() and ref.isdigit():  # "²".isdigit() is true too, and int() refuses it
        # int() of thousands of digits raises, and past 2**63 the database refuses the query itself
        return model.get_or_none(number == int(ref)) if len(ref) <= 18 else None
    return model.get_or_none(uuid_field == ref)


def redact_url(url: str) -> str:
    """The URL with its password replaced, for logs and error messages.

    Split the way the drivers split it (the last '@' ends the credentials), so a password
    containing '@' or ':' is hidden whole.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL (sqlite:////abs/path.db), None for any other database or :memory:."""
    scheme, sep, rest = url.partition(":///")
    if not sep or not scheme.lower().startswith("sqlite") or not rest or rest.startswith(":memory:"):
        return None
    return Path(rest.split("?", 1)[0])


def connect_url(url: str) -> peewee.Database:
    """A peewee database for the URL (not yet connected). User and password may be %-encoded."""
    scheme = url.split(":", 1)[0].lower()
    _hide_password(url)
    kwargs: dict[str, Any] = {}
    if scheme.startswith("sqlite"):
        if (path := sqlite_file(url)) is not None:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # the chat trail is private
        kwargs["pragmas"] = _SQLITE_PRAGMAS
        kwargs["check_same_thread"] = False
    elif scheme.startswith(("mysql", "mariadb")):
        kwargs["field_types"] = _MYSQL_FIELD_TYPES
        kwargs.setdefault("charset", "utf8mb4")
    try:
        db = connect(url, unquote_password=True, unquote_user=True, **kwargs)
    except Exception as exc:  # peewee raises bare errors for unknown schemes and missing drivers
        raise StorageError(f"cannot use database {redact_url(url)}: {redact(str(exc))}") from None
    if "passwd" in db.connect_params:  # playhouse still spells it the way PyMySQL deprecated
        db.connect_params["password"] = db.connect_params.pop("passwd")
    return db


def _hide_password(url: str) -> None:
    """The password, as written and %-decoded, is redacted from the logs wherever it shows (a driver's error)."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return
    if password:
        hide(password, unquote(password))


def open_database(
    url: str,
    proxy: peewee.DatabaseProxy,
    component: str,
    migrations: Sequence[Migration],
) -> peewee.Database:
    """Connect, bind `proxy`, and apply the component's migrations that have not run yet."""
    db = connect_url(url)
    try:
        db.connect(reuse_if_open=True)
    except (peewee.OperationalError, peewee.ImproperlyConfigured) as exc:
        # Unreachable server, bad credentials, missing database or driver: say which, never the password.
        raise StorageError(f"cannot open database {redact_url(url)}: {redact(str(exc)).strip()}") from None
    if isinstance(db, peewee.MySQLDatabase):
        _require_utf8mb4(db, url)
    proxy.initialize(db)
    migrate(db, component, migrations)
    return db


def database_now_ms(db: peewee.Database) -> int:
    """Now, in UTC epoch ms, by the database server's clock (SQLite: this host's). Leases are timed by
    it: processes whose own clocks disagree still agree on when a lease ran out."""
    if isinstance(db, peewee.PostgresqlDatabase):
        sql = "SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)"
    elif isinstance(db, peewee.MySQLDatabase):
        sql = "SELECT CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)"
    else:
        sql = "SELECT CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)"
    return int(db.execute_sql(sql).fetchone()[0])


def _require_utf8mb4(db: peewee.Database, url: str) -> None:
    """New tables take the database's character set; anything but utf8mb4 loses emoji and more."""
    name, charset = db.execute_sql("SELECT DATABASE(), @@character_set_database").fetchone()
    if charset != "utf8mb4":
        raise StorageError(f"database {redact_url(url)} uses character set {charset}; OMBot needs utf8mb4: "
                           f"ALTER DATABASE `{name}` CHARACTER SET utf8mb4")


def migrate(db: peewee.Database, component: str, migrations: Sequence[Migration]) -> int:
    """Run migrations[current:] in order, each in a transaction; returns the new version."""
    with db.bind_ctx([SchemaVersion]):
        db.create_tables([SchemaVersion], safe=True)
        row = SchemaVersion.get_or_none(SchemaVersion.component == component)
        current = row.version if row else 0
        for version, step in enumerate(migrations[current:], start=current + 1):
            with db.atomic():
                step(db)
                _record_version(component, version)
        return len(migrations)


def _record_version(component: str, version: int) -> None:
    updated = SchemaVersion.update(version=version).where(SchemaVersion.component == component).execute()
    if not updated:
        SchemaVersion.create(component=component, version=version)


def create_tables(*models: type[peewee.Model]) -> Migration:
    """A migration that creates tables for models bound to the database it runs on."""

    def step(db: peewee.Database) -> None:
        with db.bind_ctx(models):
            db.create_tables(models)

    return step


# Any epoch in seconds before the year 5138 is below this, any epoch in milliseconds after March 1973
# above it: so a conversion that was cut short (MySQL commits each ALTER at once) can simply run again.
_SECONDS_BELOW = 10**11
_FLOAT_TYPES = ("real", "float", "double")


def epoch_seconds_to_ms(columns: dict[str, tuple[str, ...]]) -> Migration:
    """A migration: these epoch-seconds columns (integer or float) become epoch milliseconds in a BIGINT.

    `columns` maps a table to its timestamp columns. A float column is widened to double first (so its
    fraction survives the scaling), scaled and rounded, then made BIGINT; an integer column is made
    BIGINT first (milliseconds overflow a 32-bit INT), then scaled. Rows already in milliseconds are
    left alone, so running it twice changes nothing.
    """

    def step(db: peewee.Database) -> None:
        migrator = SchemaMigrator.from_database(db)
        for table, names in columns.items():
            found = {c.name: c for c in _columns(db, table)}
            for name in names:
                _column_to_ms(db, migrator, table, found[name])

    return step


def add_columns(table: str, fields: dict[str, peewee.Field]) -> Migration:
    """A migration adding these (nullable) columns where they are missing: a database created at its
    version has them already, as the first step creates the current models."""

    def step(db: peewee.Database) -> None:
        present = {c.name for c in _columns(db, table)}
        migrator = SchemaMigrator.from_database(db)
        run_migration(*[migrator.add_column(table, name, field) for name, field in fields.items() if name not in present])

    return step


def _columns(db: peewee.Database, table: str) -> list[peewee.ColumnMetadata]:
    if isinstance(db, peewee.PostgresqlDatabase):  # introspection looks in "public" unless told
        schema = db.execute_sql("SELECT current_schema()").fetchone()[0]
        return db.get_columns(table, schema=schema)
    return db.get_columns(table)


def _column_to_ms(db: peewee.Database, migrator: SchemaMigrator, table: str,
                  column: peewee.ColumnMetadata) -> None:
    kind = column.data_type.lower()
    rows = peewee.Table(table).bind(db)
    value = getattr(rows.c, column.name)

    def scale(to: peewee.Node) -> None:
        rows.update({value: to}).where(value < _SECONDS_BELOW).execute()

    if kind.startswith(_FLOAT_TYPES):
        if not isinstance(db, peewee.SqliteDatabase):  # SQLite's REAL is a double already
            _alter_type(migrator, table, column, peewee.DoubleField)
        scale(peewee.fn.ROUND(value * 1000))
        _alter_type(migrator, table, column, peewee.BigIntegerField)
    else:
        if "big" not in kind and not isinstance(db, peewee.SqliteDatabase):  # SQLite's INTEGER is 64-bit
            _alter_type(migrator, table, column, peewee.BigIntegerField)
        scale(value * 1000)


def _alter_type(migrator: SchemaMigrator, table: str, column: peewee.ColumnMetadata,
                field_class: type[peewee.Field]) -> None:
    """Change a column's type in place, keeping its NULL-ness and indexes (SQLite copies the table)."""
    # Unbound, the field's DDL is its type and constraints only, which is what the migrator expects.
    migrator.alter_column_type(table, column.name, field_class(null=column.null)).run()
