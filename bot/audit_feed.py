"""The audit feed: from every master's audit table to the bot's one store, the rules and the alerts.

One process per bot database pulls (it holds the `audit-feed` lease, by the database's clock;
the others wait to take over). Every `audit_poll_seconds`, a job on the bot's scheduler
(bot.jobs.Timers), it reads each master of each IDC with
`audit_read` — every master, since an agent fails over and a server's events are spread over
them — from that master's cursor on, a page at a time. `audit_store.insert_new` keeps only events
not stored yet, and the rules run on those alone: an event that reached two masters, or was read
twice, alerts once.

The cursor per master (AuditCursor) trails the master's clock by OVERLAP_MS: a batch that commits
late may carry an earlier received_at than rows already read, so the next read starts that far
back and the insert skips what it already holds. A master that does not answer is skipped,
logged once, and tried again with a growing pause; its events wait in its table meanwhile.

Silent agents: each read also returns the heartbeat rows changed since the last one. A server
whose newest heartbeat (on any master of its IDC) is older than `audit_silent_after_seconds`
raises one alert, and one "back" message when it returns. Only servers of an IDC with a master
answering are judged: an unreachable IDC is not a thousand silent agents.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot import audit_store, lease
from bot.alerts import AlertPoster, Timers
from bot.audit_rules import RuleSet, Thresholds, load_rules, redact
from bot.messages import Message, escape, section, slack_date
from bot.settings import BotSettings
from bot.transport import Transport
from masters import Router
from ombot.clock import now_ms
from ombot.config import read_toml
from ombot.errors import OmbotError

log = logging.getLogger("ombot.bot.audit")

LEASE = "audit-feed"
OVERLAP_MS = 10_000  # how late a master's batch may commit after taking its received_at
PAGE_EVENTS = 500
MAX_PAGES = 40  # per master and poll: a long backlog is read over several polls, other masters in between
MAX_RETRY_SECONDS = 30.0
LEASE_TTL_SECONDS = 45.0
CLOSE_WAIT_SECONDS = 5.0  # how long closing waits for a poll under way
JOB_ID = "audit-feed"
RULE_FIELDS = ("id", "idc", "host", "kind", "at", "user", "login_user", "uid", "tty", "cwd", "command",
               "exit_status", "ssh_client")


@dataclass
class _Master:
    """What the feed knows of one master between polls (in memory: the cursor itself is stored)."""

    failures: int = 0
    retry_at: float = 0.0  # monotonic
    agents_since: int = 0  # heartbeat rows changed since this (the master's clock); 0: all


class AuditFeed:
    """The puller: masters -> audit_store -> rules -> alerts, while this process holds the lease."""

    def __init__(self, router: Router, idcs: list[str], rules: RuleSet | None, alerts: AlertPoster | None,
                 poll_seconds: float, silent_after_seconds: int, silent_channel: str | None,
                 fallback_channel: str | None = None) -> None:
        self.router, self.idcs, self.rules, self.alerts = router, idcs, rules, alerts
        self.poll_seconds, self.silent_after_ms = poll_seconds, silent_after_seconds * 1000
        self.silent_channel = silent_channel
        self.fallback_channel = fallback_channel  # for rules that name no channel
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        # Above a hung master's 30 s read timeout: a slow poll never loses the lease halfway.
        self.lease_ttl_ms = int(max(LEASE_TTL_SECONDS, poll_seconds * 5) * 1000)
        self.thresholds = Thresholds()
        self.leading = False
        self._masters: dict[str, _Master] = {}
        self._heartbeats: dict[str, tuple[str, int]] = {}  # host -> (idc, newest heartbeat by this bot's clock)
        self._silent: set[str] = set()
        self._stop = threading.Event()
        self._polling = threading.Lock()  # held by the poll under way
        self._timers: Timers | None = None

    def start(self, timers: Timers) -> None:
        """Poll now, then every poll_seconds (a poll that takes longer delays the next one)."""
        self._timers = timers
        timers.every(JOB_ID, self.poll_seconds, self._run)

    def close(self) -> None:
        self._stop.set()
        if self._timers is not None:
            self._timers.cancel(JOB_ID)
        if self._polling.acquire(timeout=CLOSE_WAIT_SECONDS):  # the poll under way ends at its next master
            self._polling.release()
        if self.alerts is not None:
            self.alerts.close()
        if self.leading:
            try:
                lease.release(LEASE, self.holder)  # the next bot takes over at once, not after the ttl
            except Exception as exc:
                log.warning("could not release the audit feed lease: %s", exc)

    def _run(self) -> None:
        """One scheduled poll."""
        with self._polling:
            if self._stop.is_set():
                return
            try:
                if self._lead():
                    self.poll()
            except Exception:  # the feed outlives any one bad poll; the next one starts from the cursors
                log.exception("audit feed poll failed")

    def _lead(self) -> bool:
        leading = lease.acquire(LEASE, self.holder, self.lease_ttl_ms)
        if leading != self.leading:
            log.info("this process %s the audit feed (%s)", "pulls" if leading else "no longer pulls", self.holder)
            if not leading:  # another process holds the feed: its view replaces ours
                self._masters.clear()
                self._heartbeats.clear()
                self._silent.clear()
        self.leading = leading
        return leading

    # -- one poll ------------------------------------------------------------------------------------

    def poll(self) -> int:
        """Read every master once (and its backlog up to MAX_PAGES); the number of events stored now."""
        stored = 0
        for idc in self.idcs:
            if self._stop.is_set() or not self._lead():
                break
            answered, count = self._poll_idc(idc)
            stored += count
            if answered:
                self._judge_heartbeats(idc)
        return stored

    def _poll_idc(self, idc: str) -> tuple[bool, int]:
        """Every master of the IDC that is due; whether any answered, and the events stored now."""
        answered, stored = False, 0
        for master_id in self.router.masters_of(idc):
            if self._stop.is_set() or not self._due(master_id) or not self._lead():
                continue
            count = self._poll_master(idc, master_id)
            if count is not None:
                answered, stored = True, stored + count
        return answered, stored

    def _poll_master(self, idc: str, master_id: str) -> int | None:
        """Read one master from its cursor on, page by page; the events stored now, None if it did not answer."""
        state = self._masters.setdefault(master_id, _Master())
        start = audit_store.received_after(master_id)
        page: dict[str, Any] = {"after": start, "after_id": "", "limit": PAGE_EVENTS, "agents_since": state.agents_since}
        first_now: int | None = None
        stored = 0
        for _ in range(MAX_PAGES):
            reply = self._read(idc, master_id, page)
            if isinstance(reply, OmbotError):
                self._failed(master_id, reply)
                return None if first_now is None else stored  # the cursor stays: the next poll reads it again
            self._answered(master_id)
            if first_now is None:
                first_now = int(reply["now"])
                self._heartbeat_rows(idc, master_id, reply)  # only the first page asks for them
            stored += self._store(idc, reply["events"])
            if not (reply["more"] and reply["events"]):
                self._advance(master_id, start, first_now - OVERLAP_MS)
                return stored
            if not self._lead():  # another process pulls now: leave the cursor to it
                return stored
            last = reply["events"][-1]
            page = {"after": last["received_at"], "after_id": last["id"], "limit": PAGE_EVENTS}
        assert first_now is not None
        # a backlog longer than MAX_PAGES: the next poll resumes at the last event read (other masters first)
        self._advance(master_id, start, min(first_now - OVERLAP_MS, int(page["after"])))
        return stored

    def _read(self, idc: str, master_id: str, page: dict[str, Any]) -> dict[str, Any] | OmbotError:
        try:
            return self.router.audit_read(idc, {master_id: page})[master_id]
        except Exception as exc:  # e.g. a master of an older version, without audit_read: skipped like a down one
            return OmbotError(f"{type(exc).__name__}: {exc}")

    def _store(self, idc: str, events: list[dict[str, Any]]) -> int:
        if not events:
            return 0
        fresh = audit_store.insert_new(idc, events)
        if self.rules is not None:
            for record in fresh:
                if record.kind == "command":
                    self._match(record)
        return len(fresh)

    def _match(self, record: audit_store.AuditRecord) -> None:
        assert self.rules is not None
        row = record.__data__  # the stored values; a field's descriptor per name costs more than the match
        event = {name: row.get(name) for name in RULE_FIELDS}
        event["user"] = event["user"] or ""
        for match in self.rules.match(event):
            fired = self.thresholds.fire(match, record.at)
            channel = match.channel or self.fallback_channel
            if channel is None:
                if fired:
                    log.warning("audit rule %r matched on %s but names no channel (set [bot] audit_alert_channel)",
                                match.rule, record.host)
                continue
            if self.alerts is not None:
                self.alerts.alert(match, event, fired, channel)

    @staticmethod
    def _advance(master_id: str, start: int, to: int) -> None:
        if to > start:  # never backwards: a master whose clock stepped back re-reads, it never skips
            audit_store.save_position(master_id, to)

    # -- masters that do not answer ---------------------------------------------------------------------

    def _due(self, master_id: str) -> bool:
        return time.monotonic() >= self._masters.setdefault(master_id, _Master()).retry_at

    def _failed(self, master_id: str, error: OmbotError) -> None:
        state = self._masters.setdefault(master_id, _Master())
        state.failures += 1
        pause = min(MAX_RETRY_SECONDS, self.poll_seconds * 2 ** (state.failures - 1))
        state.retry_at = time.monotonic() + pause
        if state.failures == 1:  # once per outage, not once per poll
            log.warning("audit feed: master %s did not answer (%s); trying again, its events wait there",
                        master_id, error)

    def _answered(self, master_id: str) -> None:
        state = self._masters.setdefault(master_id, _Master())
        if state.failures:
            log.info("audit feed: master %s answers again after %d failed reads", master_id, state.failures)
        state.failures, state.retry_at = 0, 0.0

    # -- silent agents ----------------------------------------------------------------------------------

    def _heartbeat_rows(self, idc: str, master_id: str, reply: dict[str, Any]) -> None:
        master_now, here = int(reply["now"]), now_ms()
        for row in reply["agents"]:
            seen = here - max(0, master_now - int(row["last_seen"]))  # the master's age of it, on our clock
            known = self._heartbeats.get(row["host"])
            if known is None or seen > known[1]:
                self._heartbeats[row["host"]] = (idc, seen)
        self._masters[master_id].agents_since = max(0, master_now - OVERLAP_MS)

    def _judge_heartbeats(self, idc: str) -> None:
        here = now_ms()
        for host, (host_idc, seen) in self._heartbeats.items():
            if host_idc != idc:
                continue
            silent = here - seen > self.silent_after_ms
            if silent and host not in self._silent:
                self._silent.add(host)
                log.warning("audit agent on %s (%s) silent since %s", host, idc, time.strftime(
                    "%Y-%m-%d %H:%M:%S UTC", time.gmtime(seen / 1000)))
                self._notify(silent_message(host, idc, seen))
            elif not silent and host in self._silent:
                self._silent.discard(host)
                log.info("audit agent on %s (%s) is back", host, idc)
                self._notify(back_message(host, idc, seen))

    def _notify(self, message: Message) -> None:
        if self.alerts is None or self.silent_channel is None:
            return
        self.alerts.notice(self.silent_channel, message)


def silent_message(host: str, idc: str, last_seen_ms: int) -> Message:
    text = (f":zzz: *audit agent silent* on `{escape(host)}` in `{escape(idc)}`: no heartbeat since "
            f"{slack_date(last_seen_ms)}. Its commands are not reaching the audit store.")
    return Message(f"[audit] agent on {escape(host)} ({escape(idc)}) is silent", [section(text)])


def back_message(host: str, idc: str, seen_ms: int) -> Message:
    text = f":white_check_mark: *audit agent back* on `{escape(host)}` in `{escape(idc)}` (heartbeat {slack_date(seen_ms)})."
    return Message(f"[audit] agent on {escape(host)} ({escape(idc)}) is back", [section(text)])


def start_feed(router: Router, idcs: list[str], settings: BotSettings, transport: Transport,
               timers: Timers) -> AuditFeed:
    """The feed of `[bot]`'s audit settings, started on `timers`: its rules file loaded (an error
    stops the bot at start, not at the first alert), alerts posted through `transport`."""
    rules = load_rules(settings.audit_rules) if settings.audit_rules is not None else None
    default_channel = _default_channel(settings.audit_rules) if settings.audit_rules is not None else None
    silent_channel = settings.audit_alert_channel or default_channel
    if rules is None:
        log.info("no [bot] audit_rules file: audit events are stored and searchable, no rule alerts")
    if silent_channel is None:
        log.warning("no [bot] audit_alert_channel and no channel in the rules file: silent agents are only logged")
    alerts = AlertPoster(transport, rules.redact if rules is not None else redact, timers)
    feed = AuditFeed(router, idcs, rules, alerts, settings.audit_poll_seconds, settings.audit_silent_after_seconds,
                     silent_channel, fallback_channel=settings.audit_alert_channel)
    feed.start(timers)
    return feed


def _default_channel(path: Path) -> str | None:
    """The rules file's top-level `channel` (load_rules checked it already)."""
    channel = read_toml(path, "an existing audit rules file").get("channel")
    return channel if isinstance(channel, str) else None
