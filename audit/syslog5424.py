"""Syslog for the SIEM export: RFC 5424 messages over TCP, framed by octet counting (RFC 6587).

The standard library's SysLogHandler writes the older BSD format (RFC 3164: no year, no time zone,
no MSGID) and frames TCP messages by a trailing newline; the one library that writes RFC 5424
(rfc5424-logging-handler) is a logging handler, not kept up, and would drag the export through the
logging tree. A message is a header and our one line of JSON, so this module writes them itself.

`SyslogSender` owns one TCP connection and a bounded queue in front of it: `offer` never blocks the
audit feed. What does not fit in the queue is dropped, counted and logged (at most once a minute);
a connection that fails is made again with a growing pause, and the message it failed on is sent
again (a collector may see a line twice: its `event.id` says so). TCP syslog has no
acknowledgement: lines in the kernel's buffer when a connection breaks are lost. The rotating file
sink (audit.export) is the one to use where no line may go missing.

With a TLS context the connection is RFC 5425's (syslog over TLS, the same octet-counted frames): the
server's certificate is verified, and its name checked against the host the address names; a server
that fails the check is treated as one that is away (retried, its lines wait in the queue).
"""

from __future__ import annotations

import logging
import queue
import socket
import ssl
import threading
import time

log = logging.getLogger("ombot.audit.export")

FACILITIES = {name: code for code, name in enumerate((
    "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron", "authpriv", "ftp", "ntp",
    "audit", "alert", "clock", "local0", "local1", "local2", "local3", "local4", "local5", "local6", "local7"))}
CRIT, WARNING, NOTICE, INFO = 2, 4, 5, 6  # the severities the export uses
CONNECT_TIMEOUT_SECONDS = 5.0
SEND_TIMEOUT_SECONDS = 10.0  # a collector that stops reading: the connection is dropped and made again
MAX_PAUSE_SECONDS = 30.0
SAY_EVERY_SECONDS = 60.0  # drops and failures are logged at most this often


def header_field(value: str, limit: int) -> str:
    """A header field as RFC 5424 allows it: printable US-ASCII without spaces, at most `limit`
    characters, `-` (NILVALUE) when empty."""
    cleaned = "".join(c if 33 <= ord(c) <= 126 else "_" for c in value)[:limit]
    return cleaned or "-"


def timestamp(epoch_ms: int) -> str:
    """RFC 5424's TIMESTAMP (RFC 3339 in UTC, milliseconds): 2026-11-20T08:00:00.123Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch_ms // 1000)) + f".{epoch_ms % 1000:03d}Z"


def message(facility: int, severity: int, epoch_ms: int, hostname: str, app_name: str, procid: str,
            msgid: str, msg: str) -> bytes:
    """One RFC 5424 message: `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - MSG`, no structured
    data. MSG is sent as it is (MSG-ANY, no BOM): the export's JSON is ASCII."""
    head = (f"<{facility * 8 + severity}>1 {timestamp(epoch_ms)} {header_field(hostname, 255)} "
            f"{header_field(app_name, 48)} {header_field(procid, 128)} {header_field(msgid, 32)} -")
    return f"{head} {msg}".encode("utf-8")


def frame(data: bytes) -> bytes:
    """Octet counting (RFC 6587, 3.4.1): the message's length in bytes, a space, the message."""
    return b"%d %b" % (len(data), data)


class SyslogSender:
    """Frames to one syslog server over TCP (or TLS, with `tls`), from a bounded queue, by a thread of its own."""

    def __init__(self, host: str, port: int, capacity: int, tls: ssl.SSLContext | None = None) -> None:
        self.host, self.port, self.tls = host, port, tls
        self.queue: queue.Queue[bytes] = queue.Queue(capacity)
        self.sent = self.dropped = 0
        self._said_at = {"dropped": 0.0, "down": 0.0}  # monotonic: when each was last logged
        self._down_since: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-export-syslog", daemon=True)
        self._thread.start()

    @property
    def where(self) -> str:
        return f"{'tls://' if self.tls else ''}{self.host}:{self.port}"

    def offer(self, data: bytes) -> bool:
        """Queue one message; False (dropped, counted) when the queue is full. Never blocks."""
        try:
            self.queue.put_nowait(frame(data))
            return True
        except queue.Full:
            self.dropped += 1
            if self._due("dropped"):
                log.warning("audit export: the syslog queue for %s is full (%d lines wait); %d lines dropped so far",
                            self.where, self.queue.qsize(), self.dropped)
            return False

    def close(self, wait: float = 5.0) -> None:
        """Send what is queued for up to `wait` seconds, then stop."""
        self._stop.set()
        self._thread.join(wait)
        left = self.queue.qsize()
        if left:
            log.warning("audit export: %d lines for syslog %s were not sent before shutdown", left, self.where)

    def _due(self, what: str) -> bool:
        now = time.monotonic()
        if self._said_at[what] and now - self._said_at[what] < SAY_EVERY_SECONDS:
            return False
        self._said_at[what] = now
        return True

    def _run(self) -> None:
        conn: socket.socket | None = None
        pending: bytes | None = None
        pause = 0.5
        while not (self._stop.is_set() and pending is None and self.queue.empty()):
            if pending is None:
                try:
                    pending = self.queue.get(timeout=0.2)
                except queue.Empty:
                    continue
            if conn is None:
                conn = self._connect()
                if conn is None:
                    if self._stop.wait(pause):
                        break  # closing while the server is away: what is queued is lost, and said so
                    pause = min(pause * 2, MAX_PAUSE_SECONDS)
                    continue
                pause = 0.5
            try:
                conn.sendall(pending)
                self.sent += 1
                pending = None
            except OSError as exc:
                self._failed(f"sending failed: {exc}")
                conn.close()
                conn = None  # `pending` goes again on the next connection
        if conn is not None:
            conn.close()
        if pending is not None and not self.queue.full():
            self.queue.put_nowait(pending)  # unsent: close() counts it with the rest

    def _connect(self) -> socket.socket | None:
        try:
            conn = socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT_SECONDS)
        except OSError as exc:
            self._failed(f"cannot connect: {exc}")
            return None
        if conn.getsockname() == conn.getpeername():  # TCP's self-connect to a loopback port nobody listens on
            conn.close()
            self._failed("nothing listens (the connection met itself)")
            return None
        if self.tls is not None:
            try:
                conn = self.tls.wrap_socket(conn, server_hostname=self.host)  # the handshake, within the timeout
            except OSError as exc:  # ssl.SSLError among them: a certificate that does not verify, say
                conn.close()
                self._failed(f"TLS handshake failed: {exc}")
                return None
        conn.settimeout(SEND_TIMEOUT_SECONDS)
        if self._down_since is not None:
            log.info("audit export: connected to syslog %s again after %.0f s", self.where,
                     time.monotonic() - self._down_since)
            self._down_since = None
        return conn

    def _failed(self, why: str) -> None:
        if self._down_since is None:
            self._down_since = self._said_at["down"] = time.monotonic()
            log.warning("audit export: syslog %s: %s; trying again, lines wait in its queue", self.where, why)
        elif self._due("down"):
            log.warning("audit export: syslog %s still unreachable (%s); %d lines wait", self.where, why,
                        self.queue.qsize())
