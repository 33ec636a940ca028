"""Several IDCs in one request: `/om echo web01 idc=bj,sh` or `idc=*` (every IDC of the config).

The request is split into one part per IDC, each a job of its own (a `BotJob`, with its own number,
lease and follower) submitted through that IDC's masters and failover. The parts share a request id:
`bot_multi_request` keeps the hosts each part had when the policy (and the approvers) saw them, and
`bot_multi_part` ties each part's job to its request. One approval covers every part; one card shows
each part's progress, one line per part, updated in place by whichever part's follower moves; the
Cancel button (and `/om cancel N` with any part's number) stops every part. A part whose IDC cannot
be reached shows `failed: reason` on the card while the others run. A list that names one IDC
(`idc=bj,`, or `idc=*` where the config has one) is handed back as that IDC's plain request.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import peewee

from ombot.approvals import ApprovalRequest, Decision, Gate, authorize_parts
from ombot.bot import grammar, metrics, store
from ombot.bot.messages import CHECK, CardState, job_card
from ombot.bot.transport import ChatRequest, Transport
from ombot.masters import FINAL_STATES, ConnectFailed, JobRef, JobState, MasterLost, NoMasterAvailable, Refused, Router
from ombot.modules import ModuleSpec, ParamError
from ombot.config import named_idcs, several_idcs
from ombot.errors import OmbotError
from ombot.message import Message, clip, text_message
from ombot.storage import JSONField, create_tables, migrate

log = logging.getLogger("ombot.bot.multi")

UNREACHABLE = (NoMasterAvailable, ConnectFailed, MasterLost)
IDC_FIELD = 64  # what ApprovalRequest.idc holds; a longer list of names is stored as `*`
LIVE_GROUPS = 256  # requests whose parts' live progress is kept in memory (the newest)
PREVIEW_HOSTS = 30
KEEP_UNSTARTED_MS = 8 * 86_400_000  # longer than any approval may wait (policy: at most 7 days)


class MultiRequest(peewee.Model):
    """A request split over IDCs: each part's IDC and hosts, as the policy and the approvers saw them."""

    request_id = peewee.CharField(max_length=36, primary_key=True)  # the approval request's id, if it needed one
    parts = JSONField()  # [{"idc": "bj", "hosts": [...], "reason": "why it cannot run" or ""}], in order
    created_at = peewee.BigIntegerField()

    class Meta:
        database = store.db
        table_name = "bot_multi_request"


class MultiPart(peewee.Model):
    """One part's job (bot_job.job_id) and the request it belongs to."""

    job_id = peewee.CharField(max_length=36, primary_key=True)
    request_id = peewee.CharField(max_length=36, index=True)
    idc = peewee.CharField(max_length=64)
    position = peewee.IntegerField()

    class Meta:
        database = store.db
        table_name = "bot_multi_part"


MIGRATIONS = [create_tables(MultiRequest, MultiPart)]


def prepare() -> None:
    """Create the tables in the bot's database (after bot.store is opened)."""
    migrate(store.db.obj, "bot_multi", MIGRATIONS)


def forget_before(cutoff_ms: int) -> None:
    """Retention: the part rows of jobs already deleted, then requests none of whose parts is left.
    A request is kept at least as long as an approval may wait (it starts from its stored split)."""
    MultiPart.delete().where(MultiPart.job_id.not_in(store.BotJob.select(store.BotJob.job_id))).execute()
    oldest = min(cutoff_ms, store.now() - KEEP_UNSTARTED_MS)
    MultiRequest.delete().where((MultiRequest.created_at < oldest)
                                & MultiRequest.request_id.not_in(MultiPart.select(MultiPart.request_id))).execute()


class Follower(Protocol):
    """What the parts need from the job follower (bot.jobs imports this module, not the reverse)."""

    def claim(self, job_id: str) -> bool: ...

    def let_go(self, job_id: str) -> None: ...

    def start(self, job: store.BotJob, transport: Transport, first: Sequence[dict[str, Any]] = ()) -> None: ...

    def end_early(self, job: store.BotJob, transport: Transport, state: JobState, reason: str) -> None: ...


class Approvals(Protocol):
    """Asking for the one approval (bot.approval_flow imports this module, not the reverse)."""

    def ask(self, command: grammar.Run, spec: ModuleSpec, hosts: list[str], decision: Decision,
            req: ChatRequest, transport: Transport,
            link: Callable[[ApprovalRequest], None] | None = None) -> ApprovalRequest: ...


class Dispatching(Protocol):
    """What a request over several IDCs needs from the dispatcher (which imports this module, not
    the reverse): read-only, so the dispatcher's own attributes fit."""

    @property
    def router(self) -> Router: ...

    @property
    def gate(self) -> Gate | None: ...

    @property
    def follower(self) -> Follower: ...

    @property
    def approvals(self) -> Approvals: ...

    def spec_of(self, idc: str, name: str) -> ModuleSpec: ...


# (a request for one IDC, who asked, transport): run it as any single-IDC request
RunOne = Callable[[grammar.Run, ChatRequest, Transport], None]


@dataclass(frozen=True)
class Part:
    """One IDC's share of a request: its hosts, or why it cannot run."""

    idc: str
    hosts: list[str]
    reason: str = ""  # why this part cannot run (its masters did not answer); it then shows failed

    def as_dict(self) -> dict[str, Any]:
        return {"idc": self.idc, "hosts": self.hosts, "reason": self.reason}


def is_multi(idc: str | None) -> bool:
    return several_idcs(idc)


# -- asking ----------------------------------------------------------------------------------------


def run(d: Dispatching, command: grammar.Run, req: ChatRequest, transport: Transport, one: RunOne) -> None:
    """`/om MODULE TARGETS idc=bj,sh`: expand and decide per IDC, then ask once or start every part;
    a list that names one IDC goes to `one`."""
    assert command.idc is not None
    idcs = named_idcs(d.router.config, command.idc)
    if len(idcs) == 1:  # `*` with one IDC configured, or `bj,`: exactly today's request
        one(replace(command, idc=idcs[0]), req, transport)
        return
    spec = spec_for(d, ",".join(idcs), command.module)
    missing = [p.name for p in spec.params if p.required and p.name not in command.params]
    if command.targets is None or missing:
        need = ", ".join(missing) or "targets"
        transport.respond(req, text_message(f"`{spec.name}` needs: {need} (a form covers one IDC: type the "
                                            f"parameters to run in several).\nusage: `/om {spec.usage()}`"))
        return
    parts = [_expand(d, idc, command.module, command.targets, command.params, req) for idc in idcs]
    ready = [p for p in parts if not p.reason]
    if not ready:
        raise OmbotError("Nothing can run: " + "; ".join(p.reason for p in parts))
    decision = authorize_parts(d.gate, req.user, spec.name, [(p.idc, p.hosts) for p in ready])
    if command.dry_run:
        gate = f"; needs {decision.approval.count} approval(s)" if decision.approval and decision.needs_approval else ""
        transport.respond(req, text_message(f"Dry run ({decision.reason}{gate}): would run `{spec.name}` in "
                                            f"{len(parts)} IDCs:\n{parts_text(parts)}"))
        return
    label = ",".join(idcs)
    whole = replace(command, idc=label if len(label) <= IDC_FIELD else "*")
    hosts = [h for p in ready for h in p.hosts]
    if decision.needs_approval:
        d.approvals.ask(whole, spec, hosts, decision, req, transport,
                        link=lambda request: _save(request.request_id, parts))
        return
    group_id = str(uuid.uuid4())
    _save(group_id, parts)
    start(d, whole, spec, req, transport, (), decision.cancel_roles, group_id)


def spec_for(d: Dispatching, idc: str, name: str) -> ModuleSpec:
    """The module's spec from the first IDC of the list whose masters answer (each part's own
    master validates again); unknown in a reachable IDC is an error for the whole request."""
    reasons: list[str] = []
    for one in named_idcs(d.router.config, idc):
        try:
            return d.spec_of(one, name)
        except UNREACHABLE as exc:
            reasons.append(str(exc))
    raise OmbotError(f"Cannot reach the masters of any of {idc}: {'; '.join(reasons)}")


def _expand(d: Dispatching, idc: str, module: str, targets: str, params: dict[str, str], req: ChatRequest) -> Part:
    """One IDC's part: its hosts, or why its masters could not be asked. A refusal (unknown module,
    bad targets or parameters) refuses the whole request, as it would in one IDC."""
    try:
        spec = d.spec_of(idc, module)
        try:
            spec.validate(params)
        except ParamError as exc:
            raise ParamError(exc.param, f"{exc.expected} (in {idc})\nusage: `/om {spec.usage()}`") from None
        hosts = d.router.expand(idc, targets, requester=req.user)
    except UNREACHABLE as exc:
        return Part(idc, [], f"cannot reach the masters of {idc}: {exc}")
    except Refused as exc:
        raise Refused(exc.code, f"in {idc}: {exc.message}") from None
    return Part(idc, hosts) if hosts else Part(idc, [], f"no hosts match in {idc}")


def _save(request_id: str, parts: Sequence[Part]) -> None:
    MultiRequest.create(request_id=request_id, parts=[p.as_dict() for p in parts], created_at=store.now())


def parts_of(request_id: str) -> list[Part] | None:
    row = MultiRequest.get_or_none(MultiRequest.request_id == request_id)
    if row is None:
        return None
    return [Part(p["idc"], list(p["hosts"]), p.get("reason") or "") for p in row.parts]


def parts_text(parts: Sequence[Part]) -> str:
    """One line per part, for the dry run and the approval message."""
    lines = []
    for p in parts:
        if p.reason:
            lines.append(f"{p.idc}: not run: {p.reason}")
            continue
        shown = ", ".join(p.hosts[:PREVIEW_HOSTS]) + (f" \u2026 and {len(p.hosts) - PREVIEW_HOSTS} more"
                                                     if len(p.hosts) > PREVIEW_HOSTS else "")
        lines.append(f"{p.idc} ({len(p.hosts)} host{'s' * (len(p.hosts) != 1)}): {shown}")
    return "\n".join(lines)


def approval_parts(request_id: str) -> str:
    """What an approval message lists for a request over several IDCs ("" for any other request)."""
    parts = parts_of(request_id)
    return parts_text(parts) if parts else ""


# -- starting --------------------------------------------------------------------------------------


def start(d: Dispatching, command: grammar.Run, spec: ModuleSpec, req: ChatRequest, transport: Transport,
          approvers: Sequence[str], cancel_roles: Sequence[str], request_id: str) -> None:
    """Store every part (each its own job and lease), post the one card, then submit each part to
    its IDC; a part that cannot run or be submitted ends `failed` on the card, the others go on."""
    parts = parts_of(request_id)
    if parts is None:
        raise OmbotError(f"Request {request_id} has no parts recorded; it cannot start.")
    values = spec.validate(command.params)
    shown = {k: v for k, v in values.items() if v is not None}
    if command.check:  # as Dispatcher.start_job: the card says "check" from it
        shown[CHECK] = True
    jobs = _store_parts(d, request_id, parts, spec.name, shown, req, approvers, cancel_roles)
    try:
        transport.respond(req, text_message(f"Starting job #{jobs[0].number}: `{spec.name}` in {len(jobs)} IDCs:\n"
                                            + "\n".join(f"{j.idc} #{j.number}: {j.host_count} host(s)" for j in jobs)))
        card_ts = transport.post(req.channel, card_message(jobs[0], stored_card(jobs[0])), req=req)
        for job in jobs:
            store.update_job(job, card_ts=card_ts)
    except Exception:  # the parts are adopted on the next tick and never stay stuck
        for job in jobs:
            d.follower.let_go(job.job_id)
        raise
    broke: list[Exception] = []
    for job, part in zip(jobs, parts):
        try:
            if part.reason:
                d.follower.end_early(job, transport, JobState.FAILED, part.reason)
            else:
                _submit(d, job, command, spec, req, transport, approvers)
        except Exception as exc:  # the other parts still go; this one is adopted on the next tick
            log.exception("starting part %s (%s) of request %s", job.job_id, job.idc, request_id)
            d.follower.let_go(job.job_id)
            broke.append(exc)
    if broke:
        raise broke[0]


def _store_parts(d: Dispatching, request_id: str, parts: Sequence[Part], module: str, shown: dict[str, Any],
                 req: ChatRequest, approvers: Sequence[str], cancel_roles: Sequence[str]) -> list[store.BotJob]:
    # A part's job id follows from the request and its IDC: the same request can never start twice.
    ids = [str(uuid.uuid5(uuid.UUID(request_id), part.idc)) for part in parts]
    claimed: list[str] = []
    try:
        for job_id in ids:  # owned from before it is stored, as a single job is
            if not d.follower.claim(job_id):
                raise OmbotError(f"Job {job_id} is already being started.")
            claimed.append(job_id)
        jobs = []
        with store.db.atomic():
            for position, (job_id, part) in enumerate(zip(ids, parts)):
                MultiPart.create(job_id=job_id, request_id=request_id, idc=part.idc, position=position)
                jobs.append(store.BotJob.create(
                    job_id=job_id, requester=req.user, origin=req.origin, channel=req.channel,
                    idc=part.idc, module=module, params=shown, host_count=len(part.hosts), hosts=list(part.hosts),
                    state=JobState.SUBMITTING, created_at=store.now(), reply_url=req.response_url,
                    approvers=list(approvers), cancel_roles=list(cancel_roles)))
        return jobs
    except Exception:
        for job_id in claimed:
            d.follower.let_go(job_id)
        raise


def _submit(d: Dispatching, job: store.BotJob, command: grammar.Run, spec: ModuleSpec, req: ChatRequest,
            transport: Transport, approvers: Sequence[str]) -> None:
    """One part to its IDC, as Dispatcher._submit sends a single job (without its own card)."""
    try:
        ref, reply = d.router.submit(job.idc, spec.name, command.params, list(job.hosts), approvers=approvers,
                                     timeout=command.timeout, request_id=job.job_id, requester=req.user,
                                     check=command.check)
    except MasterLost as exc:  # sent, then the link broke: follow it where it went, never re-send
        metrics.job_submitted(spec.name, "lost")
        if exc.ref is None:
            d.follower.end_early(job, transport, JobState.UNKNOWN, str(exc))
        else:
            store.update_job(job, master_id=exc.ref.master_id, state=JobState.QUEUED)
            d.follower.start(job, transport)
        return
    except (Refused, NoMasterAvailable) as exc:
        metrics.job_submitted(spec.name, "refused")
        d.follower.end_early(job, transport, JobState.FAILED, getattr(exc, "message", str(exc)))
        return
    metrics.job_submitted(spec.name, "accepted")
    store.update_job(job, master_id=ref.master_id, state=JobState.QUEUED)
    d.follower.start(job, transport, reply.get("events", []))


# -- the one card ----------------------------------------------------------------------------------

_live: OrderedDict[str, dict[str, CardState]] = OrderedDict()  # request -> job id -> progress followed here
_locks: dict[str, threading.Lock] = {}
_registry = threading.Lock()


def card_message(job: store.BotJob, card: CardState) -> Message:
    """The card of a job: its own, or, for a part, its request's one card."""
    part = MultiPart.get_or_none(MultiPart.job_id == job.job_id)
    return job_card(card) if part is None else _request_card(part.request_id, job.job_id, card)


def show_card(transport: Transport, job: store.BotJob, card: CardState) -> None:
    """Update the job's card in place. Parts render and update under their request's lock, so the
    last update of the shared card is always the newest picture of every part."""
    assert job.card_ts is not None
    part = MultiPart.get_or_none(MultiPart.job_id == job.job_id)
    if part is None:
        transport.update(job.channel, job.card_ts, job_card(card))
        return
    with _lock_of(part.request_id):
        transport.update(job.channel, job.card_ts, _request_card(part.request_id, job.job_id, card))


def _lock_of(request_id: str) -> threading.Lock:
    with _registry:
        return _locks.setdefault(request_id, threading.Lock())


def _request_card(request_id: str, job_id: str, card: CardState) -> Message:
    with _registry:
        live = _live.setdefault(request_id, {})
        live[job_id] = card
        _live.move_to_end(request_id)
        while len(_live) > LIVE_GROUPS:
            old, _ = _live.popitem(last=False)
            _locks.pop(old, None)
        followed = dict(live)
    order = [p.job_id for p in MultiPart.select().where(MultiPart.request_id == request_id).order_by(MultiPart.position)]
    jobs = {j.job_id: j for j in store.BotJob.select().where(store.BotJob.job_id.in_(order))}
    cards = [(followed.get(i) or stored_card(jobs[i]), i in followed or jobs[i].hosts_ok is not None)
             for i in order if i in jobs]
    return job_card(_combined(cards))


def stored_card(job: store.BotJob) -> CardState:
    """A job's card as the database has it: per-host counts once it ended (its follower has them
    before), no schedule label (bot.jobs.card_of adds it; a request's one card shows none)."""
    ok, failed = job.hosts_ok or 0, job.hosts_failed or 0
    return CardState(
        number=job.number, job_id=job.job_id, requester=job.requester, module=job.module,
        params=job.params, idc=job.idc, hosts=job.host_count, created_at=job.created_at,
        state=job.state, finished_at=job.finished_at if job.state in FINAL_STATES else None, note=job.note or "",
        done=ok + failed, ok=ok, failed=failed,
    )


def _combined(cards: Sequence[tuple[CardState, bool]]) -> CardState:
    """The request's card: the first part's number and Cancel button, every part's hosts and counts,
    and one line per part in the note."""
    first = cards[0][0]
    states = [c.state for c, _ in cards]
    final = all(s in FINAL_STATES for s in states)
    if final:
        state = states[0] if len(set(states)) == 1 else JobState.PARTIAL
    else:
        state = next((s for s in (JobState.RUNNING, JobState.QUEUED) if s in states), JobState.SUBMITTING)
    ended = [c.finished_at for c, _ in cards if c.finished_at]
    return CardState(
        number=first.number, job_id=first.job_id, requester=first.requester, module=first.module,
        params=first.params, idc=",".join(c.idc for c, _ in cards), hosts=sum(c.hosts for c, _ in cards),
        created_at=first.created_at, state=state, done=sum(c.done for c, _ in cards),
        ok=sum(c.ok for c, _ in cards), failed=sum(c.failed for c, _ in cards),
        finished_at=max(ended) if final and ended else None, note="\n".join(_line(c, live) for c, live in cards))


def _line(card: CardState, live: bool) -> str:
    """`bj #5: ok · 3/3 hosts · 3 ok · 0 failed`, or `sh #6: failed: why · 2 hosts`."""
    why = f": {clip(card.note, 300)}" if card.note else ""
    counts = (f"{card.done}/{card.hosts} hosts \u00b7 {card.ok} ok \u00b7 {card.failed} failed" if live
              else f"{card.hosts} host{'s' * (card.hosts != 1)}")
    return f"{card.idc} #{card.number}: {card.state}{why} \u00b7 {counts}"


# -- cancelling ------------------------------------------------------------------------------------


def parts_with(job: store.BotJob) -> list[store.BotJob]:
    """Every part of the request `job` belongs to, in order ([] for a single job)."""
    part = MultiPart.get_or_none(MultiPart.job_id == job.job_id)
    if part is None:
        return []
    order = [p.job_id for p in MultiPart.select().where(MultiPart.request_id == part.request_id)
             .order_by(MultiPart.position)]
    jobs = {j.job_id: j for j in store.BotJob.select().where(store.BotJob.job_id.in_(order))}
    return [jobs[i] for i in order if i in jobs]


def cancel_parts(d: Dispatching, jobs: Sequence[store.BotJob], req: ChatRequest, transport: Transport) -> None:
    """Ask each part's master to cancel it (the caller checked who may); say what became of each."""
    said = []
    for job in jobs:
        if job.state in FINAL_STATES:
            said.append(f"{job.idc} #{job.number} already ended: {job.state}")
            continue
        if job.master_id is None:
            said.append(f"{job.idc} #{job.number} has not reached a master")
            continue
        try:
            reply = d.router.cancel(JobRef(job.job_id, job.idc, job.master_id), requester=req.user)
        except (Refused, *UNREACHABLE) as exc:
            said.append(f"{job.idc} #{job.number}: cannot cancel: {clip(str(exc), 200)}")
            continue
        said.append(f"{job.idc} #{job.number} cancelling" if reply["cancelled"]
                    else f"{job.idc} #{job.number} already ended: {reply['state']}")
    transport.respond(req, text_message(f"Cancelling job #{jobs[0].number} in {len(jobs)} IDCs: " + "; ".join(said)))
