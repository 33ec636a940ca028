"""The master's logic, independent of the transport: open a request, check it, act, seal the reply.

`MasterCore.handle(op, frame)` never raises and never returns a traceback: every refusal is a
structured error in the reply, and anything unexpected becomes `internal` with a reference that
is also in the master's log.

The work behind the operations lives elsewhere: the submit checks in masters.jobspec, every query
in masters.jobstore, and a job's life once recorded (run, report, finish, cancel, long-poll,
restart recovery) in masters.runner (the job in memory and its end: masters.livejob). This module
keeps the transport entry, the replay check and the table of operations.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ombot
from ombot import context
from ombot.masters.backends.base import Backend
from ombot.masters.backends.base import close as close_backend
from ombot.masters.audit import PRUNE_SECONDS, AuditIngest, wait_for_heartbeat
from ombot.masters.clients import check_operation, check_requester
from ombot.envelope import Opener, Peer, Refused, Request
from ombot.masters.housekeeping import SECONDS_PER_DAY, Housekeeping, purge_interval
from ombot.masters.inventory import Inventory, TargetError
from ombot.masters.jobspec import SubmitChecks, require_inventory
from ombot.masters.jobstore import JobStore, summary
from ombot.keys import Identity
from ombot.masters.enrolment import MAX_BIND_FRAME, Signer
from ombot.masters.registry import ClientRegistry
from ombot.masters.rollout import AgentRollout, IdcMaster
from ombot.masters.lograte import LogBudget
from ombot.masters.runner import JobRunner
from ombot.modules import Module, catalog_of
from ombot.clock import MS_PER_SECOND
from ombot.config import ClientRegistration, MasterSettings
from ombot.timers import Timers

log = logging.getLogger("ombot.master")
DEFAULT_JOBS_LISTED, MAX_JOBS_LISTED = 20, 200  # the `jobs` operation's limit


class MasterCore:
    """One master's request handling: open each frame, check who asks, run the operation, seal the reply."""

    def __init__(self, settings: MasterSettings, identity: Identity, clients: Mapping[str, ClientRegistration],
                 modules: dict[str, Module], inventory: Inventory | None, backend: Backend,
                 idc_masters: Sequence[IdcMaster] = ()) -> None:
        """`clients`: ombot.toml's registrations this master accepts; the live registry overlays them
        with what `registry` stored in the database (which must be open). `idc_masters`: this IDC's
        masters in failover order (ombot.toml): whose binding certificates this master believes, and
        what the agent.toml of a rollout names."""
        self.settings, self.modules, self.inventory, self.backend = settings, modules, inventory, backend
        # One live map of who is accepted now: the opener asks it per frame, everything else reads it.
        idc_masters = idc_masters or [IdcMaster(settings.id, settings.host, settings.port, settings.public_key)]
        signer = Signer(identity, settings.idc, {m.id: m.public_key for m in idc_masters})
        self.clients = ClientRegistry(settings.id, clients, signer)
        self.catalog = catalog_of(modules)
        limits = settings.limits
        self.opener = Opener(identity, settings.id, self.clients.sender, limits.max_frame_bytes,
                             limits.clock_skew_seconds, limits.max_validity_seconds,
                             unregistered={"bind": MAX_BIND_FRAME})  # an agent's first contact, its key not bound here yet
        self.jobs = JobStore(settings.id, settings.limits.lock_lease_seconds)
        self.checks = SubmitChecks(settings, self.clients, modules, inventory, backend)
        self.rollout = AgentRollout(settings.state_dir, settings.idc, list(idc_masters), self.clients.bind,
                                    wait_for_heartbeat)
        self.runner = JobRunner(settings, backend, inventory, self.jobs, self.rollout)
        self.started_at = time.time()
        operations: dict[str, Callable[[Request], dict[str, Any]]] = {
            "catalog": self._catalog, "expand": self._expand, "submit": self._submit,
            "events": self._events, "cancel": self._cancel, "health": self._health,
            "ingest": self._ingest, "audit_read": lambda request: self.audit.read(request),
            "preview": self._preview,  # read-only: a dry run's hosts and generated playbook
            "registry": self.clients.operation,  # admin keys: add, revoke and list registrations
            "jobs": self._jobs,  # read-only: the asking client's recent jobs (`ombot jobs`)
            "binding": self.clients.binding_of,  # agents: the certificate of their own key bound here
        }
        # Every operation first checks who is asking against the sender's registration.
        self.ops = {op: self._as_registered(op, work) for op, work in operations.items()}
        self.audit = AuditIngest(self.clients, settings)
        self.runner.recover_interrupted()
        # The process's one scheduler: the housekeeping's jobs, the audit prune, the server's deadlines.
        self.timers = Timers()
        # Retention, old nonces, and jobs waiting for hosts another master holds.
        self.housekeeping = Housekeeping(self.timers, self.jobs, settings.retention_days,
                                         self.runner.retry_waiting, self.runner.leases)
        prune_every = min(PRUNE_SECONDS, purge_interval(settings.audit_retention_days * SECONDS_PER_DAY))
        self.timers.interval("audit-prune", prune_every, self.audit.prune)  # what the bot has pulled
        self.housekeeping.start()
        self.timers.start()

    # -- transport entry point -------------------------------------------------------------

    # What a peer without a valid envelope can make the master write: rate-limited, shared by all.
    strangers_log = LogBudget(log, burst=20, per_second=0.5)

    def handle(self, op: str, frame: object, authenticated: Callable[[str, str], None] | None = None) -> bytes:
        """`authenticated(client_id, kind)` is called once the frame has opened (a valid envelope from
        an accepted key), before any work: the transport binds the connection to that key, and may
        refuse (raise Refused) a key or kind that holds all the connections it may."""
        with context.scope():  # the request's ids, once its envelope opened, on every line handling it writes
            return self._handle(op, frame, authenticated)

    def _handle(self, op: str, frame: object, authenticated: Callable[[str, str], None] | None) -> bytes:
        peer: Peer | None = None
        request: Request | None = None
        try:
            if op == "bind":  # the one op a key this master does not know may send: rate-limited before any crypto
                self.clients.admit_bind(frame)
            request, peer = self.opener.open(frame, op)
            context.tie(rid=request.rid, user=request.requester)
            if authenticated is not None and request.sender:  # the connection learns whose it is (and may
                client = self.clients.get(request.sender)  # refuse to carry it); a stranger's bind stays a stranger's
                authenticated(request.sender, "" if client is None else client.kind)
            if op in ("cancel", "registry"):  # state-changing: a replay must never act twice (submit: JobStore.record)
                self._remember(request)  # (bind is idempotent, and a stranger must not make the master write)
            result = self._bind(request, peer) if op == "bind" else self.ops[op](request)
            return self.opener.seal_reply(peer, request, result)
        except Refused as refused:
            if peer is None or request is None or not request.sender:  # nothing proves who sent it: anyone can
                # send these (a stranger's bind: any key), as fast as they like
                self.strangers_log.info("refused %s: %s (%r)", op, refused.code, refused.message)
            else:
                log.info("refused %s: %s (%r)", op, refused.code, refused.message)
            return self.opener.seal_refusal(peer, request, refused)
        except Exception:
            ref = uuid.uuid4().hex[:8]
            log.exception("internal error on %s, ref E-%s", op, ref)
            return self.opener.seal_refusal(peer, request, Refused("internal", f"internal error, ref E-{ref}"))

    def _bind(self, request: Request, peer: Peer) -> dict[str, Any]:
        """`bind`: an agent's key made on its host, bound here by the certificate a master of this IDC
        signed (masters.enrolment). A key registered already must be an agent's, asking as itself."""
        if request.sender:
            client = self.clients.get(request.sender)
            if client is None:  # revoked between opening the frame and now
                raise Refused("revoked", f"client {request.sender} was revoked at this master")
            check_operation(client, "bind")
            check_requester(client, request)
        return self.clients.bind_request(request, bytes(peer.peer_key))

    def _remember(self, request: Request) -> None:
        self.jobs.remember(request.nonce, self._keep_nonce_until(request))

    def _keep_nonce_until(self, request: Request) -> int:
        """Epoch ms, as stored; the envelope's times are epoch seconds."""
        return (max(request.expires_at, request.issued_at + self.opener.skew) + 1) * MS_PER_SECOND

    def _as_registered(self, op: str, work: Callable[[Request], dict[str, Any]]) -> Callable[[Request], dict[str, Any]]:
        def checked(request: Request) -> dict[str, Any]:
            client = self.clients.get(request.sender)
            if client is None:  # revoked between opening the frame and now
                raise Refused("revoked", f"client {request.sender} was revoked at this master")
            check_operation(client, op)  # an agent key only ingests, and only agents do
            check_requester(client, request)
            return work(request)

        return checked

    # -- read-only operations ------------------------------------------------------------------

    def _catalog(self, request: Request) -> dict[str, Any]:
        return {"catalog": self.catalog.schema()}

    def _health(self, request: Request) -> dict[str, Any]:
        running, waiting = self.runner.counts()
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
            return {"hosts": require_inventory(self.inventory, self.settings.id).expand(targets)}
        except TargetError as exc:
            raise Refused("bad_targets", str(exc)) from None

    # -- jobs --------------------------------------------------------------------------------

    def _submit(self, request: Request) -> dict[str, Any]:
        try:
            spec = self.checks.spec(request)
        except Refused:
            if self.jobs.known(request.id):  # a re-submit is answered with the job, even if it would fail now
                return self._duplicate(request)
            raise
        wait = request.args.get("wait") or 0
        reply = self.runner.submit(request, spec, self._keep_nonce_until(request),
                                   float(wait) if isinstance(wait, (int, float)) else 0.0)
        if reply is None:  # this request id is already a job: idempotent, it never runs twice
            return self._duplicate(request)
        return reply

    def _duplicate(self, request: Request) -> dict[str, Any]:
        job = self.jobs.stored(request.id)
        if job.sender != request.sender:
            raise Refused("conflict", "that request id belongs to another client's job")
        return {"job": summary(job), "duplicate": True}

    def _events(self, request: Request) -> dict[str, Any]:
        after, wait = request.args.get("after", 0), request.args.get("wait", 0)
        state_only = request.args.get("state_only", False)
        if not isinstance(after, int) or not isinstance(wait, (int, float)):
            raise Refused("bad_request", "after must be an integer and wait a number")
        if not isinstance(state_only, bool):
            raise Refused("bad_request", "state_only must be true or false")
        reply = self.runner.events(request.args.get("job"), request.sender, after, float(wait), state_only)
        if reply is None:
            raise self._unknown_job(request)
        return reply

    def _preview(self, request: Request) -> dict[str, Any]:
        """The dry run; for the agent's rollout, also what this master would install and where."""
        shown = self.checks.preview(request)
        if request.args.get("module") in ("audit.rollout", "audit.remove"):
            shown["steps"] = [*shown["steps"], *self.rollout.describe(request.args.get("module") == "audit.rollout")]
        return shown

    def _jobs(self, request: Request) -> dict[str, Any]:
        """The newest jobs this client submitted as this requester; no other client's jobs."""
        limit = request.args.get("limit", DEFAULT_JOBS_LISTED)
        if type(limit) is not int or not 1 <= limit <= MAX_JOBS_LISTED:
            raise Refused("bad_request", f"limit must be an integer from 1 to {MAX_JOBS_LISTED}")
        jobs = self.jobs.recent(request.sender, request.requester, limit)
        for job in jobs:  # the store says queued until the end: a job this master runs says where it is now
            live = self.runner.live.get(job["id"])
            if live is not None:
                job["state"] = str(live.state)
        return {"jobs": jobs}

    def _cancel(self, request: Request) -> dict[str, Any]:
        reply = self.runner.cancel(request.args.get("job"), request.sender, request.requester)
        if reply is None:
            raise self._unknown_job(request)
        return reply

    def _ingest(self, request: Request) -> dict[str, Any]:
        return self.audit.ingest(self.clients[request.sender], request)

    def _unknown_job(self, request: Request) -> Refused:
        """Other clients' jobs do not exist for the one asking."""
        return Refused("unknown_job", f"no job {request.args.get('job')!r} on master {self.settings.id}")

    def close(self) -> None:
        self.timers.close(wait=True)  # a job under way finishes first
        self.runner.close()
        close_backend(self.backend)
