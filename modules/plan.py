"""What a module's `run` returns: a declarative plan that a backend carries out on each host.

Plans never hold shell strings built from parameters: commands are argv lists. The one
exception, `Shell`, is allowed only for modules that declare a `ShellCommand` parameter.
Dry runs and tests inspect a plan without executing it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TempPath:
    """A file in a private temporary directory the backend makes on each host and removes after."""

    name: str

    def __str__(self) -> str:
        return f"$TMP/{self.name}"


Arg = str | TempPath


@dataclass(frozen=True)
class Emit:
    """Report text without running anything on the host."""

    text: str


@dataclass(frozen=True)
class Ping:
    """Check the host answers, the backend's native way."""


@dataclass(frozen=True)
class Command:
    argv: tuple[Arg, ...]
    stdin: str | None = None

    def __init__(self, argv: list[Arg] | tuple[Arg, ...], stdin: str | None = None) -> None:
        if not argv or not all(isinstance(a, (str, TempPath)) for a in argv):
            raise TypeError("argv must be a non-empty list of strings")
        object.__setattr__(self, "argv", tuple(argv))
        object.__setattr__(self, "stdin", stdin)


@dataclass(frozen=True)
class Shell:
    """`sh -c cmd`, for modules that declare a ShellCommand parameter (shell.exec) and nothing else."""

    cmd: str


@dataclass(frozen=True)
class PutFile:
    """Write a file on the host: inline `content`, or `source`, a file in the master's file store."""

    dest: Arg
    content: str | None = None
    source: str | None = None
    mode: int = 0o644
    owner: str | None = None
    group: str | None = None


@dataclass(frozen=True)
class RequireWithin:
    """Refuse the host unless `path`, symlinks resolved on that host, lies under one of `roots`."""

    path: str
    roots: tuple[str, ...]


Step = Emit | Ping | Command | Shell | PutFile | RequireWithin


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]
    # Turns one host's collected stdout into structured data shown beside the text.
    parse: Callable[[str], dict[str, Any]] | None = field(default=None, compare=False)

    def __init__(self, *steps: Step, parse: Callable[[str], dict[str, Any]] | None = None) -> None:
        object.__setattr__(self, "steps", tuple(steps))
        object.__setattr__(self, "parse", parse)

    def describe(self) -> list[str]:
        """One human line per step, for dry runs."""
        return [_describe(step) for step in self.steps]


def _describe(step: Step) -> str:
    match step:
        case Emit(text):
            return f"emit {text!r}"
        case Ping():
            return "ping"
        case Command(argv, stdin):
            return "run " + " ".join(repr(str(a)) for a in argv) + (" (with stdin)" if stdin else "")
        case Shell(cmd):
            return f"sh -c {cmd!r}"
        case PutFile(dest, content, source, mode, owner, group):
            what = f"store:{source}" if source else f"{len(content or '')} chars"
            return f"put {what} -> {dest} mode {mode:o}" + (f" owner {owner}" if owner else "")
        case RequireWithin(path, roots):
            return f"require {path} within {', '.join(roots)}"
    raise TypeError(f"not a plan step: {step!r}")
