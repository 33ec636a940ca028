"""Chat commands, each declared once: `@chat_command(word, arguments, summary)` on its handler.

The declaration is all there is: help lists its usage, the grammar parses its arguments from it,
and the dispatcher calls its handler — the way errbot declares a command with one decorator and
this project declares a task module. A handler is a method of the dispatcher taking
`(req, transport, **arguments)`.

Argument kinds:
- `Word("job")`: one word (quotes allowed); `Word("module", optional=True)` may be left out.
- `Prose("reason")`: the rest of the text as typed (apostrophes are prose, not shell quotes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ombot.modules import RESERVED_COMMANDS
from ombot.errors import CommandError

ANYONE = "anyone"  # listings and lookups; deciding steps (approve, cancel) check the person themselves
REQUESTERS = "requesters"  # only people the access policy lets request jobs: checked before any work


@dataclass(frozen=True)
class Word:
    """One word (quotes allowed), or nothing when optional."""

    name: str
    optional: bool = False

    def usage(self) -> str:
        return f"[{self.name}]" if self.optional else self.name.upper()


@dataclass(frozen=True)
class Prose:
    """The rest of the text as typed, such as a denial's reason."""

    name: str

    def usage(self) -> str:
        return self.name.upper()


Argument = Word | Prose


@dataclass(frozen=True)
class ChatCommand:
    """One /om command: its word, its arguments, who may use it, and the handler that does it."""

    word: str
    arguments: tuple[Argument, ...]
    summary: str
    handler: Callable[..., None] | None  # None: reserved for a command still to come
    access: str = ANYONE
    usage_text: str = ""  # when the arguments are free-form (run)
    parse_words: Callable[[list[str]], dict[str, Any]] | None = None  # a free-form argument parser

    @property
    def usage(self) -> str:
        shown = self.usage_text or " ".join(a.usage() for a in self.arguments)
        return f"/om {self.word} {shown}".rstrip()

    @property
    def takes_prose(self) -> bool:
        return any(isinstance(a, Prose) for a in self.arguments)

    def parse(self, words: list[str]) -> dict[str, Any]:
        """The handler's keyword arguments from the words after the command word."""
        if self.parse_words is not None:
            return self.parse_words(words)
        values: dict[str, Any] = {}
        rest = list(words)
        for argument in self.arguments:
            match argument:
                case Word(name, optional):
                    if not rest and not optional:
                        raise CommandError(f"usage: {self.usage}")
                    values[name] = rest.pop(0) if rest else None
                case Prose(name):
                    if not rest:
                        raise CommandError(f"{self.word} needs a {name}.\nusage: {self.usage}")
                    values[name], rest = rest[0], []
        if rest:
            raise CommandError(f"too many words for {self.word}.\nusage: {self.usage}")
        return values


_declared: dict[str, ChatCommand] = {}


def chat_command(word: str, *arguments: Argument, summary: str, access: str = ANYONE, usage: str = "",
                 parse: Callable[[list[str]], dict[str, Any]] | None = None) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Declare the decorated method as the handler of `/om WORD ...`."""
    def declare(handler: Callable[..., None]) -> Callable[..., None]:
        _declare(ChatCommand(word, arguments, summary, handler, access, usage, parse))
        return handler

    return declare


def reserve(word: str, summary: str) -> None:
    """A command word taken for a command still to come: it answers that it is not available yet."""
    _declare(ChatCommand(word, (), summary, None))


def _declare(command: ChatCommand) -> None:
    if command.word in _declared:
        raise ValueError(f"chat command {command.word!r} is declared twice")
    if command.word not in RESERVED_COMMANDS:  # the master refuses site modules named like a command
        raise ValueError(f"chat command {command.word!r} is missing from modules.RESERVED_COMMANDS")
    _declared[command.word] = command


def declared() -> dict[str, ChatCommand]:
    """Every declared command, by word (the bot package's door imports the handlers first)."""
    return dict(_declared)


def available() -> list[ChatCommand]:
    return [c for c in _declared.values() if c.handler is not None]
