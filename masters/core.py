"""The master's logic, independent of the transport: open a request, check it, act, seal the reply.

`MasterCore.handle(op, frame)` never raises and never returns a traceback: every refusal is a
structured error in the reply, and anything unexpected becomes `internal` with a reference that
is also in the master's log.
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ombot
from masters import store
from masters.backends.base import Backend, HostResult, HostStatus, RunContext
from masters.clients import check_approvers, check_permitted, check_requester
from masters.envelope import Opener, Peer, Refused, Request
from masters.inventory import Inventory, TargetError
from masters.keys import Identity, decode_public
from masters.lograte import LogBudget
from masters.slots import JobSlots
from masters.states import FINAL_STATES, JobState
from modules import Module, ParamError, Plan, Shell, catalog_of
from ombot.clock import MS_PER_SECOND, now_ms
from ombot.config import ClientRegistration, MasterSettings

log = logging.getLogger("ombot.master")

MAX_WAIT_SECONDS = 20.0  # below rpyc's 30 s sync timeout
MAX_EVENTS_PER_REPLY = 500
MAX_REPLY_OUTPUT = 1024 * 1024  # captured output per events reply, at least one event
COALESCE_SECONDS = 0.01  # once events exist, wait this long for more so a quick job ends in one reply
NONCE_PURGE_SECONDS = 300
MAX_SUBMIT_WAIT_SECONDS = 2.0


@dataclass
class LiveJob:
    """A job this process is running: where its events are announced and its cancel is signalled."""

    id: str
    sender: str
    host_count: int
    next_seq: int
    state: JobState = JobState.QUEUED
    finished: bool = False  # set once the final state and "finished" event are committed
    cancelled: threading.Event = field(default_factory=threading.Event)
    changed: threading.Condition = field(default_factory=lambda: threading.Condition(threading.RLock()))
    results: list[HostResult] = field(default_factory=list)
    held: HostResult | None = None  # the last host's result, written together with the final state


class MasterCore:
    def __init__(self, settings: MasterSettings, identity: Identity, clients: dict[str, ClientRegistration],
                 modules: dict[str, Module], inventory: Inventory | None, backend: Backend) -> None:
        self.settings, self.modules, self.inventory, self.backend = settings, modules, inventory, backend
        self.clients = clients
        self.catalog = catalog_of(modules)
        limits = settings.limits
        accepted = {cid: decode_public(client.public_key) for cid, client in clients.items()}
        self.opener = Opener(identity, settings.id, accepted, limits.max_frame_bytes,
                             limits.clock_skew_seconds, limits.max_validity_seconds)
        self.live: dict[str, LiveJob] = {}
        self.lock = threading.Lock()
        self.slots = JobSlots(limits.max_jobs, limits.max_jobs_per_requester)
        self.started_at = time.time()
        self._next_purge = 0.0
        operations: dict[str, Callable[[Request], dict[str, Any]]] = {
            "catalog": self._catalog, "expand": self._expand, "submit": self._submit,
            "events": self._events, "cancel": self._cancel, "health": self._health,
        }
        # Every operation first checks who is asking against the sender's registration.
        self.ops = {op: self._as_registered(work) for op, work in operations.items()}
        self._recover_interrupted()

    # -- transport entry point -------------------------------------------------------------

    # What a peer without a valid envelope can make the master write: rate-limited, shared by all.
    strangers_log = LogBudget(log, burst=20, per_second=0.5)

    def handle(self, op: str, frame: object, authenticated: Callable[[], None] | None = None) -> bytes:
        """`authenticated` is called once the frame has opened (a valid envelope from an accepted key),
        before any work: the transport then stops treating that connection as a stranger's."""
        peer: Peer | None = None
        request: Request | None = None
        try:
            request, peer = self.opener.open(frame, op)
            if authenticated is not None:
                authenticated()
            if op == "cancel":  # state-changing: a replay must never act twice (submit checks in _record)
                self._remember(request)
            if op in ("submit", "cancel") and time.monotonic() >= self._next_purge:
                # Nonces past their window can never pass the time checks again: forget them.
                self._next_purge = time.monotonic() + NONCE_PURGE_SECONDS
                store.forget_old_nonces()
            return self.opener.seal_reply(peer, request, self.ops[op](request))
        except Refused as refused:
            if peer is None:  # nothing proves who sent it: anyone can send these, as fast as they like
                self.strangers_log.info("refused %s: %s (%r)", op, refused.code, refused.message)
            else:
                log.info("refused %s: %s (%r)", op, refused.code, refused.message)
            return self.opener.seal_refusal(peer, request, refused)
        except Exception:
            ref = uuid.uuid4().hex[:8]
            log.exception("internal error on %s, ref E-%s", op, ref)
            return self.opener.seal_refusal(peer, request, Refused("internal", f"internal error, ref E-{ref}"))

    def _remember(self, request: Request) -> None:
        if not store.remember_nonce(request.nonce, self._keep_nonce_until(request)):
            raise Refused("replay", "this request was already received (replayed nonce)")

    def _keep_nonce_until(self, request: Request) -> int:
        """Epoch ms, as stored; the envelope's times are epoch seconds."""
        return (max(request.expires_at, request.issued_at + self.opener.skew) + 1) * MS_PER_SECOND

    def _as_registered(self, work: Callable[[Request], dict[str, Any]]) -> Callable[[Request], dict[str, Any]]:
        def checked(request: Request) -> dict[str, Any]:
            check_requester(self.clients[request.sender], request)
            return work(request)

        return checked

    # -- read-only operations ------------------------------------------------------------------

    def _catalog(self, request: Request) -> dict[str, Any]:
        return {"catalog": self.catalog.schema()}

    def _health(self, request: Request) -> dict[str, Any]:
        running, waiting = self.slots.counts()
        return {
            "master": self.settings.id, "idc": self.settings.idc, "version": ombot.__version__,
            "backend": self.backend.name, "time": int(time.time()), "uptime": int(time.time() - self.started_at),
            "running_jobs": running, "waiting_jobs": waiting, "catalog_version": self.catalog.version,
        }

    def _expand(self, request: Request) -> dict[str, Any]:
        targets = request.args.get("targets")
        if not isinstance(targets, str):
            raise Refused("bad_request", "expand needs targets as a string")
        try:
            return {"hosts": self._inventory().expand(targets)}
        except TargetError as exc:
            raise Refused("bad_targets", str(exc)) from None

    def _inventory(self) -> Inventory:
        if self.inventory is None:
            raise Refused("no_inventory", f"master {self.settings.id} has no inventory configured")
        return self.inventory

    # -- submit ------------------------------------------------------------------------------

    def _submit(self, request: Request) -> dict[str, Any]:
        try:
            module, values, hosts, timeout = self._check_job(request)
            plan = self._plan(module, values)
        except Refused:
            if self._known(request.id):  # a re-submit is answered with the job, even if it would fail now
                return self._duplicate(request)
            raise
        job = self._record(request, module, values, hosts, timeout)
        if job is None:  # this request id is already a job: idempotent, it never runs twice
            return self._duplicate(request)
        live = self.live[request.id]
        self.slots.submit(request.requester, lambda: self._run(request.id, plan, hosts, timeout))
        reply = {"job": _summary(job), "duplicate": False}
        wait = request.args.get("wait") or 0
        if isinstance(wait, (int, float)) and wait > 0:  # a quick job comes back whole, in this one reply
            with live.changed:
                live.changed.wait_for(lambda: live.finished, timeout=min(float(wait), MAX_SUBMIT_WAIT_SECONDS))
            reply["events"] = self._read_events(request.id, 0)
        return reply

    @staticmethod
    def _known(job_id: str) -> bool:
        return store.Job.select(store.Job.id).where(store.Job.id == job_id).exists()

    def _duplicate(self, request: Request) -> dict[str, Any]:
        job = store.Job.get_by_id(request.id)
        if job.sender != request.sender:
            raise Refused("conflict", "that request id belongs to another client's job")
        return {"job": _summary(job), "duplicate": True}

    def _check_job(self, request: Request) -> tuple[Module, dict[str, Any], list[str], int]:
        args, client = request.args, self.clients[request.sender]
        name = args.get("module")
        if not isinstance(name, str) or name not in self.modules:
            close = difflib.get_close_matches(str(name), self.modules, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise Refused("unknown_module", f"no module named {name!r} on this master{hint}")
        module = self.modules[name]
        if args.get("idc") != self.settings.idc:
            raise Refused("wrong_idc", f"this master serves IDC {self.settings.idc!r}, not {args.get('idc')!r}")
        params = args.get("params")
        if not isinstance(params, dict):
            raise Refused("invalid_params", "params must be an object")
        try:
            values = module.validate(params)
        except ParamError as exc:
            raise Refused("invalid_params", str(exc), param=exc.param) from None
        hosts = self._check_hosts(args.get("hosts"))
        check_permitted(client, module.name, hosts)
        self._check_approvals(module.name, check_approvers(client, args.get("approvers")), request.requester)
        return module, values, hosts, self._timeout(module, args.get("timeout"))

    def _check_approvals(self, module: str, approvers: list[str], requester: str) -> None:
        """The master's own approval floor: it never trusts the bot to have run the approval flow."""
        needed = max((n for glob, n in self.settings.approvals.items() if fnmatch.fnmatchcase(module, glob)), default=0)
        if not needed:
            return
        if requester in approvers:
            raise Refused("approval_required", f"{module}: the requester cannot approve their own job")
        if len(set(approvers)) != len(approvers):
            raise Refused("approval_required", f"{module}: an approver is listed twice")
        if len(approvers) < needed:
            raise Refused("approval_required", f"{module} needs {needed} approval(s) on this master; "
                                               f"the request carries {len(approvers)}", needed=needed)

    def _check_hosts(self, hosts: Any) -> list[str]:
        if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) for h in hosts):
            raise Refused("bad_request", "hosts must be a non-empty list of host names")
        if len(set(hosts)) != len(hosts):
            raise Refused("bad_request", "hosts lists a host twice")
        missing = self._inventory().missing(hosts)
        if missing:
            raise Refused("unknown_host", f"not in this master's inventory: {', '.join(missing[:10])}",
                          hosts=missing[:100])
        return hosts

    def _timeout(self, module: Module, requested: Any) -> int:
        ceiling = self.settings.limits.job_timeout_seconds
        if requested is None:
            return min(module.timeout or ceiling, ceiling)
        if not isinstance(requested, int) or isinstance(requested, bool) or not 1 <= requested <= ceiling:
            raise Refused("invalid_params", f"timeout: expected seconds from 1 to {ceiling}", param="timeout")
        return requested

    def _plan(self, module: Module, values: dict[str, Any]) -> Plan:
        try:
            plan = module.plan(values)
        except Exception as exc:
            log.exception("module %s failed to plan", module.name)
            raise Refused("module_error", f"{module.name} could not plan: {type(exc).__name__}") from None
        if any(isinstance(step, Shell) for step in plan.steps) and not module.allows_shell:
            raise Refused("module_error", f"{module.name} tried to run a shell without declaring a shell parameter")
        return plan

    def _record(self, request: Request, module: Module, values: dict[str, Any], hosts: list[str],
                timeout: int) -> store.Job | None:
        now = now_ms()
        live = LiveJob(request.id, request.sender, len(hosts), next_seq=1)
        try:
            with store.db.atomic():  # nonce, job and first event: all or nothing, in one transaction
                if not store.remember_nonce(request.nonce, self._keep_nonce_until(request)):
                    raise Refused("replay", "this request was already received (replayed nonce)")
                job = store.Job.create(
                    id=request.id, sender=request.sender, requester=request.requester, origin=request.origin,
                    approvers=request.args.get("approvers") or [], module=module.name, params=values,
                    hosts=hosts, idc=self.settings.idc, timeout=timeout, state=JobState.QUEUED,
                    created_at=now, signed_request=request.signed,
                )
                self._append(live, "accepted", {"hosts": hosts, "module": module.name, "timeout": timeout})
        except store.peewee.IntegrityError:
            return None
        with self.lock:
            self.live[request.id] = live
        return job

    # -- running -------------------------------------------------------------------------------

    def _run(self, job_id: str, plan: Plan, hosts: list[str], timeout: int) -> None:
        live = self.live[job_id]
        started = time.time()
        live.state = JobState.RUNNING  # in memory only: one write less per job; a restart reports it unknown anyway
        ctx = RunContext(
            job_id=job_id, plan=plan, hosts=hosts, host_vars=self._host_vars, report=lambda r: self._report(live, r),
            output_cap=self.settings.limits.output_cap_bytes, deadline=time.monotonic() + timeout,
            cancelled=live.cancelled, max_parallel=self.settings.limits.max_parallel_hosts,
            file_store=self.settings.state_dir / "files",
        )
        try:
            self.backend.run(ctx)
        except Exception:
            log.exception("backend %s failed on job %s", self.backend.name, job_id)
        try:
            self._finish(live, hosts, started)
        except Exception:
            # The final record could not be written: say so, and never leave a follower waiting forever.
            log.exception("could not record the end of job %s", job_id)
            with live.changed:
                live.state, live.finished = JobState.UNKNOWN, True
                live.changed.notify_all()
            with self.lock:
                self.live.pop(live.id, None)

    def _host_vars(self, host: str) -> dict[str, Any]:
        return self.inventory.host_vars(host) if self.inventory else {}

    def _report(self, live: LiveJob, result: HostResult) -> None:
        with live.changed:  # backends may report from several threads
            live.results.append(result)
            last = len(live.results) == live.host_count
        if last:
            live.held = result  # saves a commit: written with the final state, right after
        else:
            self._append(live, "host", result.as_dict())

    def _finish(self, live: LiveJob, hosts: list[str], started: float) -> None:
        done = {r.host for r in live.results}
        # A backend bug must not leave a host unreported.
        missing = [HostResult(h, HostStatus.FAILED, error="the backend reported no result") for h in hosts if h not in done]
        live.results.extend(missing)
        state = final_state([r.status for r in live.results], live.cancelled.is_set())
        counts: dict[str, int] = {}
        for r in live.results:
            counts[str(r.status)] = counts.get(str(r.status), 0) + 1
        last = ([live.held] if live.held else []) + missing
        events = [("host", r.as_dict()) for r in last]
        events.append(("finished", {"state": state, "counts": counts, "duration": round(time.time() - started, 3)}))
        with live.changed, store.db.atomic():  # final state and "finished" event become visible together
            self._set_state(live.id, state, finished=True)
            self._write_events(live, events)
        with live.changed:
            live.state, live.finished = state, True
            live.changed.notify_all()
        with self.lock:
            self.live.pop(live.id, None)

    def _append(self, live: LiveJob, kind: str, data: dict[str, Any]) -> None:
        self._write_events(live, [(kind, data)])
        with live.changed:
            live.changed.notify_all()

    @staticmethod
    def _write_events(live: LiveJob, events: list[tuple[str, dict[str, Any]]]) -> None:
        """Numbered in order, in one INSERT."""
        with live.changed:
            now = now_ms()  # stored and sent to clients as epoch ms
            rows = [{"job": live.id, "seq": live.next_seq + i, "kind": kind, "at": now, "data": data}
                    for i, (kind, data) in enumerate(events)]
            store.JobEvent.insert_many(rows).execute()
            live.next_seq += len(rows)

    def _set_state(self, job_id: str, state: JobState, finished: bool = False) -> None:
        fields: dict[Any, Any] = {store.Job.state: state}
        if finished:
            fields[store.Job.finished_at] = now_ms()
        store.Job.update(fields).where(store.Job.id == job_id).execute()

    def _recover_interrupted(self) -> None:
        """Jobs that were running when this master stopped: their outcome on the hosts is unknown."""
        for job in store.Job.select().where(store.Job.state.in_([JobState.QUEUED, JobState.RUNNING])):
            last = store.JobEvent.select(store.peewee.fn.MAX(store.JobEvent.seq)).where(store.JobEvent.job == job.id).scalar()
            live = LiveJob(job.id, job.sender, len(job.hosts), next_seq=(last or 0) + 1)
            self._set_state(job.id, JobState.UNKNOWN, finished=True)
            self._append(live, "finished", {"state": JobState.UNKNOWN, "counts": {},
                                            "reason": "the master stopped while the job ran; hosts may or may not have finished"})

    # -- events and cancel -------------------------------------------------------------------

    def _job_state(self, request: Request) -> tuple[str, str]:
        """(job id, state) of the requesting client's job; other clients' jobs do not exist for it."""
        job_id = request.args.get("job")
        row = (store.Job.select(store.Job.sender, store.Job.state).where(store.Job.id == job_id).tuples().first()
               if isinstance(job_id, str) else None)
        if row is None or row[0] != request.sender:
            raise Refused("unknown_job", f"no job {job_id!r} on master {self.settings.id}")
        return job_id, row[1]

    def _events(self, request: Request) -> dict[str, Any]:
        after, wait = request.args.get("after", 0), request.args.get("wait", 0)
        if not isinstance(after, int) or not isinstance(wait, (int, float)):
            raise Refused("bad_request", "after must be an integer and wait a number")
        job_arg = request.args.get("job")
        live = self.live.get(job_arg) if isinstance(job_arg, str) else None
        if live is not None and live.sender == request.sender:
            job_id = live.id
            _await_events(live, after, max(0.0, min(float(wait), MAX_WAIT_SECONDS)))
            state = live.state  # final only once committed, together with its "finished" event
        else:
            job_id, state = self._job_state(request)
        events = self._read_events(job_id, after)  # state first, then events: never a final state without them
        return {"job": job_id, "state": state, "done": state in FINAL_STATES, "events": events}

    @staticmethod
    def _read_events(job_id: str, after: int) -> list[dict[str, Any]]:
        rows = (store.JobEvent.select(store.JobEvent.seq, store.JobEvent.kind, store.JobEvent.at, store.JobEvent.data)
                .where((store.JobEvent.job == job_id) & (store.JobEvent.seq > after))
                .order_by(store.JobEvent.seq).limit(MAX_EVENTS_PER_REPLY).tuples())
        events, size = [], 0
        for seq, kind, at, data in rows:
            events.append({"seq": seq, "kind": kind, "at": at, "data": data})
            size += len(data.get("stdout", "")) + len(data.get("stderr", "")) + 512
            if size >= MAX_REPLY_OUTPUT:  # the rest comes with the next poll
                break
        return events

    def _cancel(self, request: Request) -> dict[str, Any]:
        job_id, state = self._job_state(request)
        live = self.live.get(job_id)
        if live is None:
            return {"job": job_id, "cancelled": False, "state": state}
        with live.changed:  # decided under the job's lock: a job that just finished stays finished
            if live.finished:
                return {"job": job_id, "cancelled": False, "state": live.state}
            live.cancelled.set()
            self._write_events(live, [("cancel_requested", {"by": request.requester})])
            live.changed.notify_all()
            return {"job": job_id, "cancelled": True, "state": live.state}

    def close(self) -> None:
        for live in list(self.live.values()):
            live.cancelled.set()
        self.slots.close()


def _await_events(live: LiveJob, after: int, wait: float) -> None:
    """Long-poll: until an event after `after` exists (or `wait` passes), then briefly for the rest
    of a burst, so a quick job comes back whole in one reply instead of one event per round trip."""
    deadline = time.monotonic() + wait
    with live.changed:
        if not live.changed.wait_for(lambda: live.next_seq > after + 1, timeout=wait):
            return
        live.changed.wait_for(lambda: live.finished, timeout=max(0.0, min(COALESCE_SECONDS, deadline - time.monotonic())))


def final_state(statuses: list[HostStatus], cancelled: bool) -> JobState:
    if cancelled and any(s is HostStatus.CANCELLED for s in statuses):
        return JobState.CANCELLED
    if statuses and all(s is HostStatus.OK for s in statuses):
        return JobState.OK
    if any(s is HostStatus.TIMED_OUT for s in statuses) and not any(s is HostStatus.OK for s in statuses):
        return JobState.TIMED_OUT
    if any(s is HostStatus.OK for s in statuses):
        return JobState.PARTIAL
    return JobState.FAILED


def _summary(job: store.Job) -> dict[str, Any]:
    return {"id": job.id, "module": job.module, "hosts": job.hosts, "idc": job.idc, "state": job.state,
            "requester": job.requester, "created_at": job.created_at}
