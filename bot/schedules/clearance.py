"""Whether a schedule may still run as approved: the policy, its targets and its approvers, checked
again at every run (and on resume) against today's policy and inventory."""

from __future__ import annotations

from dataclasses import dataclass

from ombot.approvals import Decision, Gate, PolicyRefusal, authorize
from ombot.bot.schedules.models import Schedule
from ombot.bot.schedules.render import when
from ombot.masters import Refused, Router
from ombot.clock import now_ms
from ombot.message import escape


@dataclass(frozen=True)
class Cleared:
    """A schedule may run now: on these hosts, with these approvers."""

    hosts: list[str]
    approvers: list[str]
    cancel_roles: list[str]


@dataclass(frozen=True)
class Blocked:
    """A schedule may not run as approved: pause it, and ask again when `decision` says approval helps."""

    reason: str
    hosts: list[str]
    decision: Decision | None  # None: no approval can help (the requester may not run it at all)


def may_run(schedule: Schedule, router: Router, gate: Gate | None) -> Cleared | Blocked:
    """Whether the schedule may still run as approved: same hosts, enough approvers who still may."""
    try:
        hosts = router.expand(schedule.idc, schedule.targets, requester=schedule.requester)
        decision = authorize(gate, schedule.requester, schedule.module, hosts, schedule.idc)
    except PolicyRefusal as exc:
        return Blocked(f"<@{schedule.requester}> may no longer run it: {escape(str(exc))}", list(schedule.hosts), None)
    except Refused as exc:
        return Blocked(f"its targets no longer expand: {escape(exc.message)}", list(schedule.hosts), None)
    approvers = list(schedule.approvers)  # every vote; the envelope names those other than the requester
    cleared = Cleared(hosts, [a for a in approvers if a != schedule.requester], list(decision.cancel_roles))
    if not decision.needs_approval or decision.approval is None:
        return cleared
    approval = decision.approval
    if schedule.approval_expires_at is None:
        return Blocked(f"the policy now asks {approval.count} approval(s) for it", hosts, decision)
    if sorted(hosts) != sorted(schedule.hosts):
        return Blocked(f"its targets now expand to {len(hosts)} host(s), not the {len(schedule.hosts)} "
                       f"approved", hosts, decision)
    if now_ms() >= schedule.approval_expires_at:
        return Blocked(f"its approval ran out {when(schedule.approval_expires_at)}", hosts, decision)
    assert gate is not None  # authorize refuses without one
    still = [a for a in approvers if gate.policy.in_roles(a, gate.groups_of(a), approval.roles)
             and (a != schedule.requester or approval.self_approval)]
    if len(still) < approval.count:
        lost = [a for a in approvers if a not in still]
        why = (f"approver(s) {', '.join(f'<@{a}>' for a in lost)} may no longer approve it" if lost
               else f"the policy now asks {approval.count} approval(s), it has {len(still)}")
        return Blocked(why, hosts, decision)
    return cleared
