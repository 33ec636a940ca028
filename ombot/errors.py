"""The one family of user-facing errors. Anything else is a bug and is reported as one."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class OmbotError(Exception):
    """An error whose message is meant for the person who caused it."""


class CommandError(OmbotError):
    """Text that is not a valid /om command (or a value in one, such as a `since=` time); the message
    says what is wrong and how to write it. In the base: the time parser (ombot.since) raises it too."""


class ConfigError(OmbotError):
    """A setting that cannot be used: names the file, the key path and what was expected."""

    def __init__(self, path: Path, key: str, expected: str, got: Any = ...) -> None:
        where = f"{path}: {key}" if key else str(path)
        message = f"{where}: expected {expected}"
        if got is not ...:
            message += f", got {got!r}"
        super().__init__(message)
        self.path, self.key, self.expected = path, key, expected
