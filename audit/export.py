"""The SIEM export: each audit event the feed stores (once: only events not stored before) and each
alert it raises, as one line of JSON in Elastic Common Schema (audit.ecs), to a rotating file, a
syslog server (RFC 5424 over TCP or TLS with octet counting: audit.syslog5424), or both. Configured by
`[bot.audit_export]` (docs/audit.md, "SIEM export"); the process that pulls the audit feed (the one
holding its lease) writes, so one process writes at a time.

The export never holds the feed up and never breaks it: a file that cannot be written, or a syslog
server that is slow or away, costs lines (counted, logged), never a poll. The file is the sink that
loses nothing while the disk has room; a site's Filebeat, Vector or Fluent Bit tails it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ombot.audit import ecs
from ombot.audit.rules import Match
from ombot.audit.store import AuditRecord
from ombot.audit.syslog5424 import FACILITIES, SyslogSender, message
from ombot.clock import now_ms
from ombot.errors import ConfigError
from ombot.tables import TableReader, parse_address, read_secret_file

log = logging.getLogger("ombot.audit.export")

APP_NAME = "ombot"
MSGID = {"event": "audit-event", "alert": "audit-alert"}


@dataclass(frozen=True)
class ExportSettings:
    """`[bot.audit_export]`: where the lines go (a file, a syslog server or both), and their limits."""

    file: Path | None = None
    file_max_bytes: int = 100 * 1024 * 1024  # past it the file is renamed FILE.1 and a new one begun
    file_backups: int = 5  # FILE.1 ... FILE.N kept
    syslog: tuple[str, int] | None = None
    syslog_facility: str = "local0"
    syslog_queue: int = 10_000  # lines waiting for the syslog server; past it new lines are dropped
    syslog_tls: bool = False  # RFC 5425: the server's certificate verified against syslog_ca (else the system's CAs)
    syslog_ca: Path | None = None
    syslog_cert: Path | None = None  # a client certificate, for a server that asks for one, and its key (0600)
    syslog_key: Path | None = None

    @classmethod
    def read(cls, r: TableReader) -> ExportSettings | None:
        """The table, checked; None when there is none (no export)."""
        if not r.table:
            return None
        defaults = cls()
        facility = r.get("syslog_facility", str, defaults.syslog_facility)
        if facility not in FACILITIES:
            raise ConfigError(r.path, r.key("syslog_facility"), f"a syslog facility ({', '.join(FACILITIES)})", facility)
        settings = cls(file=r.file("file", None), file_max_bytes=_at_least(r, "file_max_bytes", defaults.file_max_bytes, 4096),
                       file_backups=_at_least(r, "file_backups", defaults.file_backups, 1),
                       syslog=parse_address(r, "syslog") if "syslog" in r.table else None, syslog_facility=facility,
                       syslog_queue=_at_least(r, "syslog_queue", defaults.syslog_queue, 1),
                       syslog_tls=r.get("syslog_tls", bool, False), syslog_ca=r.file("syslog_ca", None),
                       syslog_cert=r.file("syslog_cert", None), syslog_key=r.file("syslog_key", None))
        r.known.add("syslog")
        r.done()
        if settings.file is None and settings.syslog is None:
            raise ConfigError(r.path, r.key("file"), "a file, a syslog address (host:port), or both")
        _check_tls(r, settings)
        return settings


def _check_tls(r: TableReader, settings: ExportSettings) -> None:
    """The TLS keys make sense together and their files load (a client key only its owner can read)."""
    if not settings.syslog_tls:
        given = [k for k in ("syslog_ca", "syslog_cert", "syslog_key") if getattr(settings, k) is not None]
        if given:
            raise ConfigError(r.path, r.key("syslog_tls"), f"true when {given[0]} is set (TLS to the syslog server)", False)
        return
    if settings.syslog is None:
        raise ConfigError(r.path, r.key("syslog_tls"), "false without a syslog address (host:port)", True)
    if (settings.syslog_cert is None) != (settings.syslog_key is None):
        missing = "syslog_key" if settings.syslog_key is None else "syslog_cert"
        raise ConfigError(r.path, r.key(missing), "a file path too: a client certificate (syslog_cert) goes with its "
                          "key (syslog_key)")
    if settings.syslog_key is not None:
        read_secret_file(settings.syslog_key, r.path, r.key("syslog_key"))
    try:
        tls_context(settings)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError: a file that is not PEM, a key that does not match
        raise ConfigError(r.path, r.key("syslog_tls"), f"certificate files that load ({exc})") from None


def tls_context(settings: ExportSettings) -> ssl.SSLContext | None:
    """The TLS client context `[bot.audit_export]` asks for (TLS 1.2 at least, the server verified), or None."""
    if not settings.syslog_tls:
        return None
    context = ssl.create_default_context(cafile=str(settings.syslog_ca) if settings.syslog_ca else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.syslog_cert is not None and settings.syslog_key is not None:
        context.load_cert_chain(settings.syslog_cert, settings.syslog_key)
    return context


def _at_least(r: TableReader, key: str, default: int, least: int) -> int:
    value: int = r.get(key, int, default)
    if value < least:
        raise ConfigError(r.path, r.key(key), f"a whole number of at least {least}", value)
    return value


class RotatingFile:
    """JSON lines appended to `path` (0600). Past `max_bytes` it becomes path.1 (path.1 path.2, ...,
    `backups` kept) and a new file begins; one moved away by someone else (logrotate) is reopened."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        self.written = self.dropped = 0
        self._fd: int | None = None
        self._id: tuple[int, int] | None = None
        self._size = 0
        self._failing = False

    def write(self, lines: list[str]) -> None:
        """Append the lines (one write); on an error they are dropped, counted and logged once."""
        data = "".join(line + "\n" for line in lines).encode("utf-8")
        try:
            self._reopen_if_moved()
            if self._size and self._size + len(data) > self.max_bytes:
                self._rotate()
            assert self._fd is not None
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            self._size += len(data)
            self.written += len(lines)
            if self._failing:
                log.info("audit export: writing %s again", self.path)
                self._failing = False
        except OSError as exc:
            self.dropped += len(lines)
            self.close()
            if not self._failing:
                log.warning("audit export: cannot write %s (%s); its lines are dropped until it can", self.path, exc)
                self._failing = True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _reopen_if_moved(self) -> None:
        if self._fd is not None:
            try:
                st = os.stat(self.path)
                moved = (st.st_dev, st.st_ino) != self._id
            except FileNotFoundError:
                moved = True
            if moved:
                self.close()
        if self._fd is None:
            self._open()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        st = os.fstat(self._fd)
        self._id, self._size = (st.st_dev, st.st_ino), st.st_size

    def _rotate(self) -> None:
        self.close()
        for n in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._open()


class Export:
    """Writes each document as one line to every sink configured. Its methods never raise: an export
    that fails is logged, and the feed goes on storing, matching and alerting."""

    def __init__(self, settings: ExportSettings, redact: Callable[[str], str], hostname: str | None = None) -> None:
        self.redact = redact
        self.hostname = hostname or socket.gethostname()
        self.observer = ecs.observer(self.hostname)
        self.facility = FACILITIES[settings.syslog_facility]
        self.file = RotatingFile(settings.file, settings.file_max_bytes, settings.file_backups) if settings.file else None
        self.syslog = (SyslogSender(*settings.syslog, settings.syslog_queue, tls_context(settings))
                       if settings.syslog else None)
        self._procid = str(os.getpid())

    def events(self, records: Iterable[AuditRecord]) -> None:
        """Events stored just now (audit.store.insert_new's answer)."""
        self._write(lambda: [ecs.event_document(record.__data__, self.redact, self.observer) for record in records])

    def alert(self, match: Match, event: Mapping[str, Any], fired: bool, channel: str | None) -> None:
        """A rule's match, or a notice's alert, on a stored event."""
        self._write(lambda: [ecs.alert_document(match, event, fired, channel, self.redact, self.observer, now_ms())])

    def pipeline(self, action: str, severity: str, text: str, idc: str, host: str | None = None) -> None:
        """What the feed says about the pipeline itself: an agent silent or back, an IDC unreachable."""
        self._write(lambda: [ecs.pipeline_document(action, severity, text, idc, host, self.observer, now_ms())])

    def stats(self) -> dict[str, int]:
        """Lines written and dropped, per sink."""
        return {"file_written": self.file.written if self.file else 0, "file_dropped": self.file.dropped if self.file else 0,
                "syslog_sent": self.syslog.sent if self.syslog else 0,
                "syslog_dropped": self.syslog.dropped if self.syslog else 0}

    def close(self) -> None:
        if self.syslog is not None:
            self.syslog.close()
        if self.file is not None:
            self.file.close()

    def _write(self, build: Callable[[], list[dict[str, Any]]]) -> None:
        try:
            docs = build()
            if not docs:
                return
            lines = [json.dumps(doc, separators=(",", ":")) for doc in docs]  # ASCII: a syslog MSG needs no BOM
            if self.file is not None:
                self.file.write(lines)
            if self.syslog is not None:
                at = now_ms()
                for doc, line in zip(docs, lines):
                    self.syslog.offer(message(self.facility, doc["event"]["severity"], at, self.hostname, APP_NAME,
                                              self._procid, MSGID[doc["event"]["kind"]], line))
        except Exception:  # a bug here must cost lines, never the feed's poll (its alerts, its cursor)
            log.exception("audit export failed; its lines are lost")


def open_export(settings: ExportSettings | None, redact: Callable[[str], str]) -> Export | None:
    """The export `[bot.audit_export]` asks for, or None."""
    if settings is None:
        return None
    export = Export(settings, redact)
    sinks = [str(settings.file)] if settings.file else []
    if export.syslog is not None:
        sinks.append(f"syslog {export.syslog.where} (RFC 5424 over {'TLS' if settings.syslog_tls else 'TCP'})")
    log.info("audit export (ECS %s) to %s", ecs.ECS_VERSION, " and ".join(sinks))
    return export
