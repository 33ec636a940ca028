"""The auditd layer's rules: one execve rule per architecture for login sessions, added and removed.

The shell hook runs inside the user's shell and can be dodged; the kernel's audit subsystem cannot
be, from inside a session. `install_rules` adds one execve rule per architecture, for processes
with a login uid (`auid`, set by pam_loginuid at an SSH or console login and kept across sudo and
su), keyed `ombot`. The rules are never locked (`-e 2`): locking is the operator's decision, and a
locked set can only change at reboot. auditd.py reads the records they produce.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

RULES_FILE = "etc/audit/rules.d/ombot.rules"
KEY = "ombot"
ARCHES = ("b64", "b32")
# One rule per architecture (a 64-bit kernel runs 32-bit binaries through other syscall numbers).
# auid!=unset is the same filter as auid!=-1 (4294967295): processes outside any login session
# (daemons, cron before pam_loginuid, the agent) are not recorded.
RULES = tuple(f"-a always,exit -F arch={arch} -S execve -S execveat -F auid!=unset -k {KEY}" for arch in ARCHES)


class AuditdError(Exception):
    """auditd cannot take or give up the rules (not installed, locked, refused)."""


# -- rules -------------------------------------------------------------------------------------------


def rules_text() -> str:
    return ("# OMBot shell audit: execve of every login session (docs/audit.md). Written by\n"
            "# `ombot audit-agent install --auditd`; `... --auditd --remove` deletes it. Never -e 2 here.\n"
            + "\n".join(RULES) + "\n")


def status() -> dict[str, str]:
    """`auditctl -s` as a dict (enabled, pid, lost, ...); AuditdError when auditctl cannot run."""
    out = _auditctl("-s")
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


def loaded_arches() -> set[str]:
    """Which of our rules the kernel holds now (by architecture)."""
    lines = [line for line in _auditctl("-l").splitlines() if f"key={KEY}" in line.split()]
    return {arch for arch in ARCHES for line in lines if f"arch={arch}" in line.split()}


def install_rules(root: Path, load: bool = True) -> list[str]:
    """Write ROOT/etc/audit/rules.d/ombot.rules (augenrules loads it at every auditd start) and,
    with `load`, add the rules the kernel does not hold yet. Returns what it did, line by line."""
    done = [f"wrote {_write(root / RULES_FILE, rules_text())}"]
    if not load:
        return done
    state = status()
    if state.get("enabled") == "2":
        raise AuditdError("the audit rules are locked (enabled 2): the rules file applies at the next boot")
    have = loaded_arches()
    for rule, arch in zip(RULES, ARCHES):
        if arch not in have:
            _auditctl(*shlex.split(rule))
            done.append(f"loaded: {rule}")
    if state.get("pid", "0") == "0":
        done.append("warning: no auditd is running: the kernel holds the rules but nothing writes the log "
                    "(systemctl enable --now auditd)")
    elif state.get("enabled") == "0":
        done.append("warning: auditing is disabled (enabled 0): start auditd, or auditctl -e 1")
    return done


def remove_rules(root: Path, unload: bool = True) -> list[str]:
    """Delete our rules file and, with `unload`, every loaded rule keyed `ombot` (and nothing else)."""
    done = []
    path = root / RULES_FILE
    if path.exists():
        path.unlink()
        done.append(f"removed {path}")
    if unload and loaded_arches():  # none loaded: done, even where the rules are locked
        if status().get("enabled") == "2":
            raise AuditdError("the audit rules are locked (enabled 2): they stay loaded until reboot")
        _auditctl("-D", "-k", KEY)
        done.append(f"unloaded the rules keyed {KEY}")
    return done


def available() -> bool:
    """auditctl is installed: without it nothing of ours can be loaded, or unloaded."""
    return _auditctl_path() is not None


def _auditctl_path() -> str | None:
    return shutil.which("auditctl", path="/usr/sbin:/sbin:" + os.environ.get("PATH", ""))


def _auditctl(*args: str) -> str:
    exe = _auditctl_path()
    if exe is None:
        raise AuditdError("auditctl not found: install auditd (apt-get install auditd)")
    proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise AuditdError(f"auditctl {' '.join(args)}: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.chmod(partial, 0o640)
    partial.replace(path)
    return path
