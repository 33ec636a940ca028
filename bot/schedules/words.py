"""The `/om schedule` command's words: what to do, and for a new schedule its timing and its run."""

from __future__ import annotations

from typing import Any

from ombot.bot import grammar
from ombot.bot.commands import CommandError

SCHEDULE_USAGE = ('"CRON" run MODULE TARGETS [key=value ...] [idc=X]  |  every N[smhd] run MODULE TARGETS ...'
                  '  |  pause|resume|delete ID')


def schedule_words(words: list[str]) -> dict[str, Any]:
    """`schedule`'s arguments: `pause|resume|delete ID`, or TIMING `run` MODULE TARGETS key=value ..."""
    usage = f"usage: /om schedule {SCHEDULE_USAGE}"
    if not words:
        raise CommandError(usage)
    head = words[0].lower()
    if head in ("pause", "resume", "delete"):
        if len(words) != 2:
            raise CommandError(f"schedule {head} takes one schedule number.\n{usage}")
        return {"action": head, "ref": words[1], "timing": None, "run": None}
    lowered = [w.lower() for w in words]
    if "run" not in lowered:
        raise CommandError(f"a schedule says what to run: TIMING run MODULE TARGETS ...\n{usage}")
    split = lowered.index("run")
    timing, rest = " ".join(words[:split]), words[split + 1:]
    if not timing:
        raise CommandError(f"a schedule starts with its timing, a quoted cron line or `every N[smhd]`.\n{usage}")
    if not rest:
        raise CommandError(f"run needs a module name.\n{usage}")
    return {"action": "create", "ref": None, "timing": timing, "run": grammar.run_of(rest[0], rest[1:])}
