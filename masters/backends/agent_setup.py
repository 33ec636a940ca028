"""Install or remove OMBot's audit agent on a host: the one implementation of the `AgentSetup` step.

Every backend runs this file's own source on the target host (`python3 -c SOURCE HOST`), the request as
one JSON object on stdin (`request`), and reads its last line of JSON (`reply`). The local backend runs
it the same way, as a child. So it needs only the standard library of Python 3.9 or newer, and
imports nothing of OMBot's: it runs before the agent is there.

What it touches, and nothing else: the agent's venv and wheelhouse (/opt/ombot-agent), its config,
key and binding (/etc/ombot/agent.*), and what the agent's own `install`, `install --auditd` and
`service install` write (the shell hook, the auditd rules file, the unit); `remove` runs the agent's
`uninstall --purge` and deletes the venv. The private key is made here, on the host, by the agent's
`keygen`; only its public key leaves, in the reply. Running it again changes nothing: each file is
compared by content, and the reply lists only what really changed (`check` lists what would).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

PREFIX = Path("/opt/ombot-agent")
ETC = Path("/etc/ombot")
CONFIG = ETC / "agent.toml"
KEY = ETC / "agent.key"
DISTRIBUTION = "ombot-agent"
REPLY_MARK = "ombot-agent-setup:"  # the reply line: the mark, then JSON
# What the agent's own installers write: compared before and after, so a re-run reports no change.
WATCHED = ("etc/profile.d/ombot-audit.bash", "etc/profile.d/ombot-audit.sh", "etc/bash.bashrc",
           "etc/zsh/ombot-audit.zsh", "etc/zsh/zshrc", "etc/zshrc", "etc/zsh/zshrc.d/ombot-audit.zsh",
           "etc/audit/rules.d/ombot.rules", "etc/systemd/system/ombot-audit-agent.service",
           "etc/ombot/agent.toml", "etc/ombot/agent.key", "etc/ombot/agent.binding")
_WHEEL = re.compile(r"^[A-Za-z0-9_.+-]{1,200}\.whl$")
_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,252}$")
_VERSION = re.compile(r"^[0-9][0-9A-Za-z.+-]{0,40}$")


class SetupError(Exception):
    """The host cannot take the agent; the message says why and what to do."""


def request(action: str, check: bool, wheels: Dict[str, str], agent_toml: str, version: str,
            auditd: bool) -> str:
    """The JSON the master sends on stdin (the agent.toml's `@HOST@` is filled in on each host).
    `wheels`: each wheel's name and sha256; the backend copies the wheels to PREFIX/wheels first
    (Ansible's copy, Salt's cp.recv_chunked), and this checks each one."""
    return json.dumps({"action": action, "check": check, "version": version, "auditd": auditd,
                       "agent_toml": agent_toml, "wheels": wheels})


def source() -> str:
    """This file's text: what the backends run with `python3 -c`."""
    return Path(__file__).read_text(encoding="utf-8")


def reply(stdout: str) -> Dict[str, Any]:
    """The host's answer: {"changes": [...], "public_key": ..., "version": ...}; {} if it gave none."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(REPLY_MARK):
            answer = json.loads(line[len(REPLY_MARK):])
            return answer if isinstance(answer, dict) else {}
    return {}


class Setup:
    """One run on one host: `changes` collects what it did (or, checking, would do)."""

    def __init__(self, host: str, req: Dict[str, Any]) -> None:
        self.host, self.req, self.check = host, req, bool(req.get("check"))
        self.changes: List[str] = []
        self.agent = PREFIX / "bin" / "ombot-agent"

    def install(self) -> Dict[str, Any]:
        version = str(self.req.get("version", ""))
        if not _VERSION.fullmatch(version):
            raise SetupError(f"bad agent version {version!r}")
        before = _snapshot()
        wheels_changed = self._wheels()
        self._venv(version, wheels_changed)
        public_key = self._key()
        config = str(self.req["agent_toml"]).replace("@HOST@", self.host).encode()
        if self.check:
            self.changes += _diff(CONFIG, config)
        self._write(CONFIG, config, 0o644)
        if not self.check:
            public_key = public_key or self._run_agent("keygen", "--key", str(KEY)).strip().splitlines()[-1]
            self._run_agent("install")
            if self.req.get("auditd"):
                self._run_agent("install", "--auditd")
            self._run_agent("service", "install", "--prefix", str(PREFIX))
            started = self._run_agent("service", "start")  # systemctl where systemd runs, else detached
            if "already" not in started:
                self.changes.append("started the agent")
        else:
            self._would_install_hooks()
        self.changes += [f"changed {path}" for path in _changed(before, _snapshot()) if path not in (str(CONFIG), str(KEY))]
        return {"public_key": public_key, "version": version}

    def remove(self) -> Dict[str, Any]:
        before = _snapshot()
        if self.agent.exists():
            if self.check:
                self.changes.append(f"would stop the agent, remove its hook, rules, unit and files, and {PREFIX}")
                return {}
            self._run_agent("uninstall", "--auditd", "--purge")  # stops the agent first
        self.changes += [f"removed {path}" for path in _changed(before, _snapshot())]
        for leftover in (CONFIG, KEY, ETC / "agent.binding"):
            if leftover.exists() or leftover.is_symlink():
                self._do(f"removed {leftover}", leftover.unlink)
        if PREFIX.exists():
            self._do(f"removed {PREFIX}", lambda: shutil.rmtree(PREFIX))
        if ETC.is_dir() and not any(ETC.iterdir()):
            self._do(f"removed {ETC}", ETC.rmdir)
        return {}

    def _wheels(self) -> bool:
        """The wheelhouse on the host is exactly the master's (checked by sha256; the backend copied it,
        except in a check run), stale wheels removed; True if it removed one (a copied wheel does not
        count: a changed wheel under the same version is not reinstalled)."""
        wheels = self.req.get("wheels")
        if not isinstance(wheels, dict) or not wheels or not all(_WHEEL.fullmatch(n) for n in wheels):
            raise SetupError("the master sent no usable wheelhouse")
        house = PREFIX / "wheels"
        changed = False
        for name, digest in sorted(wheels.items()):
            try:
                ok = hashlib.sha256((house / name).read_bytes()).hexdigest() == digest
            except OSError:
                ok = False
            if not ok and self.check:
                self.changes.append(f"would have copied the wheel {house / name}")
            elif not ok:
                raise SetupError(f"the wheel {name} did not arrive intact in {house}")
        for stale in sorted(house.glob("*.whl")) if house.is_dir() else []:
            if stale.name not in wheels:
                changed = True
                self._do(f"removed the old wheel {stale}", stale.unlink)
        return changed

    def _venv(self, version: str, wheels_changed: bool) -> None:
        python = PREFIX / "bin" / "python"
        if not python.exists():
            self._do(f"made the venv {PREFIX} ({sys.executable})",
                     lambda: _run([sys.executable, "-m", "venv", str(PREFIX)],
                                  "making the agent's venv failed (Debian and Ubuntu: install python3-venv)"))
        installed = None if self.check and not python.exists() else _installed_version(python)
        if installed != version or wheels_changed:
            self._do(f"installed {DISTRIBUTION} {version}" + (f" (was {installed})" if installed else ""),
                     lambda: _run([str(python), "-m", "pip", "install", "--quiet", "--no-index", "--disable-pip-version-check",
                                   "--find-links", str(PREFIX / "wheels"), "--upgrade", f"{DISTRIBUTION}=={version}"],
                                  "installing the agent from the wheelhouse failed"))

    def _key(self) -> Optional[str]:
        """The host's public key: made here the first time (the private key never leaves this host)."""
        if KEY.exists():
            return self._run_agent("keygen", "--key", str(KEY)).strip().splitlines()[-1] if self.agent.exists() else None
        self._do(f"made the agent's key {KEY} (0600)", lambda: None)  # made by `keygen` once the agent is installed
        return None

    def _would_install_hooks(self) -> None:
        missing = [p for p in ("etc/profile.d/ombot-audit.bash", "etc/systemd/system/ombot-audit-agent.service")
                   if not (Path("/") / p).exists()]
        if missing:
            self.changes.append("would install the shell hook and the agent's service" + (" and the auditd rules"
                                                                                         if self.req.get("auditd") else ""))

    def _write(self, path: Path, data: bytes, mode: int) -> bool:
        """Write `path` unless it holds `data` already; True if it did (or would)."""
        try:
            if path.read_bytes() == data and not path.is_symlink():
                return False
        except OSError:
            pass
        self._do(f"wrote {path}", lambda: _atomic_write(path, data, mode))
        return True

    def _do(self, what: str, action: Any) -> None:
        self.changes.append(("would have " if self.check else "") + what)
        if not self.check:
            action()

    def _run_agent(self, *args: str) -> str:
        return _run([str(self.agent), *args], f"ombot-agent {' '.join(args)} failed")


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    partial = path.with_name(f".{path.name}.ombot-partial")
    fd = os.open(str(partial), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(str(partial), mode)
    os.replace(str(partial), str(path))


def _diff(path: Path, new: bytes) -> List[str]:
    """A check run's view of a config file it would change: the unified diff, line by line."""
    try:
        old = path.read_text(errors="replace")
    except OSError:
        old = ""
    return [line.rstrip("\n") for line in difflib.unified_diff(
        old.splitlines(True), new.decode(errors="replace").splitlines(True), f"before: {path}", f"after: {path}")]


def _installed_version(python: Path) -> Optional[str]:
    probe = ("import importlib.metadata as m\ntry:\n    print(m.version('ombot-agent'))\n"
             "except m.PackageNotFoundError:\n    pass\n")
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=60)
    return done.stdout.strip() or None


def _snapshot() -> Dict[str, str]:
    """Content hashes of the files the agent's installers write."""
    found: Dict[str, str] = {}
    for rel in WATCHED:
        path = Path("/") / rel
        try:
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            continue
    return found


def _changed(before: Dict[str, str], after: Dict[str, str]) -> List[str]:
    return sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))


def _run(argv: List[str], failure: str) -> str:
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        raise SetupError(f"{failure}: {(done.stderr or done.stdout).strip()[-600:]}")
    return done.stdout


def main(argv: List[str]) -> int:
    """argv: HOST; the request on stdin. Prints what changed, then the reply line; a refusal is one
    line on stderr and exit status 1."""
    try:
        if len(argv) != 1 or not _HOST.fullmatch(argv[0]):
            raise SetupError("usage: agent_setup.py HOST (the request as JSON on stdin)")
        if os.geteuid() != 0:
            raise SetupError("the agent is installed as root (become: the backend's sudo, or a root login)")
        req = json.loads(sys.stdin.read())
        setup = Setup(argv[0], req)
        if req.get("action") == "install":
            answer = setup.install()
        elif req.get("action") == "remove":
            answer = setup.remove()
        else:
            raise SetupError(f"unknown action {req.get('action')!r}")
    except (SetupError, OSError, ValueError, KeyError, subprocess.SubprocessError) as exc:
        print(f"agent setup: {exc}", file=sys.stderr)
        return 1
    for line in setup.changes or ["nothing to change"]:
        print(line)
    print(REPLY_MARK + json.dumps({**answer, "changes": setup.changes}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
