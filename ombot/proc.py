"""Process hygiene for everything OMBot starts: an allow-listed environment and Linux prctl flags.

The bot holds Slack tokens and signing secrets in its environment; a master runs jobs. Nothing a
job can reach (its parent's /proc/PID/environ, a core dump, ptrace) may lead back to those secrets,
so children get only the variables named here, and the bot makes itself non-dumpable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import threading
from collections.abc import Iterable, Mapping
from types import FrameType

# What a Python child of ours needs to start and behave: nothing that carries a credential.
ALLOWED_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ", "TMPDIR", "TERM",
    "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED",
})
ALLOWED_PREFIXES = ("LC_",)
# Refused even when a caller names one in `keep`: Slack secrets; systemd's notify socket and watchdog,
# which only the bot or the master itself may use (ombot.sdnotify)
NEVER_PREFIXES = ("SLACK_", "NOTIFY_SOCKET", "WATCHDOG_")

PR_SET_PDEATHSIG = 1
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37


def child_env(keep: Iterable[str] = (), extra: Mapping[str, str] | None = None,
              source: Mapping[str, str] | None = None) -> dict[str, str]:
    """The allow-listed part of `source` (default: this process's environment), plus the variables
    named in `keep` (e.g. OMBOT_MASTER_DATABASE_URL for a master), plus `extra`."""
    env = os.environ if source is None else source
    wanted = set(keep)
    picked = {name: value for name, value in env.items()
              if name in ALLOWED_NAMES or name in wanted or name.startswith(ALLOWED_PREFIXES)}
    picked.update(extra or {})
    return {name: value for name, value in picked.items() if not name.startswith(NEVER_PREFIXES)}


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:  # not glibc/musl Linux: the flags below are best effort
        return None


_LIBC = _libc()


def prctl(option: int, arg: int = 0) -> int:
    """prctl(2); raises OSError on failure, or when there is no libc to call it through."""
    if _LIBC is None:
        raise OSError("prctl is unavailable on this platform")
    result = _LIBC.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0),
                         ctypes.c_ulong(0))
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return int(result)


def make_undumpable() -> bool:
    """No core dumps, no ptrace and no /proc/PID/{environ,mem} for other processes of our uid
    (root can still read them). True when it took effect."""
    try:
        prctl(PR_SET_DUMPABLE, 0)
        return prctl(PR_GET_DUMPABLE) == 0
    except OSError:
        return False


def become_subreaper() -> bool:
    """Orphaned descendants are reparented to this process instead of init, so it can find and
    kill what a job left behind. True when it took effect."""
    try:
        prctl(PR_SET_CHILD_SUBREAPER, 1)
        return True
    except OSError:
        return False


def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> None:
    """For a `preexec_fn`: deliver `sig` to this child when the process that forked it dies, even by
    SIGKILL. If that parent is already gone (it died before the flag was set), exit at once."""
    prctl(PR_SET_PDEATHSIG, int(sig))
    if os.getppid() != parent_pid:
        os._exit(1)


def exit_cleanly_on(*signals: signal.Signals) -> dict[int, signal._HANDLER]:
    """Make `signals` end this process by SystemExit(0), so its `finally` blocks run: leases let go at
    once (another process takes over now, not when they run out), a terminal put back as it was, the
    masters `ombot up` started stopped. Nothing outside the main thread (signals cannot be caught there),
    nor for a signal that already has a handler (`ombot up`'s, for the console it serves). Returns
    the handlers replaced, to put back."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def leave(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    return {sig: signal.signal(sig, leave) for sig in signals if signal.getsignal(sig) is signal.SIG_DFL}
