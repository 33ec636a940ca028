"""Warm starts for the Ansible backend: the master's side of ansible_forkserver.py.

The fork server starts with the first run, with that run's environment (less the per-run names),
and again after it died; `[masters.ID.ansible] warm_start = false` turns it off. A run finds it
through PATH: the run's PATH starts with a directory holding only the launcher, named
ansible-playbook, so ansible-runner starts the launcher where it would start ansible-playbook and
nothing else about the run changes.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
import threading
from pathlib import Path

from ombot.masters.backends import ansible_forkserver as forkserver

log = logging.getLogger("ombot.master.ansible")

SERVER_FILE = Path(forkserver.__file__)
_SOCKET_PATH_MAX = 100  # below the 108 bytes of sun_path


class WarmStart:
    """One master's fork server: started on demand, stopped with the backend."""

    def __init__(self, data_dir: Path, socket_dir: Path, real_binary: str) -> None:
        self.socket = socket_dir / "warm.sock"
        self.bin_dir = data_dir / "warm-bin"
        self.log_path = data_dir / "warm.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.local_temp = ""  # the server's ANSIBLE_LOCAL_TEMP, where a killed server leaves its temp dir
        self.lock = threading.Lock()
        if len(str(self.socket)) > _SOCKET_PATH_MAX:
            raise ValueError(f"{self.socket}: too long for a Unix socket")
        self.bin_dir.mkdir(mode=0o700, exist_ok=True)
        launcher = self.bin_dir / "ansible-playbook"
        fd = os.open(launcher, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700)
        with os.fdopen(fd, "w") as f:
            f.write("#!/bin/sh\n# OMBot's warm start for ansible-playbook (masters/backends/ansible_forkserver.py)\n"
                    f"exec {shlex.join([sys.executable, '-I', '-S', str(SERVER_FILE), 'launch', real_binary, str(self.socket)])}"
                    ' "$@"\n')

    def environment(self, env: dict[str, str]) -> dict[str, str]:
        """A run's environment with the launcher's directory first in PATH; starts the server (with
        that environment) if it is not running. A run that finds no server yet starts cold."""
        warm = {**env, "PATH": f"{self.bin_dir}:{env.get('PATH', os.defpath)}"}
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self._start({k: v for k, v in warm.items() if k not in forkserver.PER_RUN})
        return warm

    def _start(self, server_env: dict[str, str]) -> None:
        if self.proc is not None:
            log.warning("the warm ansible-playbook server exited (%s): starting it again", self.proc.returncode)
            self._remove_temp(self.proc.pid)
        self.local_temp = server_env.get("ANSIBLE_LOCAL_TEMP", "")
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", str(SERVER_FILE), "serve", str(self.socket), str(os.getpid())],
                env=server_env, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, close_fds=True,
                start_new_session=True)  # a Ctrl-C at the master's terminal is the master's to handle
        finally:
            os.close(fd)

    def close(self) -> None:
        with self.lock:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
                    self._remove_temp(self.proc.pid)
            self.proc = None

    def _remove_temp(self, pid: int) -> None:
        if self.local_temp:
            forkserver.remove_local_temp(self.local_temp, pid)
