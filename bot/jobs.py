"""Following jobs on OMBot's own worker pool: progress on the card, results in its thread."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bot import store
from bot.messages import CardState, job_card, results_message
from bot.transport import ChatRequest, Transport
from masters import JobRef, JobState, Router

log = logging.getLogger("ombot.bot.jobs")

UPDATE_INTERVAL = 2.0  # at most one card update per 2 s per card; the final state is always written
IDLE_WAIT = 15.0


class JobFollower:
    """Follows each started job at its master and keeps its card and thread up to date."""

    def __init__(self, router: Router, pool: ThreadPoolExecutor) -> None:
        self.router, self.pool = router, pool

    def start(self, job: store.BotJob, transport: Transport, first: Sequence[dict[str, Any]] = ()) -> None:
        """Follow a job; `first` are events already in hand (from the submit reply)."""
        self.pool.submit(self._guarded, job, transport, list(first))

    def resume_all(self, transport_for: Callable[[str], Transport | None]) -> int:
        """After a restart: follow again every job that had not ended, updating its existing card."""
        pending = store.BotJob.select().where(~store.BotJob.reported & store.BotJob.master_id.is_null(False))
        count = 0
        for job in pending:
            transport = transport_for(job.origin)
            if transport is not None:
                self.start(job, transport)
                count += 1
        return count

    def _guarded(self, job: store.BotJob, transport: Transport, first: Sequence[dict[str, Any]] = ()) -> None:
        try:
            self._follow(job, transport, first)
        except Exception:
            log.exception("following job %s failed", job.job_id)

    def _follow(self, job: store.BotJob, transport: Transport, first: Sequence[dict[str, Any]]) -> None:
        card = card_of(job)
        results: dict[str, dict[str, Any]] = {}
        last_update, dirty = 0.0, False

        def on_event(event: dict[str, Any]) -> None:
            nonlocal dirty
            apply_event(card, results, event)
            dirty = True

        def next_wait() -> float:
            return max(0.0, last_update + UPDATE_INTERVAL - time.monotonic()) if dirty else IDLE_WAIT

        def flush(force: bool = False) -> None:
            nonlocal last_update, dirty
            if dirty and (force or time.monotonic() - last_update >= UPDATE_INTERVAL) and job.card_ts:
                transport.update(job.channel, job.card_ts, job_card(card))
                last_update, dirty = time.monotonic(), False

        assert job.master_id is not None  # followed only once a master has it
        ref = JobRef(job.job_id, job.idc, job.master_id)
        self.router.follow(ref, on_event, next_wait, flush, first)
        store.update_job(job, state=card.state, finished_at=card.finished_at or store.now())
        req = ChatRequest(job.requester, job.channel, origin=job.origin, response_url=job.reply_url)
        if job.card_ts:
            dirty = True
            flush(force=True)
        else:
            transport.post(job.channel, job_card(card), req=req)
        transport.post(job.channel, results_message(job.number, list(results.values())), thread_ts=job.card_ts, req=req)
        store.update_job(job, reported=True)


def card_of(job: store.BotJob) -> CardState:
    return CardState(
        number=job.number, job_id=job.job_id, requester=job.requester, module=job.module,
        params=job.params, idc=job.idc, hosts=job.host_count, created_at=job.created_at,
        state=job.state,
    )


def apply_event(card: CardState, results: dict[str, dict[str, Any]], event: dict[str, Any]) -> None:
    kind, data = event["kind"], event["data"]
    if kind == "accepted" and not card.final:
        card.state = JobState.RUNNING
    elif kind == "host":
        results[data["host"]] = data
        card.done = len(results)
        card.ok = sum(1 for r in results.values() if r["status"] == "ok")
        card.failed = card.done - card.ok
    elif kind == "cancel_requested":
        card.note = f"cancel requested by <@{data.get('by')}>"
    elif kind == "finished":
        card.state, card.finished_at = data["state"], event["at"]  # epoch ms, as the master stores it
        if data.get("reason"):
            card.note = data["reason"]
