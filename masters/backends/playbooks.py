"""The playbooks `ansible.playbook` may run: files of one allow-listed directory on the master
(`[masters.ID.ansible] playbooks`), each with its extra vars declared beside it.

    playbooks/ntp-server.yml            the playbook
    playbooks/ntp-server.params.toml    its vars, typed like module parameters (modules.params):

    description = "Point the hosts' NTP drop-in at a server"
    [vars.ntp_server]
    kind = "string"
    pattern = "[a-z0-9.-]+"
    help = "the NTP server"

A request names the playbook and gives `NAME=VALUE` words; they are checked here, at submit, with
the same parameter types modules use, and reach Ansible as typed data marked `!unsafe`
(masters.backends.ansible_play), never as templates.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ombot.modules import ModuleSpec, Param, ParamError, Risk, RunPlaybook, within

PLAYBOOK_NAME = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"  # a file name without its .yml: no dots, no slashes
_VAR_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
# Names Ansible itself gives meaning (connection, privilege, interpreter) or OMBot's own.
_RESERVED_PREFIXES = ("ansible_", "ombot_")
_VAR_KINDS = ("string", "int", "bool", "choice", "radio", "multi", "path")


@dataclass(frozen=True)
class ResolvedPlaybook(RunPlaybook):
    """A RunPlaybook the master checked: the playbook's real path and its typed vars, in order."""

    path: str = ""
    values: tuple[tuple[str, Any], ...] = ()


def resolve(directory: Path | None, step: RunPlaybook) -> ResolvedPlaybook:
    """The playbook and vars `step` asks for, or ParamError naming `playbook` or the var."""
    if directory is None:
        raise ParamError("playbook", "a playbook directory on this master (none is configured: "
                                     "[masters.ID.ansible] playbooks)")
    if not re.fullmatch(PLAYBOOK_NAME, step.playbook):
        raise ParamError("playbook", "a playbook name (letters, digits, '_', '-')", step.playbook)
    root = directory.resolve()
    path = (root / f"{step.playbook}.yml").resolve()
    if not within(str(path), str(root)) or not path.is_file():
        raise ParamError("playbook", f"one of {', '.join(available(directory)) or 'no playbooks'}", step.playbook)
    spec = schema_of(path)
    values = spec.validate(_pairs(step.vars))
    kept = tuple((name, value) for name, value in values.items() if value is not None)
    return ResolvedPlaybook(step.playbook, step.vars, path=str(path), values=kept)


def available(directory: Path) -> list[str]:
    """The playbook names the directory offers."""
    root = directory.resolve()
    return sorted(p.stem for p in root.glob("*.yml") if re.fullmatch(PLAYBOOK_NAME, p.stem) and p.is_file()
                  and within(str(p.resolve()), str(root)))


def schema_of(playbook: Path) -> ModuleSpec:
    """The vars declared beside `playbook` (NAME.params.toml; none if it has no such file), as a
    spec that validates like a module's parameters."""
    schema = playbook.with_name(playbook.stem + ".params.toml")
    data: dict[str, Any] = {}
    if schema.exists():
        try:
            data = tomllib.loads(schema.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ParamError("playbook", f"a readable var schema ({schema.name}: {exc})") from None
    declared = data.get("vars", {})
    if not isinstance(declared, dict):
        raise ParamError("playbook", f"a var schema whose [vars] is a table ({schema.name})")
    params = tuple(_param(schema.name, name, table) for name, table in declared.items())
    return ModuleSpec(name=f"playbook {playbook.stem}", description=str(data.get("description", "")),
                      category="ansible", risk=Risk.HIGH, params=params)


def _param(source: str, name: str, table: Any) -> Param:
    """One declared var; a broken declaration is the playbook's problem, said plainly."""
    if not _VAR_NAME.fullmatch(name) or name.startswith(_RESERVED_PREFIXES):
        raise ParamError("playbook", f"var names like ntp_server, not starting with ansible_ or ombot_ ({source})",
                         name)
    if not isinstance(table, dict) or table.get("kind") not in _VAR_KINDS:
        raise ParamError("playbook", f"vars.{name}.kind one of {', '.join(_VAR_KINDS)} ({source})")
    try:
        return Param.from_schema({**table, "name": name})
    except (TypeError, ValueError) as exc:
        raise ParamError("playbook", f"a valid declaration of vars.{name} ({source}: {exc})") from None


def _pairs(words: tuple[str, ...]) -> dict[str, str]:
    values: dict[str, str] = {}
    for word in words:
        name, sep, value = word.partition("=")
        if not sep or not name:
            raise ParamError("vars", "NAME=VALUE words", word)
        if name in values:
            raise ParamError("vars", f"each var once; {name} is given twice")
        values[name] = value
    return values
