"""The /om grammar: normalise what chat clients send, then parse it into an invocation of one of
the declared chat commands (bot.commands), or of a module in the short form `/om MODULE TARGETS ...`.
"""

from __future__ import annotations

import html
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

from ombot.bot.commands import ChatCommand, CommandError, Prose, declared
from ombot.modules import RESERVED_PARAMS, yes_or_no

# Phone and desktop clients "smarten" what people type; commands need the plain characters.
_PUNCTUATION = str.maketrans({
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u00ab": '"', "\u00bb": '"',
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'",
    "\u2013": "-", "\u2014": "--", "\u2212": "-", "\u00a0": " ", "\u2009": " ", "\u202f": " ",
})
_SLACK_LINK = re.compile(r"<(?:mailto:|https?://)?[^|>]*\|([^>]*)>")
_SLACK_BARE_LINK = re.compile(r"<((?:https?://|mailto:)[^>|]*)>")


def normalise(text: str) -> str:
    """Undo what Slack and chat clients do to typed text: entities, links, smart punctuation.

    The result is what the person typed, in plain text (`&lt;!channel&gt;` is `<!channel>` again):
    whatever echoes it back to chat escapes it again (ombot.message: `escape`, `error_message`)."""
    text = _SLACK_LINK.sub(r"\1", text)  # <http://web01|web01> -> web01 (auto-linked host names)
    text = _SLACK_BARE_LINK.sub(r"\1", text)
    text = html.unescape(text) if "&" in text else text  # Slack sends & < > as &amp; &lt; &gt;
    return text.translate(_PUNCTUATION).strip()


@dataclass(frozen=True)
class Run:
    """A module invocation as typed: `/om run MODULE TARGETS key=value ...` or its short form."""

    module: str
    targets: str | None
    params: dict[str, str] = field(default_factory=dict)
    idc: str | None = None
    dry_run: bool = False
    timeout: int | None = None
    check: bool = False  # check=yes: a real job that reports what would change and changes nothing


@dataclass(frozen=True)
class Invocation:
    """A parsed command: which declared command, and the keyword arguments for its handler."""

    command: ChatCommand
    arguments: dict[str, Any] = field(default_factory=dict)

    @property
    def word(self) -> str:
        return self.command.word


RUN_USAGE = "MODULE TARGETS [key=value ...] [idc=X|X,Y|*] [dry_run=yes] [timeout=SECONDS] [check=yes]"


def parse(text: str) -> Invocation:
    """Text after `/om` -> the declared command it invokes, or CommandError saying what is wrong."""
    text = normalise(text)
    commands = declared()
    head = text.split(None, 1)[0].lower() if text else ""
    command = commands.get(head)
    if command is not None and command.takes_prose:  # the prose is taken as typed, not shell-split
        leading = sum(1 for a in command.arguments if not isinstance(a, Prose))
        return Invocation(command, command.parse(text.split(None, leading + 1)[1:]))
    words = _split(text)
    if not words:
        return Invocation(commands["help"], commands["help"].parse([]))
    head = words[0].lower()  # the word as the shell reads it: `"jobs"` is `jobs`
    command = commands.get(head)
    if command is None:  # the short form: /om MODULE TARGETS ...
        return Invocation(commands["run"], {"run": run_of(words[0], words[1:])})
    if command.handler is None:
        raise CommandError(f"{head!r} is not available yet.")
    return Invocation(command, command.parse(words[1:]))


def run_words(words: list[str]) -> dict[str, Any]:
    """`run`'s arguments: MODULE, then TARGETS and key=value pairs."""
    if not words:
        raise CommandError(f"run needs a module name.\nusage: /om run {RUN_USAGE}")
    return {"run": run_of(words[0], words[1:])}


def _split(text: str) -> list[str]:
    try:
        return shlex.split(text, posix=True)
    except ValueError as exc:  # unbalanced quotes
        raise CommandError(f"cannot read the command: {exc} (close every quote you open)") from None


def run_of(module: str, args: list[str]) -> Run:
    """MODULE and the words after it: TARGETS (one word) and key=value parameters."""
    targets: str | None = None
    params: dict[str, str] = {}
    reserved: dict[str, str] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            if targets is not None:
                raise CommandError(f"unexpected {arg!r}: parameters are key=value.\nusage: /om run {RUN_USAGE}")
            targets = arg
            continue
        if not key:
            raise CommandError(f"{arg!r} has no parameter name before '='")
        bucket = reserved if key in RESERVED_PARAMS else params
        if key in bucket:
            raise CommandError(f"parameter {key!r} is given twice")
        bucket[key] = value
    return Run(module=module, targets=targets, params=params, idc=reserved.get("idc") or None,
               dry_run=_flag("dry_run", reserved.get("dry_run")), timeout=_seconds(reserved.get("timeout")),
               check=_flag("check", reserved.get("check")))


def _flag(name: str, value: str | None) -> bool:
    if value is None:
        return False
    answer = yes_or_no(value)
    if answer is None:
        raise CommandError(f"{name} is yes or no, got {value!r}")
    return answer


def _seconds(value: str | None) -> int | None:
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()) or len(value) > 5 or not 1 <= int(value) <= 86_400:
        raise CommandError(f"timeout is a number of seconds from 1 to 86400, got {value!r}")
    return int(value)
