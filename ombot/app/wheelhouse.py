"""`ombot audit wheelhouse DIR`: the wheels a master carries so `audit.rollout` needs no index on the hosts.

The agent's own wheel (built from this checkout's packaging/agent, or given) and its dependencies'
wheels for each Python the servers run, downloaded once here with pip: the servers never reach the
internet. A master reads STATE_DIR/wheelhouse (masters/rollout.py).
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ombot import __version__
from ombot.errors import OmbotError

# What ombot-agent needs (packaging/agent/pyproject.toml), pinned alike.
AGENT_REQUIREMENTS = ("pynacl>=1.5,<2", "rpyc>=6.0.2,<7", "tomli>=1.1")
PYTHONS = ("3.9", "3.10", "3.11", "3.12", "3.13")
AGENT_PROJECT = Path(__file__).resolve().parents[2] / "packaging" / "agent"  # in a checkout


def build(dest: Path, pythons: list[str], agent_wheel: Path | None, machine: str) -> list[str]:
    """Fill `dest` (made if needed; an older agent wheel in it is replaced): returns the wheels' names."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("ombot_agent-*.whl"):
        old.unlink()
    if agent_wheel is not None:
        shutil.copy2(agent_wheel, dest / agent_wheel.name)
    else:
        with tempfile.TemporaryDirectory(prefix="ombot-agent-wheel-") as out:
            built = _build_agent(Path(out))
            shutil.copy2(built, dest / built.name)
    for python in pythons:
        _pip("download", "--quiet", "--dest", str(dest), "--only-binary=:all:", "--implementation", "cp",
             "--python-version", python, "--platform", f"manylinux2014_{machine}",
             "--platform", f"manylinux_2_17_{machine}", *AGENT_REQUIREMENTS)
    return sorted(p.name for p in dest.glob("*.whl"))


def default_machine() -> str:
    """The wheels' architecture: this machine's, as manylinux names it."""
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine())


def _build_agent(out: Path) -> Path:
    if not (AGENT_PROJECT / "pyproject.toml").exists():
        raise OmbotError("no packaging/agent here (an installed ombot): give the agent's wheel with --agent-wheel "
                         f"(ombot_agent-{__version__}-py3-none-any.whl, from the release or `python -m build packaging/agent`)")
    _pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(AGENT_PROJECT))
    built = sorted(out.glob("ombot_agent-*.whl"))
    if len(built) != 1:
        raise OmbotError(f"building {AGENT_PROJECT} gave {len(built)} agent wheels")
    return built[0]


def _pip(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check"],
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise OmbotError(f"pip {args[0]} failed: {(done.stderr or done.stdout).strip()[-800:]}")
