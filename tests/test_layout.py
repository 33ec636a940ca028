"""Each top-level package is a room with one door: imports flow bot -> approvals -> masters -> modules,
the master side never imports the bot, and each heavy third-party library lives in one place."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support import REPO

PACKAGES = ("bot", "approvals", "masters", "modules", "audit_agent", "ombot")
# package -> first-party packages it must never import
FORBIDDEN = {
    "modules": {"bot", "approvals", "masters"},
    "masters": {"bot", "approvals"},
    "approvals": {"bot"},
    "audit_agent": {"bot", "approvals", "masters", "modules"},
}
# third-party library -> the only files allowed to import it
LIBRARY_HOMES = {
    "slack_bolt": {"bot/slack_app.py"},
    "slack_sdk": {"bot/slack_app.py"},
    "rpyc": {"masters/server.py", "masters/client.py"},
    "ansible": {"masters/inventory.py"},
    "apscheduler": {"approvals/gate.py"},
    "re2": {"masters/inventory.py"},
}


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def sources() -> list[tuple[str, Path]]:
    return [(str(p.relative_to(REPO)), p) for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))]


def test_imports_flow_one_way() -> None:
    wrong = []
    for rel, path in sources():
        package = rel.split("/")[0]
        for name in imports_of(path):
            if name.split(".")[0] in FORBIDDEN.get(package, set()):
                wrong.append(f"{rel} imports {name}")
    assert not wrong, wrong


def test_each_heavy_library_is_imported_in_one_place() -> None:
    wrong = []
    for rel, path in sources():
        for name in imports_of(path):
            homes = LIBRARY_HOMES.get(name.split(".")[0])
            if homes is not None and rel not in homes:
                wrong.append(f"{rel} imports {name}")
    assert not wrong, wrong
