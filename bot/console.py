"""Console mode: the /om grammar in a terminal, through the same dispatcher as Slack.

Cards are printed as text when posted and again when updated; `/as USER` switches the acting
user when the config allows it (the demo config does, so approval flows can be tried alone).
"""

from __future__ import annotations

import itertools
import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

from ombot.bot.service import BotService
from ombot.bot.terminal import HISTORY_FILE, is_terminal, terminal
from ombot.bot.transport import ChatRequest
from ombot.message import Message, plain

CHANNEL = "console"
PROMPT = "om> "


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
            self.out.write(text.rstrip("\n") + "\n")
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


def run_console(service: BotService, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> None:
    """Read /om lines until /quit or end of input. In a terminal: line editing, history (in the
    state directory), Ctrl-C clears the line, output above the prompt (bot.terminal); from a pipe or
    file: plain lines, each command run to its end before the next is read."""
    if not is_terminal(stdin, out):
        _serve(service, out, lambda: _plain_line(stdin, out), lambda work: work())
        return
    with terminal(PROMPT, service.settings.state_dir / HISTORY_FILE) as (term, screen):
        _serve(service, screen, term.read, term.run)


def _plain_line(stdin: TextIO, out: TextIO) -> str | None:
    """The next line from a pipe or file, after a prompt; None at end of input."""
    out.write(PROMPT)
    out.flush()
    return stdin.readline() or None


def _serve(service: BotService, out: TextIO, read: Callable[[], str | None],
           run: Callable[[Callable[[], None]], None]) -> None:
    """The console's loop: `read` gives each line (None: leave), `run` runs each command."""
    transport = ConsoleTransport(out)
    service.start(transport)
    user = service.console_user
    transport.say(f"OMBot console: you are {user}. Type /om help; /as USER switches user; /quit leaves.")
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


def _switch_user(service: BotService, transport: ConsoleTransport, user: str, new: str) -> str:
    if not service.console_may_switch:
        transport.say("/as is disabled (set console_allow_as = true under [bot] to allow it).")
        return user
    if not new or " " in new:
        transport.say("usage: /as USER")
        return user
    transport.say(f"you are now {new}")
    return new
