"""The SIEM export (audit/export.py, docs/audit.md "SIEM export"): a real `ombot bot` pulling the audit
from two real masters, fed by a real audit agent and by batches sent with an agent's key, writes each
event it stores and each alert it raises as one line of Elastic Common Schema JSON to a file and to a
syslog server over TCP (RFC 5424, octet counting), here the test's own listener on loopback. Every
line is read back and held to ECS's field list (tests/data/ecs_fields.txt); the formats and the
settings are checked directly too."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from ombot.audit.export import ExportSettings, RotatingFile, tls_context
from ombot.audit.syslog5424 import FACILITIES, SyslogSender, frame, message
from ombot.bot.settings import BotSettings
from ombot.errors import ConfigError
from tests.rigs import ALERT_RULES, HOST, UID, AuditRig, audit_site, event
from tests.scrape import samples, value
from tests.support import Cluster, bot_table, free_port, wait_for
from tests.tlspki import Authority, Issued

ECS_FIELDS = Path(__file__).parent / "data" / "ecs_fields.txt"
EXPORT_FILE = "state/export/audit.jsonl"
QUEUE = 16  # lines the bot keeps for an absent syslog server; more are dropped
HEADER = re.compile(r"<(\d{1,3})>1 (\S+) (\S+) (\S+) (\S+) (\S+) - (.*)", re.DOTALL)
ECS_DATE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
LOCAL0 = FACILITIES["local0"]


# -- the declared schema ------------------------------------------------------------------------------


def ecs_fields() -> dict[str, tuple[str, bool]]:
    """ECS field -> (its type, whether ECS normalises it to an array), from tests/data/ecs_fields.txt."""
    fields = {}
    for line in ECS_FIELDS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, kind, *array = line.split()
            fields[name] = (kind, array == ["array"])
    return fields


def flat(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested document's leaves by dotted name (`{"event": {"kind": "alert"}}` -> event.kind)."""
    found: dict[str, Any] = {}
    for key, value in doc.items():
        name = f"{prefix}{key}"
        found |= flat(value, name + ".") if isinstance(value, dict) and key != "labels" else {name: value}
    return found


def assert_ecs(doc: dict[str, Any], fields: dict[str, tuple[str, bool]]) -> None:
    """Every field outside `ombot.*` is an ECS field holding a value of its ECS type."""
    for name, value in flat(doc).items():
        if name.startswith("ombot."):
            continue
        assert name in fields, f"{name} is not an ECS field (tests/data/ecs_fields.txt): {doc}"
        kind, array = fields[name]
        if array:
            assert isinstance(value, list) and value, (name, value)
        for item in value if array else [value]:
            assert_type(name, kind, item)


def assert_type(name: str, kind: str, value: Any) -> None:
    if kind == "date":
        assert isinstance(value, str) and ECS_DATE.fullmatch(value), (name, value)
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    elif kind == "long":
        assert isinstance(value, int) and not isinstance(value, bool), (name, value)
    elif kind == "ip":
        ipaddress.ip_address(value)
    elif kind == "object":
        assert isinstance(value, dict) and all(isinstance(v, str) for v in value.values()), (name, value)
    else:  # keyword, wildcard, match_only_text
        assert isinstance(value, str), (name, value)


# -- a syslog server of our own -----------------------------------------------------------------------


class SyslogListener:
    """A TCP syslog server on loopback: it splits octet-counted frames (RFC 6587) and keeps each message;
    stopped and started again on the same port, as a collector that restarts."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.port, self.tls = 0, tls
        self.messages: list[bytes] = []
        self.unframed: list[bytes] = []  # data that was not an octet-counted frame
        self.clients: list[str] = []  # with `tls`: the common name of each client certificate shown
        self.handshakes_failed: list[str] = []
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []

    def start(self) -> SyslogListener:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen()
        self.port = server.getsockname()[1]
        self._sockets = [server]
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()
        return self

    def stop(self) -> None:
        for sock in self._sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def received(self) -> list[bytes]:
        with self._lock:
            return list(self.messages)

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            self._sockets.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        if self.tls is not None:  # RFC 5425: the same frames, inside TLS
            try:
                conn = self.tls.wrap_socket(conn, server_side=True)
            except OSError as exc:
                self.handshakes_failed.append(str(exc))
                conn.close()
                return
            self._sockets.append(conn)
            subject = dict(pair for rdn in (conn.getpeercert() or {}).get("subject", ()) for pair in rdn)
            self.clients.append(str(subject.get("commonName", "")))
        self._read(conn)

    def _read(self, conn: socket.socket) -> None:
        buffer = b""
        while chunk := self._recv(conn):
            buffer += chunk
            while True:
                length, space, rest = buffer.partition(b" ")
                if not space or (length.isdigit() and len(rest) < int(length)):
                    break
                if not length.isdigit():
                    self.unframed.append(buffer)
                    return
                with self._lock:
                    self.messages.append(rest[:int(length)])
                buffer = rest[int(length):]

    @staticmethod
    def _recv(conn: socket.socket) -> bytes:
        try:
            return conn.recv(65536)
        except OSError:
            return b""


@pytest.fixture
def listener() -> Iterator[SyslogListener]:
    started = SyslogListener().start()
    yield started
    started.stop()


# -- through the bot ----------------------------------------------------------------------------------


def spool_lines(spool_dir: Path, commands: list[str]) -> None:
    """Lines as the shell hook writes them (tab-separated, format om1), for the real agent to ship."""
    user_dir = spool_dir / str(UID)
    user_dir.mkdir(mode=0o700, exist_ok=True)
    with open(user_dir / "spool", "a") as f:
        for n, text in enumerate(commands):
            f.write("\t".join(["om1", f"{time.time():.6f}", "4242", str(n), "0", "history", str(UID), "", "tester",
                               "/dev/pts/3", "192.0.2.7 50000 22", "/srv/app", text, str(len(text))]) + "\n")


def exported(rig: AuditRig) -> list[dict[str, Any]]:
    path = rig.cluster.root / EXPORT_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def lines_for(rig: AuditRig, count: int, what: str) -> list[dict[str, Any]]:
    wait_for(lambda: len(exported(rig)) >= count, 45, what)
    return exported(rig)


FULL = {"uid": 1000, "user": "alice", "login_user": "bob", "login_check": "mismatch", "tty": "/dev/pts/3",
        "cwd": "/srv", "ssh_client": "10.1.2.3 51000 22", "command": "systemctl restart nginx", "exit": 0, "pid": 4242}
AUDITD = {"source": "auditd", "exe": "/usr/bin/id", "comm": "id", "pid": 77, "ppid": 70, "uid": 0, "user": "root",
          "euid": 0, "login_uid": 1000, "login_user": "alice", "session": 5, "command": "id -u", "cwd": "/root",
          "exit": None, "success": True}


@pytest.mark.slow
def test_events_and_alerts_reach_the_file_and_syslog_as_ecs(make_slack_rig: Callable[..., AuditRig],
                                                            listener: SyslogListener) -> None:
    export = (f'[bot.audit_export]\nfile = "{EXPORT_FILE}"\nsyslog = "127.0.0.1:{listener.port}"\n'
              f"syslog_queue = {QUEUE}\n")
    ops = free_port()
    rig = make_slack_rig({"local": ["m1", "m2"]}, kind=AuditRig, extra_toml=export, audit_silent_after_seconds=3,
                         ops_listen=f"127.0.0.1:{ops}", **audit_site(ALERT_RULES))
    fields = ecs_fields()
    agent = rig.agent(["m1", "m2"])
    spool_lines(rig.spool_dir, ["echo MARKER token=hunter2", "ls /srv"])
    batch = [event(1, data=FULL), {"id": f"{HOST}:0123abcd-0000:auditd:7", "kind": "command", "at": 1_700_000_000_007,
                                   "data": AUDITD},
             {"id": f"{HOST}:0123abcd-0000:qtest:9", "kind": "notice", "at": 1_700_000_000_009,
              "data": {"code": "spool_line", "problem": "a spool line that is not a record", "line": "junk"}}]
    rig.ingest("m1", batch)
    rig.ingest("m2", batch)  # the same events at the other master too: stored, and exported, once
    # 5 events (2 typed, 3 sent), the MARKER alert, the notice's alert
    docs = lines_for(rig, 7, "every event and alert in the export file")
    time.sleep(1)  # a second export of anything would have come by now
    docs = exported(rig)
    for doc in docs:
        assert_ecs(doc, fields)
    events = {d["event"]["id"]: d for d in docs if d["event"]["kind"] == "event"}
    assert Counter(d["event"]["id"] for d in docs).most_common(1)[0][1] == 1  # nothing twice: only new events
    assert set(events) == {i for i, _ in rig.stored()} >= {e["id"] for e in batch}
    text = (rig.cluster.root / EXPORT_FILE).read_text()
    assert "hunter2" not in text and "token=****" in text  # redacted as chat shows it

    full = flat(events[batch[0]["id"]])
    assert {k: full[k] for k in ("host.name", "user.name", "user.id", "source.ip", "source.port", "process.pid",
                                 "process.exit_code", "process.command_line", "process.working_directory",
                                 "event.outcome", "event.category", "event.type", "event.dataset", "labels",
                                 "ecs.version", "observer.product", "ombot.audit.login_user")} == {
        "host.name": HOST, "user.name": "alice", "user.id": "1000", "source.ip": "10.1.2.3", "source.port": 51000,
        "process.pid": 4242, "process.exit_code": 0, "process.command_line": "systemctl restart nginx",
        "process.working_directory": "/srv", "event.outcome": "success", "event.category": ["process"],
        "event.type": ["end"], "event.dataset": "ombot.audit", "labels": {"idc": "local"}, "ecs.version": "8.11.0",
        "observer.product": "OMBot", "ombot.audit.login_user": "bob"}
    auditd = flat(events[batch[1]["id"]])
    assert (auditd["event.provider"], auditd["event.type"], auditd["process.executable"], auditd["process.parent.pid"],
            auditd["event.outcome"]) == ("auditd", ["start"], "/usr/bin/id", 70, "success")
    notice = flat(events[batch[2]["id"]])
    assert (notice["event.code"], notice["event.category"], notice["event.severity"]) == ("spool_line", ["host"], 4)

    alerts = [flat(d) for d in docs if d["event"]["kind"] == "alert"]
    [marker] = [a for a in alerts if a.get("rule.name") == "marker"]
    typed = next(i for i, d in events.items() if "MARKER" in d.get("process", {}).get("command_line", ""))
    assert marker["event.id"] == f"{typed}/marker" and marker["ombot.audit.event_id"] == typed
    assert marker["process.command_line"] == "echo MARKER token=****" and marker["ombot.alert.fired"] is True
    assert any(a["event.action"] == "agent-notice" and a["ombot.audit.event_id"] == batch[2]["id"] for a in alerts)

    wait_for(lambda: len(listener.received()) >= len(docs), 30, "every line at the syslog server")
    assert_syslog(listener.received(), text.splitlines(), (rig.cluster.root / EXPORT_FILE).read_text().splitlines(), rig)

    # The syslog server goes away: the feed goes on (the file gets every line), the queue keeps QUEUE
    # lines, the rest are dropped and said so; once the server is back, what follows arrives.
    listener.stop()
    rig.ingest("m1", [event(2000 + n) for n in range(40)])
    wait_for(lambda: len(exported(rig)) >= len(docs) + 40, 45, "the file to get every line while syslog is away")
    wait_for(lambda: "lines dropped so far" in rig.bot.log(), 30, "the drops to be logged")
    before = len(listener.received())
    listener.start()
    wait_for(lambda: len(listener.received()) > before, 60, "the queued lines once the server is back")
    rig.ingest("m1", [event(3000, data={"command": "echo back"})])  # the queue has room again: it goes
    wait_for(lambda: any(b"echo back" in m for m in listener.received()), 60, "a line after the server is back")
    assert not listener.unframed
    sent = {json.loads(HEADER.fullmatch(m.decode()).group(7))["event"]["id"] for m in listener.received()}  # type: ignore[union-attr]
    assert sent <= {d["event"]["id"] for d in exported(rig)}
    assert len({i for i in sent if ":qtest:20" in i}) < 40  # some were dropped, none made up
    found = samples(ops)  # the export's own counts, as Prometheus reads them
    assert value(found, "ombot_audit_export_lines_total", sink="file", outcome="written") == len(exported(rig))
    assert value(found, "ombot_audit_export_lines_total", sink="syslog", outcome="dropped") > 0

    # What the feed says about the pipeline is an alert line too: the agent falls silent
    agent.stop(signal.SIGKILL)
    wait_for(lambda: any(d["event"]["action"] == "agent-silent" for d in exported(rig)), 45, "the silent-agent line")
    # the last: a machine that stalled the agent past 3 s earlier may have had it said once before
    silent = [d for d in exported(rig) if d["event"]["action"] == "agent-silent"][-1]
    assert_ecs(silent, fields)
    assert (silent["event"]["kind"], silent["host"]["name"], silent["labels"]["idc"], silent["event"]["severity"]) == (
        "alert", HOST, "local", 4) and "is silent" in silent["message"]


def assert_syslog(messages: list[bytes], lines: list[str], lines_now: list[str], rig: AuditRig) -> None:
    """Each message is RFC 5424 (PRI from local0 and the line's severity, VERSION 1, a UTC TIMESTAMP,
    this host, APP-NAME ombot, the bot's pid, MSGID by kind, no structured data) around a line of the
    file, each once: every line the file had (`lines`), none it does not have now (`lines_now`)."""
    assert rig.bot.proc is not None
    seen = []
    for raw in messages:
        found = HEADER.fullmatch(raw.decode("ascii"))
        assert found is not None, raw
        pri, stamp, hostname, app, procid, msgid, msg = found.groups()
        doc = json.loads(msg)
        assert int(pri) == LOCAL0 * 8 + doc["event"]["severity"]
        assert ECS_DATE.fullmatch(stamp) and abs(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
                                                 - time.time()) < 600
        assert (hostname, app, procid, msgid) == (socket.gethostname(), "ombot", str(rig.bot.proc.pid),
                                                  f"audit-{doc['event']['kind']}")
        seen.append(msg)
    assert max(Counter(seen).values()) == 1 and set(lines) <= set(seen) <= set(lines_now)


# -- over TLS (RFC 5425) ----------------------------------------------------------------------------------


def server_tls(authority: Authority, server: Issued, clients: bool = True) -> ssl.SSLContext:
    """A collector's context: its own certificate, and (`clients`) client certificates from `authority` required."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(authority.ca))
    context.load_cert_chain(server.cert, server.key)
    context.verify_mode = ssl.CERT_REQUIRED if clients else ssl.CERT_NONE
    return context


@pytest.mark.slow
def test_syslog_over_tls_verifies_the_collector_and_shows_the_bot_s_certificate(
        make_slack_rig: Callable[..., AuditRig], tmp_path: Path) -> None:
    pki = Authority(tmp_path / "pki", "site-ca")
    collector = SyslogListener(server_tls(pki, pki.issue("collector", "127.0.0.1"))).start()
    client = pki.issue("ombot-bot")
    try:
        export = (f'[bot.audit_export]\nfile = "{EXPORT_FILE}"\nsyslog = "127.0.0.1:{collector.port}"\n'
                  f'syslog_tls = true\nsyslog_ca = "{pki.ca}"\nsyslog_cert = "{client.cert}"\n'
                  f'syslog_key = "{client.key}"\n')
        rig = make_slack_rig({"local": ["m1"]}, kind=AuditRig, extra_toml=export, **audit_site(ALERT_RULES))
        rig.ingest("m1", [event(n) for n in range(3)])
        lines_for(rig, 3, "three lines in the export file")
        lines = (rig.cluster.root / EXPORT_FILE).read_text().splitlines()
        wait_for(lambda: len(collector.received()) >= len(lines), 30, "every line at the collector, over TLS")
        assert_syslog(collector.received(), lines, (rig.cluster.root / EXPORT_FILE).read_text().splitlines(), rig)
        assert set(collector.clients) == {"ombot-bot"} and not collector.handshakes_failed and not collector.unframed
        assert f"syslog tls://127.0.0.1:{collector.port} (RFC 5424 over TLS)" in rig.bot.log()
    finally:
        collector.stop()


@pytest.mark.parametrize("wrong", ["another CA", "another address"])
def test_a_collector_that_fails_verification_gets_nothing(tmp_path: Path, wrong: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """The sender's TLS (the context `[bot.audit_export]` builds) against a collector whose certificate
    comes from another CA, or names another address: no line is sent, the failure is logged as the
    server being away, and the lines wait in the queue."""
    pki = Authority(tmp_path / "pki", "site-ca")
    impostor = Authority(tmp_path / "other", "other-ca") if wrong == "another CA" else pki
    served = impostor.issue("collector", "127.0.0.1" if wrong == "another CA" else "127.0.0.2")
    collector = SyslogListener(server_tls(pki, served, clients=False)).start()  # only the sender's check can fail
    settings = ExportSettings(syslog=("127.0.0.1", collector.port), syslog_tls=True, syslog_ca=pki.ca)
    sender = SyslogSender("127.0.0.1", collector.port, 10, tls_context(settings))
    try:
        caplog.set_level(logging.INFO, logger="ombot.audit.export")
        assert sender.offer(b"never sent")
        wait_for(lambda: collector.handshakes_failed, 15, "the handshake the sender gave up")
        wait_for(lambda: "TLS handshake failed" in caplog.text, 15, "the failure, logged")
        reason = "certificate verify failed" if wrong == "another CA" else "IP address mismatch"
        assert reason in caplog.text and "trying again, lines wait in its queue" in caplog.text, caplog.text
        assert collector.received() == [] and sender.sent == 0
    finally:
        sender.close(wait=0)
        collector.stop()


# -- the formats and the settings, directly -------------------------------------------------------------


def test_an_rfc5424_message_and_its_octet_counted_frame() -> None:
    data = message(FACILITIES["auth"], 2, 1_800_000_000_123, "bot host", "ombot", "42", "audit-alert", '{"a":1}')
    assert data == b'<34>1 2027-01-15T08:00:00.123Z bot_host ombot 42 audit-alert - {"a":1}'
    assert frame(data) == b"%d " % len(data) + data
    assert message(16, 6, 0, "", "", "", "", "x").startswith(b"<134>1 1970-01-01T00:00:00.000Z - - - - - x")


def test_the_file_rotates_and_follows_a_file_moved_away(tmp_path: Path) -> None:
    path = tmp_path / "export" / "audit.jsonl"
    sink = RotatingFile(path, max_bytes=100, backups=2)
    for n in range(6):
        sink.write([f"{n:02d}" + "x" * 45])  # 48 bytes a line: two fit a file
    assert [p.read_text().split() for p in (path.with_name("audit.jsonl.2"), path.with_name("audit.jsonl.1"), path)] == [
        ["00" + "x" * 45, "01" + "x" * 45], ["02" + "x" * 45, "03" + "x" * 45], ["04" + "x" * 45, "05" + "x" * 45]]
    assert not path.with_name("audit.jsonl.3").exists() and oct(path.stat().st_mode & 0o777) == "0o600"
    os.replace(path, tmp_path / "moved")  # logrotate took it: the next line starts a new file
    sink.write(["next"])
    assert path.read_text() == "next\n" and sink.written == 7 and sink.dropped == 0
    sink.close()


def test_a_client_key_others_can_read_is_refused(make_cluster: Callable[..., Cluster], tmp_path: Path) -> None:
    pki = Authority(tmp_path / "pki", "site-ca")
    client = pki.issue("ombot-bot")
    table = (f'syslog = "127.0.0.1:6514"\nsyslog_tls = true\nsyslog_ca = "{pki.ca}"\nsyslog_cert = "{client.cert}"\n'
             f'syslog_key = "{client.key}"')
    cluster = make_cluster(extra_toml=bot_table() + f"\n[bot.audit_export]\n{table}\n")
    assert BotSettings.from_config(cluster.config()).audit_export is not None  # 0600: accepted
    client.key.chmod(0o640)
    with pytest.raises(ConfigError, match=re.escape(f"only its owner can read (chmod 600 {client.key})")):
        BotSettings.from_config(cluster.config())
    client.key.chmod(0o600)
    client.key.write_text("not a key")
    with pytest.raises(ConfigError, match="certificate files that load"):
        BotSettings.from_config(cluster.config())


@pytest.mark.parametrize(("table", "expected"), [
    ("", None),
    ('file = "audit.jsonl"', ExportSettings(file=Path("audit.jsonl"))),
    ('syslog = "[::1]:601"\nsyslog_facility = "auth"\nsyslog_queue = 5',
     ExportSettings(syslog=("::1", 601), syslog_facility="auth", syslog_queue=5)),
    ("syslog_queue = 5", "a file, a syslog address"),
    ('file = "a"\nsyslog_facility = "loca10"', "a syslog facility"),
    ('file = "a"\nfile_max_bytes = 10', "at least 4096"),
    ('file = "a"\nsyslog_port = 514', "a known key"),
    ('syslog = "collector"', "'host:port'"),
    ('syslog = "127.0.0.1:6514"\nsyslog_tls = true',  # the system's CAs verify the collector
     ExportSettings(syslog=("127.0.0.1", 6514), syslog_tls=True)),
    ('file = "a"\nsyslog_ca = "ca.pem"', "true when syslog_ca is set"),
    ('file = "a"\nsyslog_tls = true', "syslog_tls: expected false without a syslog address"),
    ('syslog = "127.0.0.1:6514"\nsyslog_tls = true\nsyslog_cert = "bot.crt"', "syslog_key: expected a file path too"),
    ('syslog = "127.0.0.1:6514"\nsyslog_tls = true\nsyslog_ca = "missing.pem"', "certificate files that load"),
])
def test_the_export_settings_are_checked(make_cluster: Callable[..., Cluster], table: str, expected: Any) -> None:
    extra = bot_table() + (f"\n[bot.audit_export]\n{table}\n" if table else "")
    cluster = make_cluster(extra_toml=extra)
    if isinstance(expected, str):
        with pytest.raises(ConfigError, match=re.escape(expected)):
            BotSettings.from_config(cluster.config())
        return
    settings = BotSettings.from_config(cluster.config()).audit_export
    if settings is not None and settings.file is not None:  # relative to ombot.toml
        assert settings.file == cluster.root / "audit.jsonl"
        settings = dataclasses.replace(settings, file=Path("audit.jsonl"))
    assert settings == expected
