"""Wiring: one BotService per process holds the router, the stores, the pools, the dispatcher, and the
process's one scheduler (ombot.timers.Timers) that everything keeping time here shares."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ombot import audit
from ombot.approvals import Gate, bind, load_policy
from ombot.audit import Alerts, AuditFeed, FeedSettings, redact_patterns, start_feed
from ombot.bot import multi, replay, schedules, store
from ombot.bot.alerts import AlertPoster
from ombot.bot.dispatcher import CatalogCache, Dispatcher
from ombot.bot.jobs import JobFollower, Lifecycle
from ombot.bot.settings import BotSettings
from ombot.bot.transport import Transport
from ombot.masters import Identity, Router
from ombot import lease
from ombot.config import ClientRegistration, Config
from ombot.errors import ConfigError
from ombot.timers import Timers

log = logging.getLogger("ombot.bot")


class BotService:
    """One per bot or console process: the router, the stores, the pools, the gate, the dispatcher, and
    the process's scheduler (`timers`: the gate's expiries, the job lifecycle, the audit feed)."""

    def __init__(self, config: Config, origin: str,
                 group_members: Callable[[str], frozenset[str]] | None = None) -> None:
        self.config, self.origin = config, origin
        self.settings = BotSettings.from_config(config)
        self.registration = self._registration(config, origin)
        client = config.speaking_as(self.registration.id)
        bind(store.open_store(self.settings.database_url))
        replay.prepare()
        lease.prepare()
        schedules.prepare()
        multi.prepare()
        audit.prepare()
        self.timers = Timers()  # the one scheduler of this process, started by `start`, closed last
        self.router = Router(config, Identity.load(client.key_file), requester=self.registration.identity,
                             origin=origin)
        self.gate = self._gate(group_members)
        # Commands and job-following use separate pools: long-polls must never starve commands.
        self.commands = ThreadPoolExecutor(self.settings.workers, thread_name_prefix="om-cmd")
        self.following = ThreadPoolExecutor(self.settings.workers * 4, thread_name_prefix="om-follow")
        self.catalogs = CatalogCache(self.router)
        self.follower = JobFollower(self.router, self.following)
        self.dispatcher = Dispatcher(self.router, self.catalogs, self.follower, client.default_idc, self.gate,
                                     self.commands)
        self.lifecycle: Lifecycle | None = None
        self.audit_feed: AuditFeed | None = None
        self.schedules = schedules.Schedules(self.router, self.gate, self.dispatcher.approvals, self.dispatcher,
                                             self.settings, origin, client.default_idc)
        self.dispatcher.schedules = self.dispatcher.approvals.schedules = self.schedules
        self.dispatcher.audit_patterns = redact_patterns(self.settings.audit_rules)  # /om audit redacts with them

    def _registration(self, config: Config, origin: str) -> ClientRegistration:
        """The bot speaks as a chat client; the console as its own client, which acts as one fixed
        console:USER unless it is registered as a chat client (the demo)."""
        client_id = self.settings.console_client if origin == "console" else self.settings.client
        registration = config.clients.get(client_id)
        if registration is None:
            key = "console_client" if origin == "console" else "client"
            raise ConfigError(config.path, f"bot.{key}", f"a client defined under [clients] (not {client_id!r})")
        if origin != "console" and registration.kind != "chat":
            raise ConfigError(config.path, f"clients.{client_id}.kind", '"chat" for the Slack bot', registration.kind)
        return registration

    @property
    def console_user(self) -> str:
        """Who the console acts as: its fixed identity, or (a chat-kind console) the configured chat user."""
        if self.registration.kind == "chat" and self.settings.console_user:
            return self.settings.console_user
        return self.registration.identity

    @property
    def console_may_switch(self) -> bool:
        return self.registration.kind == "chat" and self.settings.console_allow_as

    def _gate(self, group_members: Callable[[str], frozenset[str]] | None) -> Gate | None:
        if self.settings.policy is None:
            log.warning("no [bot] policy configured: every request will be refused")
            return None
        policy = load_policy(self.settings.policy)
        if group_members is None:  # the console: groups come from the policy file itself
            group_members = lambda group: policy.console_groups.get(group, frozenset())  # noqa: E731
        return Gate(policy, group_members, origin=self.origin)

    def start(self, transport: Transport) -> None:
        """Warm the catalogs, pick up jobs a previous run left unfinished, re-arm approval expiries."""
        self.commands.submit(self.catalogs.warm, list(self.config.idcs))
        self.timers.start()
        if self.gate is not None:
            self.gate.on_expired = lambda request: self.dispatcher.approvals.expired(request, transport)
            self.gate.start(self.timers)
        self.lifecycle = Lifecycle(self.follower, lambda origin: transport if origin == self.origin else None,
                                   self.settings.retention_days, self.timers)
        resumed = self.lifecycle.start()  # and keeps adopting jobs whose bot died, on every tick
        if resumed:
            log.info("following %d unfinished job(s) again", resumed)
        self.schedules.start(transport, self.timers)  # restores the schedules from the table; fires if it holds the lease
        if self.origin == "slack":  # alerts go to Slack: it takes the feed from a console that holds it
            self.audit_feed = start_feed(self.router, list(self.config.idcs), self._feed_settings(None),
                                         lambda redact: AlertPoster(transport, redact, self.timers),
                                         self.timers)  # its polls and its alerts' retries: jobs on the scheduler

    def start_console_audit(self, alerts: Callable[[Callable[[str], str]], Alerts], channel: str,
                            on_lead: Callable[[bool, str | None], None]) -> bool:
        """The console's share of the audit (after `start`): with a chat key, the only kind masters let
        read the feed, it pulls whenever no other process holds the feed, never from a Slack bot, and
        hands a bot the feed when one starts (audit.feed.PREEMPTS). Its alerts go to `alerts(redact)`,
        every one of them (`channel` stands in for rules and notices that name none); `on_lead` hears
        who pulls. False (nothing started) for a console key."""
        if self.registration.kind != "chat":
            log.info("the console's key %s is of kind %s: only a chat key may read the audit feed, so the "
                     "Slack bot pulls it", self.registration.id, self.registration.kind)
            return False
        self.audit_feed = start_feed(self.router, list(self.config.idcs), self._feed_settings(channel), alerts,
                                     self.timers, surface="console", on_lead=on_lead)
        return True

    def _feed_settings(self, default_channel: str | None) -> FeedSettings:
        settings = self.settings
        return FeedSettings(settings.audit_rules, settings.audit_alert_channel or default_channel,
                            settings.audit_poll_seconds, settings.audit_silent_after_seconds, settings.audit_export)

    def close(self) -> None:
        self.schedules.close()  # first: no run fires into pools that are shutting down
        if self.audit_feed is not None:
            self.audit_feed.close()
        if self.lifecycle is not None:
            self.lifecycle.close()  # before the pools: followers still running then post nothing
        if self.gate is not None:
            self.gate.close()
        self.timers.close()  # last of what keeps time: each user above cancelled its own jobs
        self.commands.shutdown(wait=False, cancel_futures=True)
        self.following.shutdown(wait=False, cancel_futures=True)
        self.router.close()
