"""Typed module parameters. Each converts a raw value (text from chat or the CLI, or JSON from a
form or an envelope) or raises ParamError naming the parameter and what was expected.

A parameter round-trips through `schema()` / `from_schema()`, so the bot validates with exactly the
rules the master will apply again on its side.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from ombot.errors import OmbotError

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def yes_or_no(text: str) -> bool | None:
    """The one reading of yes/no words (yes, true, on, 1 / no, false, off, 0); None for anything else."""
    word = text.strip().lower()
    return True if word in _TRUE else False if word in _FALSE else None


class ParamError(OmbotError):
    """A parameter value that does not validate: which parameter, and what was expected.

    `problems` holds every problem found in one request (one per parameter, see `combine`), so
    fixing one never reveals the next."""

    def __init__(self, param: str, expected: str, got: Any = ...) -> None:
        message = f"{param}: expected {expected}"
        if got is not ...:
            shown = got if not isinstance(got, str) or len(got) <= 60 else got[:57] + "..."
            message += f", got {shown!r}"
        super().__init__(message)
        self.param, self.expected = param, expected
        self.problems: tuple[ParamError, ...] = (self,)

    @staticmethod
    def combine(errors: Sequence[ParamError]) -> ParamError:
        """One error for several problems, one line each, in the order given; one problem stays as it is.

        `param` is the first problem's parameter, and `expected` carries on from it to the last line, so
        `ParamError(e.param, e.expected + note)`, the way callers add a usage line, keeps every problem."""
        problems = [problem for error in errors for problem in error.problems]
        if len(problems) == 1:
            return problems[0]
        first = problems[0]
        rest = "".join(f"\n{problem}" for problem in problems[1:])
        combined = ParamError(first.param, str(first).removeprefix(f"{first.param}: expected ") + rest)
        combined.problems = tuple(problems)
        return combined


@dataclass(frozen=True)
class Param:
    """Base of all parameter types. `kind` names the type in schemas and forms."""

    name: str
    help: str = ""
    required: bool = True
    default: Any = None
    kind: ClassVar[str] = ""
    registry: ClassVar[dict[str, type[Param]]] = {}

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.kind:
            Param.registry[cls.kind] = cls

    def convert(self, raw: Any) -> Any:
        raise NotImplementedError

    def check(self) -> None:
        """Raise ValueError if the declaration itself is unusable (the loader reports it)."""

    def fail(self, expected: str, got: Any = ...) -> ParamError:
        return ParamError(self.name, expected, got)

    def schema(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if v is not None}
        return {"kind": self.kind, **{k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}}

    @staticmethod
    def from_schema(data: dict[str, Any]) -> Param:
        kind = data.get("kind")
        cls = Param.registry.get(str(kind))
        if cls is None:
            raise ValueError(f"unknown parameter kind {kind!r}")
        settable = {f.name for f in fields(cls) if f.init}
        unknown = set(data) - {f.name for f in fields(cls)} - {"kind"}
        if unknown:
            raise ValueError(f"unknown schema keys for {kind}: {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in settable}
        param = cls(**values)
        param.check()
        return param

    def _text(self, raw: Any) -> str:
        if not isinstance(raw, str):
            raise self.fail("text", raw)
        return raw


@dataclass(frozen=True)
class String(Param):
    """One line of text. No control characters; no leading '-' unless allowed (an option lookalike)."""

    pattern: str | None = None
    min_len: int = 0
    max_len: int = 256
    allow_dash: bool = False
    kind: ClassVar[str] = "string"

    def check(self) -> None:
        if not 0 <= self.min_len <= self.max_len:
            raise ValueError(f"needs 0 <= min_len <= max_len, got {self.min_len} and {self.max_len}")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern {self.pattern!r} is not a valid regular expression: {exc}") from None

    def convert(self, raw: Any) -> str:
        text = self._text(raw)
        if _CONTROL.search(text):
            raise self.fail("one line of text without control characters", text)
        if not self.min_len <= len(text) <= self.max_len:
            raise self.fail(f"{self.min_len}-{self.max_len} characters", text)
        if text.startswith("-") and not self.allow_dash:
            raise self.fail("a value that does not start with '-'", text)
        if self.pattern and not re.fullmatch(self.pattern, text):
            raise self.fail(f"text matching {self.pattern}", text)
        return text


@dataclass(frozen=True)
class Int(Param):
    """An integer, optionally between `min` and `max` (inclusive)."""

    min: int | None = None
    max: int | None = None
    kind: ClassVar[str] = "int"

    def check(self) -> None:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")

    def convert(self, raw: Any) -> int:
        if isinstance(raw, bool):
            raise self.fail(self._expected(), raw)
        if isinstance(raw, str) and re.fullmatch(r"[+-]?\d{1,18}", raw.strip()):
            raw = int(raw)
        if not isinstance(raw, int) or not self._in_range(raw):
            raise self.fail(self._expected(), raw)
        return raw

    def _in_range(self, value: int) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def _expected(self) -> str:
        if self.min is not None and self.max is not None:
            return f"an integer from {self.min} to {self.max}"
        if self.min is not None:
            return f"an integer of at least {self.min}"
        if self.max is not None:
            return f"an integer of at most {self.max}"
        return "an integer"


@dataclass(frozen=True)
class Bool(Param):
    """True or false; as text: yes, true, on, 1 or no, false, off, 0 (any case)."""

    kind: ClassVar[str] = "bool"

    def convert(self, raw: Any) -> bool:
        if isinstance(raw, bool):
            return raw
        answer = yes_or_no(raw) if isinstance(raw, str) else None
        if answer is None:
            raise self.fail("true or false", raw)
        return answer


@dataclass(frozen=True)
class Choice(Param):
    """One of a fixed list (a select in forms)."""

    choices: tuple[str, ...] = ()
    kind: ClassVar[str] = "choice"

    def check(self) -> None:
        _check_choices(self.choices)

    def convert(self, raw: Any) -> str:
        text = self._text(raw)
        if text not in self.choices:
            raise self.fail(f"one of {', '.join(self.choices)}", text)
        return text


@dataclass(frozen=True)
class Radio(Choice):
    """One of a short fixed list (radio buttons in forms)."""

    kind: ClassVar[str] = "radio"


@dataclass(frozen=True)
class MultiChoice(Param):
    """Any of a fixed list (checkboxes in forms); text form is comma-separated."""

    choices: tuple[str, ...] = ()
    kind: ClassVar[str] = "multi"

    def check(self) -> None:
        _check_choices(self.choices)

    def convert(self, raw: Any) -> list[str]:
        items = [s.strip() for s in raw.split(",") if s.strip()] if isinstance(raw, str) else raw
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
            raise self.fail(f"a list of {', '.join(self.choices)}", raw)
        bad = [i for i in items if i not in self.choices]
        if bad:
            raise self.fail(f"items from {', '.join(self.choices)}", bad[0])
        return list(dict.fromkeys(items))


def _check_choices(choices: tuple[str, ...]) -> None:
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise ValueError("choices must be a non-empty list of non-empty strings")
    if len(set(choices)) != len(choices):
        raise ValueError("choices lists a value twice")


@dataclass(frozen=True)
class HostPattern(Param):
    """A target expression as `ombot run` takes it (names, groups, ranges, comma lists)."""

    kind: ClassVar[str] = "hosts"
    _ALLOWED: ClassVar[re.Pattern[str]] = re.compile(r"[A-Za-z0-9_.:\-\[\],*!&]+")

    def convert(self, raw: Any) -> str:
        text = self._text(raw).strip()
        if not self._ALLOWED.fullmatch(text) or text.startswith("-"):
            raise self.fail("host names, groups or ranges such as web[01-03]", text)
        return text


@dataclass(frozen=True)
class Path(Param):
    """An absolute path under one of the allow-listed roots. `..` is refused outright; symlinks are
    resolved where the file lives (the backend checks the real path on the host before use)."""

    roots: tuple[str, ...] = ()
    kind: ClassVar[str] = "path"

    def check(self) -> None:
        if not self.roots:
            raise ValueError("a Path needs at least one allow-listed root")
        for root in self.roots:
            if not isinstance(root, str) or not root.startswith("/") or posixpath.normpath(root) != root:
                raise ValueError(f"root {root!r} must be a normalized absolute path such as /var/log")

    def convert(self, raw: Any) -> str:
        text = self._text(raw)
        expected = f"an absolute path under {', '.join(self.roots)}"
        if _CONTROL.search(text) or not text.startswith("/") or ".." in text.split("/"):
            raise self.fail(expected, text)
        normal = posixpath.normpath(text)
        if not any(within(normal, root) for root in self.roots):
            raise self.fail(expected, text)
        return normal


def within(path: str, root: str) -> bool:
    root = posixpath.normpath(root)
    return path == root or path.startswith(root.rstrip("/") + "/")


@dataclass(frozen=True)
class Script(Param):
    """Script text: many lines, no NUL bytes."""

    max_len: int = 64 * 1024
    kind: ClassVar[str] = "script"

    def check(self) -> None:
        _check_positive("max_len", self.max_len)

    def convert(self, raw: Any) -> str:
        text = self._text(raw)
        if "\x00" in text or not 0 < len(text) <= self.max_len:
            raise self.fail(f"script text of 1-{self.max_len} characters without NUL bytes")
        return text


@dataclass(frozen=True)
class Args(Param):
    """Command arguments: text split like a shell would quote it (`a 'b c'` is two items), or a
    list of strings. Never run through a shell: each item becomes exactly one argv entry. Items may
    start with '-' (they are options to the module's own program); control characters are refused."""

    max_items: int = 64
    max_len: int = 4096
    kind: ClassVar[str] = "args"

    def check(self) -> None:
        _check_positive("max_items", self.max_items)
        _check_positive("max_len", self.max_len)

    def convert(self, raw: Any) -> list[str]:
        expected = "arguments with shell-style quoting"
        if isinstance(raw, str):
            if _CONTROL.search(raw):
                raise self.fail(f"{expected}, without control characters", raw)
            try:
                items = shlex.split(raw)
            except ValueError as exc:  # "No closing quotation", "No escaped character"
                raise self.fail(f"{expected} ({str(exc).lower()})", raw) from None
        elif isinstance(raw, (list, tuple)) and all(isinstance(i, str) for i in raw):
            items = list(raw)
        else:
            raise self.fail(f"{expected} as text, or a list of strings", raw)
        if len(items) > self.max_items or sum(len(i) for i in items) > self.max_len:
            raise self.fail(f"{expected}, at most {self.max_items} items and {self.max_len} characters", raw)
        bad = next((i for i in items if _CONTROL.search(i)), None)
        if bad is not None:
            raise self.fail(f"{expected}, without control characters", bad)
        return items


@dataclass(frozen=True)
class ShellCommand(Param):
    """A command line for `sh -c`. The one parameter exempt from the no-shell rule; only modules of
    risk 'high' may declare it, and the schema says so (`shell: true`)."""

    max_len: int = 4096
    shell: bool = field(default=True, init=False)
    kind: ClassVar[str] = "shell"

    def check(self) -> None:
        _check_positive("max_len", self.max_len)

    def convert(self, raw: Any) -> str:
        text = self._text(raw)
        if "\x00" in text or not 0 < len(text.strip()) <= self.max_len:
            raise self.fail(f"a command of 1-{self.max_len} characters")
        return text


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
