"""A submit's checks, in the order the master applies them, and the typed job they produce.

`SubmitChecks.spec(request)` either returns a `JobSpec` (what will run, where, for how long, as
whom) or raises `Refused`: the module exists, the request is for this IDC, the params validate,
the hosts are in the inventory, the client's registration globs allow it, the master's approval
floor is met, the timeout is within the ceiling, the module planned without a hidden shell, and
the master's backend can run that plan (a check run, a playbook and its vars: `backends.base.vet`).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ombot.masters.backends.base import Backend, Unsupported, preview, vet
from ombot.masters.clients import check_approvers, check_permitted
from ombot.envelope import Refused, Request
from ombot.masters.inventory import Inventory, TargetError
from ombot.modules import Module, ParamError, Plan, Shell
from ombot.config import ClientRegistration, MasterSettings
from ombot.globs import matches_any

log = logging.getLogger("ombot.master")


@dataclass(frozen=True)
class JobSpec:
    """A job that passed every submit check: the validated params, its hosts, timeout and plan."""

    module: Module
    values: dict[str, Any]  # the params after validation, as recorded with the job
    hosts: list[str]
    approvers: list[str]
    timeout: int  # seconds
    plan: Plan  # as the backend vetted it (a playbook resolved, its vars typed)
    check: bool = False  # a check run: passes every check a real run does, reaches the hosts, changes nothing


def require_inventory(inventory: Inventory | None, master_id: str) -> Inventory:
    if inventory is None:
        raise Refused("no_inventory", f"master {master_id} has no inventory configured")
    return inventory


class SubmitChecks:
    """Everything a submit must pass before the master records it; it never touches the store.
    `clients` is read per request: the master's live registry (masters.registry)."""

    def __init__(self, settings: MasterSettings, clients: Mapping[str, ClientRegistration],
                 modules: dict[str, Module], inventory: Inventory | None, backend: Backend | None = None) -> None:
        self.settings, self.clients, self.modules, self.inventory = settings, clients, modules, inventory
        self.backend = backend

    def spec(self, request: Request) -> JobSpec:
        args, client = request.args, self.clients[request.sender]
        module = self._module(args.get("module"))
        if args.get("idc") != self.settings.idc:
            raise Refused("wrong_idc", f"this master serves IDC {self.settings.idc!r}, not {args.get('idc')!r}")
        values = self._values(module, args.get("params"))
        hosts = self._hosts(args.get("hosts"))
        check_permitted(client, module.name, hosts)
        approvers = check_approvers(client, args.get("approvers"))
        self._check_approvals(module.name, approvers, request.requester)
        timeout = self._timeout(module, args.get("timeout"))
        check = self.check_flag(args.get("check"))
        return JobSpec(module, values, hosts, approvers, timeout, self.vetted(self._plan(module, values), check), check)

    def preview(self, request: Request) -> dict[str, Any]:
        """The read-only `preview` operation (a dry run): the hosts `targets` expands to and what the
        backend would run there, after the checks a submit applies to the module, params and hosts.
        Nothing is recorded; approvals are not asked for (a dry run runs nothing)."""
        args, client = request.args, self.clients[request.sender]
        module = self._module(args.get("module"))
        values = self._values(module, args.get("params"))
        targets = args.get("targets")
        if not isinstance(targets, str):
            raise Refused("bad_request", "preview needs targets as a string")
        try:
            hosts = require_inventory(self.inventory, self.settings.id).expand(targets)
        except TargetError as exc:
            raise Refused("bad_targets", str(exc)) from None
        check_permitted(client, module.name, hosts)
        check = self.check_flag(args.get("check"))
        plan = self.vetted(self._plan(module, values), check)
        backend = self.backend.name if self.backend is not None else "none"
        shown = preview(self.backend, plan, hosts, check) if self.backend is not None else {"steps": plan.describe()}
        return {"module": module.name, "hosts": hosts, "backend": backend, "check": check, **shown}

    @staticmethod
    def check_flag(value: Any) -> bool:
        if value is None:
            return False
        if not isinstance(value, bool):
            raise Refused("bad_request", "check must be true or false")
        return value

    def vetted(self, plan: Plan, check: bool) -> Plan:
        """The plan as this master's backend will run it, or the refusal of what it cannot run."""
        if self.backend is None:
            return plan
        try:
            return vet(self.backend, plan, check)
        except Unsupported as exc:
            raise Refused("unsupported", str(exc)) from None
        except ParamError as exc:
            raise Refused("invalid_params", str(exc), param=exc.param) from None

    def _module(self, name: Any) -> Module:
        if not isinstance(name, str) or name not in self.modules:
            close = difflib.get_close_matches(str(name), self.modules, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise Refused("unknown_module", f"no module named {name!r} on this master{hint}")
        return self.modules[name]

    @staticmethod
    def _values(module: Module, params: Any) -> dict[str, Any]:
        if not isinstance(params, dict):
            raise Refused("invalid_params", "params must be an object")
        try:
            return module.validate(params)
        except ParamError as exc:
            raise Refused("invalid_params", str(exc), param=exc.param) from None

    def _hosts(self, hosts: Any) -> list[str]:
        if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) for h in hosts):
            raise Refused("bad_request", "hosts must be a non-empty list of host names")
        if len(set(hosts)) != len(hosts):
            raise Refused("bad_request", "hosts lists a host twice")
        missing = require_inventory(self.inventory, self.settings.id).missing(hosts)
        if missing:
            raise Refused("unknown_host", f"not in this master's inventory: {', '.join(missing[:10])}",
                          hosts=missing[:100])
        return hosts

    def _check_approvals(self, module: str, approvers: list[str], requester: str) -> None:
        """The master's own approval floor: it never trusts the bot to have run the approval flow."""
        needed = max((n for glob, n in self.settings.approvals.items() if matches_any(module, (glob,))), default=0)
        if not needed:
            return
        if requester in approvers:
            raise Refused("approval_required", f"{module}: the requester cannot approve their own job")
        if len(set(approvers)) != len(approvers):
            raise Refused("approval_required", f"{module}: an approver is listed twice")
        if len(approvers) < needed:
            raise Refused("approval_required", f"{module} needs {needed} approval(s) on this master; "
                                               f"the request carries {len(approvers)}", needed=needed)

    def _timeout(self, module: Module, requested: Any) -> int:
        ceiling = self.settings.limits.job_timeout_seconds
        if requested is None:
            return min(module.timeout or ceiling, ceiling)
        if not isinstance(requested, int) or isinstance(requested, bool) or not 1 <= requested <= ceiling:
            raise Refused("invalid_params", f"timeout: expected seconds from 1 to {ceiling}", param="timeout")
        return requested

    @staticmethod
    def _plan(module: Module, values: dict[str, Any]) -> Plan:
        try:
            plan = module.plan(values)
        except Exception as exc:
            log.exception("module %s failed to plan", module.name)
            raise Refused("module_error", f"{module.name} could not plan: {type(exc).__name__}") from None
        if any(isinstance(step, Shell) for step in plan.steps) and not module.allows_shell:
            raise Refused("module_error", f"{module.name} tried to run a shell without declaring a shell parameter")
        return plan
