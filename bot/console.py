"""Console mode: the /om grammar in a terminal, through the same dispatcher as Slack.

Cards are printed as text when posted and again when updated; `/as USER` switches the acting
user when the config allows it (the demo config does, so approval flows can be tried alone).

With a chat key (the demo's), the console also pulls the shell audit while no other process does and
prints its alerts (`AlertScreen`); a Slack bot on the same database takes the feed over when it starts
(docs/audit.md, "Quickstart").
"""

from __future__ import annotations

import itertools
import re
import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

from ombot.bot.alerts import AlertPoster
from ombot.bot.service import BotService
from ombot.bot.terminal import HISTORY_FILE, is_terminal, terminal
from ombot.bot.transport import ChatRequest
from ombot.message import Message, plain

CHANNEL = "console"
PROMPT = "om> "
ALERT_RATE, ALERT_BURST = 2.0, 5  # alerts a second, and at once after a quiet spell: a flood stays readable
# What a terminal would act on instead of showing: control characters but tab and newline (a `\r` or
# `\b` typed into an audited command would overwrite what the alert shows; ESC starts a sequence), C1
# controls, and the bidi overrides that reorder text on screen.
_HIDDEN = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


class ConsoleTransport:
    """The console's side of the Transport: every message printed as plain text."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out
        self._lock = threading.Lock()
        self._ts = itertools.count(1)

    def say(self, text: str) -> None:
        """Print a line of OMBot's markup as plain text (ombot.message.plain)."""
        self._write(plain(text))

    def _write(self, text: str) -> None:
        with self._lock:
            self.out.write(visible(text).rstrip("\n") + "\n")
            self.out.flush()

    def respond(self, req: ChatRequest, message: Message) -> None:
        self.say(f"(to {req.user}) {message.text}")

    def post(self, channel: str, message: Message, thread_ts: str | None = None,
             req: ChatRequest | None = None) -> str | None:
        ts = str(next(self._ts))
        lead = f"  \u21b3 (thread of {thread_ts}) " if thread_ts else f"[{channel} #{ts}] "
        self.say(lead + message.text)
        for name, content in message.files:
            self._write(f"  \u21b3 file {name} ({len(content)} bytes):\n{content}")  # raw text, not markup
        return ts

    def update(self, channel: str, ts: str, message: Message) -> None:
        self.say(f"[{channel} #{ts} updated] {message.text}")

    def open_form(self, req: ChatRequest, view: dict[str, Any]) -> bool:
        return False


def visible(text: str) -> str:
    r"""`text` as a terminal can show it without acting on it: every character of _HIDDEN as its
    escape (`\x1b`, `\u202e`); line ends of `\r\n` as `\n`."""
    return _HIDDEN.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}",
                       text.replace("\r\n", "\n"))


class AlertScreen:
    """Audit alerts as the console shows them: each message whole (its blocks as plain text, the
    directory and command included), numbered, so that an update names the alert whose count it
    raises. The transport of an AlertPoster (bot.alerts: the queue, its order and pacing)."""

    def __init__(self, console: ConsoleTransport) -> None:
        self.console = console
        self._numbers = itertools.count(1)

    def post(self, channel: str, message: Message, thread_ts: str | None = None,
             req: ChatRequest | None = None) -> str | None:
        number = str(next(self._numbers))
        self.console.say(f"[audit alert #{number}] {_whole(message)}")
        return number

    def update(self, channel: str, ts: str, message: Message) -> None:
        self.console.say(f"[audit alert #{ts} updated] {_whole(message)}")

    def respond(self, req: ChatRequest, message: Message) -> None:
        self.console.respond(req, message)

    def open_form(self, req: ChatRequest, view: dict[str, Any]) -> bool:
        return False


def _whole(message: Message) -> str:
    """A message's blocks (sections and context lines) in order, else its text: OMBot's markup."""
    parts: list[str] = []
    for block in message.blocks or ():
        if block.get("type") == "section" and isinstance(block.get("text"), dict):
            parts.append(str(block["text"].get("text", "")))
        elif block.get("type") == "context":
            parts.extend(str(e.get("text", "")) for e in block.get("elements", ()) if isinstance(e, dict))
    return "\n".join(parts) if parts else message.text


def lead_note(leading: bool, holder: str | None) -> str:
    """One line on who pulls the audit feed: this console (`leading`), else the lease's `holder`
    (SURFACE:HOST:PID:RANDOM; older bots wrote HOST:PID:RANDOM)."""
    if leading:
        return ("audit: this console pulls the audit feed: alerts print here (a Slack bot that starts on "
                "this database takes it over)")
    if holder is None:
        return "audit: another process pulls the audit feed; this console takes it if it stops"
    parts = holder.split(":")
    surface, rest = (parts[0], parts[1:]) if parts[0] in ("slack", "console") else ("slack", parts)
    where = f"{rest[0]}, pid {rest[1]}" if len(rest) >= 2 else holder
    if surface == "console":
        return f"audit: alerts print in another console ({where} holds the feed); this console takes it if it stops"
    return f"audit: alerts go to Slack (the bot on {where} holds the feed); /om audit searches what it stored"


def run_console(service: BotService, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> None:
    """Read /om lines until /quit or end of input. In a terminal: line editing, history (in the
    state directory), Ctrl-C clears the line, output above the prompt (bot.terminal); from a pipe or
    file: plain lines, each command run to its end before the next is read. Only in a terminal does
    it pull the audit (`_watch_audit`): a script's console has nobody to show the alerts to."""
    if not is_terminal(stdin, out):
        _serve(service, out, lambda: _plain_line(stdin, out), lambda work: work(), audit=False)
        return
    with terminal(PROMPT, service.settings.state_dir / HISTORY_FILE) as (term, screen):
        _serve(service, screen, term.read, term.run, audit=True)


def _plain_line(stdin: TextIO, out: TextIO) -> str | None:
    """The next line from a pipe or file, after a prompt; None at end of input."""
    out.write(PROMPT)
    out.flush()
    return stdin.readline() or None


def _serve(service: BotService, out: TextIO, read: Callable[[], str | None],
           run: Callable[[Callable[[], None]], None], audit: bool) -> None:
    """The console's loop: `read` gives each line (None: leave), `run` runs each command; `audit`:
    pull the audit feed too, while no other process does."""
    transport = ConsoleTransport(out)
    service.start(transport)
    user = service.console_user
    transport.say(f"OMBot console: you are {user}. Type /om help; /as USER switches user; /quit leaves.")
    if audit:
        _watch_audit(service, transport)
    while True:
        line = read()
        if line is None or line.strip() in ("/quit", "/exit"):
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/as"):
            user = _switch_user(service, transport, user, text[3:].strip())
            continue
        if text.startswith("/om"):
            text = text[3:].strip()
        request = ChatRequest(user, CHANNEL, text, origin="console")
        run(lambda: service.dispatcher.command(request, transport))


def _watch_audit(service: BotService, transport: ConsoleTransport) -> None:
    """Pull the audit feed whenever no other process does, printing its alerts; who pulls is said
    once now, then at each change."""
    screen = AlertScreen(transport)
    service.start_console_audit(lambda redact: AlertPoster(screen, redact, service.timers, ALERT_RATE, ALERT_BURST),
                                CHANNEL, lambda leading, holder: transport.say(lead_note(leading, holder)))


def _switch_user(service: BotService, transport: ConsoleTransport, user: str, new: str) -> str:
    if not service.console_may_switch:
        transport.say("/as is disabled (set console_allow_as = true under [bot] to allow it).")
        return user
    if not new or " " in new:
        transport.say("usage: /as USER")
        return user
    transport.say(f"you are now {new}")
    return new
