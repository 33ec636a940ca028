"""A real salt-master and minions on loopback, with a private config tree, for testing the Salt backend.

Everything lives under one directory: the master's config (`ROOT/master/master`), each minion's
(`ROOT/<id>/minion`), their root_dirs, keys, sockets, caches and logs. The master listens on
127.0.0.1 on two free ports; minion keys are generated here and pre-accepted (no auto_accept), so a
minion answers as soon as it has connected (~8 s). `file_roots` holds a demo state. A key can be
accepted for a minion that never runs (`absent`): the master knows it, nothing answers for it.
Salt runs as root here, like the master's own service would. `salt_cluster` is an OMBot site whose
master m1 runs the Salt backend against such a rig.

`SaltRig(..., private_roots=True)` (root only) starts each minion in a mount namespace of its own, the
way tests/sshd.py's private-root hosts run their sshd (`sshd.in_private_root`): /etc, /opt, /usr/local,
/var/lib and /var/spool are overlays whose upper layer is the minion's tree (`rig.host_root(name)`),
/tmp is its own. What the minion's jobs install lands there, never on the machine. The minion's own
config, keys, cache and sockets live in its private /tmp (`/tmp/salt-minion`), out of `snapshot`s that
skip /tmp; `stop()` ends whatever its jobs left running in its namespace (`leftovers`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tests import sshd
from tests.support import Cluster

BIN = Path(sys.executable).parent
DEMO_STATE = "ombot_demo"
ANSWER_SECONDS = 4  # how long salt_cluster's master waits for the minions' answers
PRIVATE_CONF = Path("/tmp/salt-minion")  # a private-root minion's config and state dir, in its own /tmp
# The demo state writes /tmp/ombot-salt-demo-<minion id>: a check run shows it would change, a real one makes it.
DEMO_SLS = """\
ombot-demo-file:
  file.managed:
    - name: /tmp/ombot-salt-demo-{{ grains['id'] }}
    - contents: "managed by the ombot demo state"
    - mode: "0640"
"""


def available() -> bool:
    try:
        import salt.version  # noqa: F401
    except ImportError:
        return False
    return (BIN / "salt-master").exists() and (BIN / "salt-minion").exists() and os.geteuid() == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class SaltRig:
    """A salt-master and minions under `root`; `start()` returns once every minion answers test.ping."""

    root: Path
    minions: list[str] = field(default_factory=lambda: ["minion1", "minion2"])
    absent: list[str] = field(default_factory=list)  # accepted keys with no minion behind them
    publish_port: int = field(default_factory=_free_port)
    ret_port: int = field(default_factory=_free_port)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    private_roots: bool = False  # each minion in a mount namespace with a root of its own (root only)
    namespaces: dict[str, str] = field(default_factory=dict)  # private roots: minion -> "mnt:[N]"
    leftovers: dict[str, list[int]] = field(default_factory=dict)  # private roots: pids stop() ended, by minion

    @property
    def master_dir(self) -> Path:
        return self.root / "master"

    @property
    def master_config(self) -> Path:
        """What the OMBot master's `[masters.ID.salt] config` names (LocalClient's c_path)."""
        return self.master_dir / "master"

    @property
    def file_roots(self) -> Path:
        return self.root / "srv" / "salt"

    def start(self, timeout: float = 60, jobs: int = 1, batch: int = 0) -> SaltRig:
        """`jobs`: how many minion configs and key pairs (a salt-key process each) are made at once.
        `batch`: start the minions that many at a time, each batch answering (within `timeout`) before the
        next starts; 0 starts them all at once. Many minions at once starve the master's 2 worker threads."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.private_roots and (why := sshd.private_roots_unavailable(self.root)) is not None:
            raise sshd.Unavailable(why)
        self._write_master()
        with ThreadPoolExecutor(max(1, jobs)) as pool:
            list(pool.map(self._write_minion, self.minions + self.absent))
        try:
            self._spawn("master", [str(BIN / "salt-master"), "-c", str(self.master_dir), "-l", "warning"])
            step = batch or len(self.minions) or 1
            for first in range(0, max(1, len(self.minions)), step):
                for name in self.minions[first:first + step]:
                    self.start_minion(name)
                self.wait_answering(self.minions[first:first + step], timeout)
        except BaseException:
            self.stop()  # never leave daemons behind a failed start
            raise
        return self

    def _write_master(self) -> None:
        self.master_dir.mkdir(parents=True, exist_ok=True)
        self.file_roots.mkdir(parents=True, exist_ok=True)
        (self.file_roots / f"{DEMO_STATE}.sls").write_text(DEMO_SLS)
        (self.file_roots / "ombot_other.sls").write_text("ombot-other:\n  test.succeed_without_changes\n")
        root = self.master_dir / "root"
        self.master_config.write_text("\n".join([
            f"root_dir: {root}", f"pki_dir: {root}/pki", f"cachedir: {root}/cache", f"sock_dir: {root}/sock",
            f"log_file: {root}/master.log", f"pidfile: {root}/master.pid", "interface: 127.0.0.1",
            f"publish_port: {self.publish_port}", f"ret_port: {self.ret_port}", "worker_threads: 2",
            "auto_accept: False", "open_mode: False", "user: root", "file_roots:", "  base:",
            f"    - {self.file_roots}", "fileserver_backend: [roots]", "enable_gpu_grains: False",
            "keep_jobs_seconds: 3600", "",
        ]))

    def host_root(self, name: str) -> Path:
        """A private-root minion's tree on the machine (tests/sshd.py's PrivateRoot): what its jobs installed."""
        return self.root / name / "host"

    def _conf_dir(self, name: str) -> tuple[Path, Path]:
        """The minion's config dir as this process reaches it, and as the minion names it."""
        if name in self.minions and self.private_roots:
            return self.host_root(name) / PRIVATE_CONF.relative_to("/"), PRIVATE_CONF
        return self.root / name, self.root / name

    def _write_minion(self, name: str) -> None:
        if name in self.minions and self.private_roots and not self.host_root(name).exists():
            # The venv may be under the machine's /tmp, which the minion's own hides: shown at its path
            # (Salt's loader finds its modules by their real path, so /proc/PID/root would not do).
            venv = Path(sys.prefix)
            argv = sshd.in_private_root(self.host_root(name), self.root / name / "ns-scratch", f"salt-{name}",
                                        self._minion_argv(name), shown=[venv] if venv.is_relative_to("/tmp") else [])
            (self.root / name / "argv").write_text("\0".join(argv))  # start_minion's, made with the tree
        conf, seen = self._conf_dir(name)
        root, seen_root = conf / "root", seen / "root"
        (root / "pki").mkdir(parents=True, exist_ok=True)
        conf.joinpath("minion").write_text("\n".join([
            f"id: {name}", f"root_dir: {seen_root}", f"pki_dir: {seen_root}/pki", f"cachedir: {seen_root}/cache",
            f"sock_dir: {seen_root}/sock", f"log_file: {seen_root}/minion.log", f"pidfile: {seen_root}/minion.pid",
            "master: 127.0.0.1", f"master_port: {self.ret_port}", f"publish_port: {self.publish_port}",
            "user: root", "acceptance_wait_time: 1", "random_reauth_delay: 0", "auth_timeout: 10",
            "enable_gpu_grains: False", "grains_cache: True", "multiprocessing: True", "",
        ]))
        # Pre-accept its key: the minion's pair is made here, its public half placed on the master.
        if not (root / "pki" / "minion.pub").exists():
            subprocess.run([str(BIN / "salt-key"), "-c", str(self.master_dir), f"--gen-keys=minion",
                            f"--gen-keys-dir={root / 'pki'}"], check=True, capture_output=True)
        accepted = self.master_dir / "root" / "pki" / "minions"
        accepted.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / "pki" / "minion.pub", accepted / name)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)

    def _minion_argv(self, name: str) -> list[str]:
        conf = PRIVATE_CONF if self.private_roots else self.root / name
        return [str(BIN / "salt-minion"), "-c", str(conf), "-l", "warning"]

    def start_minion(self, name: str) -> None:
        if not self.private_roots:
            self._spawn(name, self._minion_argv(name))
            return
        self._spawn(name, (self.root / name / "argv").read_text().split("\0"))
        deadline = time.monotonic() + 10
        mine = os.readlink("/proc/self/ns/mnt")
        while (space := self._namespace(name)) in (None, mine):  # until unshare has made it
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"salt minion {name} did not get a mount namespace of its own")
            time.sleep(0.02)
        self.namespaces[name] = space

    def _namespace(self, name: str) -> str | None:
        try:
            return os.readlink(f"/proc/{self.procs[name].pid}/ns/mnt")
        except OSError:
            return None

    def pid(self, name: str) -> int:
        """The minion's pid: `nsenter --target PID --mount` enters its namespace (private roots)."""
        return self.procs[name].pid

    def snapshot(self, name: str, skip: tuple[str, ...] = ("/tmp",)) -> dict[str, str]:
        """A private-root minion's tree as it sees it (tests/sshd.py's `snapshot`); compare with `sshd.changes`."""
        return sshd.snapshot(self.host_root(name), skip)

    def stop_minion(self, name: str) -> None:
        self._end([name])

    def _end(self, names: list[str]) -> None:
        """SIGTERM to each daemon's process group, then SIGKILL to what is left after a short grace."""
        procs = [p for p in (self.procs.pop(n, None) for n in names) if p is not None and p.poll() is None]
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 3
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the group: a minion's job processes too
            except ProcessLookupError:
                pass
            proc.wait()
        survivors = []
        for name in names:  # a private-root minion's jobs may have left daemons (a detached agent)
            if (space := self.namespaces.pop(name, None)) is not None:
                ended, left = sshd.end_namespace(space)
                self.leftovers.setdefault(name, []).extend(ended)
                survivors += [f"{name}: {left}"] if left else []
        if survivors:
            raise RuntimeError(f"processes of salt minions outlived SIGKILL: {'; '.join(survivors)}")

    def wait_answering(self, names: list[str], timeout: float) -> None:
        """Until every named minion answers test.ping through the master."""
        import salt.client

        deadline = time.monotonic() + timeout
        root = self.master_dir / "root"
        # LocalClient reads the master's key when made: only once the master has written it and listens.
        while not ((root / "cache" / ".root_key").exists() and (root / "sock" / "publish_pull.ipc").exists()):
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the salt-master did not start: {self.log('master')}")
            time.sleep(0.2)
        client = salt.client.LocalClient(c_path=str(self.master_config))
        missing = set(names)
        while missing:
            self._check_alive()
            try:
                answered = client.cmd(sorted(missing), "test.ping", tgt_type="list", timeout=3)
            except Exception:  # the master is still starting
                answered = {}
            missing -= {name for name, value in answered.items() if value is True}
            if missing and time.monotonic() > deadline:
                raise RuntimeError(f"salt minions {sorted(missing)} did not answer: {self.log('master')}")
            if missing:
                time.sleep(0.5)

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"salt {name} exited {proc.returncode}: {self.log(name)}")

    def log(self, name: str) -> str:
        path = self.root / f"{name}.out"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        self._end([n for n in self.procs if n != "master"])
        self._end(["master"])


def salt_cluster(root: Path, rig: SaltRig, extra: str = "", admins: tuple[str, ...] = ()) -> Cluster:
    """A site (not started) whose master m1 runs the Salt backend on `rig`, its inventory the accepted
    minion keys; `extra` is appended to its [masters.m1.salt] table; `admins` as Cluster's."""
    made = Cluster(root, {"local": ["m1"]}, admins=admins, extra_toml=(
        f'[masters.m1.salt]\nconfig = "{rig.master_config}"\ninventory = "minions"\n'
        f'states = ["{DEMO_STATE}"]\nanswer_seconds = {ANSWER_SECONDS}\n' + extra))
    text = made.config_path.read_text()
    text = text.replace('inventory = "inventory.ini"\n', '', 1)  # the minions' keys are the inventory
    made.config_path.write_text(text.replace('state_dir = "state-m1"', 'state_dir = "state-m1"\nbackend = "salt"'))
    return made
