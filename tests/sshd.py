"""Real `sshd`s on loopback addresses, one per "host", for testing the Ansible backend.

Each address (127.0.0.2, 127.0.0.3, ...) gets its own sshd (`sshd -D -f CONFIG`, a child process),
its own host key and port; all accept one client key generated for the test session, for the user
running the tests. One extra address has nothing listening: an unreachable host. A host may be
given session environment variables (sshd's `SetEnv`), which is how a test makes a command fail on
one host only. `inventory()` writes the standard Ansible INI lines for them.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SSHD = shutil.which("sshd", path="/usr/sbin:/usr/local/sbin:/sbin:" + os.environ.get("PATH", ""))
UNREACHABLE_ADDRESS = "127.0.0.250"


def available() -> bool:
    return SSHD is not None and shutil.which("ssh-keygen") is not None


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ombot-test", "-f", str(path)],
                   check=True, capture_output=True)


@dataclass
class SshHost:
    name: str
    address: str
    port: int
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None


class SshHosts:
    """Several sshd "hosts" on loopback, started together, stopped by `stop()`."""

    def __init__(self, root: Path, names: list[str], env: dict[str, dict[str, str]] | None = None) -> None:
        self.root, self.user = root, getpass.getuser()
        root.mkdir(parents=True, exist_ok=True)
        self.client_key = root / "client_key"
        _keygen(self.client_key)
        (root / "authorized_keys").write_text(Path(f"{self.client_key}.pub").read_text())
        self.hosts = []
        for index, name in enumerate(names):
            address = f"127.0.0.{index + 2}"
            self.hosts.append(SshHost(name, address, _free_port(address), (env or {}).get(name, {})))
        self.unreachable_port = _free_port(UNREACHABLE_ADDRESS)  # nothing will listen there

    def start(self, timeout: float = 15) -> SshHosts:
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        for host in self.hosts:
            host.proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(self._config(host))],
                                         stdout=subprocess.DEVNULL, stderr=open(self.root / f"{host.name}.log", "ab"))
        deadline = time.monotonic() + timeout
        for host in self.hosts:
            while not self._listening(host):
                if host.proc is not None and host.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"sshd for {host.name} did not start:\n"
                                       + (self.root / f"{host.name}.log").read_text(errors="replace"))
                time.sleep(0.05)
        return self

    def _config(self, host: SshHost) -> Path:
        key = self.root / f"host_key_{host.name}"
        _keygen(key)
        lines = [
            f"ListenAddress {host.address}:{host.port}", f"HostKey {key}",
            f"AuthorizedKeysFile {self.root / 'authorized_keys'}", f"PidFile {self.root / host.name}.pid",
            "StrictModes no", "UsePAM no", "PermitRootLogin prohibit-password", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "LogLevel ERROR", "MaxSessions 100", "MaxStartups 100",
            "Subsystem sftp internal-sftp", f"AllowUsers {self.user}",
        ]
        if host.env:
            lines.append("SetEnv " + " ".join(f"{k}={v}" for k, v in host.env.items()))
        path = self.root / f"sshd_{host.name}.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    @staticmethod
    def _listening(host: SshHost) -> bool:
        try:
            with socket.create_connection((host.address, host.port), timeout=0.5) as s:
                return s.recv(4).startswith(b"SSH-")
        except OSError:
            return False

    def host_line(self, name: str, address: str, port: int) -> str:
        return (f"{name} ansible_host={address} ansible_port={port} ansible_user={self.user} "
                f"ansible_ssh_private_key_file={self.client_key} "
                "ansible_ssh_common_args='-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null'")

    def inventory(self, group: str = "ssh", unreachable: str | None = "down01", extra: str = "") -> str:
        """A standard INI inventory: every sshd host (and the unreachable one) in `group`."""
        lines = [f"[{group}]"] + [self.host_line(h.name, h.address, h.port) for h in self.hosts]
        if unreachable:
            lines.append(self.host_line(unreachable, UNREACHABLE_ADDRESS, self.unreachable_port))
        return "\n".join(lines) + "\n" + extra

    def stop(self) -> None:
        for host in self.hosts:
            if host.proc is not None and host.proc.poll() is None:
                host.proc.terminate()
                try:
                    host.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    host.proc.kill()
                    host.proc.wait()
