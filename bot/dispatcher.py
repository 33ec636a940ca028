"""One command dispatcher behind every transport. It runs after the transport has acked, on
OMBot's worker pool, and answers every input: a reply, a card, a form, or a clear error."""

from __future__ import annotations

import contextvars
import difflib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any

from ombot import context
from ombot.approvals import (
    ApprovalError, Decision, Gate, PolicyRefusal, authorize, record_trail, require_requester, viewer_of,
)
from ombot.audit import AuditQuery
from ombot.bot import forms, grammar, metrics, multi, store
from ombot.bot.approval_flow import ApprovalFlow
from ombot.bot.audit_search import AUDIT_USAGE, parse_audit_query, search_audit
from ombot.bot.commands import REQUESTERS, CommandError, Prose, Word, chat_command
from ombot.bot.jobs import JOBS_USAGE, JobFilter, JobFollower, card_of, parse_job_filter
from ombot.bot.listings import (commands_help, few_hosts, find_job, job_status, jobs_message, masters_message,
                                module_help, modules_message)
from ombot.bot.messages import CHECK, job_card, preview_message
from ombot.bot.schedules import SCHEDULE_USAGE, Schedules, schedule_words
from ombot.bot.transport import ChatRequest, Transport
from ombot.masters import ConnectFailed, JobRef, JobState, MasterLost, NoMasterAvailable, Refused, Router
from ombot.modules import Catalog, ModuleSpec, ParamError
from ombot.errors import OmbotError
from ombot.message import Markup, Message, clip, error_message, escape, text_message

log = logging.getLogger("ombot.bot")

CATALOG_TTL = 60.0


class CatalogCache:
    """Catalogs per IDC, kept warm so a modal opens within the trigger's 3 s."""

    def __init__(self, router: Router, ttl: float = CATALOG_TTL) -> None:
        self.router, self.ttl = router, ttl
        self._cached: dict[str, tuple[float, Catalog]] = {}
        self._lock = threading.Lock()

    def get(self, idc: str) -> Catalog:
        hit = self._cached.get(idc)
        if hit and time.monotonic() - hit[0] < self.ttl:
            return hit[1]
        with self._lock:
            catalog = self.router.catalog(idc)
            self._cached[idc] = (time.monotonic(), catalog)
            return catalog

    def warm(self, idcs: list[str]) -> None:
        for idc in idcs:
            try:
                self.get(idc)
            except OmbotError as exc:
                log.warning("could not load the catalog of IDC %s: %s", idc, exc)


class Dispatcher:
    """Everything a chat request can do, behind every transport: each chat command is a method
    declared with `@chat_command`; the entry points run after the transport has acked."""

    def __init__(self, router: Router, catalogs: CatalogCache, follower: JobFollower, default_idc: str,
                 gate: Gate | None, pool: Executor) -> None:
        self.router, self.catalogs, self.follower, self.default_idc = router, catalogs, follower, default_idc
        self.gate, self.pool = gate, pool
        self.approvals = ApprovalFlow(gate, default_idc, self.spec_of, self._start_approved, self.later)
        self.schedules: Schedules | None = None  # set by the service (bot.schedules)
        self.audit_patterns: tuple[str, ...] = ()  # the audit rules file's redactions, set by the service

    # -- entry points (called by transports after their ack, each through `answering`) ---------

    def command(self, req: ChatRequest, transport: Transport) -> None:
        """A line of /om text, answered and recorded in the trail whatever happens."""
        self.answering(req, transport, "command", req.text, lambda: self._invoke(req, transport))

    def _invoke(self, req: ChatRequest, transport: Transport) -> None:
        """The declared command the text names, or a module's short form."""
        invocation = grammar.parse(req.text)
        if invocation.command.access == REQUESTERS:
            require_requester(self.gate, req.user)  # before the catalog and any expansion reach a master
        assert invocation.command.handler is not None  # the grammar refuses commands still to come
        invocation.command.handler(self, req, transport, **invocation.arguments)

    def form_submitted(self, req: ChatRequest, metadata: str, state: dict[str, Any],
                       transport: Transport) -> dict[str, str]:
        """Validate a modal; return field errors (shown in the modal) or start the job and return {}."""
        require_requester(self.gate, req.user)  # before the catalog and any expansion reach a master
        meta = json.loads(metadata)
        spec = self.catalogs.get(meta["idc"]).modules[meta["module"]]
        targets, raw = forms.read_submission(state)
        values, errors = forms.validate_submission(spec, raw)
        hosts: list[str] = []
        if not targets.strip():
            errors[forms.TARGETS_BLOCK] = "required"
        else:
            try:
                hosts = self.router.expand(meta["idc"], targets, requester=req.user)
            except Refused as exc:
                errors[forms.TARGETS_BLOCK] = clip(exc.message, 150)
        if errors:
            return errors
        run = grammar.Run(spec.name, targets, dict(values), meta["idc"], dry_run=bool(meta.get("dry_run")),
                          timeout=meta.get("timeout"), check=bool(meta.get("check")))
        channel_req = ChatRequest(req.user, meta["channel"], origin=req.origin, team=req.team,
                                  response_url=meta.get("response_url"))
        self.later(channel_req, transport, "form", f"{spec.name} {targets}",
                   lambda: self._authorized_run(run, spec, hosts, channel_req, transport))
        return {}

    def later(self, req: ChatRequest, transport: Transport, action: str, detail: str,
              work: Callable[[], None]) -> None:
        """Run work on the pool, answered and recorded like any entry point, with the ids of the work
        that asked for it (ombot.context): a form's job keeps its command's rid."""
        self.pool.submit(contextvars.copy_context().run, self.answering, req, transport, action, detail, work)

    def answering(self, req: ChatRequest, transport: Transport, action: str, detail: str,
                  work: Callable[[], None]) -> None:
        """Run work; whatever goes wrong, the person gets an answer (never a traceback), and the
        action and its outcome go into the trail and the log. Transports wrap every entry point in it;
        work that does not carry a request id yet (ombot.context) gets its own here."""
        with context.scope(rid=context.rid() or context.new_rid(), user=req.user):
            outcome = "interrupted"
            try:
                outcome = self._answer(req, transport, detail, work)
            finally:
                log.info("%s %r in %s: %s", action, clip(detail, 300), req.channel or "-", outcome)
                try:
                    record_trail(req.user, req.channel, req.origin, action, detail, outcome)
                except Exception:
                    log.exception("could not record %s by %s in the trail", action, req.user)

    def _answer(self, req: ChatRequest, transport: Transport, detail: str, work: Callable[[], None]) -> str:
        """Run work and answer whatever goes wrong; the outcome, as the trail records it."""
        outcome = "ok"
        try:
            work()
        except PolicyRefusal as exc:
            outcome = f"refused: {exc}"
            transport.respond(req, error_message(exc, "Refused: "))
        except (CommandError, ParamError, ApprovalError) as exc:
            outcome = f"error: {exc}"
            transport.respond(req, error_message(exc))
        except Refused as exc:
            outcome = f"refused by master: {exc.code}"
            transport.respond(req, text_message(f"Refused: {escape(exc.message)}"))
        except (NoMasterAvailable, ConnectFailed, MasterLost) as exc:
            outcome = "masters unreachable"
            transport.respond(req, error_message(exc, "Cannot reach the masters: "))
        except OmbotError as exc:
            outcome = f"error: {exc}"
            transport.respond(req, error_message(exc))
        except Exception:
            ref = uuid.uuid4().hex[:8]
            outcome = f"internal error E-{ref}"
            log.exception("internal error handling %r from %s, ref E-%s", detail, req.user, ref)
            transport.respond(req, text_message(f"Internal error, ref E-{ref}. The operators can find it in the bot's log."))
        return outcome

    # -- the chat commands ---------------------------------------------------------------------

    @chat_command("help", Word("module", optional=True), summary="the commands, or one module's parameters")
    def help_command(self, req: ChatRequest, transport: Transport, module: str | None) -> None:
        transport.respond(req, module_help(self.spec_of(self.default_idc, module)) if module
                          else commands_help(self._allowed_specs(req.user)))

    @chat_command("modules", Word("category", optional=True), summary="the modules you may run")
    def modules_command(self, req: ChatRequest, transport: Transport, category: str | None) -> None:
        transport.respond(req, modules_message(self._allowed_specs(req.user), category))

    @chat_command("run", summary="run a module on hosts", access=REQUESTERS, usage=grammar.RUN_USAGE,
                  parse=grammar.run_words)
    def run_command(self, req: ChatRequest, transport: Transport, run: grammar.Run) -> None:
        self._run(run, req, transport)

    @chat_command("form", Word("module"), summary="a form for a module's parameters", access=REQUESTERS)
    def form_command(self, req: ChatRequest, transport: Transport, module: str) -> None:
        self._form(grammar.Run(module, None), req, transport)

    @chat_command("jobs", summary="recent jobs you may see: `mine`, and filters by module, host and time (UTC)",
                  usage=JOBS_USAGE, parse=parse_job_filter)
    def jobs_command(self, req: ChatRequest, transport: Transport, filters: JobFilter) -> None:
        transport.respond(req, jobs_message(self.gate, filters, req.user))

    @chat_command("status", Word("job"), summary="where a job stands")
    def status_command(self, req: ChatRequest, transport: Transport, job: str) -> None:
        transport.respond(req, job_status(self.router, self.gate, job, req.user))

    @chat_command("cancel", Word("job"), summary="cancel a job (its requester, approvers, or the policy's roles)")
    def cancel_command(self, req: ChatRequest, transport: Transport, job: str) -> None:
        self._cancel(job, req, transport)

    @chat_command("masters", summary="the health of every master")
    def masters_command(self, req: ChatRequest, transport: Transport) -> None:
        transport.respond(req, masters_message(self.router))

    @chat_command("approvals", summary="pending approval requests")
    def approvals_command(self, req: ChatRequest, transport: Transport) -> None:
        transport.respond(req, self.approvals.listing(viewer_of(self.gate, req.user)))

    @chat_command("approve", Word("request"), summary="approve a request")
    def approve_command(self, req: ChatRequest, transport: Transport, request: str) -> None:
        self.approvals.approve(request, req, transport)

    @chat_command("deny", Word("request"), Prose("reason"), summary="deny a request, saying why")
    def deny_command(self, req: ChatRequest, transport: Transport, request: str, reason: str) -> None:
        self.approvals.deny(request, reason, req, transport)

    @chat_command("audit", summary="search the shell audit trail (only you see the results)", usage=AUDIT_USAGE,
                  parse=parse_audit_query)
    def audit_command(self, req: ChatRequest, transport: Transport, query: AuditQuery) -> None:
        search_audit(query, req, transport, self.gate, self.audit_patterns)

    @chat_command("schedule", summary="run a module on a timetable (cron in UTC, or `every 15m`); pause, resume, "
                  "delete", usage=SCHEDULE_USAGE, parse=schedule_words)
    def schedule_command(self, req: ChatRequest, transport: Transport, action: str, ref: str | None,
                         timing: str | None, run: grammar.Run | None) -> None:
        schedules = self._schedules()
        if action == "create":
            assert timing is not None and run is not None
            if run.check:  # a schedule would run it for real: refuse rather than drop the word
                raise CommandError("check=yes is for one look at what would change: run it now with "
                                   "`/om run ... check=yes`, then schedule the real job")
            require_requester(self.gate, req.user)  # before the catalog and any expansion reach a master
            schedules.create(timing, run, req, transport)
            return
        assert ref is not None
        {"pause": schedules.pause, "resume": schedules.resume, "delete": schedules.delete}[action](ref, req, transport)

    @chat_command("schedules", summary="the schedules you may see")
    def schedules_command(self, req: ChatRequest, transport: Transport) -> None:
        transport.respond(req, self._schedules().listing(req.user))

    def _schedules(self) -> Schedules:
        if self.schedules is None:
            raise OmbotError("Schedules are not running in this process.")
        return self.schedules

    # -- clicks ----------------------------------------------------------------------------------

    def cancel_clicked(self, req: ChatRequest, job_id: str, transport: Transport) -> None:
        self._cancel(job_id, req, transport)

    # -- reading -------------------------------------------------------------------------------

    def spec_of(self, idc: str, name: str) -> ModuleSpec:
        if multi.is_multi(idc):  # a request over several IDCs (bot.multi), e.g. awaiting approval
            return multi.spec_for(self, idc, name)
        catalog = self.catalogs.get(idc)
        if name in catalog.modules:
            return catalog.modules[name]
        close = difflib.get_close_matches(name, catalog.modules, n=3)
        hint = f" Did you mean {', '.join(f'`{c}`' for c in close)}?" if close else " Try `/om modules`."
        raise OmbotError(f"No module `{name}` in IDC {idc}.{hint}")

    def _allowed_specs(self, user: str) -> list[ModuleSpec]:
        specs = self.catalogs.get(self.default_idc).modules.values()
        return [s for s in specs if self.gate is not None and self.gate.may_run(user, s.name, self.default_idc)]

    # -- acting --------------------------------------------------------------------------------

    def _run(self, command: grammar.Run, req: ChatRequest, transport: Transport) -> None:
        if multi.is_multi(command.idc):  # idc=bj,sh or idc=*: one job per IDC, one card (bot.multi)
            multi.run(self, command, req, transport, one=self._run)
            return
        idc = command.idc or self.default_idc
        spec = self.spec_of(idc, command.module)
        missing = [p.name for p in spec.params if p.required and p.name not in command.params]
        if command.targets is None or missing:
            self._form(command, req, transport, missing)
            return
        try:
            spec.validate(command.params)
        except ParamError as exc:
            raise ParamError(exc.param, f"{exc.expected}\nusage: `/om {spec.usage()}`") from None
        hosts = self.router.expand(idc, command.targets, requester=req.user)
        self._authorized_run(command, spec, hosts, req, transport)

    def decide(self, user: str, module: str, hosts: list[str], idc: str) -> Decision:
        return authorize(self.gate, user, module, hosts, idc)

    def _authorized_run(self, command: grammar.Run, spec: ModuleSpec, hosts: list[str], req: ChatRequest,
                        transport: Transport) -> None:
        idc = command.idc or self.default_idc
        decision = self.decide(req.user, spec.name, hosts, idc)
        if command.dry_run:
            gate = f"; needs {decision.approval.count} approval(s)" if decision.approval and decision.needs_approval else ""
            check = " a check run of" if command.check else ""
            shown = self.router.preview(idc, spec.name, command.params, command.targets or ",".join(hosts),
                                         command.check, requester=req.user)
            transport.respond(req, preview_message(f"Dry run ({decision.reason}{gate}): would run{check}", idc, shown))
        elif decision.needs_approval:
            self.approvals.ask(command, spec, hosts, decision, req, transport)
        else:
            self.start_job(command, spec, hosts, req, transport, cancel_roles=decision.cancel_roles)

    def _form(self, command: grammar.Run, req: ChatRequest, transport: Transport, missing: list[str] | None = None) -> None:
        idc = command.idc or self.default_idc
        spec = self.spec_of(idc, command.module)
        carry = {"dry_run": command.dry_run, "timeout": command.timeout, "response_url": req.response_url,
                 "check": command.check}
        view = forms.build_view(spec, idc, req.channel, command.targets, command.params, carry)
        if req.trigger_id and transport.open_form(req, view):
            return
        need = ", ".join(missing or []) or "targets"
        transport.respond(req, text_message(f"`{spec.name}` needs: {need}.\nusage: `/om {spec.usage()}`"))

    def _start_approved(self, command: grammar.Run, spec: ModuleSpec, hosts: list[str], req: ChatRequest,
                        transport: Transport, approvers: Sequence[str], cancel_roles: Sequence[str],
                        job_id: str) -> None:
        self.start_job(command, spec, hosts, req, transport, approvers, cancel_roles, job_id)

    def start_job(self, command: grammar.Run, spec: ModuleSpec, hosts: list[str], req: ChatRequest,
                  transport: Transport, approvers: Sequence[str] = (), cancel_roles: Sequence[str] = (),
                  job_id: str | None = None, announce: bool = True) -> None:
        """Store, announce (unless a schedule fires it: its card says it all) and submit one job."""
        if multi.is_multi(command.idc) and job_id is not None:  # an approved request over several IDCs
            multi.start(self, command, spec, req, transport, approvers, cancel_roles, job_id)
            return
        values = spec.validate(command.params)
        idc = command.idc or self.default_idc
        shown = {k: v for k, v in values.items() if v is not None}
        if command.check:  # a reserved word, never a module's parameter: the card says "check" from it
            shown[CHECK] = True
        job_id = job_id or str(uuid.uuid4())
        # Owned from before it is stored: another bot process never adopts a job this one is submitting.
        if not self.follower.claim(job_id):
            raise OmbotError(f"Job {job_id} is already being started.")
        try:
            job = store.BotJob.create(
                job_id=job_id, requester=req.user, origin=req.origin, channel=req.channel,
                idc=idc, module=spec.name, params=shown, host_count=len(hosts), hosts=list(hosts),
                state=JobState.SUBMITTING, created_at=store.now(), reply_url=req.response_url,
                approvers=list(approvers), cancel_roles=list(cancel_roles),
            )
        except Exception:
            self.follower.let_go(job_id)
            raise
        try:
            with context.scope(job=job_id, idc=idc, user=req.user):  # the requester's, whoever approved it
                self._submit(job, command, spec, hosts, req, transport, approvers, announce)
        except Exception:  # whatever broke, the job is adopted on the next tick and never stays stuck
            self.follower.let_go(job_id)
            raise

    def _submit(self, job: store.BotJob, command: grammar.Run, spec: ModuleSpec, hosts: list[str],
                req: ChatRequest, transport: Transport, approvers: Sequence[str], announce: bool = True) -> None:
        idc = job.idc
        kind = " (a check run: it changes nothing)" if command.check else ""
        if announce:
            transport.respond(req, _preview(spec.name, idc, hosts, f"Starting job #{job.number}{kind}:"))
        card_ts = transport.post(req.channel, job_card(card_of(job)), req=req)
        store.update_job(job, card_ts=card_ts)
        try:
            ref, reply = self.router.submit(idc, spec.name, command.params, hosts, approvers=approvers,
                                            timeout=command.timeout, request_id=job.job_id, requester=req.user,
                                            check=command.check)
        except MasterLost as exc:  # sent, then the link broke: follow it where it went, never re-send
            metrics.job_submitted(spec.name, "lost")
            if exc.ref is None:
                self._end_early(job, transport, JobState.UNKNOWN, str(exc))
            else:
                store.update_job(job, master_id=exc.ref.master_id, state=JobState.QUEUED)
                self.follower.start(job, transport)
            return
        except (Refused, NoMasterAvailable) as exc:
            metrics.job_submitted(spec.name, "refused")
            self._end_early(job, transport, JobState.FAILED, getattr(exc, "message", str(exc)))
            return
        metrics.job_submitted(spec.name, "accepted")
        store.update_job(job, master_id=ref.master_id, state=JobState.QUEUED)
        log.info("job #%d submitted: %s on %d host(s), at master %s", job.number, spec.name, len(hosts), ref.master_id)
        self.follower.start(job, transport, reply.get("events", []))

    def _end_early(self, job: store.BotJob, transport: Transport, state: JobState, reason: str) -> None:
        self.follower.end_early(job, transport, state, reason)

    def _cancel(self, ref: str, req: ChatRequest, transport: Transport) -> None:
        job = find_job(ref)
        allowed = req.user == job.requester or (
            self.gate is not None and self.gate.may_cancel(req.user, job.requester, list(job.approvers),
                                                           list(job.cancel_roles)))
        if not allowed:
            raise PolicyRefusal(Markup(f"only the requester (<@{job.requester}>), its approvers or the roles the "
                                       f"policy names may cancel job #{job.number}"))
        parts = multi.parts_with(job)
        if parts:  # one part of a request over several IDCs: cancel every part
            multi.cancel_parts(self, parts, req, transport)
            return
        if job.master_id is None:
            raise OmbotError(f"Job #{job.number} never reached a master.")
        reply = self.router.cancel(JobRef(job.job_id, job.idc, job.master_id), requester=req.user)
        if reply["cancelled"]:
            transport.respond(req, text_message(f"Cancelling job #{job.number}."))
        else:
            transport.respond(req, text_message(f"Job #{job.number} already ended: {reply['state']}."))


def _preview(module: str, idc: str, hosts: list[str], lead: str) -> Message:
    return text_message(f"{lead} `{module}` on {len(hosts)} host(s) in {idc}: {few_hosts(hosts)}")
