"""Console mode: the /om grammar in a terminal, through the same dispatcher as Slack.

Cards are printed as text when posted and again when updated; `/as USER` switches the acting
user when the config allows it (the demo config does, so approval flows can be tried alone).
"""

from __future__ import annotations

import html
import itertools
import re
import sys
import threading
from typing import Any, TextIO

from bot.messages import Message
from bot.service import BotService
from bot.transport import ChatRequest

CHANNEL = "console"
_DATE = re.compile(r"<!date\^\d+\^[^|>]*\|([^>]*)>")
_MENTION = re.compile(r"<@([^>|]+)>")
PROMPT = "om> "


class ConsoleTransport:
    """The console's side of the Transport: every message printed as plain text."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out
        self._lock = threading.Lock()
        self._ts = itertools.count(1)

    def say(self, text: str) -> None:
        with self._lock:
            self.out.write(plain(text).rstrip("\n") + "\n")
            self.out.flush()

    def respond(self, req: ChatRequest, message: Message) -> None:
        self.say(f"(to {req.user}) {message.text}")

    def post(self, channel: str, message: Message, thread_ts: str | None = None,
             req: ChatRequest | None = None) -> str | None:
        ts = str(next(self._ts))
        lead = f"  \u21b3 (thread of {thread_ts}) " if thread_ts else f"[{channel} #{ts}] "
        self.say(lead + message.text)
        for name, content in message.files:
            self.say(f"  \u21b3 file {name} ({len(content)} bytes):\n{content}")
        return ts

    def update(self, channel: str, ts: str, message: Message) -> None:
        self.say(f"[{channel} #{ts} updated] {message.text}")

    def open_form(self, req: ChatRequest, view: dict[str, Any]) -> bool:
        return False


def plain(text: str) -> str:
    """Slack's markup as a terminal shows it: dates in UTC, mentions as @user."""
    return html.unescape(_MENTION.sub(r"@\1", _DATE.sub(r"\1", text)))


def run_console(service: BotService, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> None:
    transport = ConsoleTransport(out)
    service.start(transport)
    user = service.console_user
    transport.say(f"OMBot console: you are {user}. Type /om help; /as USER switches user; /quit leaves.")
    while True:
        out.write(PROMPT)
        out.flush()
        line = stdin.readline()
        if not line or line.strip() in ("/quit", "/exit"):
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/as"):
            user = _switch_user(service, transport, user, text[3:].strip())
            continue
        if text.startswith("/om"):
            text = text[3:].strip()
        service.dispatcher.command(ChatRequest(user, CHANNEL, text, origin="console"), transport)


def _switch_user(service: BotService, transport: ConsoleTransport, user: str, new: str) -> str:
    if not service.console_may_switch:
        transport.say("/as is disabled (set console_allow_as = true under [bot] to allow it).")
        return user
    if not new or " " in new:
        transport.say("usage: /as USER")
        return user
    transport.say(f"you are now {new}")
    return new
