"""The approval flow as the chat sees it: the Approve/Deny message, updated in place, and the job
starting exactly once when enough approvers said yes. The rules themselves live in `approvals`."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from approvals import Decision, params_text
from approvals import store as astore
from bot import grammar
from bot.messages import Message, RequestView, approval_card, deny_form, escape, slack_date, text_message
from bot.transport import ChatRequest, Transport
from modules import ModuleSpec
from ombot.errors import OmbotError

if TYPE_CHECKING:
    from bot.dispatcher import Dispatcher

log = logging.getLogger("ombot.bot.approvals")


class ApprovalFlow:
    def __init__(self, dispatcher: Dispatcher) -> None:
        self.d = dispatcher

    @property
    def gate(self):  # type: ignore[no-untyped-def]
        if self.d.gate is None:
            raise OmbotError("No access policy is configured, so there are no approvals.")
        return self.d.gate

    # -- asking ----------------------------------------------------------------------------------

    def ask(self, command: grammar.Run, spec: ModuleSpec, hosts: list[str], decision: Decision,
            req: ChatRequest, transport: Transport) -> None:
        assert decision.approval is not None
        request = self.gate.open_request(
            requester=req.user, origin=req.origin, channel=req.channel, reply_url=req.response_url,
            idc=command.idc or self.d.default_idc, module=spec.name, params=command.params, hosts=hosts,
            timeout=command.timeout, decision=decision)
        where = decision.approval.channel or req.channel
        ts = transport.post(where, approval_card(view_of(request)), req=req)  # falls back only in req's own channel
        astore.ApprovalRequest.update(message_channel=where, message_ts=ts).where(
            astore.ApprovalRequest.number == request.number).execute()
        transport.respond(req, text_message(
            f"`{spec.name}` on {len(hosts)} host(s) needs {decision.approval.count} approval(s) from "
            f"{', '.join(decision.approval.roles)} ({decision.reason}). Waiting as request #{request.number}; "
            f"it expires {slack_date(request.expires_at)}."))

    # -- deciding ------------------------------------------------------------------------------

    def approve(self, ref: str, req: ChatRequest, transport: Transport) -> None:
        found = astore.find_request(ref)
        if found is not None:  # check it can still run before a vote could mark it approved
            self.d.spec_of(found.idc, found.module).validate(found.params)
        vote = self.gate.approve(ref, req.user)
        request = vote.request
        self.show(request, transport)
        if vote.start:
            transport.respond(req, text_message(f"Approved request #{request.number}; its job starts now."))
            self._start(request, transport)
        elif request.state != astore.PENDING:
            transport.respond(req, text_message(f"Your approval was recorded, but request #{request.number} "
                                                f"is {request.state}."))
        else:
            transport.respond(req, text_message(f"Approved request #{request.number}: "
                                                f"{vote.approved}/{request.needed} approvals."))

    def approve_clicked(self, req: ChatRequest, request_id: str, transport: Transport) -> None:
        self.d.answering(req, transport, "approve click", request_id, lambda: self.approve(request_id, req, transport))

    def deny_clicked(self, req: ChatRequest, request_id: str, transport: Transport) -> None:
        """A Deny click asks for the reason in a modal (checks run again when it is submitted)."""
        def work() -> None:
            request = self.gate.check_deny(request_id, req.user)  # a stranger gets no modal
            if not (req.trigger_id and transport.open_form(req, deny_form(request_id, request.number))):
                transport.respond(req, text_message(f"Type `/om deny {request.number} REASON` to deny it."))

        self.d.answering(req, transport, "deny click", request_id, work)

    def deny_submitted(self, req: ChatRequest, request_id: str, reason: str, transport: Transport) -> dict[str, str]:
        """The reason modal: an empty reason is a field error; the rest (group lookups in Slack, the
        database, the chat updates) happens after the ack, so it can never push the ack past 3 s."""
        if not reason.strip():
            return {"reason": "A denial needs a reason."}
        found = astore.find_request(request_id)  # the local database only: no Slack call before the ack
        if found is None or found.state != astore.PENDING:
            state = found.state if found else "unknown"
            return {"reason": f"This request is no longer open: it was {state}."}
        where = ChatRequest(req.user, found.message_channel or found.channel, origin=req.origin)
        self.d.pool.submit(self.d.answering, where, transport, "deny form", request_id,
                           lambda: self.deny(request_id, reason, where, transport))
        return {}

    def deny(self, ref: str, reason: str, req: ChatRequest, transport: Transport) -> None:
        request = self.gate.deny(ref, req.user, reason)
        transport.respond(req, text_message(f"Denied request #{request.number}."))
        self._announce_denial(request, req.user, transport)

    def _announce_denial(self, request: astore.ApprovalRequest, user: str, transport: Transport) -> None:
        try:
            self.show(request, transport)
            self._tell_requester(request, transport, f"Request #{request.number} (`{request.module}`) was denied "
                                                     f"by <@{user}>: {escape(request.reason or '')}")
        except Exception:  # on the pool nobody else would see it
            log.exception("announcing the denial of request %s", request.request_id)

    def expired(self, request: astore.ApprovalRequest, transport: Transport) -> None:
        self.show(request, transport)
        self._tell_requester(request, transport, f"Request #{request.number} (`{request.module}`) expired "
                                                 f"before it had enough approvals.")

    def listing(self) -> Message:
        rows = [f"#{r.number} `{r.module}` on {len(r.hosts)} host(s) in {r.idc} by <@{r.requester}>: "
                f"{astore.ApprovalVote.select().where(astore.ApprovalVote.request == r.number).count()}/{r.needed} "
                f"approvals, expires {slack_date(r.expires_at)}" for r in self.gate.pending()]
        return text_message("\n".join(rows) or "No pending approval requests.")

    # -- helpers ---------------------------------------------------------------------------------

    def show(self, request: astore.ApprovalRequest, transport: Transport) -> None:
        """Update the approval message in place, from a fresh read: racing votes must not leave a
        stale 'pending' card behind the final one."""
        request = astore.ApprovalRequest.get_by_id(request.number)
        if request.message_channel and request.message_ts:
            transport.update(request.message_channel, request.message_ts, approval_card(view_of(request)))

    def _tell_requester(self, request: astore.ApprovalRequest, transport: Transport, text: str) -> None:
        transport.post(request.channel, text_message(text),
                       req=ChatRequest(request.requester, request.channel, origin=request.origin,
                                       response_url=request.reply_url))

    def _start(self, request: astore.ApprovalRequest, transport: Transport) -> None:
        run = grammar.Run(request.module, None, request.params, request.idc, timeout=request.timeout)
        requester = ChatRequest(request.requester, request.channel, origin=request.origin,
                                response_url=request.reply_url)
        spec = self.d.spec_of(request.idc, request.module)
        # The master's floor counts approvals by people other than the requester (and refuses an
        # envelope naming the requester): a self-approval the policy allowed stays in our votes only.
        others = [a for a in astore.approvers(request) if a != request.requester]
        self.d.start_job(run, spec, request.hosts, requester, transport, approvers=others,
                         cancel_roles=request.cancel_roles, job_id=request.request_id)


def view_of(request: astore.ApprovalRequest) -> RequestView:
    votes = astore.ApprovalVote.select().where(astore.ApprovalVote.request == request.number).order_by(astore.ApprovalVote.id)
    return RequestView(
        number=request.number, request_id=request.request_id, requester=request.requester, module=request.module,
        params=params_text(request), idc=request.idc, hosts=list(request.hosts), needed=request.needed,
        approver_roles=list(request.approver_roles), approvers=[(v.approver, v.at) for v in votes],
        state=request.state, expires_at=request.expires_at, decided_by=request.decided_by, reason=request.reason,
    )

