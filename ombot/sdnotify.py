"""systemd's readiness protocol (sd_notify(3)) without libsystemd: each message is one datagram to
the unix socket named by $NOTIFY_SOCKET (a path, or `@name` for the abstract namespace).

`claim` takes the socket and the watchdog settings out of this process's environment, as
`sd_notify(unset_environment=1)` does: nothing OMBot starts (an Ansible run, a job's command) can
inherit them and speak to systemd for the bot or the master (NotifyAccess=main refuses them too).
Without $NOTIFY_SOCKET (not started by a Type=notify unit) every call here is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only its type: the CLI claims the socket early, without loading the scheduler
    from ombot.timers import Timers

log = logging.getLogger("ombot.sdnotify")

NAMES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
WATCHDOG_JOB = "sd-watchdog"
SEND_TIMEOUT_SECONDS = 1.0  # systemd drains its socket at once; a stuck one must not hold the caller


@dataclass(frozen=True)
class Claimed:
    """What the service manager handed this process: where to notify, and the watchdog's period."""

    socket: str | None
    watchdog_usec: int | None


_claimed: Claimed | None = None


def claim() -> Claimed:
    """Take NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID out of the environment (once; later calls
    return what the first found)."""
    global _claimed
    if _claimed is None:
        values = {name: os.environ.pop(name, None) for name in NAMES}
        _claimed = Claimed(values["NOTIFY_SOCKET"] or None, _watchdog_usec(values))
    return _claimed


def _watchdog_usec(values: dict[str, str | None]) -> int | None:
    """The watchdog period, if it is meant for this process (WATCHDOG_PID absent or ours)."""
    usec, pid = values["WATCHDOG_USEC"], values["WATCHDOG_PID"]
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None  # inherited from a parent the watchdog watches, not us
    return int(usec)


def _address(name: str) -> str | bytes:
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


def notify(*lines: str) -> bool:
    """Send `READY=1`, `STATUS=...`, ... as one datagram. False when there is no socket or the send
    failed (logged: systemd then times the start out or the watchdog fires, which is its to report)."""
    target = claim().socket
    if target is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(SEND_TIMEOUT_SECONDS)
        try:
            sock.sendto("\n".join(lines).encode(), _address(target))
        except OSError as exc:
            log.warning("cannot notify the service manager at %s: %s", target, exc)
            return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings: half the unit's WatchdogSec=, as sd_watchdog_enabled(3)
    advises; None when no watchdog watches this process."""
    usec = claim().watchdog_usec
    return None if usec is None else usec / 2 / 1_000_000


def ready(status: str, timers: Timers) -> None:
    """READY=1 with a status line, and WATCHDOG=1 from then on, on the process's scheduler: if that
    scheduler stalls (the thread that runs every timer of the process), systemd restarts the unit."""
    notify("READY=1", f"STATUS={status}")
    interval = watchdog_interval()
    if interval is not None:
        timers.interval(WATCHDOG_JOB, interval, _ping, first_now=True)


def _ping() -> None:
    notify("WATCHDOG=1")


def stopping(status: str = "stopping") -> None:
    notify("STOPPING=1", f"STATUS={status}")
