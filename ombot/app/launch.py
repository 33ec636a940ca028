"""Start the masters a config runs on this machine as child processes (for `ombot up`)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ombot import proc as hygiene
from ombot.config import Config
from ombot.errors import OmbotError
from ombot.logs import FORMAT_ENV

# Of the environment of `ombot up` (which holds the Slack secrets), a master gets the allow-list
# and these: its database URL, the log format, and Ansible's own settings for inventory parsing.
MASTER_ENV_NAMES = ("OMBOT_MASTER_DATABASE_URL", FORMAT_ENV)
MASTER_ENV_PREFIXES = ("ANSIBLE_",)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def local_masters(config: Config, timeout: float = 60) -> Iterator[list[str]]:
    """Start every master whose key file is here; stop them on exit. Yields what was started."""
    procs: list[subprocess.Popen[bytes]] = []
    lines: list[str] = []
    previous = hygiene.exit_cleanly_on(*STOP_SIGNALS)  # as Ctrl-C does: the masters are stopped, not orphaned
    with tempfile.TemporaryDirectory(prefix="ombot-up-") as tmp:
        try:
            for settings in config.masters.values():
                if settings.key_file is None or not settings.key_file.exists():
                    continue
                ready = Path(tmp) / f"{settings.id}.ready"
                log = settings.state_dir / f"{settings.id}.log"
                procs.append(_start_master(config, settings.id, ready, log))
                _wait_ready(procs[-1], ready, log, timeout)
                lines.append(f"master {settings.id} (IDC {settings.idc}) on {ready.read_text().strip()}, log {log}")
            yield lines
        finally:
            for sig in STOP_SIGNALS:  # a second SIGTERM must not cut the masters' shutdown short
                if previous:
                    signal.signal(sig, signal.SIG_IGN)
            for proc in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:  # a master stuck in shutdown must not keep `up` alive
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def _start_master(config: Config, master_id: str, ready: Path, log: Path) -> subprocess.Popen[bytes]:
    """A master with an allow-listed environment (never the Slack secrets), a private log, and the
    parent-death signal set: if `up` dies, even by SIGKILL, the master shuts down and frees its lock."""
    log.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)  # a log left 0644 by an older version becomes private too
    keep = [*MASTER_ENV_NAMES, *(n for n in os.environ if n.startswith(MASTER_ENV_PREFIXES))]
    parent = os.getpid()
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "ombot", "--config", str(config.path), "master", "--id", master_id,
             "--ready-file", str(ready)],
            stdin=subprocess.DEVNULL, stdout=fd, stderr=subprocess.STDOUT, start_new_session=True,
            env=hygiene.child_env(keep), preexec_fn=lambda: hygiene.die_with_parent(parent),
        )
    finally:
        os.close(fd)


def _wait_ready(proc: subprocess.Popen[bytes], ready: Path, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None:
            raise OmbotError(f"the master exited with {proc.returncode}; see {log}:\n{log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise OmbotError(f"the master did not start within {timeout:.0f} s; see {log}")
        time.sleep(0.05)
