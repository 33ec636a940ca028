"""`uninstall`: the undoing of everything `install` put on a server, and the service.

The hook files and marked lines (hook.uninstall_hook, by the install record), the service
(service.remove_unit), the auditd rules on request, and with `purge` the spool, the state and
/etc/ombot/agent.*, removed by descriptor (shutil.rmtree's fd-based walk): the spool is
world-writable (1733) and each user owns their directory in it, so a symlink planted there must
never lead root's removal elsewhere.

Runs on the servers: Python 3.9 and the standard library only.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from typing import Optional

from ombot.audit_agent import auditd_rules, hook
from ombot.audit_agent.service import remove_unit, under
from ombot.audit_agent.settings import DEFAULT_CONFIG, DEFAULT_STATE_DIR, agent_dirs
from ombot.errors import OmbotError

AGENT_FILES = ("agent.toml", "agent.key", "agent.pub", "agent.binding")  # in etc/ombot: enrolment's and keygen's


def uninstall(root: Path, spool_dir: str = hook.DEFAULT_SPOOL_DIR, auditd: bool = False,
              purge: bool = False) -> tuple[int, list[str]]:
    """Undo `install` (and the service, and with `auditd` the auditd rules; with `purge` the spool,
    the state and the agent's files in /etc/ombot). Returns (0, or 1 if something stayed; the lines
    saying what was removed)."""
    config = under(root, DEFAULT_CONFIG)
    record = hook.installed_record(root)  # read first: --purge removes the state directory that holds it
    done = remove_unit(root, config)
    problems: list[str] = []
    if auditd:
        done += auditd_rules.remove_rules(root, unload=False)
        if root.resolve() == Path("/") and auditd_rules.available():  # never the kernel's rules for a test root
            try:
                done += auditd_rules.remove_rules(root, unload=True)
            except auditd_rules.AuditdError as exc:
                problems.append(f"the auditd rules stay loaded: {exc}")
    done += hook.uninstall_hook(root, record)
    if purge:
        removed, failed = _purge(root, spool_dir, config)
        done += removed
        problems += failed
    done += hook.remove_created(root, spool_dir, record, purge)
    kept = [] if purge else [str(p) for p in (under(root, spool_dir), under(root, DEFAULT_STATE_DIR))
                             if os.path.lexists(p)]
    lines = done or ["nothing to remove" + ("" if kept else ": the agent is not installed here")]
    if kept:
        lines.append(f"kept {' and '.join(kept)} (records not sent yet, the queue): --purge removes them")
    return (1 if problems else 0), lines + [f"error: {p}" for p in problems]


def _purge(root: Path, spool_dir: str, config: Path) -> tuple[list[str], list[str]]:
    """The spool and state directories (the defaults under root) and etc/ombot/agent.*. Directories go
    by descriptor: rmtree never follows a symlink a user planted in the spool."""
    if not shutil.rmtree.avoids_symlink_attacks:
        return [], ["this platform's shutil.rmtree is not safe against symlinks: remove the spool by hand"]
    removed: list[str] = []
    failed: list[str] = []
    try:
        named = agent_dirs(config, config.parent) if config.is_file() else None
    except OmbotError:
        named = None
    for path, mode in ((under(root, spool_dir), 0o1733), (under(root, DEFAULT_STATE_DIR), None)):
        problem = _remove_tree(path, mode)
        if problem is None:
            removed.append(f"removed {path}")
        elif problem:
            failed.append(problem)
    etc = under(root, os.path.dirname(DEFAULT_CONFIG))
    for name in AGENT_FILES:
        if hook.unlink_entry(etc / name):
            removed.append(f"removed {etc / name}")
    try:
        if stat.S_ISDIR(os.lstat(etc).st_mode):
            os.rmdir(etc)  # only when nothing else (a master's or the bot's files) is in it
            removed.append(f"removed {etc}")
    except OSError:
        pass
    if named is not None:
        for where in named:
            if Path(where) not in (under(root, spool_dir), under(root, DEFAULT_STATE_DIR)) and os.path.lexists(where):
                removed.append(f"left {where}: agent.toml named it, it is not a default path; remove it by hand")
    return removed, failed


def _remove_tree(path: Path, mode: Optional[int]) -> Optional[str]:
    """None when removed, '' when absent, else why it stays. Only a real directory of ours (and, for
    the spool, the installer's mode 1733) is removed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return ""
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or (mode is not None and stat.S_IMODE(st.st_mode) != mode):
        return f"left {path}: not the directory the installer made (a directory of uid {os.geteuid()}" + \
            (f", mode {mode:o})" if mode is not None else ")")
    try:
        shutil.rmtree(path)
    except (OSError, RecursionError) as exc:
        return f"could not remove all of {path} ({exc}): remove the rest with `rm -rf --one-file-system {path}`"
    return None

