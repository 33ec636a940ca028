"""Confine each command a job runs, so that nothing it starts outlives it.

A process group is not enough: `setsid cmd &` and `(cmd &)` leave it, and survive the job and its
timeout. Where cgroup v2 is writable, every command runs in a fresh cgroup below the master's own,
and `cgroup.kill` ends all of it at once when the command ends; the cgroup is then removed. Where it
is not, the master becomes a child subreaper (orphans are reparented to it rather than to init), each
command's environment carries a random token, and the sweep kills every descendant of the master
that carries the token (or carries none: the environment was wiped to hide) and reaps them.

`OMBOT_JOB_CGROUPS=off` in the master's environment forces the fallback (for tests and for hosts
where another manager owns the master's cgroup); falling back for any other reason is logged, once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ombot import proc as hygiene

log = logging.getLogger("ombot.master.cgroup")

TOKEN_ENV = "OMBOT_RUN_TOKEN"
SWITCH_ENV = "OMBOT_JOB_CGROUPS"
EMPTY_WAIT_SECONDS = 5.0
_POLL_SECONDS = 0.02
_SWEEP_ROUNDS = 50

# Held while a command is being spawned and while the fallback sweeps: a child between fork and exec
# still shows the master's environment (no token), and must not be taken for a leftover.
_spawn_lock = threading.Lock()
_live_pids: set[int] = set()  # commands' main processes, waited for by their own thread


@dataclass
class Confinement:
    """Where one command runs: `wrap` its argv and add `env` to its environment, call `started` with
    its pid, and `end` (always) once the main process is gone or killed."""

    token: str
    cgroup: Path | None
    pid: int | None = None
    env: dict[str, str] = field(default_factory=dict)

    def wrap(self, argv: list[str]) -> list[str]:
        if self.cgroup is None:
            return argv
        # The child moves itself into the cgroup before exec'ing the command: nothing it starts can
        # precede the move. `echo` is a shell builtin, so it is the shell itself that moves.
        return ["/bin/sh", "-c", 'echo 0 >"$0" || exit 125; exec "$@"', str(self.cgroup / "cgroup.procs"), *argv]

    def started(self, pid: int) -> None:
        self.pid = pid
        _live_pids.add(pid)

    def end(self) -> None:
        """Kill whatever the command left behind, wait for it to be gone, and clean up."""
        if self.pid is not None:
            _live_pids.discard(self.pid)
        if self.cgroup is not None:
            _kill_cgroup(self.cgroup)
        else:
            _sweep(self.token)


def confine(label: str) -> Confinement:
    token = secrets.token_hex(8)
    base = _job_cgroup_root()
    if base is not None:
        cgroup = base / f"ombot-{os.getpid()}-{label}-{token}"  # the pid: see _sweep_dead_masters
        try:
            cgroup.mkdir(mode=0o700)
            return Confinement(token, cgroup, env={TOKEN_ENV: token})
        except OSError as exc:
            log.warning("cannot make a job cgroup under %s (%s); using the subreaper fallback", base, exc)
    _ensure_subreaper()
    return Confinement(token, None, env={TOKEN_ENV: token})


def spawning() -> threading.Lock:
    """Hold around Popen and `started`, so the fallback sweep never sees a half-started command."""
    return _spawn_lock


# -- cgroup v2 -----------------------------------------------------------------------------------------

_root_checked = False
_root: Path | None = None


def _job_cgroup_root() -> Path | None:
    """The master's own cgroup v2 directory, if jobs can be placed below it (checked once)."""
    global _root_checked, _root
    if not _root_checked:
        switched_off = os.environ.get(SWITCH_ENV, "").lower() in ("off", "0", "no")
        _root = None if switched_off else own_cgroup()
        if _root is not None and not os.access(_root, os.W_OK):
            _fallback_warning(f"the master's cgroup {_root} is not writable")
            _root = None
        elif _root is None and not switched_off:
            _fallback_warning("the master is in no cgroup v2 hierarchy")
        if _root is not None:
            _sweep_dead_masters(_root)
        _root_checked = True
    return _root


def _fallback_warning(why: str) -> None:
    # Said once, at the first job: the fallback is weaker (it finds leftovers among the master's
    # descendants by a token in their environment), and under systemd it means the unit is wrong.
    log.warning("%s: each job's commands run under the subreaper fallback, not in a cgroup of their own "
                "(under systemd: Delegate=yes, and no ProtectControlGroups=, in the master's unit)", why)


def own_cgroup() -> Path | None:
    """This process's cgroup v2 directory: its `0::` line in /proc/self/cgroup, under the cgroup2 mount."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    path = next((line[3:] for line in lines if line.startswith("0::")), None)
    if path is None or path.endswith(" (deleted)"):
        return None
    for mount in mounts:
        fields = mount.split()
        sep = fields.index("-") if "-" in fields else -1
        if sep < 0 or fields[sep + 1] != "cgroup2":
            continue
        root, point = fields[3], fields[4]
        if root == "/" or path == root or path.startswith(root.rstrip("/") + "/"):
            relative = path[len(root):] if root != "/" else path
            candidate = Path(point) / relative.lstrip("/")
            if (candidate / "cgroup.procs").exists():
                return candidate
    return None


def _sweep_dead_masters(base: Path) -> None:
    """A master killed outright (SIGKILL, OOM) cannot end its jobs: the next master to start here
    kills what they left and removes their cgroups."""
    for cgroup in base.glob("ombot-*-*"):
        owner = cgroup.name.split("-")[1]
        if owner.isdigit() and int(owner) != os.getpid() and not Path(f"/proc/{owner}").exists():
            log.warning("ending the leftovers of a master that is gone: %s", cgroup)
            _kill_cgroup(cgroup)


def _kill_cgroup(cgroup: Path) -> None:
    kill_file = cgroup / "cgroup.kill"
    deadline = time.monotonic() + EMPTY_WAIT_SECONDS
    while True:
        try:
            if kill_file.exists():
                kill_file.write_text("1")
            else:  # kernels before 5.14: one SIGKILL per process, until none is left
                for pid in _pids_in(cgroup):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        except OSError as exc:
            log.warning("cannot kill job cgroup %s: %s", cgroup, exc)
        if not _populated(cgroup):
            break
        if time.monotonic() > deadline:
            log.warning("job cgroup %s still holds processes after %.0f s", cgroup, EMPTY_WAIT_SECONDS)
            return
        time.sleep(_POLL_SECONDS)
    _remove(cgroup, deadline)


def _populated(cgroup: Path) -> bool:
    try:
        events = (cgroup / "cgroup.events").read_text()
    except OSError:
        return bool(_pids_in(cgroup))
    return "populated 1" in events


def _pids_in(cgroup: Path) -> list[int]:
    try:
        return [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def _remove(cgroup: Path, deadline: float) -> None:
    while True:
        try:
            cgroup.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:  # EBUSY while the last tasks finish exiting
            if time.monotonic() > deadline:
                log.warning("cannot remove job cgroup %s: %s", cgroup, exc)
                return
            time.sleep(_POLL_SECONDS)


# -- fallback: child subreaper ---------------------------------------------------------------------------

_subreaper = False


def _ensure_subreaper() -> None:
    global _subreaper
    if not _subreaper:
        _subreaper = hygiene.become_subreaper()
        if not _subreaper:
            log.warning("cannot become a child subreaper: processes a job leaves behind may survive it")


def _sweep(token: str) -> None:
    """Kill and reap the master's descendants that carry `token` or no token at all, until none is left."""
    me = os.getpid()
    for _ in range(_SWEEP_ROUNDS):
        with _spawn_lock:
            victims = _leftovers(me, token)
            for pid in victims:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        _reap_orphans(me)
        if not victims:
            return
        time.sleep(_POLL_SECONDS)
    log.warning("processes of run %s kept reappearing; gave up killing them", token)


def _leftovers(me: int, token: str) -> list[int]:
    parents = _parent_map()
    mine = f"{TOKEN_ENV}={token}".encode()
    found = []
    for pid in parents:
        if pid == me or pid in _live_pids or not _descends_from(pid, me, parents) or _is_zombie(pid):
            continue
        if _descends_from_any(pid, _live_pids, parents):  # part of a command that is still running
            continue
        environ = _environ(pid)
        if environ is None:
            continue
        tokens = [item for item in environ if item.startswith(f"{TOKEN_ENV}=".encode())]
        if not tokens or mine in tokens:
            found.append(pid)
    return found


def _reap_orphans(me: int) -> None:
    """Collect zombies reparented to the master; never a command's own main process, whose thread waits."""
    for pid, parent in _parent_map().items():
        if parent == me and pid not in _live_pids and _is_zombie(pid):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def _parent_map() -> dict[int, int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None:
                parents[int(entry)] = int(stat[1])
    return parents


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, ...)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2:].split()


def _is_zombie(pid: int) -> bool:
    stat = _stat(pid)
    return stat is None or stat[0] in ("Z", "X")


def _environ(pid: int) -> list[bytes] | None:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None


def _descends_from(pid: int, ancestor: int, parents: dict[int, int]) -> bool:
    seen = 0
    while pid in parents and seen < 4096:
        pid = parents[pid]
        if pid == ancestor:
            return True
        seen += 1
    return False


def _descends_from_any(pid: int, ancestors: set[int], parents: dict[int, int]) -> bool:
    return any(_descends_from(pid, a, parents) for a in set(ancestors))
