"""An IDC's inventory, read with Ansible's own inventory code (INI or YAML), and target expansion.

OMBot expands its ranges (`web[01-03]`) itself before Ansible sees a pattern: to Ansible,
`web[01-03]` is a subscript of a group `web` and selects other hosts.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import re2

from ombot.config import MasterSettings
from ombot.errors import OmbotError

# Bounds on one expansion, so whoever may send a target expression cannot make the master work long.
MAX_HOSTS = 10_000  # names a whole expression may expand to
MAX_TARGETS_LENGTH = 4096  # characters in a whole expression
MAX_TERMS = 100  # terms as written, before ranges expand
MAX_TERM_LENGTH = 255  # characters in one term (a DNS name is at most 253)
MAX_RANGE_DIGITS = 9  # digits of each bound in name[NN-MM]
MAX_REGEX_PROGRAM = 2000  # re2 program size of one ~REGEX term
REGEX_MEMORY = 1 << 20  # re2 memory budget per compiled ~REGEX (its DFA falls back to the NFA past it)
# Each term that is not a host's own name is compared with every group name (and most with every host
# name too): 10 000 such terms on a 2 000-host inventory took seconds. The work is counted in name
# comparisons and capped before any matching (about 0.3 s of CPU); the whole expansion has a deadline besides.
MAX_NAME_MATCHES = 1_500_000  # name comparisons one expression may cost
TERM_MATCH_COST = 500  # what resolving one such term costs besides its comparisons (two regex compiles...)
EXPAND_SECONDS = 1.0  # wall time for one whole expansion, every term however it is matched

_RANGE = re.compile(r"^([^\[\]]*)\[([0-9]+)-([0-9]+)\]([^\[\]]*)$")
_SUBSCRIPT = re.compile(r"\[[^\]]*\]")
_TERM = re.compile(r"^[!&]?[A-Za-z0-9_.*\-]+$|^[!&]?~.+$")
_SCANS_HOSTS = re.compile(r"^~|[.?*\[]")  # Ansible also compares such a term with every host name


class TargetError(OmbotError):
    """A target expression that cannot be resolved to hosts."""


# How every Ansible of a master reads the inventory: this module's, and ansible-playbook's in the
# Ansible backend (which passes them to each run), so both see the same hosts: INI or YAML only, and a
# file Ansible cannot parse is an error, never an empty inventory.
INVENTORY_SETTINGS = {"ANSIBLE_INVENTORY_ENABLED": "ini,yaml", "ANSIBLE_INVENTORY_UNPARSED_FAILED": "True",
                      "ANSIBLE_INVENTORY_ANY_UNPARSED_IS_FAILED": "True"}


def _quiet_ansible() -> None:
    # Ansible reads these at import time: keep it off ~/.ansible and make unparsable files an error.
    os.environ.setdefault("ANSIBLE_HOME", os.path.join(tempfile.gettempdir(), f"ombot-ansible-{os.getuid()}"))
    os.environ.setdefault("ANSIBLE_LOCAL_TEMP", os.path.join(os.environ["ANSIBLE_HOME"], "tmp"))
    os.environ.update(INVENTORY_SETTINGS)
    os.environ["ANSIBLE_HOST_PATTERN_MISMATCH"] = "ignore"  # we report non-matching terms ourselves
    os.environ.setdefault("ANSIBLE_DEPRECATION_WARNINGS", "False")
    os.environ.setdefault("ANSIBLE_LOCALHOST_WARNING", "False")


class Inventory:
    """An IDC's hosts as Ansible reads the inventory file, and the expansion of target expressions."""

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
        # Ansible caches every pattern it resolves, without bound, and is not thread-safe about it:
        # expansions hold this lock and empty the cache after each.
        self._lock = threading.Lock()
        self._known = frozenset(self.hosts())  # read once: the inventory is loaded at start

    def hosts(self) -> list[str]:
        with self._lock:
            return [h.name for h in self._im.get_hosts("all")]

    def host_vars(self, host: str) -> dict[str, Any]:
        entry = self._im.get_host(host)
        return dict(entry.get_vars()) if entry else {}

    def groups(self) -> list[str]:
        return sorted(self._im.groups)

    def expand(self, targets: str) -> list[str]:
        """Resolve a target expression to the exact, ordered host list; every term must match.

        Each term is resolved on its own and the results are combined as Ansible combines a
        pattern list (all plain terms, then the `&` ones, then the `!` ones). `~REGEX` terms never
        reach Ansible, which would run them with Python's backtracking `re`: they are matched
        here with re2, in linear time, against the inventory's group and host names. The work of
        the whole expansion is capped before it starts, and it stops at a deadline besides."""
        terms = expand_ranges(targets)
        regexes = {term: _compile_regex(term) for term in terms if _body(term).startswith("~")}
        with self._lock:
            deadline = time.monotonic() + EXPAND_SECONDS  # not counting the wait for another expansion
            try:
                self._check_work(terms)
                selected = [(term, self._select(term, regexes.get(term), deadline)) for term in terms]
                names = _combine(selected, self._all_names)
            finally:
                self._im.clear_pattern_cache()
        if not names:
            raise TargetError(f"{targets!r} selects no hosts")
        return names

    def _select(self, term: str, regex: Any, deadline: float) -> list[str]:
        """The hosts one term names, ignoring its `!`/`&`; a plain term must name some."""
        body = _body(term)
        if regex is None:  # a ~REGEX term checks the deadline name by name, in _regex_hosts
            _check_deadline(term, deadline)
        hosts = self._regex_hosts(term, regex, deadline) if regex is not None else self._im.get_hosts(body)
        names = [h.name for h in _listed(hosts)]
        if body == term and not names:
            raise TargetError(f"no host or group matches {term!r}")
        return names

    def _regex_hosts(self, term: str, regex: Any, deadline: float) -> list[Any]:
        """Ansible's meaning of `~REGEX`: the hosts of every group whose name it matches, then every
        host whose name it matches (re.match: anchored at the start only)."""
        hosts: list[Any] = []
        for name, group in self._im.groups.items():
            _check_deadline(term, deadline)
            if regex.match(name):
                hosts.extend(group.get_hosts())
        for name, host in self._im.hosts.items():
            _check_deadline(term, deadline)
            if regex.match(name):
                hosts.append(host)
        return hosts

    def _check_work(self, terms: list[str]) -> None:
        """Refuse, before matching anything, an expression whose terms would cost more than
        MAX_NAME_MATCHES name comparisons. As Ansible resolves a term: a host's own name is one lookup;
        anything else is compared with every group name, and with every host name too unless it is a
        group's plain name (a ~REGEX term here, with re2, likewise)."""
        groups, hosts = len(self._im.groups), len(self._im.hosts)
        costs = [0 if body in self._im.hosts else TERM_MATCH_COST + groups
                 + (0 if body in self._im.groups and not _SCANS_HOSTS.search(body) else hosts)
                 for body in map(_body, terms)]
        work = sum(costs)
        if work > MAX_NAME_MATCHES:
            raise TargetError(f"{sum(1 for c in costs if c)} target terms are patterns or names that are not hosts; "
                              f"matching them against the inventory's {groups} groups and {hosts} hosts would cost "
                              f"about {work:,} name comparisons, over the cap of {MAX_NAME_MATCHES:,}: name hosts, "
                              "or use fewer patterns")

    def _all_names(self) -> list[str]:
        return [h.name for h in _listed(self._im.get_hosts("all"))]

    def missing(self, hosts: list[str]) -> list[str]:
        return [h for h in hosts if h not in self._known]


_MINION_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}$")


class MinionInventory(Inventory):
    """The salt-master's accepted minion keys as the inventory (`[masters.ID.salt] inventory = "minions"`):
    every minion in one group, `minions`. They are written to an INI file of the master's own and read
    again whenever the accepted keys change, so a newly accepted minion is a target without a restart."""

    def __init__(self, path: Path, list_minions: Callable[[], Iterable[str]]) -> None:
        self._list = list_minions
        self._names = self._minions()
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_minions(path, self._names)
        super().__init__(path)

    def _minions(self) -> list[str]:
        # Only ids an INI file and a target expression carry exactly; Salt allows a few more.
        return [name for name in self._list() if _MINION_ID.fullmatch(name)]

    def _refresh(self) -> None:
        names = self._minions()  # a directory listing: cheap enough for every expansion
        with self._lock:
            if names == self._names:
                return
            _write_minions(self.path, names)
            self._im.refresh_inventory()
            self._names, self._known = names, frozenset(h.name for h in self._im.get_hosts("all"))

    def expand(self, targets: str) -> list[str]:
        self._refresh()
        return super().expand(targets)

    def hosts(self) -> list[str]:
        if hasattr(self, "_known"):  # not while the base class is still being set up
            self._refresh()
        return super().hosts()

    def missing(self, hosts: list[str]) -> list[str]:
        self._refresh()
        return super().missing(hosts)


def _write_minions(path: Path, names: list[str]) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text("[minions]\n" + "".join(f"{name}\n" for name in names))
    os.replace(partial, path)


def open_inventory(settings: MasterSettings) -> Inventory | None:
    """A master's inventory: its inventory file, or the salt-master's accepted minion keys."""
    if settings.salt.inventory == "minions":
        from ombot.masters.backends import salt_module  # Salt only for a master that asks for it

        config = settings.salt.config
        return MinionInventory(settings.state_dir / "salt-minions.ini",
                               lambda: salt_module().accepted_minions(config))
    return Inventory(settings.inventory) if settings.inventory else None


def _listed(hosts: list[Any]) -> list[Any]:
    # Ansible invents an implicit `localhost` (connection local) for the names localhost and
    # 127.0.0.1 even when the inventory lacks them; a target must be a host the inventory lists.
    return [h for h in hosts if not getattr(h, "implicit", False)]


def _body(term: str) -> str:
    return term[1:] if term[:1] in ("!", "&") else term


def _combine(selected: list[tuple[str, list[str]]], all_names: Any) -> list[str]:
    """Ansible's order of applying a pattern list: the plain terms' union (in order), then each
    `&` term intersects, then each `!` term removes; with no plain term, start from all hosts."""
    plain = [names for term, names in selected if _body(term) == term]
    result = dict.fromkeys(name for names in (plain or [all_names()]) for name in names)
    for term, names in selected:
        if term[0] == "&":
            keep = set(names)
            result = {name: None for name in result if name in keep}
    for term, names in selected:
        if term[0] == "!":
            for name in names:
                result.pop(name, None)
    return list(result)


def _compile_regex(term: str) -> Any:
    """A `~REGEX` term compiled with re2 (linear time), or a TargetError saying why it cannot be."""
    options = re2.Options()
    options.log_errors = False  # re2 would write every refused pattern to stderr
    options.never_capture = True  # only "does it match" is asked: lets re2 use its DFA throughout
    options.max_mem = REGEX_MEMORY
    pattern = _body(term)[1:]
    try:
        regex = re2.compile(pattern, options)
    except UnicodeEncodeError:
        raise TargetError(f"{term!r} is not valid Unicode text") from None
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise TargetError(f"{term!r} is not a regular expression OMBot can run ({reason}); target regexes use "
                          "RE2 syntax, without backreferences or lookarounds") from None
    if regex.programsize > MAX_REGEX_PROGRAM:
        raise TargetError(f"{term!r}: the regular expression is too complex (RE2 program of {regex.programsize} "
                          f"instructions, the cap is {MAX_REGEX_PROGRAM})")
    return regex


def _check_deadline(term: str, deadline: float) -> None:
    if time.monotonic() > deadline:
        raise TargetError(f"expanding the targets took over {EXPAND_SECONDS:g} s (stopped at {term!r}); "
                          "use fewer terms or simpler patterns")


def expand_ranges(targets: str) -> list[str]:
    """Split a target expression into terms and expand `name[NN-MM]` ranges (inclusive, padding kept).

    `~REGEX` terms are kept as written: `~web0[1-2]` is a character class, not a range."""
    if len(targets) > MAX_TARGETS_LENGTH:
        raise TargetError(f"the target expression is {len(targets)} characters long; the cap is {MAX_TARGETS_LENGTH}")
    terms = [t for t in re.split(r"[,\s]+", targets.strip()) if t]
    if not terms:
        raise TargetError("no targets given")
    if len(terms) > MAX_TERMS:
        raise TargetError(f"{len(terms)} target terms; the cap is {MAX_TERMS} (a range such as web[01-40] is one term)")
    out: list[str] = []
    for term in terms:
        out.extend(_expand_term(term))
        if len(out) > MAX_HOSTS:
            raise TargetError(f"targets expand to more than {MAX_HOSTS} names")
    return out


def _expand_term(term: str) -> list[str]:
    if len(term) > MAX_TERM_LENGTH:
        raise TargetError(f"target term {term[:40]!r}... is {len(term)} characters long; the cap is {MAX_TERM_LENGTH}")
    if _body(term).startswith("~"):
        if _body(term) == "~":
            raise TargetError(f"{term!r}: a ~ term needs a regular expression after the ~")
        return [term]
    match = _RANGE.match(term)
    if match:
        prefix, start, end, suffix = match.groups()
        if max(len(start), len(end)) > MAX_RANGE_DIGITS:
            raise TargetError(f"range {term[:60]!r}: a range bound has at most {MAX_RANGE_DIGITS} digits")
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
