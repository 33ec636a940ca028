"""Scheduled runs: `/om schedule "CRON" run ...` or `every 15m`, kept in the bot's database.

The door of the schedules (the rest of the bot imports only what is named here). Inside, one
concern a file, each importing only those listed before it:

- `models`: the tables (`bot_schedule`, `bot_schedule_run`) and their migrations (`schedules`);
- `timing`: reading `every N[smhd]` and cron lines, and the fire times APScheduler's triggers compute;
- `words`: the `/om schedule` command's arguments;
- `render`: the listing's rows, a run's card label, the notices in chat;
- `clearance`: whether a schedule may still run as approved;
- `firing`: claiming a due run once (compare-and-set), catching up, starting it through the `Runner`;
- `service`: `Schedules`, the commands, the approval hooks, and the lease that picks the process that fires.
"""

from ombot.bot.schedules.firing import RUN_NAMESPACE
from ombot.bot.schedules.models import ACTIVE, Schedule, ScheduleRun, prepare
from ombot.bot.schedules.render import schedule_label, schedule_rows
from ombot.bot.schedules.service import Schedules
from ombot.bot.schedules.timing import fire_times, parse_timing
from ombot.bot.schedules.words import SCHEDULE_USAGE, schedule_words

__all__ = ["ACTIVE", "RUN_NAMESPACE", "SCHEDULE_USAGE", "Schedule", "ScheduleRun", "Schedules", "fire_times",
           "parse_timing", "prepare", "schedule_label", "schedule_rows", "schedule_words"]
