"""An IDC's inventory, read with Ansible's own inventory code (INI or YAML), and target expansion.

OMBot expands its ranges (`web[01-03]`) itself before Ansible sees a pattern: to Ansible,
`web[01-03]` is a subscript of a group `web` and selects other hosts.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

from ombot.errors import OmbotError

MAX_HOSTS = 10_000
_RANGE = re.compile(r"^([^\[\]]*)\[(\d+)-(\d+)\]([^\[\]]*)$")
_SUBSCRIPT = re.compile(r"\[[^\]]*\]")
_TERM = re.compile(r"^[!&]?[A-Za-z0-9_.*\-]+$|^[!&]?~.+$")


class TargetError(OmbotError):
    """A target expression that cannot be resolved to hosts."""


def _quiet_ansible() -> None:
    # Ansible reads these at import time: keep it off ~/.ansible and make unparsable files an error.
    os.environ.setdefault("ANSIBLE_HOME", os.path.join(tempfile.gettempdir(), f"ombot-ansible-{os.getuid()}"))
    os.environ.setdefault("ANSIBLE_LOCAL_TEMP", os.path.join(os.environ["ANSIBLE_HOME"], "tmp"))
    os.environ["ANSIBLE_INVENTORY_ENABLED"] = "ini,yaml"
    os.environ["ANSIBLE_INVENTORY_UNPARSED_FAILED"] = "True"
    os.environ["ANSIBLE_INVENTORY_ANY_UNPARSED_IS_FAILED"] = "True"
    os.environ["ANSIBLE_HOST_PATTERN_MISMATCH"] = "ignore"  # we report non-matching terms ourselves
    os.environ.setdefault("ANSIBLE_DEPRECATION_WARNINGS", "False")
    os.environ.setdefault("ANSIBLE_LOCALHOST_WARNING", "False")


class Inventory:
    def __init__(self, path: Path) -> None:
        _quiet_ansible()
        from ansible.errors import AnsibleError
        from ansible.inventory.manager import InventoryManager
        from ansible.parsing.dataloader import DataLoader

        if not path.is_file():
            raise TargetError(f"inventory {path} does not exist")
        self.path = path
        try:
            self._im = InventoryManager(loader=DataLoader(), sources=[str(path)])
        except AnsibleError as exc:
            raise TargetError(f"inventory {path}: {exc.message}") from None
        self._known = frozenset(self.hosts())  # read once: the inventory is loaded at start

    def hosts(self) -> list[str]:
        return [h.name for h in self._im.get_hosts("all")]

    def host_vars(self, host: str) -> dict[str, Any]:
        entry = self._im.get_host(host)
        return dict(entry.get_vars()) if entry else {}

    def groups(self) -> list[str]:
        return sorted(self._im.groups)

    def expand(self, targets: str) -> list[str]:
        """Resolve a target expression to the exact, ordered host list; every term must match."""
        terms = expand_ranges(targets)
        names: dict[str, None] = {}
        for term in terms:
            if term[0] not in "!&" and not _listed(self._im.get_hosts(term)):
                raise TargetError(f"no host or group matches {term!r}")
        for host in _listed(self._im.get_hosts(terms)):
            names[host.name] = None
        if not names:
            raise TargetError(f"{targets!r} selects no hosts")
        return list(names)

    def missing(self, hosts: list[str]) -> list[str]:
        return [h for h in hosts if h not in self._known]


def _listed(hosts: list[Any]) -> list[Any]:
    # Ansible invents an implicit `localhost` (connection local) for the names localhost and
    # 127.0.0.1 even when the inventory lacks them; a target must be a host the inventory lists.
    return [h for h in hosts if not getattr(h, "implicit", False)]


def expand_ranges(targets: str) -> list[str]:
    """Split a target expression into terms and expand `name[NN-MM]` ranges (inclusive, padding kept)."""
    terms = [t for t in re.split(r"[,\s]+", targets.strip()) if t]
    if not terms:
        raise TargetError("no targets given")
    out: list[str] = []
    for term in terms:
        out.extend(_expand_term(term))
        if len(out) > MAX_HOSTS:
            raise TargetError(f"targets expand to more than {MAX_HOSTS} names")
    return out


def _expand_term(term: str) -> list[str]:
    match = _RANGE.match(term)
    if match:
        prefix, start, end, suffix = match.groups()
        if int(start) > int(end):
            raise TargetError(f"range {term!r} runs backwards")
        if int(end) - int(start) >= MAX_HOSTS:
            raise TargetError(f"range {term!r} is larger than {MAX_HOSTS} hosts")
        width = len(start) if start.startswith("0") or len(start) == len(end) else 0
        return [f"{prefix}{n:0{width}d}{suffix}" for n in range(int(start), int(end) + 1)]
    if _SUBSCRIPT.search(term):
        raise TargetError(
            f"{term!r}: OMBot ranges are name[NN-MM] (e.g. web[01-03]); Ansible subscripts such as "
            "group[0:2] are not supported, because the two read the same text differently"
        )
    if not _TERM.match(term):
        raise TargetError(f"{term!r} is not a host name, group or pattern")
    return [term]
