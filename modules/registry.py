"""Module declarations, their catalog schema, and the loader that validates them hard at start."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import re
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from ombot.modules.params import Param, ParamError, ShellCommand
from ombot.modules.plan import Plan
from ombot.errors import OmbotError

BUILTIN_DIR = Path(__file__).parent / "builtin"
RESERVED_COMMANDS = frozenset({
    "help", "run", "form", "jobs", "status", "cancel", "masters", "modules",
    "approve", "deny", "approvals", "audit", "schedule", "schedules",
})
RESERVED_PARAMS = frozenset({"idc", "dry_run", "check", "timeout"})
_MODULE_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$")
_PARAM_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_CATEGORY = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")

# Every @module call lands here too, so the loader sees all of a file's declarations, even two
# that share the name `run` (the second would hide the first in the file's namespace).
_declared: list[Module] = []
_loading = threading.Lock()


class Risk(StrEnum):
    """How much harm a module can do; a module with a shell parameter must be high."""

    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


class Concurrency(StrEnum):
    """What a job of this module does when another job is changing one of its hosts (the master's host locks)."""

    WAIT = "wait"  # wait for the hosts (the default: two changes to one host never overlap)
    REFUSE = "refuse"  # refuse the submit with host_busy
    PARALLEL = "parallel"  # read-only: takes no lock and never waits


_CONCURRENCIES = tuple(str(c) for c in Concurrency)


class ModuleLoadError(OmbotError):
    """A module file that failed to load or declares something invalid; the master refuses to start."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")


@dataclass(frozen=True)
class ModuleSpec:
    """A module as the catalog describes it: enough to validate and to build a form."""

    name: str
    description: str
    category: str
    risk: Risk
    params: tuple[Param, ...]
    timeout: int | None = None
    concurrency: Concurrency = Concurrency.WAIT

    @property
    def allows_shell(self) -> bool:
        return any(isinstance(p, ShellCommand) for p in self.params)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def validate(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """Convert every given value; refuse unknown and missing ones. The refusal names every
        problem (unknown names first, then each parameter in declaration order), not only the first."""
        known = {p.name for p in self.params}
        expected = f"one of {', '.join(sorted(known))}" if known else "no parameters"
        errors = [ParamError(key, f"a parameter of {self.name} ({expected})") for key in raw if key not in known]
        values: dict[str, Any] = {}
        for p in self.params:
            try:
                if key_present(raw, p.name):
                    values[p.name] = p.convert(raw[p.name])
                elif p.required:
                    raise ParamError(p.name, f"a value ({p.help or p.kind})")
                else:  # defaults go through convert too, so run() always gets the converted type
                    values[p.name] = None if p.default is None else p.convert(p.default)
            except ParamError as exc:
                errors.append(exc)
        if errors:
            raise ParamError.combine(errors)
        return values

    def usage(self) -> str:
        parts = [self.name, "TARGETS"]
        for p in self.params:
            parts.append(f"{p.name}=<{p.kind}>" if p.required else f"[{p.name}=<{p.kind}>]")
        return " ".join(parts)

    def schema(self) -> dict[str, Any]:
        return {
            "name": self.name, "description": self.description, "category": self.category,
            "risk": str(self.risk), "timeout": self.timeout, "concurrency": str(self.concurrency),
            "params": [p.schema() for p in self.params],
        }

    @staticmethod
    def from_schema(data: Mapping[str, Any]) -> ModuleSpec:
        return ModuleSpec(
            name=str(data["name"]), description=str(data["description"]), category=str(data["category"]),
            risk=Risk(data["risk"]), params=tuple(Param.from_schema(p) for p in data["params"]),
            timeout=data.get("timeout"), concurrency=Concurrency(data.get("concurrency", Concurrency.WAIT)),
        )


def key_present(raw: Mapping[str, Any], name: str) -> bool:
    return name in raw and raw[name] is not None and raw[name] != ""


@dataclass(frozen=True)
class Module(ModuleSpec):
    """A loaded module: its spec plus the `run` that turns validated values into a Plan."""

    run: Callable[..., Plan] = field(default=lambda: Plan(), compare=False)
    source: str = ""

    def plan(self, values: Mapping[str, Any]) -> Plan:
        plan = self.run(**values)
        if not isinstance(plan, Plan):
            raise TypeError(f"{self.name}: run() returned {type(plan).__name__}, not a Plan")
        return plan


def module(
    name: str, *, category: str, risk: Risk | str = Risk.LOW, params: Iterable[Param] = (),
    timeout: int | None = None, concurrency: Concurrency | str = Concurrency.WAIT,
) -> Callable[[Callable[..., Plan]], Module]:
    """Declare a module: decorate its `run`; the function's docstring is the module's help."""

    def wrap(run: Callable[..., Plan]) -> Module:
        doc = inspect.getdoc(run) or ""
        declared = Module(
            name=name, description=doc.splitlines()[0] if doc else "", category=category, risk=Risk(risk),
            params=tuple(params), timeout=timeout, run=run, source=inspect.getsourcefile(run) or "",
            # An unknown value is kept as given, for _check to refuse with the file's name.
            concurrency=Concurrency(concurrency) if concurrency in _CONCURRENCIES else concurrency,  # type: ignore[arg-type]
        )
        _declared.append(declared)
        return declared

    return wrap


@dataclass(frozen=True)
class Catalog:
    """The modules a master offers, as schemas, with a version that changes whenever any of them changes."""

    modules: dict[str, ModuleSpec]
    version: str

    def schema(self) -> dict[str, Any]:
        return {"version": self.version, "modules": [m.schema() for m in self.modules.values()]}

    @staticmethod
    def from_schema(data: Mapping[str, Any]) -> Catalog:
        specs = [ModuleSpec.from_schema(m) for m in data["modules"]]
        return Catalog({m.name: m for m in specs}, str(data["version"]))


def load_modules(site_dirs: Iterable[Path] = ()) -> dict[str, Module]:
    """Load built-ins, then each site directory, refusing anything invalid or ambiguous."""
    found: dict[str, Module] = {}
    for directory in (BUILTIN_DIR, *site_dirs):
        if not directory.is_dir():
            raise ModuleLoadError(str(directory), "module directory does not exist")
        for path in sorted(directory.glob("*.py")):
            if path.name.startswith("_"):
                continue
            mod = _load_file(path)
            if mod.name in found:
                raise ModuleLoadError(str(path), f"module name {mod.name!r} is already defined in {found[mod.name].source}")
            found[mod.name] = mod
    return found


def catalog_of(modules: Mapping[str, Module]) -> Catalog:
    digest = hashlib.sha256()
    for name in sorted(modules):
        digest.update(json.dumps(modules[name].schema(), sort_keys=True).encode())
        digest.update(Path(modules[name].source).read_bytes() if modules[name].source else b"")
    return Catalog(dict(sorted(modules.items())), digest.hexdigest()[:16])


def _load_file(path: Path) -> Module:
    unique = "ombot_module_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(unique, path)
    if spec is None or spec.loader is None:
        raise ModuleLoadError(str(path), "cannot be imported")
    py = importlib.util.module_from_spec(spec)
    with _loading:
        _declared.clear()
        sys.modules[unique] = py
        try:
            spec.loader.exec_module(py)
        except Exception as exc:
            sys.modules.pop(unique, None)
            raise ModuleLoadError(str(path), f"failed to import: {type(exc).__name__}: {exc}") from exc
        declared = list(_declared)
    if len(declared) != 1:
        sys.modules.pop(unique, None)
        names = f" ({', '.join(m.name for m in declared)})" if declared else ""
        raise ModuleLoadError(str(path), f"a module file declares exactly one @module, found {len(declared)}{names}")
    mod = declared[0]
    _check(mod, str(path))
    return mod


def _check(mod: Module, source: str) -> None:
    if not _MODULE_NAME.match(mod.name):
        raise ModuleLoadError(source, f"module name {mod.name!r} must be lowercase words joined by dots")
    if mod.name in RESERVED_COMMANDS:
        raise ModuleLoadError(source, f"module name {mod.name!r} collides with the reserved command word")
    if not mod.description:
        raise ModuleLoadError(source, f"{mod.name}: run() needs a docstring (the module's help)")
    if not isinstance(mod.category, str) or not _CATEGORY.match(mod.category):
        raise ModuleLoadError(source, f"{mod.name}: category {mod.category!r} must be one lowercase word")
    if mod.timeout is not None and (not isinstance(mod.timeout, int) or isinstance(mod.timeout, bool) or mod.timeout < 1):
        raise ModuleLoadError(source, f"{mod.name}: timeout must be a positive number of seconds, got {mod.timeout!r}")
    if mod.concurrency not in _CONCURRENCIES:
        raise ModuleLoadError(source, f"{mod.name}: concurrency must be one of {', '.join(_CONCURRENCIES)}, "
                                      f"got {mod.concurrency!r}")
    names = [p.name for p in mod.params if isinstance(p, Param)]
    for p in mod.params:
        if not isinstance(p, Param) or not _PARAM_NAME.match(p.name):
            raise ModuleLoadError(source, f"{mod.name}: bad parameter {p!r} (a params.* type named like 'lines')")
        try:
            p.check()
        except ValueError as exc:
            raise ModuleLoadError(source, f"{mod.name}: parameter {p.name!r}: {exc}") from None
        if p.name in RESERVED_PARAMS:
            raise ModuleLoadError(source, f"{mod.name}: parameter name {p.name!r} is reserved")
        if names.count(p.name) > 1:
            raise ModuleLoadError(source, f"{mod.name}: parameter {p.name!r} is declared twice")
        if not p.required and p.default is not None:
            try:
                p.convert(p.default)
            except ParamError as exc:
                raise ModuleLoadError(source, f"{mod.name}: default of {exc}") from None
    if mod.allows_shell and mod.risk is not Risk.HIGH:
        raise ModuleLoadError(source, f"{mod.name}: a ShellCommand parameter requires risk='high'")
    _check_signature(mod, names, source)


def _check_signature(mod: Module, names: list[str], source: str) -> None:
    """run() is called as run(**values): it takes exactly the declared parameters, by keyword."""
    by_keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    taken = inspect.signature(mod.run).parameters
    if set(taken) != set(names) or any(p.kind not in by_keyword for p in taken.values()):
        declared = ", ".join(names) or "no parameters"
        raise ModuleLoadError(source, f"{mod.name}: run() must take exactly its declared parameters ({declared}), "
                                      f"got run({', '.join(taken)})")
