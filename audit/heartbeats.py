"""The feed's watch on agents and IDCs: silent agents, agents reporting a problem, unreachable IDCs.

audit.feed hands it each master's heartbeat rows and whether an IDC's masters answered; it says what
changed through the feed's `notify` (the alert channel and the SIEM export), once per change. It
judges only servers of an IDC with a master answering: an unreachable IDC is not a thousand silent
agents, but one alert of its own (see audit.feed's docstring).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ombot.audit.notices import (back_message, degraded_message, reachable_message, recovered_message, silent_message,
                                 unreachable_message)
from ombot.clock import now_ms
from ombot.message import Message

log = logging.getLogger("ombot.bot.audit")  # the feed's logger: operators' filters keep working

UNREACHABLE_AFTER_SECONDS = 60.0  # no master of an IDC answered this long (or silent_after, if less): said

# (message, severity, (what happened, the IDC, the host)): the feed's `_notify`
Notify = Callable[[Message, str, tuple[str, str, str | None]], None]


@dataclass
class _Outage:
    """An IDC none of whose masters answers: since when, and whether the channel was told."""

    since: float  # monotonic
    since_ms: int
    said: bool = False


class Heartbeats:
    """What the feed knows of agents' heartbeats and IDCs' outages, and the alerts on their changes."""

    def __init__(self, silent_after_ms: int, notify: Notify) -> None:
        self.silent_after_ms = silent_after_ms
        self._notify = notify
        self._seen: dict[str, tuple[str, int]] = {}  # host -> (idc, newest heartbeat by this bot's clock)
        self._silent: set[str] = set()
        self._problems: dict[str, str] = {}  # host -> the problem its agent reports, once alerted
        self._down: dict[str, _Outage] = {}  # idc -> since when none of its masters answers

    def clear(self) -> None:
        """Forget it all: another process holds the feed, and its view replaces ours."""
        self._seen.clear()
        self._silent.clear()
        self._problems.clear()
        self._down.clear()

    def rows(self, idc: str, reply: dict[str, Any]) -> None:
        """A master's read: the heartbeat rows changed since the last one, aged by its clock (`now`)."""
        master_now, here = int(reply["now"]), now_ms()
        for row in reply["agents"]:
            seen = here - max(0, master_now - int(row["last_seen"]))  # the master's age of it, on our clock
            known = self._seen.get(row["host"])
            if known is None or seen > known[1]:
                self._seen[row["host"]] = (idc, seen)
                self._judge_problem(row["host"], idc, row.get("problem"))

    def _judge_problem(self, host: str, idc: str, problem: Any) -> None:
        """An agent that says something is wrong with it: one alert, and one when it no longer does."""
        problem = problem if isinstance(problem, str) and problem else None
        if problem is not None and host not in self._problems:
            self._problems[host] = problem
            log.warning("audit agent on %s (%s) reports a problem: %s", host, idc, problem)
            self._notify(degraded_message(host, idc, problem), "warning", ("agent-degraded", idc, host))
        elif problem is None and host in self._problems:
            del self._problems[host]
            log.info("audit agent on %s (%s) reports no problem now", host, idc)
            self._notify(recovered_message(host, idc), "info", ("agent-recovered", idc, host))

    def judge(self, idc: str) -> None:
        """After a master of the IDC answered: its servers silent too long, or back."""
        here = now_ms()
        for host, (host_idc, seen) in self._seen.items():
            if host_idc != idc:
                continue
            silent = here - seen > self.silent_after_ms
            if silent and host not in self._silent:
                self._silent.add(host)
                log.warning("audit agent on %s (%s) silent since %s", host, idc, time.strftime(
                    "%Y-%m-%d %H:%M:%S UTC", time.gmtime(seen / 1000)))
                self._notify(silent_message(host, idc, seen), "warning", ("agent-silent", idc, host))
            elif not silent and host in self._silent:
                self._silent.discard(host)
                log.info("audit agent on %s (%s) is back", host, idc)
                self._notify(back_message(host, idc, seen), "info", ("agent-back", idc, host))

    def reachable(self, idc: str, answered: bool) -> None:
        """Say once when no master of an IDC has answered for UNREACHABLE_AFTER_SECONDS, and when one does again."""
        down = self._down.get(idc)
        if answered:
            if down is not None and self._down.pop(idc).said:
                log.info("audit feed: a master of %s answers again", idc)
                self._notify(reachable_message(idc, time.monotonic() - down.since), "info",
                             ("idc-reachable", idc, None))
            return
        if down is None:
            self._down[idc] = _Outage(time.monotonic(), now_ms())
        elif not down.said and time.monotonic() - down.since >= min(UNREACHABLE_AFTER_SECONDS,
                                                                     self.silent_after_ms / 1000):
            down.said = True
            log.warning("audit feed: no master of %s has answered for %.0f s", idc, time.monotonic() - down.since)
            self._notify(unreachable_message(idc, down.since_ms), "warning", ("idc-unreachable", idc, None))
