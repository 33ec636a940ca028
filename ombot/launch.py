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

from ombot.config import Config
from ombot.errors import OmbotError


@contextlib.contextmanager
def local_masters(config: Config, timeout: float = 60) -> Iterator[list[str]]:
    """Start every master whose key file is here; stop them on exit. Yields what was started."""
    procs: list[subprocess.Popen[bytes]] = []
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ombot-up-") as tmp:
        try:
            for settings in config.masters.values():
                if settings.key_file is None or not settings.key_file.exists():
                    continue
                ready = Path(tmp) / f"{settings.id}.ready"
                log = settings.state_dir / f"{settings.id}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "ombot", "--config", str(config.path), "master", "--id", settings.id,
                     "--ready-file", str(ready)],
                    stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
                ))
                _wait_ready(procs[-1], ready, log, timeout)
                lines.append(f"master {settings.id} (IDC {settings.idc}) on {ready.read_text().strip()}, log {log}")
            yield lines
        finally:
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


def _wait_ready(proc: subprocess.Popen[bytes], ready: Path, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None:
            raise OmbotError(f"the master exited with {proc.returncode}; see {log}:\n{log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise OmbotError(f"the master did not start within {timeout:.0f} s; see {log}")
        time.sleep(0.05)
