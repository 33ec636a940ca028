"""Wiring: one BotService per process holds the router, the stores, the pools and the dispatcher."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from bot import store
from bot.dispatcher import CatalogCache, Dispatcher
from bot.jobs import JobFollower
from bot.settings import BotSettings
from bot.transport import Transport
from masters import Identity, Router
from ombot.config import Config

log = logging.getLogger("ombot.bot")


class BotService:
    def __init__(self, config: Config, origin: str) -> None:
        self.config, self.origin = config, origin
        self.settings = BotSettings.from_config(config)
        client = config.require_client()
        store.open_store(self.settings.database_url)
        self.router = Router(config, Identity.load(client.key_file), requester="bot", origin=origin)
        # Commands and job-following use separate pools: long-polls must never starve commands.
        self.commands = ThreadPoolExecutor(self.settings.workers, thread_name_prefix="om-cmd")
        self.following = ThreadPoolExecutor(self.settings.workers * 4, thread_name_prefix="om-follow")
        self.catalogs = CatalogCache(self.router)
        self.follower = JobFollower(self.router, self.following)
        self.dispatcher = Dispatcher(self.router, self.catalogs, self.follower, client.default_idc)

    def start(self, transport: Transport) -> None:
        """Warm the catalogs and pick up jobs a previous run left unfinished."""
        self.commands.submit(self.catalogs.warm, list(self.config.idcs))
        resumed = self.follower.resume_all(lambda origin: transport if origin == self.origin else None)
        if resumed:
            log.info("following %d unfinished job(s) again", resumed)

    def close(self) -> None:
        self.commands.shutdown(wait=False, cancel_futures=True)
        self.following.shutdown(wait=False, cancel_futures=True)
        self.router.close()
