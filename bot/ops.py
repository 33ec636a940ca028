"""The bot's ops listener (`[bot] ops_listen`, docs/monitoring.md): /metrics, /healthz, and /readyz
with three checks: the bot's database answers, a master of each IDC answers, Slack is connected.

The masters' check reads what the bot's own traffic says first (the audit feed reads every master
every second or so): only an IDC none of whose masters replied lately is asked, with `health`, on a
pooled connection if one is idle, one probe per IDC at a time."""

from __future__ import annotations

import threading

import ombot
from ombot.bot import store
from ombot.bot.metrics import BOT
from ombot.bot.settings import BotSettings
from ombot.masters import Router
from ombot.opsweb import Check, NotReady, OpsServer, database_check, start_ops

FRESH_SECONDS = 30.0  # a master that replied this recently, and has not failed since, is taken as answering


class MastersCheck:
    """Ready when a master of every IDC answers."""

    def __init__(self, router: Router, idcs: list[str]) -> None:
        self.router, self.idcs = router, idcs
        self._probing = {idc: threading.Lock() for idc in idcs}

    def __call__(self) -> str:
        down = [idc for idc in self.idcs if not self._answers(idc)]
        if down:
            raise NotReady(f"no master of {', '.join(down)} answers")
        return f"a master of each IDC answers ({', '.join(self.idcs)})"

    def _answers(self, idc: str) -> bool:
        if self.router.answering(idc, FRESH_SECONDS):
            return True
        probing = self._probing[idc]
        if not probing.acquire(blocking=False):  # the last probe of it still waits for an answer
            return False
        try:
            return self.router.probe(idc) is not None
        finally:
            probing.release()


def start_bot_ops(settings: BotSettings, router: Router, idcs: list[str], mode: str, slack: Check) -> OpsServer | None:
    """The listener of `ombot bot` (`mode`: socket or http), if `[bot] ops_listen` is set."""
    if settings.ops_listen is None:
        return None
    BOT.info({"mode": mode, "version": ombot.__version__})
    return start_ops(settings.ops_listen, "bot", {"database": database_check(store.db),
                                                 "masters": MastersCheck(router, idcs), "slack": slack})
