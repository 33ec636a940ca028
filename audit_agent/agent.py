"""The agent daemon: spool files -> the bounded queue -> batches to a master of its IDC.

One thread, one loop: scan the spools, queue what is new (with the offsets, in one transaction),
send the oldest batch, delete what the master acknowledged. A failed send backs off exponentially
with full jitter, so a fleet of agents does not hammer a master that just came back. A heartbeat
(spool depth, drops, sent) rides on every batch, and goes alone when there is nothing to send.
"""

from __future__ import annotations

import logging
import random
import signal
import time
from typing import Any

from audit_agent import spool
from audit_agent.auditd import AuditLog
from audit_agent.link import MasterLinks, Unreachable
from audit_agent.queue import EventQueue
from audit_agent.settings import AgentSettings
from masters.envelope import Refused
from masters.keys import Identity

log = logging.getLogger("ombot.audit_agent")


class Agent:
    """The audit agent of one host: it queues what the shell hook's spool (and auditd's log, when
    configured) records, and ships the queue in batches to a master of its IDC, with backoff."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.queue = EventQueue(settings.state_dir, settings.host, settings.max_events)
        self.links = MasterLinks(settings, Identity.load(settings.key_file))
        self.offsets: dict[str, int] = dict(self.queue.db.execute("SELECT file, offset FROM offsets").fetchall())
        self.reported: set[str] = set()
        self.stopping = False
        self.retry_at = 0.0
        self.failures = 0
        self.heartbeat_at = 0.0
        self.batch_events = settings.batch_events
        self.auditd = None if settings.auditd_log is None else AuditLog(  # the second source: the kernel's view
            settings.auditd_log, settings.host, self.queue.boot_id, self.offsets, settings.state_dir)

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        log.info("audit agent for %s: spool %s, %d event(s) queued", self.settings.host, self.settings.spool_dir,
                 self.queue.depth())
        try:
            while not self.stopping:
                self.collect()
                if time.monotonic() >= self.retry_at:
                    self.ship()
                time.sleep(self.settings.scan_seconds)
        finally:
            self.links.close()
            self.queue.close()

    def _stop(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def collect(self) -> int:
        """Queue every new spool line; returns how many events were queued."""
        queued = 0
        for chunk in spool.scan(self.settings.spool_dir, self.offsets, self.reported):
            self.queue.add(chunk.events, chunk.key, chunk.offset)
            self.offsets[chunk.key] = chunk.offset
            queued += len(chunk.events)
            if spool.rotate(chunk):
                self.queue.forget_file(chunk.key)
                self.offsets.pop(chunk.key, None)
        for log_chunk in self.auditd.poll() if self.auditd is not None else ():
            self.queue.add_identified(log_chunk.events, log_chunk.key if log_chunk.offset is not None else None,
                                      log_chunk.offset)
            if log_chunk.gone:
                self.queue.forget_file(log_chunk.key)
            queued += len(log_chunk.events)
        return queued

    def ship(self) -> None:
        """Send one batch (or a heartbeat when the queue is empty and one is due)."""
        batch = self.queue.batch(self.batch_events, self.settings.batch_bytes)
        if not batch and time.monotonic() < self.heartbeat_at:
            return
        try:
            master, reply = self.links.ingest(batch, self.queue.status())
        except Unreachable as exc:
            return self._failed(f"no master reachable: {exc}")
        except Refused as exc:
            if exc.code == "frame_too_large" and self.batch_events > 1:
                self.batch_events = max(1, self.batch_events // 2)
            return self._failed(f"refused ({exc.code}): {exc.message}")
        self._delivered(master, batch, reply)

    def _delivered(self, master: str, batch: list[dict[str, Any]], reply: dict[str, Any]) -> None:
        acked = [i for i in reply.get("acked", []) if isinstance(i, str)]
        rejected = [r for r in reply.get("rejected", []) if isinstance(r, dict)]
        for r in rejected:  # a master's reasoned refusal of one event is final: it would never pass
            log.warning("master %s rejected event %s: %s", master, r.get("id"), r.get("reason"))
        indexes = [r.get("index") for r in rejected]
        done = self.queue.done(acked + [batch[i]["id"] for i in indexes if isinstance(i, int) and 0 <= i < len(batch)])
        log.debug("master %s acknowledged %d of %d event(s)", master, done, len(batch))
        self.failures, self.retry_at = 0, 0.0
        self.heartbeat_at = time.monotonic() + self.settings.heartbeat_seconds
        self.batch_events = min(self.settings.batch_events, self.batch_events * 2)

    def _failed(self, why: str) -> None:
        self.failures += 1
        ceiling = min(self.settings.retry_max_seconds, self.settings.retry_min_seconds * 2 ** min(self.failures, 16))
        delay = random.uniform(self.settings.retry_min_seconds, ceiling)  # full jitter
        self.retry_at = time.monotonic() + delay
        log.warning("%s; %d event(s) wait, retrying in %.1f s", why, self.queue.depth(), delay)
