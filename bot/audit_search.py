"""`/om audit`: search the central shell-audit store (the audit room's search) from chat and the console.

Only roles the access policy names under `[audit] viewers` may search (audit.require_audit_viewer).
Results go to the asker alone: a short answer as an ephemeral message, a long one as a file in a
direct message with the bot. Commands are shown redacted (the built-in secret patterns and the
rules file's own) and escaped in code blocks, so a typed `<!channel>` or a stray triple backtick does nothing.
"""

from __future__ import annotations

import json
import time
from typing import Any

from ombot.approvals import Gate
from ombot.audit import AuditQuery, AuditRecord, clock_note, find_events, login_status, redact, require_audit_viewer, utc
from ombot.bot.transport import ChatRequest, Transport
from ombot.errors import CommandError
from ombot.message import Message, clip, code, escape, section
from ombot.since import parse_since

AUDIT_USAGE = "[host=GLOB] [user=GLOB] [grep=TEXT] [since=2h|3d|2026-11-20] [idc=IDC]"
AUDIT_KEYS = ("host", "user", "grep", "since", "idc")
INLINE_ROWS = 20  # more than this goes to a file in a DM
FILE_ROWS = 1000  # the newest this many matches go into the file
ROW_COMMAND_LIMIT = 300  # characters of a command in the ephemeral answer; the file has it whole
SECTION_BUDGET = 2800  # characters of rows per code block (a section holds 3,000)


def parse_audit_query(words: list[str]) -> dict[str, Any]:
    """`audit`'s arguments: key=value filters, each at most once (`grep="rm -rf"` for spaces)."""
    found: dict[str, str] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or key not in AUDIT_KEYS or key in found or not value:
            raise CommandError(f"cannot read {word!r}: filters are {', '.join(k + '=' for k in AUDIT_KEYS)} each once "
                               f"(quote a value with spaces: grep=\"rm -rf\").\nusage: /om audit {AUDIT_USAGE}")
        found[key] = value
    since = parse_since(found["since"]) if "since" in found else None
    return {"query": AuditQuery(found.get("host"), found.get("user"), found.get("grep"), since, found.get("idc"))}


def search_audit(query: AuditQuery, req: ChatRequest, transport: Transport, gate: Gate | None,
                 patterns: tuple[str, ...] = ()) -> None:
    """Answer `/om audit` to the asker only: ephemeral rows, or a file in a DM when there are many."""
    require_audit_viewer(gate, req.user)
    records = find_events(query, limit=FILE_ROWS + 1)
    if not records:
        transport.respond(req, _plain(f"No audit events match {query.describe()}."))
        return
    if len(records) <= INLINE_ROWS:
        transport.respond(req, inline_answer(query, records, patterns))
        return
    shown = records[:FILE_ROWS]
    more = "+" if len(records) > FILE_ROWS else ""
    name = f"audit-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.tsv"
    lead = f"Audit search {query.describe()}: {len(shown)}{more} events, newest first."
    ts = transport.post(req.user, Message(escape(lead), [section(escape(lead))],
                                          files=[(name, file_text(shown, patterns))]))
    if ts is None:  # the DM failed: the transport logged why
        transport.respond(req, _plain(f"{len(shown)}{more} audit events match, too many to show here, and the "
                                      f"direct message with the file could not be sent. Narrow the search."))
        return
    newest = inline_answer(query, records[:5], patterns, heading=f"{len(shown)}{more} audit events match "
                                                                  f"{query.describe()}; all of them are in a "
                                                                  f"file in your direct messages. The newest:")
    transport.respond(req, newest)


def inline_answer(query: AuditQuery, records: list[AuditRecord], patterns: tuple[str, ...],
                  heading: str | None = None) -> Message:
    lines = [row_line(r, patterns) for r in records]
    head = heading or f"{len(records)} audit event(s) match {query.describe()}, newest first:"
    if any(r.kind == "command" and r.source != "auditd" for r in records):
        head += f"\n{LEGEND}"
    blocks = [section(escape(head))] + [section(code(chunk)) for chunk in _chunks(lines, SECTION_BUDGET)]
    text = escape(head) + "\n" + escape("\n".join(lines))
    return Message(clip(text, 3500), blocks)


LEGEND = "(* claimed by the user's shell, not checked; ! the kernel says otherwise)"


def row_line(record: AuditRecord, patterns: tuple[str, ...]) -> str:
    """One event on one line (unescaped): when, where, who, in which directory, exit status, command.
    What only the user's shell claims is marked `*`, a login the kernel contradicts `!`."""
    when = utc(record.at)
    if record.kind != "command":
        return f"{when} {record.idc} {record.host} {record.kind}: {clip(_data(record), 200)}"
    data = record.data if isinstance(record.data, dict) else {}
    kernel_said = record.source == "auditd"
    note = clock_note(record.at, data.get("claimed_at"))
    if note:
        when += f" ({note}*)"
    who = (record.user or "?") + _login(record, data)
    mark = "" if kernel_said else "*"
    origin = f" from {record.ssh_client.split(' ', 1)[0]}{mark}" if record.ssh_client else ""
    status = "" if record.exit_status is None else f" [{record.exit_status}]"
    command = clip(_one_line(redact(record.command, patterns)), ROW_COMMAND_LIMIT)
    cwd = _one_line(redact(record.cwd or "?", patterns))
    return f"{when} {record.idc} {record.host} {who}{origin} {clip(cwd, 80)}{status} $ {command}"


def _login(record: AuditRecord, data: dict[str, Any]) -> str:
    checked = login_status({**data, "source": record.source})
    if checked == "mismatch":
        return f" (login {record.login_user or '?'}! kernel: {data.get('kernel_login_user') or 'no login session'})"
    if not record.login_user or record.login_user == record.user:
        return ""
    return f" (login {record.login_user}{'' if checked == 'kernel' else '*'})"


FILE_COLUMNS = ("time_utc", "idc", "host", "user", "login_user", "uid", "ssh_client", "tty", "cwd", "exit",
                "kind", "command", "id", "source", "login_check", "kernel_login_user", "claimed_time_utc")


def file_text(records: list[AuditRecord], patterns: tuple[str, ...]) -> str:
    """Tab-separated, one event a line, commands whole but redacted; tabs and newlines shown as \\t \\n.
    `source` is auditd (every field the kernel's) or the agent's queue (a shell hook's record)."""
    rows = ["\t".join(FILE_COLUMNS)]
    for r in records:
        data = r.data if isinstance(r.data, dict) else {}
        claimed = data.get("claimed_at")
        values: list[object] = [utc(r.at), r.idc, r.host, r.user, r.login_user, r.uid, r.ssh_client, r.tty,
                                redact(r.cwd or "", patterns), r.exit_status, r.kind,
                                redact(r.command, patterns) if r.kind == "command" else _data(r), r.id, r.source,
                                data.get("login_check"), data.get("kernel_login_user"),
                                utc(claimed) if isinstance(claimed, int) else None]
        rows.append("\t".join(_cell(v) for v in values))
    return "\n".join(rows) + "\n"


def _cell(value: object) -> str:
    text = "" if value is None else str(value)
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _data(record: AuditRecord) -> str:
    """A dropped or notice event's data (counts, the problem seen), on one line."""
    return _one_line(json.dumps(record.data, ensure_ascii=False, separators=(", ", ": "), sort_keys=True))


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _chunks(lines: list[str], budget: int) -> list[str]:
    """Lines joined into chunks of at most `budget` characters (after escaping) each."""
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for line in lines:
        cost = len(escape(line)) + 1
        if current and size + cost > budget:
            chunks.append("\n".join(current))
            current, size = [], 0
        current.append(line)
        size += cost
    if current:
        chunks.append("\n".join(current))
    return chunks


def _plain(text: str) -> Message:
    return Message(escape(text), [section(escape(text))])
