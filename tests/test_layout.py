"""Each top-level package is a room with one door, and imports flow one way (the README's picture):

    ombot.app (the CLI: composes everything; nothing imports it)
      -> bot -> audit (the central audit) -> approvals -> masters (the client library and the master)
                                                            -> modules -> ombot (the base)
                 audit_agent -> ombot (the seven base files its distribution, ombot-agent, ships: AGENT_BASE)

A package imports only packages below it; the master side never imports the bot; nobody outside
`masters` reaches its internals; no two project files import each other, however indirectly; and
each heavy third-party library lives in one place.

The rooms live at the repository's root and are imported as `ombot.bot`, `ombot.masters`, ...
(ombot/ links them in: README, "Installed names"); below, names are written without the `ombot.`
prefix, so `bot.grammar` is the file bot/grammar.py, imported as `ombot.bot.grammar`.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support import REPO

ROOMS = ("bot", "audit", "approvals", "masters", "modules", "audit_agent")  # at the root, linked into ombot/
PACKAGES = (*ROOMS, "ombot")
# The rooms from the bottom up: a room may import only rooms of a lower rank.
RANK = {"ombot": 0, "audit_agent": 1, "modules": 1, "masters": 2, "approvals": 3, "audit": 4, "bot": 5,
        "ombot.app": 6}
# What a room may import besides the base, where it is narrower than "everything below".
ONLY: dict[str, set[str]] = {"audit_agent": set()}  # it runs on every server: no Slack, no engines, no masters
# The base files the agent imports: with audit_agent/, all that its own distribution (ombot-agent) ships.
AGENT_BASE = {"ombot", "ombot.envelope", "ombot.keys", "ombot.tables", "ombot.errors", "ombot.logs", "ombot.context"}
MASTER_INTERNALS = ("masters.core", "masters.server", "masters.connections", "masters.backends", "masters.store", "masters.jobstore",
                    "masters.runner", "masters.livejob", "masters.jobspec", "masters.slots", "masters.lograte", "masters.audit",
                    "masters.housekeeping", "masters.registry", "masters.registrations", "masters.enrolment",
                    "masters.ingest_budget", "masters.rollout", "masters.metrics", "masters.ops")
ENTRY_POINTS = {"ombot/__main__.py"}  # `python -m ombot` starts the root: the one upward arrow, by design
# third-party library -> the only files allowed to import it
LIBRARY_HOMES = {
    "slack_bolt": {"bot/slack_app.py"},
    "slack_sdk": {"bot/slack_app.py", "bot/slack_client.py"},
    "rpyc": {"masters/server.py", "masters/connections.py", "masters/client.py", "audit_agent/link.py"},
    "ansible": {"masters/inventory.py", "masters/backends/ansible_forkserver.py"},
    # one scheduler per process (ombot.timers); bot/schedules keeps its own until it moves onto it
    "apscheduler": {"ombot/timers.py", "bot/schedules/timing.py"},
    "re2": {"masters/inventory.py", "audit/rules.py"},
    "ahocorasick": {"audit/rules.py"},
    "ansible_runner": {"masters/backends/ansible.py"},
    "salt": {"masters/backends/salt.py"},
    "prompt_toolkit": {"bot/terminal.py"},
    "prometheus_client": {"ombot/opsweb.py"},  # the metrics' modules take their types from it
}


def imports_of(path: Path, top_level_only: bool = False) -> set[str]:
    """Absolute imports in a file; with top_level_only, those at module level (not inside
    functions), `if TYPE_CHECKING:` blocks included."""
    return imports_in(path.read_text(), str(path), top_level_only)


def imports_in(source: str, filename: str, top_level_only: bool = False, raw: bool = False) -> set[str]:
    """The names imported, each room's written without its `ombot.` prefix (raw: as written)."""
    tree = ast.parse(source, filename)
    nodes = _top_level(tree.body) if top_level_only else ast.walk(tree)
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from bot import grammar`
    return names if raw else {_unprefixed(name) for name in names}


def _unprefixed(name: str) -> str:
    """ombot.bot.grammar -> bot.grammar; `from ombot import bot` (ombot.bot) -> bot; others as they are."""
    head, _, rest = name.partition(".")
    return rest if head == "ombot" and rest.split(".")[0] in ROOMS else name


def _top_level(body: list[ast.stmt]) -> list[ast.stmt]:
    # `if TYPE_CHECKING:` counts: a type-only import back into a caller is still the circle
    # (a module that needs its caller's class wants a Protocol or callbacks, as bot.schedules.firing.Runner).
    found: list[ast.stmt] = []
    for node in body:
        if isinstance(node, (ast.If, ast.Try)):
            found += _top_level(node.body) + _top_level(getattr(node, "orelse", []))
        elif isinstance(node, (ast.ClassDef,)):
            found += _top_level(node.body)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
    return found


def sources() -> list[tuple[str, Path]]:
    """Every project file once, by its real path (not again through ombot/'s links)."""
    return [(str(p.relative_to(REPO)), p) for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))
            if p.relative_to(REPO).parts[:2] not in _LINKS]


_LINKS = {("ombot", room) for room in ROOMS}


def room_of(module: str) -> str | None:
    """The room a dotted module name belongs to, or None for third-party and standard modules."""
    if module == "ombot.app" or module.startswith("ombot.app."):
        return "ombot.app"
    top = module.split(".")[0]
    return top if top in PACKAGES else None


def module_of(rel: str) -> str:
    dotted = rel[:-3].replace("/", ".")
    return dotted[: -len(".__init__")] if dotted.endswith(".__init__") else dotted


def test_imports_flow_one_way() -> None:
    wrong = []
    for rel, path in sources():
        if rel in ENTRY_POINTS:
            continue
        room = room_of(module_of(rel))
        assert room is not None
        for name in imports_of(path):
            target = room_of(name)
            if target is None or target == room:
                continue
            narrow = ONLY.get(room)
            allowed = RANK[target] < RANK[room] and (narrow is None or target == "ombot"
                                                     or any(name == n or name.startswith(n + ".") for n in narrow))
            if not allowed:
                wrong.append(f"{rel} ({room}) imports {name} ({target})")
    assert not wrong, wrong


def test_the_agent_needs_only_what_its_distribution_ships() -> None:
    """audit_agent/ imports itself and AGENT_BASE only (`ombot.envelope.Peer` counts as ombot.envelope)."""
    wrong = [f"{rel} imports {name}" for rel, path in sources() if rel.startswith("audit_agent/")
             for name in imports_of(path) if name.split(".")[0] == "ombot"
             and not any(name == base or name.rpartition(".")[0] == base for base in AGENT_BASE)]
    assert not wrong, wrong


def test_the_masters_internals_are_reached_only_from_inside() -> None:
    wrong = [f"{rel} imports {name}" for rel, path in sources() if not rel.startswith("masters/")
             for name in imports_of(path) if name.startswith(MASTER_INTERNALS)]
    assert not wrong, wrong


DOORS = ("bot", "audit", "approvals", "masters", "modules")  # ombot, the base, is a toolbox: its modules are its doors


def test_rooms_are_entered_by_their_door() -> None:
    """Outside a room, only its door (`from modules import Plan`), never its rooms within
    (`from modules.plan import Plan`)."""
    wrong = []
    for rel, path in sources():
        room = room_of(module_of(rel))
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                       [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            for name in modules:
                target = room_of(name)
                exempt = any(name == n or name.startswith(n + ".") for n in ONLY.get(room or "", ()))
                if target in DOORS and target != room and name != target and not exempt:
                    wrong.append(f"{rel} imports {name}")
    assert not wrong, wrong


def test_the_approval_tables_stay_inside_approvals() -> None:
    wrong = [f"{rel} imports {name}" for rel, path in sources() if not rel.startswith("approvals/")
             for name in imports_of(path) if name.startswith(("approvals.store", "approvals.gate", "approvals.policy"))]
    assert not wrong, wrong


def test_no_file_imports_itself_through_others() -> None:
    """No import circle between project files (module-level imports, those for typing too: not lazy ones)."""
    circles = import_circles({rel: path.read_text() for rel, path in sources()})
    assert not circles, circles[0]


def test_a_type_only_import_back_into_a_caller_is_a_circle() -> None:
    """The back-reference bot.multi once had: the dispatcher imports it, and it imports the
    Dispatcher for its type hints. A lazy import (inside a function) is no circle."""
    caller = "from bot import multi\n"
    typed = "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from bot.dispatcher import Dispatcher\n"
    lazy = "def run() -> None:\n    from bot.dispatcher import Dispatcher\n"
    assert import_circles({"bot/dispatcher.py": caller, "bot/multi.py": typed}) == [
        ["bot.dispatcher", "bot.multi", "bot.dispatcher"], ["bot.multi", "bot.dispatcher", "bot.multi"]]
    assert import_circles({"bot/dispatcher.py": caller, "bot/multi.py": lazy}) == []


def import_circles(tree: dict[str, str]) -> list[list[str]]:
    """Every import circle between the files of a tree (relative path -> source)."""
    known = {module_of(rel) for rel in tree}
    graph: dict[str, set[str]] = {}
    for rel, source in tree.items():
        targets = set()
        for name in imports_in(source, rel, top_level_only=True):
            while name and name not in known:  # `from bot import grammar` -> bot.grammar; `masters.x.Y` -> masters.x
                name = name.rpartition(".")[0]
            if name and name != module_of(rel):
                targets.add(name)
        graph[module_of(rel)] = targets
    return [circle for start in graph if (circle := _circle_from(start, graph))]


def _circle_from(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    """A path start -> ... -> start through modules other than packages' doors, if one exists."""
    stack, seen = [(start, [start])], {start}
    while stack:
        node, path = stack.pop()
        for nxt in graph.get(node, ()):
            if nxt == start and len(path) > 1 and not _through_door(path):
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return None


def _through_door(path: list[str]) -> bool:
    """A package's __init__ importing its own submodules, which import siblings through the package,
    is how a door works (Python loads the package first), not a circle between files."""
    return any("." not in node for node in path)


def test_each_heavy_library_is_imported_in_one_place() -> None:
    wrong = []
    for rel, path in sources():
        for name in imports_of(path):
            homes = LIBRARY_HOMES.get(name.split(".")[0])
            if homes is not None and rel not in homes:
                wrong.append(f"{rel} imports {name}")
    assert not wrong, wrong


def test_rooms_are_imported_by_their_installed_names() -> None:
    """`from ombot.bot import ...`, never `from bot import ...`: a wheel installs only `ombot`, and a
    bare name would load a second copy of a room (its own peewee models, its own caches) beside it."""
    trees = [*sources(), *[(str(p.relative_to(REPO)), p) for d in ("tests", "bench", "scripts")
                           for p in sorted((REPO / d).rglob("*.py"))]]
    wrong = [f"{rel} imports {name}" for rel, path in trees
             for name in imports_in(path.read_text(), rel, raw=True) if name.split(".")[0] in ROOMS]
    assert not wrong, wrong
    assert {room: (REPO / "ombot" / room).readlink() for room in ROOMS} == {room: Path("..", room) for room in ROOMS}


def test_nothing_imports_the_root() -> None:
    wrong = [f"{rel} imports {name}" for rel, path in sources()
             if rel not in ENTRY_POINTS and not rel.startswith("ombot/app/")
             for name in imports_of(path) if room_of(name) == "ombot.app"]
    assert not wrong, wrong


def test_every_public_class_says_what_it_is() -> None:
    """A docstring on each public class, nested ones too; peewee's `Meta` (table options) is not a class of ours."""
    wrong = [f"{rel}:{node.lineno} {node.name}" for rel, path in sources()
             for node in _classes(ast.parse(path.read_text(), str(path)).body)
             if not node.name.startswith("_") and node.name != "Meta" and ast.get_docstring(node) is None]
    assert not wrong, wrong


def _classes(body: list[ast.stmt]) -> list[ast.ClassDef]:
    """The classes a module defines, at its top level and inside classes (not those local to a function)."""
    found: list[ast.ClassDef] = []
    for node in body:
        if isinstance(node, (ast.If, ast.Try)):
            found += _classes(node.body) + _classes(getattr(node, "orelse", []))
        elif isinstance(node, ast.ClassDef):
            found += [node, *_classes(node.body)]
    return found


def test_the_agents_distribution_links_exactly_what_the_agent_imports() -> None:
    """packaging/agent/ombot/ (what ombot-agent ships, docs/packaging.md) holds a relative link to each
    AGENT_BASE file and to audit_agent/, and nothing else: the two cannot drift apart."""
    shipped = REPO / "packaging" / "agent" / "ombot"
    links = {entry.name: entry for entry in shipped.iterdir() if entry.name != "__pycache__"}
    assert all(entry.is_symlink() and not Path(entry.readlink()).is_absolute() for entry in links.values()), links
    files = {("__init__" if module == "ombot" else module.split(".")[1]) + ".py" for module in AGENT_BASE}
    assert {name: entry.resolve() for name, entry in links.items()} == {
        **{name: REPO / "ombot" / name for name in files}, "audit_agent": REPO / "audit_agent"}
