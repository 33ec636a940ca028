"""When a schedule fires: reading `every N[smhd]` or a cron line, and the fire times that follow.

No hand-rolled cron: APScheduler's CronTrigger and IntervalTrigger compute every fire time, here and in
the service that arms them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from ombot.bot.commands import CommandError
from ombot.bot.schedules.models import Schedule
from ombot.clock import MS_PER_SECOND, now_ms

MAX_COUNTED = 100_000  # missed firings counted one by one up to here (every 1s for a day)
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Timing:
    """When a schedule fires: `every N[smhd]`, or a five-field cron line in UTC."""

    text: str
    interval: int | None  # seconds, for `every`

    def trigger(self, anchor_ms: int) -> BaseTrigger:
        """APScheduler's trigger for it; an interval counts from `anchor_ms`."""
        if self.interval is not None:
            return IntervalTrigger(seconds=self.interval, start_date=_utc(anchor_ms), timezone=timezone.utc)
        return CronTrigger.from_crontab(self.text, timezone=timezone.utc)


def parse_timing(text: str, min_interval: int = 1) -> Timing:
    """`every 15m` or `*/5 * * * *`, or CommandError saying how to write it."""
    words = text.split()
    if words and words[0].lower() == "every":
        amount = words[1] if len(words) == 2 else ""
        count, unit = amount[:-1], amount[-1:].lower()
        if not (count.isascii() and count.isdigit() and unit in UNITS and len(count) <= 6):
            raise CommandError(f"cannot read {text!r}: write `every N` with s, m, h or d, e.g. `every 15m`")
        seconds = int(count) * UNITS[unit]
        if seconds < min_interval:
            raise CommandError(f"`{text}` is too often: the shortest interval is {min_interval} s")
        return Timing(f"every {count}{unit}", seconds)
    if len(words) != 5:
        raise CommandError(f"cannot read {text!r}: a cron line has five fields (minute hour day month weekday, "
                           f"UTC), e.g. \"0 3 * * *\"; or write `every 15m`")
    try:
        CronTrigger.from_crontab(" ".join(words), timezone=timezone.utc)
    except ValueError as exc:
        raise CommandError(f"cannot read the cron line {text!r}: {exc}") from None
    return Timing(" ".join(words), None)


def fire_times(trigger: BaseTrigger, after_ms: int, until_ms: int) -> tuple[list[int], int]:
    """The fire times in (after, until], and how many there are: the list stops at MAX_COUNTED."""
    times: list[int] = []
    previous = _utc(after_ms)
    while len(times) < MAX_COUNTED:
        upcoming = trigger.get_next_fire_time(previous, previous)
        if upcoming is None or _ms(upcoming) > until_ms:
            break
        times.append(_ms(upcoming))
        previous = upcoming
    return times, len(times)


def next_fire(schedule: Schedule) -> int | None:
    """The schedule's next fire time after the latest one handled, and not in the past (None: never)."""
    upcoming = timing_of(schedule).trigger(schedule.anchor_at).get_next_fire_time(
        _utc(schedule.last_fire_at), _utc(max(schedule.last_fire_at, now_ms())))
    return None if upcoming is None else _ms(upcoming)


def timing_of(schedule: Schedule) -> Timing:
    """The stored timing, read again (it was checked when the schedule was made)."""
    return parse_timing(schedule.timing)


def _utc(epoch_ms: int) -> datetime:
    return datetime.fromtimestamp(epoch_ms / MS_PER_SECOND, tz=timezone.utc)


def _ms(when: datetime) -> int:
    return round(when.timestamp() * MS_PER_SECOND)
