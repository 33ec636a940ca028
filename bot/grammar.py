"""The /om grammar: normalise what chat clients send, then parse it into one command object.

    /om help [module]            /om modules [category]
    /om run MODULE TARGETS [key=value ...] [idc=X] [dry_run=yes] [timeout=N]
    /om MODULE TARGETS ...       (short form of run)
    /om form MODULE              /om jobs [mine]     /om status JOB    /om cancel JOB
    /om masters                  /om approvals       /om approve ID    /om deny ID reason...
"""

from __future__ import annotations

import html
import re
import shlex
from dataclasses import dataclass, field

from modules import RESERVED_COMMANDS, RESERVED_PARAMS
from ombot.errors import OmbotError

# Phone and desktop clients "smarten" what people type; commands need the plain characters.
_PUNCTUATION = str.maketrans({
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u00ab": '"', "\u00bb": '"',
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'",
    "\u2013": "-", "\u2014": "--", "\u2212": "-", "\u00a0": " ", "\u2009": " ", "\u202f": " ",
})
_SLACK_LINK = re.compile(r"<(?:mailto:|https?://)?[^|>]*\|([^>]*)>")
_SLACK_BARE_LINK = re.compile(r"<((?:https?://|mailto:)[^>|]*)>")


class CommandError(OmbotError):
    """Text that is not a valid /om command; the message says what is wrong and how to write it."""


def normalise(text: str) -> str:
    """Undo what Slack and chat clients do to typed text: entities, links, smart punctuation."""
    text = _SLACK_LINK.sub(r"\1", text)  # <http://web01|web01> -> web01 (auto-linked host names)
    text = _SLACK_BARE_LINK.sub(r"\1", text)
    text = html.unescape(text) if "&" in text else text  # Slack sends & < > as &amp; &lt; &gt;
    return text.translate(_PUNCTUATION).strip()


@dataclass(frozen=True)
class Help:
    module: str | None = None


@dataclass(frozen=True)
class Modules:
    category: str | None = None


@dataclass(frozen=True)
class Run:
    module: str
    targets: str | None
    params: dict[str, str] = field(default_factory=dict)
    idc: str | None = None
    dry_run: bool = False
    timeout: int | None = None


@dataclass(frozen=True)
class Form:
    module: str


@dataclass(frozen=True)
class Jobs:
    mine: bool = False


@dataclass(frozen=True)
class Status:
    job: str


@dataclass(frozen=True)
class Cancel:
    job: str


@dataclass(frozen=True)
class Masters:
    pass


@dataclass(frozen=True)
class Approvals:
    pass


@dataclass(frozen=True)
class Approve:
    request: str


@dataclass(frozen=True)
class Deny:
    request: str
    reason: str


Command = Help | Modules | Run | Form | Jobs | Status | Cancel | Masters | Approvals | Approve | Deny

USAGE = {
    "help": "/om help [module]",
    "modules": "/om modules [category]",
    "run": "/om run MODULE TARGETS [key=value ...] [idc=X] [dry_run=yes] [timeout=SECONDS]",
    "form": "/om form MODULE",
    "jobs": "/om jobs [mine]",
    "status": "/om status JOB",
    "cancel": "/om cancel JOB",
    "masters": "/om masters",
    "approvals": "/om approvals",
    "approve": "/om approve REQUEST",
    "deny": "/om deny REQUEST REASON",
}


def parse(text: str) -> Command:
    text = normalise(text)
    if text.split(None, 1)[:1] and text.split(None, 1)[0].lower() == "deny":
        return _deny_raw(text)  # a reason is prose: apostrophes and quotes are not shell syntax
    words = _split(text)
    if not words:
        return Help()
    head, rest = words[0].lower(), words[1:]
    if head in _PARSERS:
        return _PARSERS[head](rest)
    if head == "run":
        if not rest:
            raise CommandError(f"run needs a module name.\nusage: {USAGE['run']}")
        return _run(rest[0], rest[1:])
    if head in RESERVED_COMMANDS:
        raise CommandError(f"{head!r} is not available yet.")
    return _run(head, rest)


def _split(text: str) -> list[str]:
    try:
        return shlex.split(text, posix=True)
    except ValueError as exc:  # unbalanced quotes
        raise CommandError(f"cannot read the command: {exc} (close every quote you open)") from None


def _run(module: str, args: list[str]) -> Run:
    targets: str | None = None
    params: dict[str, str] = {}
    reserved: dict[str, str] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            if targets is not None:
                raise CommandError(f"unexpected {arg!r}: parameters are key=value.\nusage: {USAGE['run']}")
            targets = arg
            continue
        if not key:
            raise CommandError(f"{arg!r} has no parameter name before '='")
        bucket = reserved if key in RESERVED_PARAMS else params
        if key in bucket:
            raise CommandError(f"parameter {key!r} is given twice")
        bucket[key] = value
    return Run(module=module, targets=targets, params=params, idc=reserved.get("idc") or None,
               dry_run=_flag("dry_run", reserved.get("dry_run")), timeout=_seconds(reserved.get("timeout")))


def _flag(name: str, value: str | None) -> bool:
    if value is None:
        return False
    lowered = value.lower()
    if lowered in ("yes", "true", "1", "on", ""):
        return True
    if lowered in ("no", "false", "0", "off"):
        return False
    raise CommandError(f"{name} is yes or no, got {value!r}")


def _seconds(value: str | None) -> int | None:
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()) or len(value) > 5 or not 1 <= int(value) <= 86_400:
        raise CommandError(f"timeout is a number of seconds from 1 to 86400, got {value!r}")
    return int(value)


def _at_most(name: str, args: list[str], n: int) -> None:
    if len(args) > n:
        raise CommandError(f"too many words for {name}.\nusage: {USAGE[name]}")


def _exactly_one(name: str, args: list[str]) -> str:
    if len(args) != 1:
        raise CommandError(f"usage: {USAGE[name]}")
    return args[0]


def _help(args: list[str]) -> Command:
    _at_most("help", args, 1)
    return Help(args[0] if args else None)


def _modules(args: list[str]) -> Command:
    _at_most("modules", args, 1)
    return Modules(args[0] if args else None)


def _jobs(args: list[str]) -> Command:
    _at_most("jobs", args, 1)
    if args and args[0].lower() != "mine":
        raise CommandError(f"usage: {USAGE['jobs']}")
    return Jobs(mine=bool(args))


def _deny_raw(text: str) -> Command:
    parts = text.split(None, 2)
    if len(parts) < 3:
        raise CommandError(f"deny needs a reason.\nusage: {USAGE['deny']}")
    return Deny(parts[1], parts[2])


def _no_args(command: Command, name: str):  # type: ignore[no-untyped-def]
    def parse_(args: list[str]) -> Command:
        _at_most(name, args, 0)
        return command

    return parse_


_PARSERS = {
    "help": _help,
    "modules": _modules,
    "form": lambda args: Form(_exactly_one("form", args)),
    "jobs": _jobs,
    "status": lambda args: Status(_exactly_one("status", args)),
    "cancel": lambda args: Cancel(_exactly_one("cancel", args)),
    "masters": _no_args(Masters(), "masters"),
    "approvals": _no_args(Approvals(), "approvals"),
    "approve": lambda args: Approve(_exactly_one("approve", args)),
}
