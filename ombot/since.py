"""`since=` as people type it: a time ago (`30m`, `2h`, `3d`, `1w`) or a UTC date or time, read into
the stored unit (UTC epoch milliseconds, ombot.clock). `/om jobs` and `/om audit` both take it."""

from __future__ import annotations

import re
from datetime import datetime, timezone

from ombot.clock import now_ms as clock_now_ms
from ombot.errors import CommandError

MS_PER_DAY = 86_400_000
SINCE_UNITS_MS = {"m": 60_000, "h": 3_600_000, "d": MS_PER_DAY, "w": 7 * MS_PER_DAY}
_SINCE_DURATION = re.compile(r"(\d{1,6})([mhdw])")


def parse_since(text: str, now_ms: int | None = None) -> int:
    """`30m`, `2h`, `3d`, `1w` ago, or an ISO date or time (UTC unless it names its offset) -> epoch ms."""
    now = clock_now_ms() if now_ms is None else now_ms
    duration = _SINCE_DURATION.fullmatch(text.lower())
    if duration:
        return now - int(duration.group(1)) * SINCE_UNITS_MS[duration.group(2)]
    try:
        when = datetime.fromisoformat(text) if text[:4].isdigit() else None
    except ValueError:
        when = None
    if when is None:
        raise CommandError(f"since is a time ago such as 30m, 2h, 3d or 1w, or a UTC date such as 2026-11-20 "
                           f"or 2026-11-20T08:00, got {text!r}")
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return int(when.timestamp() * 1000)
