"""One request in several IDCs (`idc=bj,sh`, `idc=*`): the policy decides each part on its own
(per host, per IDC, through `authorize`), and the parts' terms combine into one decision for the
whole request, the strictest of them, as the hosts of one IDC under several rules already do:
`max_hosts` counts every part's hosts together; one approval covers every part.
"""

from __future__ import annotations

from collections.abc import Sequence

from ombot.approvals.gate import Gate, PolicyRefusal, authorize
from ombot.approvals.policy import Decision, _strictest


def authorize_parts(gate: Gate | None, user: str, module: str,
                    parts: Sequence[tuple[str, list[str]]]) -> Decision:
    """(idc, hosts) per part -> one decision for them all, or PolicyRefusal naming the part."""
    decided: list[tuple[str, Decision]] = []
    for idc, hosts in parts:
        try:
            decided.append((idc, authorize(gate, user, module, hosts, idc)))
        except PolicyRefusal as exc:
            raise PolicyRefusal(f"in {idc}: {exc}") from None
    total = sum(len(hosts) for _, hosts in parts)
    counts = ", ".join(f"{idc} {len(hosts)}" for idc, hosts in parts)
    limited = [(d.max_hosts, idc, d) for idc, d in decided if d.max_hosts is not None]
    max_hosts = min(limit for limit, _, _ in limited) if limited else None
    if max_hosts is not None and total > max_hosts:
        _, idc, strictest = next(item for item in limited if item[0] == max_hosts)
        raise PolicyRefusal(f"{total} hosts ({counts}) is over the limit of {max_hosts} for the whole request, "
                            f"set by rule {_names(strictest)} in {idc}")
    gated = [(idc, d.approval) for idc, d in decided if d.approval is not None]
    if len({frozenset(a.roles) for _, a in gated}) > 1:
        shown = "; ".join(f"{idc}: {', '.join(a.roles)}" for idc, a in gated)
        raise PolicyRefusal(f"the IDCs need approvers from different roles ({shown}); ask for them in separate requests")
    rules = tuple(dict.fromkeys(name for _, d in decided for name in d.rules))
    cancel = tuple(dict.fromkeys(role for _, d in decided for role in d.cancel_roles))
    reason = "allowed by " + "; ".join(f"{_names(d)} in {idc}" for idc, d in decided)
    return Decision(True, reason, rules, max_hosts, _strictest([a for _, a in gated]), cancel)


def _names(decision: Decision) -> str:
    return ", ".join(f"`{name}`" for name in decision.rules)
