"""Glob matching, the one way: case-sensitive shell globs (`web*`, `shell.*`) as in ombot.toml and the policy."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable


def matches_any(name: str, globs: Iterable[str]) -> bool:
    """Whether `name` matches at least one glob; case matters (`Web01` is not `web*`)."""
    return any(fnmatch.fnmatchcase(name, glob) for glob in globs)
