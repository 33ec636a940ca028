"""The audit feed: from every master's audit table to the bot's one store, the rules and the alerts.

One process per bot database pulls (it holds the `audit-feed` lease, by the database's clock;
the others wait to take over). The Slack bot and a console may both pull (`surface`): a console takes
the feed only while nobody holds it, and a Slack bot takes it from a console at once (PREEMPTS), so
alerts go to Slack whenever a bot runs, and to the console of the embedded default otherwise.

Every `audit_poll_seconds`, a job on the process's scheduler (ombot.timers.Timers), it reads
each master of each IDC with `audit_read` — every master, since an agent fails over and a
server's events are spread over them — from that master's cursor on, a page at a time.
`store.insert_new` keeps only events not stored yet, and the rules run on those alone: an event
that reached two masters, or was read twice, alerts once. Alerts go to the `Alerts` the bot
provides (audit.queue: its queue, served at the pace of the chat surface).

The cursor per master (AuditCursor) trails the master's clock by OVERLAP_MS: a batch that commits
late may carry an earlier received_at than rows already read, so the next read starts that far
back and the insert skips what it already holds. A master that does not answer is skipped,
logged once, and tried again with a growing pause; its events wait in its table meanwhile.

Silent agents: each read also returns the heartbeat rows changed since the last one. A server
whose newest heartbeat (on any master of its IDC) is older than `audit_silent_after_seconds`
raises one alert, and one "back" message when it returns; one whose agent reports a problem in its
heartbeat raises one "degraded" alert, and one when it recovers. Only servers of an IDC with a
master answering are judged: an unreachable IDC is not a thousand silent agents, but one alert of
its own once no master of it has answered for UNREACHABLE_AFTER_SECONDS (or
`audit_silent_after_seconds`, if shorter), and one when a master answers again (audit.heartbeats
judges all this). Agents' and masters' notices (audit.notices) alert like rule matches, whether a
rules file is loaded or not. With `[bot.audit_export]`, each event stored and each alert go to the
SIEM too (audit.export).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ombot.audit import metrics, store
from ombot.audit.alerts import Thresholds
from ombot.audit.export import Export, ExportSettings, open_export
from ombot.audit.heartbeats import Heartbeats
from ombot.audit.notices import notice_alert
from ombot.audit.queue import Alerts
from ombot.audit.rules import RuleSet, load_rules, redact
from ombot.masters import Router
from ombot import lease
from ombot.tables import read_toml
from ombot.errors import OmbotError
from ombot.message import Message, plain
from ombot.timers import Timers

log = logging.getLogger("ombot.bot.audit")  # its name from before the audit room: operators' filters keep working

LEASE = "audit-feed"
OVERLAP_MS = 10_000  # how late a master's batch may commit after taking its received_at
PAGE_EVENTS = 500
MAX_PAGES = 40  # per master and poll: a long backlog is read over several polls, other masters in between
MAX_RETRY_SECONDS = 30.0
LEASE_TTL_SECONDS = 45.0
CLOSE_WAIT_SECONDS = 5.0  # how long closing waits for a poll under way
JOB_ID = "audit-feed"
# Which holders each surface takes the feed from before their lease runs out: the Slack bot from a
# console (alerts belong in the channel once a bot runs); a console from nobody.
PREEMPTS = {"slack": "console:"}
RULE_FIELDS = ("id", "idc", "host", "kind", "at", "user", "login_user", "uid", "tty", "cwd", "command",
               "exit_status", "ssh_client", "source")
DATA_FIELDS = ("login_check", "kernel_login_user", "claimed_at")  # shown in alerts: what the kernel says, the claim


@dataclass(frozen=True)
class FeedSettings:
    """What the feed takes from `[bot]`: the rules file (None: store and search, no rule alerts), the
    channel for silent agents and rules that name none, how often to poll, when an agent is silent."""

    rules: Path | None
    alert_channel: str | None
    poll_seconds: float
    silent_after_seconds: int
    export: ExportSettings | None = None  # `[bot.audit_export]`: events and alerts to the SIEM (audit.export)


@dataclass
class _Master:
    """What the feed knows of one master between polls (in memory: the cursor itself is stored)."""

    failures: int = 0
    retry_at: float = 0.0  # monotonic
    agents_since: int = 0  # heartbeat rows changed since this (the master's clock); 0: all


class AuditFeed:
    """The puller: masters -> store -> rules -> alerts, while this process holds the lease."""

    def __init__(self, router: Router, idcs: list[str], rules: RuleSet | None, alerts: Alerts | None,
                 poll_seconds: float, silent_after_seconds: int, silent_channel: str | None,
                 fallback_channel: str | None = None, surface: str = "slack",
                 on_lead: Callable[[bool, str | None], None] | None = None) -> None:
        self.router, self.idcs, self.rules, self.alerts = router, idcs, rules, alerts
        self.poll_seconds, self.silent_after_ms = poll_seconds, silent_after_seconds * 1000
        self.silent_channel = silent_channel
        self.fallback_channel = fallback_channel  # for rules that name no channel
        # SURFACE:HOST:PID:RANDOM; the surface tells a console's hold (which a Slack bot takes over) from a bot's
        self.holder = f"{surface}:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.preempt = PREEMPTS.get(surface)
        self.on_lead = on_lead  # told (leading, the holder when not) once at the first poll, then at each change
        self._announced = False
        # Above a hung master's 30 s read timeout: a slow poll never loses the lease halfway.
        self.lease_ttl_ms = int(max(LEASE_TTL_SECONDS, poll_seconds * 5) * 1000)
        self.thresholds = Thresholds()
        self.leading = False
        self._masters: dict[str, _Master] = {}
        self.heartbeats = Heartbeats(self.silent_after_ms, self._notify)  # silent agents, unreachable IDCs
        self._stop = threading.Event()
        self._polling = threading.Lock()  # held by the poll under way
        self._timers: Timers | None = None
        self.export: Export | None = None  # every event stored and every alert, to the SIEM

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
        if self.export is not None:
            self.export.close()
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
        before = lease.holder_of(LEASE) if self.preempt and not self.leading else None
        leading = lease.acquire(LEASE, self.holder, self.lease_ttl_ms, self.preempt)
        if leading and not self.leading and before and before != self.holder:
            log.info("taking the audit feed over from %s", before)
        if leading != self.leading:
            log.info("this process %s the audit feed (%s)", "pulls" if leading else "no longer pulls", self.holder)
            if not leading:  # another process holds the feed: its view replaces ours
                self._masters.clear()
                self.heartbeats.clear()
        if leading != self.leading or not self._announced:
            self._announce(leading)
        self.leading = leading
        return leading

    def _announce(self, leading: bool) -> None:
        """Tell `on_lead` who pulls now; a failure there never stops the feed."""
        self._announced = True
        if self.on_lead is None:
            return
        try:
            self.on_lead(leading, None if leading else lease.holder_of(LEASE))
        except Exception:
            log.exception("could not report who pulls the audit feed")

    # -- one poll ------------------------------------------------------------------------------------

    def poll(self) -> int:
        """Read every master once (and its backlog up to MAX_PAGES); the number of events stored now."""
        stored = 0
        for idc in self.idcs:
            if self._stop.is_set() or not self._lead():
                break
            answered, count = self._poll_idc(idc)
            stored += count
            if answered is not None:
                self.heartbeats.reachable(idc, answered)
            if answered:
                self.heartbeats.judge(idc)
        return stored

    def _poll_idc(self, idc: str) -> tuple[bool | None, int]:
        """Every master of the IDC that is due; whether any answered (None: none was due), and the
        events stored now."""
        answered: bool | None = None
        stored = 0
        for master_id in self.router.masters_of(idc):
            if self._stop.is_set() or not self._due(master_id) or not self._lead():
                continue
            count = self._poll_master(idc, master_id)
            answered = bool(answered) or count is not None
            stored += count or 0
        return answered, stored

    def _poll_master(self, idc: str, master_id: str) -> int | None:
        """Read one master from its cursor on, page by page; the events stored now, None if it did not answer."""
        state = self._masters.setdefault(master_id, _Master())
        start = store.received_after(master_id)
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
                self.heartbeats.rows(idc, reply)  # only the first page asks for them
                state.agents_since = max(0, first_now - OVERLAP_MS)
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
        fresh = store.insert_new(idc, events)
        metrics.pulled(len(events), len(fresh))
        if self.export is not None:
            self.export.events(fresh)
        for record in fresh:
            if record.kind == "command":
                if self.rules is not None:
                    self._match(record)
            else:
                self._notice(record)
        return len(fresh)

    def _notice(self, record: store.AuditRecord) -> None:
        """An agent's or master's notice (or an agent's drop) alerts in the alert channel."""
        if self.alerts is None or self.silent_channel is None:
            log.warning("audit notice from %s (no alert channel): %s", record.host, record.data)
            return
        row = record.__data__
        match, event = notice_alert({name: row.get(name) for name in RULE_FIELDS}, row["data"], self.silent_channel)
        fired = self.thresholds.fire(match, record.at)
        if self.export is not None:
            self.export.alert(match, event, fired, self.silent_channel)
        self.alerts.alert(match, event, fired, self.silent_channel)

    def _match(self, record: store.AuditRecord) -> None:
        assert self.rules is not None
        row = record.__data__  # the stored values; a field's descriptor per name costs more than the match
        event = {name: row.get(name) for name in RULE_FIELDS}
        event["user"] = event["user"] or ""
        data = row["data"]
        event |= {name: data.get(name) for name in DATA_FIELDS}
        for match in self.rules.match(event):
            fired = self.thresholds.fire(match, record.at)
            channel = match.channel or self.fallback_channel
            if self.export is not None:  # whether or not a channel hears of it
                self.export.alert(match, event, fired, channel)
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
            store.save_position(master_id, to)

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

    # -- what the feed says about itself and its agents -------------------------------------------------

    def _notify(self, message: Message, severity: str = "warning",
                about: tuple[str, str, str | None] = ("notice", "", None)) -> None:
        """Tell the alert channel; `about` (what happened, the IDC, the host) is for the SIEM export."""
        if self.export is not None:
            self.export.pipeline(about[0], severity, plain(message.text), about[1], about[2])
        if self.alerts is None or self.silent_channel is None:
            return
        self.alerts.notice(self.silent_channel, message, severity)


def start_feed(router: Router, idcs: list[str], settings: FeedSettings,
               alerts: Callable[[Callable[[str], str]], Alerts], timers: Timers, surface: str = "slack",
               on_lead: Callable[[bool, str | None], None] | None = None) -> AuditFeed:
    """The feed of `[bot]`'s audit settings, started on `timers`: its rules file loaded (an error
    stops the bot at start, not at the first alert), its alerts handed to what `alerts(redact)` makes
    (the chat surface's, e.g. bot.alerts.AlertPoster; `redact` hides the secrets in the commands shown).
    `surface` ("slack" or "console") says whose holds it may take over (PREEMPTS); `on_lead(leading,
    holder)` hears at the first poll, and at each change, whether this process pulls, else who does."""
    rules = load_rules(settings.rules) if settings.rules is not None else None
    default_channel = _default_channel(settings.rules) if settings.rules is not None else None
    silent_channel = settings.alert_channel or default_channel
    if rules is None:
        log.info("no [bot] audit_rules file: audit events are stored and searchable, no rule alerts")
    if silent_channel is None:
        log.warning("no [bot] audit_alert_channel and no channel in the rules file: silent agents are only logged")
    redactor = rules.redact if rules is not None else redact
    feed = AuditFeed(router, idcs, rules, alerts(redactor), settings.poll_seconds,
                     settings.silent_after_seconds, silent_channel, fallback_channel=settings.alert_channel,
                     surface=surface, on_lead=on_lead)
    feed.export = open_export(settings.export, redactor)
    if feed.export is not None:
        metrics.watch_export(feed.export.stats)
    feed.start(timers)
    return feed


def _default_channel(path: Path) -> str | None:
    """The rules file's top-level `channel` (load_rules checked it already)."""
    channel = read_toml(path, "an existing audit rules file").get("channel")
    return channel if isinstance(channel, str) else None
