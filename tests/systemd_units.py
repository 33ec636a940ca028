"""systemd's own checks of a unit file, for every suite that writes one (the agent's, the master's and
the bot's): `systemd-analyze verify` must print nothing (it exits 0 on an unknown key, printing only a
warning, so any line it prints fails), and `systemd-analyze security --offline=true` rates it."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ANALYZE = shutil.which("systemd-analyze")
# Debian's `systemd` package has it (.ci/run installs it where it is missing).
ABSENT = "systemd-analyze is not installed (Debian and Ubuntu: apt-get install systemd)"


def need_analyze() -> str:
    if ANALYZE is None:
        pytest.skip(ABSENT)
    return ANALYZE


def verify(*units: Path) -> None:
    done = subprocess.run([need_analyze(), "verify", *map(str, units)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), done.stdout + done.stderr


@dataclass(frozen=True)
class Exposure:
    """`systemd-analyze security` of one unit: its table as printed, what it leaves unset, its score."""

    text: str
    unset: frozenset[str]  # json_field of each item not set that costs exposure
    score: float


def security(unit: Path) -> Exposure:
    analyze = need_analyze()
    shown = subprocess.run([analyze, "security", "--offline=true", str(unit)], capture_output=True, text=True,
                           timeout=120)
    table = subprocess.run([analyze, "security", "--offline=true", "--json=short", str(unit)], capture_output=True,
                           text=True, timeout=120)
    unset = frozenset(i["json_field"] for i in json.loads(table.stdout) if not i["set"] and i.get("exposure"))
    score = float(shown.stdout.rsplit("exposure level for", 1)[1].split(":", 1)[1].split()[0])
    return Exposure(shown.stdout, unset, score)
