"""Audit events and alerts as Elastic Common Schema (ECS) documents, for the SIEM export (audit.export).

ECS rather than OCSF because the pipelines sites run (Filebeat, Elastic Agent, Vector, Fluent Bit,
Logstash, Loki, Elasticsearch and OpenSearch) map ECS field names without a translation step, and
OCSF's class-and-attribute model (its Process Activity class, activity_id, type_uid) suits a
lake that speaks OCSF, not the shippers most sites have: docs/audit.md, "SIEM export".

One document per stored event and per alert, as ECS's JSON is written: nested objects
(`{"event": {"kind": "alert"}}`, read as `event.kind`). What ECS has no field for (the login the
shell claims, whether the kernel agrees, the alert's cooldown key) goes under `ombot.*`, as ECS asks
of custom fields. `event.id` is the event's own id (host:boot:source:seq, the store's dedupe key),
or for an alert that id and the rule's name, so a line sent twice is recognisable. Commands are
redacted as chat shows them (the rules file's patterns and the built-in ones). Empty fields are left out.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Mapping
from typing import Any

from ombot import __version__
from ombot.audit.notices import NOTICES, UNKNOWN, describe
from ombot.audit.rules import Match
from ombot.audit.syslog5424 import CRIT, INFO, NOTICE, WARNING, timestamp

ECS_VERSION = "8.11.0"
DATASET = "ombot.audit"
# A rule's or notice's severity -> the document's event.severity and its syslog severity; plain events are INFO.
SEVERITY = {"critical": CRIT, "warning": WARNING, "info": NOTICE}
# What an event's data holds beyond ECS's fields, kept under ombot.audit (docs/audit.md, "Fields").
OMBOT_FIELDS = ("tty", "login_user", "login_uid", "login_check", "kernel_login_user", "kernel_login_uid", "session",
                "sudo_user", "logname", "seen", "history", "truncated", "agent_at", "euid", "errno", "path")
Redact = Callable[[str], str]


def observer(hostname: str | None = None) -> dict[str, Any]:
    """Who saw the events: this OMBot bot (ECS observer.*)."""
    return {"hostname": hostname or socket.gethostname(), "product": "OMBot", "vendor": "OMBot",
            "version": __version__, "type": "audit"}


def event_document(row: Mapping[str, Any], redact: Redact, seen_by: Mapping[str, Any]) -> dict[str, Any]:
    """A stored event (audit.store.AuditRecord's row) as an ECS document of kind `event`."""
    doc = _common(int(row["at"]), row["host"], row["idc"], seen_by)
    data = row.get("data") or {}
    if row["kind"] == "command":
        _command(doc, row, data, redact)
    else:
        _notice(doc, row, data, redact)
    doc["event"] |= {"id": row["id"], "kind": "event", "created": timestamp(int(row["stored_at"]))}
    return pruned(doc)


def alert_document(match: Match, event: Mapping[str, Any], fired: bool, channel: str | None, redact: Redact,
                   seen_by: Mapping[str, Any], now_ms: int) -> dict[str, Any]:
    """A rule's match (or a notice's alert: audit.notices) on a stored event, as an ECS document of kind
    `alert`. `fired`: its threshold and cooldown let it post a new message in chat (else it was counted
    into one already posted)."""
    event_id, host = str(event.get("id") or ""), str(event.get("host") or "")
    command = redact(str(event.get("command") or ""))
    on_command = event.get("kind", "command") == "command"
    doc = _common(int(event["at"]), host, event.get("idc"), seen_by)
    doc["message"] = f"{match.rule} on {host}: {command}"
    doc["event"] |= {"id": f"{event_id}/{match.rule}", "kind": "alert", "category": ["process" if on_command else "host"],
                     "type": ["info"], "action": "rule-match" if on_command else "agent-notice", "reason": match.rule,
                     "severity": SEVERITY.get(match.severity, WARNING), "created": timestamp(now_ms)}
    doc["rule"] = {"name": match.rule}
    doc["user"] = {"name": event.get("user") or None}
    doc["process"] = {"command_line": command if on_command else None}
    doc["related"] = {"hosts": [host], "user": _names(event.get("user"), event.get("login_user"))}
    doc["ombot"] = {"alert": {"severity": match.severity, "dedupe_key": match.dedupe_key, "fired": fired,
                              "channel": channel}, "audit": {"event_id": event_id}}
    return pruned(doc)


def pipeline_document(action: str, severity: str, text: str, idc: str, host: str | None,
                      seen_by: Mapping[str, Any], now_ms: int) -> dict[str, Any]:
    """What the feed says about the pipeline itself (an agent silent or back, degraded or recovered, an
    IDC none of whose masters answers, or answers again), as an ECS document of kind `alert`."""
    doc = _common(now_ms, host, idc, seen_by)
    doc["message"] = text
    doc["event"] |= {"id": f"{action}:{idc}:{host or '-'}:{now_ms}", "kind": "alert", "category": ["host"],
                     "type": ["info"], "action": action, "severity": SEVERITY.get(severity, WARNING),
                     "created": timestamp(now_ms)}
    doc["related"] = {"hosts": [host] if host else None}
    return pruned(doc)


def _common(at_ms: int, host: str | None, idc: Any, seen_by: Mapping[str, Any]) -> dict[str, Any]:
    return {"@timestamp": timestamp(at_ms), "ecs": {"version": ECS_VERSION},
            "event": {"dataset": DATASET, "module": "ombot"}, "host": {"name": host or None},
            "labels": {"idc": str(idc) if idc else None}, "observer": dict(seen_by)}


def _command(doc: dict[str, Any], row: Mapping[str, Any], data: Mapping[str, Any], redact: Redact) -> None:
    auditd = row["source"] == "auditd"
    command = redact(row["command"])
    ip, port = ssh_client(row.get("ssh_client"))
    doc["message"] = f"{row['user'] or '?'}@{row['host']}: {command}"
    doc["event"] |= {"category": ["process"], "type": ["start" if auditd else "end"],
                     "action": "exec" if auditd else "shell-command", "provider": "auditd" if auditd else "shell",
                     "outcome": _outcome(data, row.get("exit_status"), auditd), "severity": INFO}
    doc["user"] = {"name": row.get("user"), "id": None if row.get("uid") is None else str(row["uid"])}
    doc["process"] = {"command_line": command, "working_directory": row.get("cwd"), "pid": _int(data.get("pid")),
                      "exit_code": row.get("exit_status"), "executable": _text(data.get("exe")),
                      "name": _text(data.get("comm")), "parent": {"pid": _int(data.get("ppid"))}}
    doc["source"] = {"ip": ip, "port": port}
    doc["related"] = {"hosts": [row["host"]], "ip": [ip] if ip else None,
                      "user": _names(row.get("user"), row.get("login_user"), data.get("kernel_login_user"),
                                     data.get("sudo_user"))}
    claimed = _int(data.get("claimed_at"))
    doc["ombot"] = {"audit": {"source": row["source"], **{k: data.get(k) for k in OMBOT_FIELDS if k in data},
                              "claimed_at": timestamp(claimed) if claimed is not None and claimed >= 0 else None}}


def _notice(doc: dict[str, Any], row: Mapping[str, Any], data: Mapping[str, Any], redact: Redact) -> None:
    """An agent's notice or drop (audit.notices), or a master's."""
    dropped = row["kind"] == "dropped"
    code = "dropped" if dropped else str(data.get("code") or "notice")
    severity = NOTICES.get(code, UNKNOWN)[0]
    doc["message"] = redact(describe(row["kind"], data))
    doc["event"] |= {"category": ["host"], "type": ["info"], "action": "events-dropped" if dropped else "agent-notice",
                     "code": code, "severity": SEVERITY[severity]}
    doc["related"] = {"hosts": [row["host"]]}
    doc["ombot"] = {"audit": {"source": row["source"], "kind": row["kind"], "count": _int(data.get("count"))}}


def _outcome(data: Mapping[str, Any], exit_status: Any, auditd: bool) -> str:
    if auditd and isinstance(data.get("success"), bool):
        return "success" if data["success"] else "failure"
    if isinstance(exit_status, int):
        return "success" if exit_status == 0 else "failure"
    return "unknown"


def ssh_client(value: Any) -> tuple[str | None, int | None]:
    """SSH_CLIENT's `IP PORT PORT` (the shell's claim): its address and port, each only when well formed."""
    parts = str(value or "").split()
    try:
        ip = str(ipaddress.ip_address(parts[0])) if parts else None
    except ValueError:
        return None, None
    port = int(parts[1]) if len(parts) > 1 and parts[1].isascii() and parts[1].isdigit() and int(parts[1]) < 65536 else None
    return ip, port


def _names(*names: Any) -> list[str] | None:
    found = list(dict.fromkeys(n for n in names if isinstance(n, str) and n))
    return found or None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def pruned(value: Any) -> Any:
    """The document without its empty parts (None, empty objects and lists): a field is there only with a value."""
    if isinstance(value, dict):
        kept = {k: pruned(v) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v is not None and v != {} and v != []}
    return value
