"""The approval flow as the chat sees it: the Approve/Deny message, updated in place, and the job
starting exactly once when enough approvers said yes. The rules themselves live in `approvals`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ombot import context
from ombot.approvals import PENDING, ApprovalRequest, Decision, Gate, Viewer
from ombot.bot import grammar, metrics, multi
from ombot.bot.messages import CHECK, RequestView, approval_card, deny_form, params_text
from ombot.bot.transport import ChatRequest, Transport
from ombot.modules import ModuleSpec
from ombot.errors import OmbotError
from ombot.message import Message, escape, slack_date, text_message

log = logging.getLogger("ombot.bot.approvals")

# (module invocation, spec, hosts, who asked, transport, approvers, cancel roles, job id): start the job
StartJob = Callable[[grammar.Run, ModuleSpec, list[str], ChatRequest, Transport, Sequence[str], Sequence[str], str], None]
# (idc, module) -> the module's spec from that IDC's catalog
SpecOf = Callable[[str, str], ModuleSpec]
# (who asked, transport, action, detail, work): run work later, answered and recorded in the trail
Later = Callable[[ChatRequest, Transport, str, str, Callable[[], None]], None]


class ScheduleApprovals(Protocol):
    """Requests that cover a schedule (bot.schedules): approving one activates the schedule."""

    def label_of(self, request: ApprovalRequest) -> str:
        """What the approval message says about the schedule ("" for a one-off job)."""

    def approved(self, request: ApprovalRequest, approvers: list[str], transport: Transport) -> bool:
        """Activate the schedule the request covers (True), or False when it covers none."""


class ApprovalFlow:
    """Asking for approval, taking votes and denials, expiring, and starting the approved job."""

    def __init__(self, gate: Gate | None, default_idc: str, spec_of: SpecOf, start_job: StartJob,
                 later: Later) -> None:
        self._gate, self.default_idc = gate, default_idc
        self.spec_of, self.start_job, self.later = spec_of, start_job, later
        self.schedules: ScheduleApprovals | None = None  # set by the service when schedules run

    @property
    def gate(self) -> Gate:
        if self._gate is None:
            raise OmbotError("No access policy is configured, so there are no approvals.")
        return self._gate

    # -- asking ----------------------------------------------------------------------------------

    def ask(self, command: grammar.Run, spec: ModuleSpec, hosts: list[str], decision: Decision,
            req: ChatRequest, transport: Transport,
            link: Callable[[ApprovalRequest], None] | None = None) -> ApprovalRequest:
        """Open a request and post its Approve/Deny message; `link` ties it to what it covers (a
        schedule) before anyone can see the message, let alone approve it."""
        assert decision.approval is not None
        request = self.gate.open_request(
            requester=req.user, origin=req.origin, channel=req.channel, reply_url=req.response_url,
            idc=command.idc or self.default_idc, module=spec.name, hosts=hosts,
            params={**command.params, CHECK: "yes"} if command.check else command.params,  # approvers see it
            timeout=command.timeout, decision=decision, rid=context.rid())  # the job it starts keeps the rid
        context.tie(approval=request.number)
        log.info("approval #%d opened: %s on %d host(s) needs %d approval(s)", request.number, spec.name, len(hosts),
                 decision.approval.count)
        if link is not None:
            link(request)
        where = decision.approval.channel or req.channel
        ts = transport.post(where, approval_card(self.view_of(request)), req=req)  # falls back only in req's own channel
        self.gate.place_message(request, where, ts)
        transport.respond(req, text_message(
            f"`{spec.name}` on {len(hosts)} host(s) needs {decision.approval.count} approval(s) from "
            f"{', '.join(decision.approval.roles)} ({decision.reason}). Waiting as request #{request.number}; "
            f"it expires {slack_date(request.expires_at)}."))
        return request

    # -- deciding ------------------------------------------------------------------------------

    def approve(self, ref: str, req: ChatRequest, transport: Transport) -> None:
        found = self.gate.find(ref)
        if found is not None:  # check it can still run before a vote could mark it approved
            context.tie(rid=found.rid, approval=found.number)  # the click goes on with the command's rid
            self.spec_of(found.idc, found.module).validate(module_params(found.params))
        vote = self.gate.approve(ref, req.user)
        request = vote.request
        log.info("approval #%d: %d/%d approval(s), %s", request.number, vote.approved, request.needed, request.state)
        self.show(request, transport)
        if vote.start:
            metrics.approval_decided("approved", request.created_at, request.decided_at)
            schedule = self.schedules.label_of(request) if self.schedules is not None else ""
            starts = f"{schedule} is active now" if schedule else "its job starts now"
            transport.respond(req, text_message(f"Approved request #{request.number}; {starts}."))
            self._start(request, transport)
        elif request.state != PENDING:
            transport.respond(req, text_message(f"Your approval was recorded, but request #{request.number} "
                                                f"is {request.state}."))
        else:
            transport.respond(req, text_message(f"Approved request #{request.number}: "
                                                f"{vote.approved}/{request.needed} approvals."))

    def deny_clicked(self, req: ChatRequest, request_id: str, transport: Transport) -> None:
        """A Deny click asks for the reason in a modal (checks run again when it is submitted)."""
        request = self.gate.check_deny(request_id, req.user)  # a stranger gets no modal
        if not (req.trigger_id and transport.open_form(req, deny_form(request_id, request.number))):
            transport.respond(req, text_message(f"Type `/om deny {request.number} REASON` to deny it."))

    def deny_submitted(self, req: ChatRequest, request_id: str, reason: str, transport: Transport) -> dict[str, str]:
        """The reason modal: an empty reason is a field error; the rest (group lookups in Slack, the
        database, the chat updates) happens after the ack, so it can never push the ack past 3 s."""
        if not reason.strip():
            return {"reason": "A denial needs a reason."}
        found = self.gate.find(request_id)  # the local database only: no Slack call before the ack
        if found is None or found.state != PENDING:
            state = found.state if found else "unknown"
            return {"reason": f"This request is no longer open: it was {state}."}
        where = ChatRequest(req.user, found.message_channel or found.channel, origin=req.origin)
        self.later(where, transport, "deny form", request_id, lambda: self.deny(request_id, reason, where, transport))
        return {}

    def deny(self, ref: str, reason: str, req: ChatRequest, transport: Transport) -> None:
        request = self.gate.deny(ref, req.user, reason)
        metrics.approval_decided("denied", request.created_at, request.decided_at)
        context.tie(rid=request.rid, approval=request.number)
        log.info("approval #%d denied", request.number)
        transport.respond(req, text_message(f"Denied request #{request.number}."))
        self._announce_denial(request, req.user, transport)

    def _announce_denial(self, request: ApprovalRequest, user: str, transport: Transport) -> None:
        try:
            self.show(request, transport)
            self._tell_requester(request, transport, f"Request #{request.number} (`{request.module}`) was denied "
                                                     f"by <@{user}>: {escape(request.reason or '')}")
        except Exception:  # on the pool nobody else would see it
            log.exception("announcing the denial of request %s", request.request_id)

    def expired(self, request: ApprovalRequest, transport: Transport) -> None:
        metrics.approval_decided("expired", request.created_at, request.decided_at)
        self.show(request, transport)
        self._tell_requester(request, transport, f"Request #{request.number} (`{request.module}`) expired "
                                                 f"before it had enough approvals.")

    def listing(self, viewer: Viewer) -> Message:
        """The pending requests `viewer` may see (approvals.Viewer.sees_request)."""
        rows = [f"#{r.number} `{r.module}` on {len(r.hosts)} host(s) in {r.idc} by <@{r.requester}>: "
                f"{self.gate.vote_count(r)}/{r.needed} "
                f"approvals, expires {slack_date(r.expires_at)}" for r in self.gate.pending()
                if viewer.sees_request(r.requester, self.gate.approvers(r), r.cancel_roles, r.approver_roles)]
        some = "" if viewer.everything else " that you may see"
        return text_message("\n".join(rows) or f"No pending approval requests{some}.")

    # -- helpers ---------------------------------------------------------------------------------

    def show(self, request: ApprovalRequest, transport: Transport) -> None:
        """Update the approval message in place, from a fresh read: racing votes must not leave a
        stale 'pending' card behind the final one."""
        request = self.gate.current(request)
        if request.message_channel and request.message_ts:
            transport.update(request.message_channel, request.message_ts, approval_card(self.view_of(request)))

    def _tell_requester(self, request: ApprovalRequest, transport: Transport, text: str) -> None:
        transport.post(request.channel, text_message(text),
                       req=ChatRequest(request.requester, request.channel, origin=request.origin,
                                       response_url=request.reply_url))

    def _start(self, request: ApprovalRequest, transport: Transport) -> None:
        if self.schedules is not None and self.schedules.approved(request, self.gate.approvers(request), transport):
            return  # an approved schedule runs at its times, not now
        run = grammar.Run(request.module, None, module_params(request.params), request.idc, timeout=request.timeout,
                          check=CHECK in request.params)
        requester = ChatRequest(request.requester, request.channel, origin=request.origin,
                                response_url=request.reply_url)
        spec = self.spec_of(request.idc, request.module)
        # The master's floor counts approvals by people other than the requester (and refuses an
        # envelope naming the requester): a self-approval the policy allowed stays in our votes only.
        others = [a for a in self.gate.approvers(request) if a != request.requester]
        self.start_job(run, spec, request.hosts, requester, transport, others, request.cancel_roles, request.request_id)


    def view_of(self, request: ApprovalRequest) -> RequestView:
        return RequestView(
            number=request.number, request_id=request.request_id, requester=request.requester, module=request.module,
            params=params_text(request.params), idc=request.idc, hosts=list(request.hosts), needed=request.needed,
            approver_roles=list(request.approver_roles), approvers=self.gate.votes(request),
            state=request.state, expires_at=request.expires_at, decided_by=request.decided_by, reason=request.reason,
            schedule=self.schedules.label_of(request) if self.schedules is not None else "",
            parts=multi.approval_parts(request.request_id) if multi.is_multi(request.idc) else "",
        )


def module_params(params: dict[str, Any]) -> dict[str, Any]:
    """A request's params without the check-run word it may carry (bot.messages.CHECK)."""
    return {k: v for k, v in params.items() if k != CHECK}
