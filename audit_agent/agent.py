"""The agent daemon: spool files -> the bounded queue -> batches to a master of its IDC.

One thread, one loop: scan the spools, queue what is new (with the offsets, in one transaction),
send the oldest batch, delete what the master acknowledged. A failed send backs off exponentially
with full jitter, so a fleet of agents does not hammer a master that just came back. A heartbeat
(spool depth, drops, sent, and what is wrong if anything is) rides on every batch, and goes alone
when there is nothing to send.

The spool is written by the users the agent watches, so the loop never dies of what it finds
there: each source (the spool, auditd's log, the queue, the link) fails on its own, the failure
becomes a `notice` event and the heartbeat's `problem`, and the next pass tries again. Notices are
budgeted per user, so nobody can fill the queue with them; what the budget holds back is counted
and said.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ombot.audit_agent import spool
from ombot.audit_agent.auditd import AuditLog, boot_time
from ombot.audit_agent.link import MasterLinks, Unreachable
from ombot.audit_agent.queue import EventQueue
from ombot.audit_agent.records import Event, notice
from ombot.audit_agent.settings import AgentSettings
from ombot import __version__
from ombot.envelope import Refused
from ombot.keys import Identity

log = logging.getLogger("ombot.audit_agent")
T = TypeVar("T")

SCAN_SAVE_SECONDS = 5.0  # how often the time of the last pass is kept (the lower bound of new lines' times)
NOTICE_BURST = 20  # notices per user at once...
NOTICE_EVERY_SECONDS = 30.0  # ...then one this often; the rest are counted and said
MAX_PROBLEM_CHARS = 500


class NoticeBudget:
    """Notices per owner (a uid, or the agent itself): a burst, then one every NOTICE_EVERY_SECONDS.
    What is held back is counted, and said in one summary notice once the owner's budget allows."""

    def __init__(self, burst: int = NOTICE_BURST, every: float = NOTICE_EVERY_SECONDS) -> None:
        self.burst, self.every = burst, every
        self._tokens: dict[str, float] = {}
        self._updated: dict[str, float] = {}
        self.held: dict[str, int] = {}

    def admit(self, events: list[Event]) -> list[Event]:
        """The events to queue: every non-notice, and the notices the budget allows."""
        return [e for e in events if e[0] != "notice" or self._take(_owner_of(e[2]))]

    def summaries(self) -> list[Event]:
        """One notice per owner whose held-back notices can be said now."""
        out = []
        for owner, count in list(self.held.items()):
            if self._take(owner, counting=False):
                del self.held[owner]
                out.append(notice("notices_held", f"{count} more notice(s) about {owner} were held back "
                                        "(a flood of them)", count=count, owner=owner))
        return out

    def _take(self, owner: str, counting: bool = True) -> bool:
        now = time.monotonic()
        tokens = min(float(self.burst), self._tokens.get(owner, float(self.burst))
                     + (now - self._updated.get(owner, now)) / self.every)
        self._updated[owner] = now
        if tokens >= 1:
            self._tokens[owner] = tokens - 1
            return True
        self._tokens[owner] = tokens
        if counting:
            self.held[owner] = self.held.get(owner, 0) + 1
        return False


def _owner_of(data: dict[str, Any]) -> str:
    for key in ("uid", "owner_uid"):
        if isinstance(data.get(key), int):
            return f"uid {data[key]}"
    return "the spool"


class Agent:
    """The audit agent of one host: it queues what the shell hook's spool (and auditd's log, when
    configured) records, and ships the queue in batches to a master of its IDC, with backoff."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.queue = EventQueue(settings.state_dir, settings.host, settings.max_events)
        self.links = MasterLinks(settings, Identity.load(settings.key_file))
        self.offsets: dict[str, int] = dict(self.queue.db.execute("SELECT file, offset FROM offsets").fetchall())
        last_scan = int(self.queue.meta("scanned_at") or 0) or boot_time() * 1000
        self.scanner = spool.SpoolScanner(settings.spool_dir, self.offsets, repair=os.geteuid() == 0,
                                          last_scan_ms=last_scan)
        self.notices = NoticeBudget()
        self.problems: dict[str, str] = {}  # source -> what went wrong on its last pass
        self.stopping = False
        self.retry_at = 0.0
        self.failures = 0
        self.heartbeat_at = 0.0
        self.saved_scan_at = 0.0
        self.batch_events = settings.batch_events
        self.auditd = None if settings.auditd_log is None else AuditLog(  # the second source: the kernel's view
            settings.auditd_log, settings.host, self.queue.boot_id, self.offsets, settings.state_dir)
        if self.scanner.repair and settings.spool_dir.is_dir():
            spool.ensure_user_dir(settings.spool_dir, 0)  # root's own: nobody else may make it first

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        log.info("%s", self.describe())
        try:
            while not self.stopping:
                self.collect()
                if time.monotonic() >= self.retry_at:
                    self._guarded("link", self.ship)
                time.sleep(self.settings.scan_seconds)
        finally:
            self.links.close()
            self.queue.close()

    def describe(self) -> str:
        """The start line: what it reads and where it ships, so a wrong agent.toml shows at once."""
        s = self.settings
        sources = [f"spool {s.spool_dir}"] + ([f"auditd {s.auditd_log}"] if s.auditd_log is not None else [])
        masters = ", ".join(f"{m.id}@{m.host}:{m.port}" if ":" not in m.host else f"{m.id}@[{m.host}]:{m.port}"
                            for m in s.masters)
        return f"{s.start_line()}sources {', '.join(sources)}; masters {masters}; {self.queue.depth()} event(s) queued"

    def _stop(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def _guarded(self, source: str, work: Callable[[], T]) -> T | None:
        """Run one source's pass; an exception is its problem (logged, sent with the heartbeat, and
        queued as a notice), never the end of the agent."""
        try:
            result = work()
        except Exception as exc:
            problem = f"{source}: {type(exc).__name__}: {exc}"[:MAX_PROBLEM_CHARS]
            if self.problems.get(source) != problem:
                log.exception("audit agent: %s failed; going on", source)
                self._note(notice("agent_error", problem, source=source))
            self.problems[source] = problem
            return None
        if self.problems.pop(source, None) is not None:
            log.info("audit agent: %s works again", source)
        return result

    def _note(self, event: Event) -> None:
        try:
            self.queue.add(self.notices.admit([event]))
        except Exception:  # the queue itself is failing: the heartbeat's problem says so
            log.exception("could not queue a notice")

    def collect(self) -> int:
        """Queue every new spool line (and auditd event); returns how many events were queued."""
        queued = self._guarded("spool", self._collect_spool) or 0
        if self.auditd is not None:
            queued += self._guarded("auditd", self._collect_auditd) or 0
        held = self.notices.summaries()
        if held:
            self._guarded("queue", lambda: self.queue.add(held))
        if time.monotonic() - self.saved_scan_at >= SCAN_SAVE_SECONDS:
            self.saved_scan_at = time.monotonic()
            self._guarded("queue", lambda: self.queue.set_meta("scanned_at", str(self.scanner.last_scan_ms)))
        return queued

    def _collect_spool(self) -> int:
        queued = 0
        for chunk in self.scanner.scan():
            events = self.notices.admit(chunk.events)
            self.queue.add(events, chunk.key or None, chunk.offset)
            if chunk.key:
                self.offsets[chunk.key] = chunk.offset
            queued += len(events)
            if spool.rotate(chunk):
                self.queue.forget_file(chunk.key)
                self.offsets.pop(chunk.key, None)
                self.scanner.forget(chunk.key)
        return queued

    def _collect_auditd(self) -> int:
        assert self.auditd is not None
        queued = 0
        for log_chunk in self.auditd.poll():
            self.queue.add_identified(log_chunk.events, log_chunk.key if log_chunk.offset is not None else None,
                                      log_chunk.offset)
            if log_chunk.gone:
                self.queue.forget_file(log_chunk.key)
            queued += len(log_chunk.events)
        return queued

    def status(self) -> dict[str, Any]:
        """The heartbeat: queue depth, drops and sent, its version and capture layers, and what is wrong,
        if anything."""
        status: dict[str, Any] = dict(self.queue.status())
        status.update(version=__version__, sources=self.settings.sources())
        if self.problems:
            status["problem"] = "; ".join(self.problems.values())[:MAX_PROBLEM_CHARS]
        return status

    def ship(self) -> None:
        """Send one batch (or a heartbeat when the queue is empty and one is due)."""
        batch = self.queue.batch(self.batch_events, self.settings.batch_bytes)
        if not batch and time.monotonic() < self.heartbeat_at:
            return
        try:
            master, reply = self.links.ingest(batch, self.status())
        except Unreachable as exc:
            return self._failed(f"no master reachable: {exc}")
        except Refused as exc:
            if exc.code == "frame_too_large" and self.batch_events > 1:
                self.batch_events = max(1, self.batch_events // 2)
            return self._failed(f"refused ({exc.code}): {exc.message}", _seconds(exc.details.get("retry_after")))
        self._delivered(master, batch, reply)

    def _delivered(self, master: str, batch: list[dict[str, Any]], reply: dict[str, Any]) -> None:
        acked = [i for i in reply.get("acked", []) if isinstance(i, str)]
        rejected = [r for r in reply.get("rejected", []) if isinstance(r, dict)]
        for r in rejected:  # a master's reasoned refusal of one event is final: it would never pass
            log.warning("master %s rejected event %s: %s", master, r.get("id"), r.get("reason"))
        indexes = [r.get("index") for r in rejected]
        done = self.queue.done(acked + [batch[i]["id"] for i in indexes if isinstance(i, int) and 0 <= i < len(batch)])
        log.debug("master %s acknowledged %d of %d event(s)", master, done, len(batch))
        self.heartbeat_at = time.monotonic() + self.settings.heartbeat_seconds
        wait = _seconds(reply.get("retry_after"))
        if wait:  # the master's ingest rate for this host is used up: the rest waits here
            self.retry_at = time.monotonic() + wait
            log.warning("master %s takes this host's events more slowly (its ingest limit): %d wait, next batch "
                        "in %.1f s", master, self.queue.depth(), wait)
            return
        self.failures, self.retry_at = 0, 0.0
        self.batch_events = min(self.settings.batch_events, self.batch_events * 2)
        if not self.queue.depth():
            self.links.close()  # nothing more to send: the master's connection slot goes back

    def _failed(self, why: str, wait: float = 0.0) -> None:
        self.failures += 1
        ceiling = min(self.settings.retry_max_seconds, self.settings.retry_min_seconds * 2 ** min(self.failures, 16))
        delay = max(wait, random.uniform(self.settings.retry_min_seconds, ceiling))  # full jitter
        self.retry_at = time.monotonic() + delay
        log.warning("%s; %d event(s) wait, retrying in %.1f s", why, self.queue.depth(), delay)


def _seconds(value: Any) -> float:
    """A master's retry_after, bounded: a master cannot park an agent for long."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return min(float(value), 60.0)
    return 0.0

