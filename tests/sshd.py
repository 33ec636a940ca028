"""Real `sshd`s on loopback addresses, one per "host", for testing the Ansible backend.

Each address (127.0.0.2, 127.0.0.3, ...) gets its own sshd (`sshd -D -f CONFIG`, a child process),
its own host key and port; all accept one client key generated for the test session, for the user
running the tests. One extra address has nothing listening: an unreachable host. A host may be
given session environment variables (sshd's `SetEnv`), which is how a test makes a command fail on
one host only. `inventory()` writes the standard Ansible INI lines for them.

`SshHosts(..., private_roots=True)` (root only) gives each host a root of its own: its sshd runs in
a private mount namespace where /etc, /opt, /usr/local, /var/lib and /var/spool are overlays whose
upper layer is the host's tree on the machine (`host.root`), and /tmp is the host's own directory.
What a session installs lands under `host.root`, never on the machine; see `PrivateRoot`.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tests import shells
from tests.shells import Unavailable

SSHD = shutil.which("sshd", path="/usr/sbin:/usr/local/sbin:/sbin:" + os.environ.get("PATH", ""))
UNREACHABLE_ADDRESS = "127.0.0.250"

__all__ = ["SSHD", "UNREACHABLE_ADDRESS", "PrivateRoot", "SshHost", "SshHosts", "Unavailable", "available",
           "changes", "describe", "end_namespace", "in_namespace", "in_private_root", "private_roots_unavailable",
           "snapshot"]


def available() -> bool:
    return SSHD is not None and shutil.which("ssh-keygen") is not None


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ombot-test", "-f", str(path)],
                   check=True, capture_output=True)


# -- private roots ------------------------------------------------------------------------------

# The machine's trees a private-root host sees as overlays: the machine's files show through (a write
# to one copies it up into the host's tree first), whatever a session creates is the host's own.
TREES = ("/etc", "/opt", "/usr/local", "/var/lib", "/var/spool")
# Directories the host starts with empty (opaque: none of the machine's entries show through).
OWN_DIRS = {"/etc/profile.d": 0o755, "/etc/zsh": 0o755, "/etc/audit/rules.d": 0o750, "/etc/systemd/system": 0o755}
_PROFILE = """\
# /etc/profile of an OMBot test host (tests/sshd.py): a minimal default, not this machine's.
if [ "${PS1-}" ] && [ "${BASH-}" ] && [ "$BASH" != /bin/sh ] && [ -f /etc/bash.bashrc ]; then
    . /etc/bash.bashrc
fi
if [ -d /etc/profile.d ]; then
    for i in /etc/profile.d/*.sh; do
        if [ -r "$i" ]; then . "$i"; fi
    done
    unset i
fi
"""
_BASHRC = """\
# /etc/bash.bashrc of an OMBot test host (tests/sshd.py): a minimal default, not this machine's.
[ -z "${PS1-}" ] && return
"""
# Files the host starts with: its own copies of minimal defaults.
OWN_FILES = {"/etc/profile": _PROFILE, "/etc/bash.bashrc": _BASHRC}
# Paths the host never sees from the machine (a whiteout in its tree where the machine has one):
# the other global shell files, sshd's per-login script, and what an OMBot install of the machine
# itself would have put there.
HIDDEN = tuple(sorted({*shells.BASH_GLOBAL_FILES, *shells.ZSH_GLOBAL_FILES, "/etc/ssh/sshrc", "/etc/ombot",
                       "/opt/ombot-agent", "/var/lib/ombot-audit", "/var/spool/ombot-audit"}
                      - set(OWN_DIRS) - set(OWN_FILES)))

# Run inside the new namespace (as root), then exec sshd. Arguments: mount's path, the scratch
# mount point, steps, `--`, the command. Steps: `keep MOUNTPOINT KIND N` moves a mount of the machine
# aside before an overlay covers it and `restore N MOUNTPOINT` puts it back on top; `overlay DIR UPPER
# WORK`; `bind SOURCE TARGET` (`rbind`: with the mounts under SOURCE). Paths only ever arrive as
# arguments, never as shell text.
_SCRIPT = r"""
set -u
m=$1 scratch=$2; shift 2
fail() { echo "tests/sshd.py: $*" >&2; exit 125; }
"$m" -t tmpfs -o mode=0700,size=64k ombot-test-sshd "$scratch" || fail "tmpfs on $scratch"
while [ "$#" -gt 0 ] && [ "$1" != -- ]; do
    case $1 in
        keep)
            if [ "$3" = d ]; then mkdir "$scratch/$4"; else : > "$scratch/$4"; fi || fail "keep $2"
            "$m" --move "$2" "$scratch/$4" || fail "move $2 aside"; shift 4 ;;
        restore) "$m" --move "$scratch/$2" "$3" || fail "move $3 back"; shift 3 ;;
        overlay) "$m" -t overlay ombot-test-root -o "lowerdir=$2,upperdir=$3,workdir=$4" "$2" || fail "overlay on $2"
            shift 4 ;;
        bind) "$m" --bind "$2" "$3" || fail "bind $2 over $3"; shift 3 ;;
        rbind) "$m" --rbind "$2" "$3" || fail "rbind $2 over $3"; shift 3 ;;
        *) fail "unknown step $1" ;;
    esac
done
[ "$#" -gt 1 ] || fail "no command"
shift
exec "$@"
"""

_probed: dict[int, str | None] = {}  # why not, by the st_dev of the directory the hosts' trees live on


def private_roots_unavailable(base: Path) -> str | None:
    """None when hosts with private roots can run here with their trees under `base`, else why not:
    they need root of the machine, a private mount namespace (tests/shells.py's probe) and an overlay
    whose upper layer is on `base`'s filesystem (not on an overlay itself, as in some containers).
    Probed once per filesystem, with a real mount in a throwaway namespace."""
    if SSHD is None or not available():
        return "needs openssh-server (sshd)"
    if not shells.real_root():
        return (f"sshd hosts with private roots need root of the machine (the mounts are made as root), "
                f"not uid {os.getuid()}")
    try:
        if shells.namespace_mode() != "root":
            return "sshd hosts with private roots need `unshare --mount` as root"
    except Unavailable as exc:
        return str(exc)
    base.mkdir(parents=True, exist_ok=True)
    device = base.stat().st_dev
    if device not in _probed:
        _probed[device] = _probe_overlay(base)
    return _probed[device]


def _probe_overlay(base: Path) -> str | None:
    probe = base / f".overlay-probe-{os.getpid()}"
    (probe / "upper").mkdir(parents=True, exist_ok=True)
    (probe / "work").mkdir(exist_ok=True)
    try:
        assert shells.UNSHARE is not None and shells.MOUNT is not None
        argv = [shells.UNSHARE, "--mount", "--propagation", "private", "--", shells.MOUNT, "-t", "overlay",
                "ombot-test-probe", "-o", f"lowerdir=/etc,upperdir={probe / 'upper'},workdir={probe / 'work'}", "/etc"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"no overlay for sshd hosts with private roots: {exc}"
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    if done.returncode != 0:
        return (f"no overlay with its upper layer under {base} (sshd hosts with private roots): "
                + (done.stderr or done.stdout).strip()[-300:])
    return None


def _option_safe(path: Path) -> str:
    text = str(path)
    if any(c in text for c in ",:\\\n"):
        raise ValueError(f"{text}: a path given to an overlay mount cannot hold ',', ':', '\\' or a newline")
    return text


def _mount_points() -> list[str]:
    """Every mount point of this process's mount namespace (a new namespace starts as a copy of it)."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4]))
    return points


def _submounts(tree: str, points: list[str]) -> list[str]:
    """The mounts an overlay on `tree` would cover (the topmost ones: a mount moves with those under it)."""
    under = sorted({p for p in points if p.startswith(tree + "/")}, key=lambda p: (p.count("/"), p))
    top: list[str] = []
    for point in under:
        if not any(point.startswith(t + "/") for t in top):
            top.append(point)
    return top


def _copy_owner(path: Path, like: str, mode: int) -> None:
    """Give `path` the machine's mode and owner of `like` (what the host sees there), or `mode` and root."""
    try:
        st = os.lstat(like)
        mode, uid, gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
    except FileNotFoundError:
        uid = gid = 0
    os.chown(path, uid, gid)
    os.chmod(path, mode)


class PrivateRoot:
    """A host's own tree on the machine: `path/etc`, `path/opt`, ... are the upper layers of the
    overlays its sshd's namespace mounts on /etc, /opt, ... (`TREES`), and `path/tmp` its /tmp.

    Made before the sshd starts: the directories in `OWN_DIRS` (empty and opaque: nothing of the
    machine's shows through), the files in `OWN_FILES`, and a whiteout for each path in `HIDDEN` the
    machine has. After that the tree holds exactly what the host's sessions changed, besides those."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.work = path.parent / "overlay-work"  # overlayfs's own scratch, beside the tree, not in it

    def make(self) -> None:
        """Lay out the tree, which must not exist yet."""
        self.path.mkdir(parents=True)
        for tree in TREES:
            if not os.path.isdir(tree) or os.path.islink(tree):
                raise Unavailable(f"{tree} is not a directory on this machine: no overlay for a private root")
            upper = self.path / tree.lstrip("/")
            upper.mkdir(parents=True)
            _copy_owner(upper, tree, 0o755)
            (self.work / tree.lstrip("/")).mkdir(parents=True)
        for own, mode in OWN_DIRS.items():
            self._own_dir(own, mode)
        for own, text in OWN_FILES.items():
            self._parents(own).joinpath(Path(own).name).write_text(text)
            (self.path / own.lstrip("/")).chmod(0o644)
        for hidden in HIDDEN:
            if os.path.lexists(hidden):
                os.mknod(self._parents(hidden) / Path(hidden).name, stat.S_IFCHR, os.makedev(0, 0))
        tmp = self.path / "tmp"
        tmp.mkdir()
        tmp.chmod(0o1777)

    def _parents(self, target: str) -> Path:
        """Make the parents of `target` in the tree (with the machine's modes where it has them); the parent."""
        here = self.path
        for depth, part in enumerate(Path(target).parts[1:-1], start=1):
            here = here / part
            if not here.exists():
                here.mkdir()
                _copy_owner(here, "/" + "/".join(Path(target).parts[1:depth + 1]), 0o755)
        return here

    def _own_dir(self, target: str, mode: int) -> None:
        path = self._parents(target) / Path(target).name
        path.mkdir()
        path.chmod(mode)
        os.setxattr(path, "trusted.overlay.opaque", b"y")  # the machine's entries stay hidden

    def steps(self, shown: Iterable[Path] = ()) -> list[str]:
        """The namespace script's steps: each tree's overlay (the machine's mounts under it moved aside
        and back on top), then the host's /tmp (last: the steps' own paths may be under /tmp). `shown`:
        directories of the machine's /tmp the host sees at the same path in its own /tmp (a venv there)."""
        points, steps, kept = _mount_points(), [], 0
        for tree in TREES:
            covered = _submounts(tree, points)
            for index, point in enumerate(covered, start=kept):
                steps += ["keep", point, "d" if os.path.isdir(point) else "f", str(index)]
            steps += ["overlay", _option_safe(Path(tree)), _option_safe(self.path / tree.lstrip("/")),
                      _option_safe(self.work / tree.lstrip("/"))]
            for index, point in enumerate(covered, start=kept):
                steps += ["restore", str(index), point]
            kept += len(covered)
        for path in shown:  # bound into the host's /tmp tree first, carried along by the rbind below
            inside = self.path / "tmp" / Path(path).relative_to("/tmp")
            inside.mkdir(parents=True, exist_ok=True)
            steps += ["bind", str(path), str(inside)]
        return [*steps, "rbind" if shown else "bind", str(self.path / "tmp"), "/tmp"]


def in_private_root(tree: Path, scratch: Path, name: str, command: list[str], shown: Iterable[Path] = ()) -> list[str]:
    """The argv that runs `command` in a new private mount namespace whose /etc, /opt, ... are the
    overlays of the tree `tree` (made here: it must not exist yet) and whose /tmp is `tree/tmp`.
    `scratch`: an empty directory for the script's own mount; `name`: the script's $0 (in `ps`).
    `shown`: directories under the machine's /tmp kept at their path (a venv); any other path of
    `command` under the machine's /tmp must be given through /proc/PID/root (`SshHosts._visible`)."""
    if (why := private_roots_unavailable(tree.parent)) is not None:
        raise Unavailable(why)
    private = PrivateRoot(tree)
    private.make()
    scratch.mkdir(exist_ok=True)
    assert shells.UNSHARE is not None and shells.MOUNT is not None  # private_roots_unavailable checked
    return [shells.UNSHARE, "--mount", "--propagation", "private", "--", shells.SH, "-c", _SCRIPT,
            name, shells.MOUNT, str(scratch), *private.steps(shown), "--", *command]


def snapshot(root: Path, skip: Iterable[str] = ()) -> dict[str, str]:
    """A private root's tree (`root`, as PrivateRoot made it) as the host sees it; see `SshHost.snapshot`."""
    skipped = {p.rstrip("/") for p in skip}
    found: dict[str, str] = {}
    for top, dirs, files in os.walk(root):
        here = "/" + str(Path(top).relative_to(root)).removeprefix(".").lstrip("/")
        for name in sorted(dirs + files):
            path = (here.rstrip("/") + "/" + name)
            if path in skipped or any(path.startswith(s + "/") for s in skipped):
                if name in dirs:
                    dirs.remove(name)
                continue
            found[path] = describe(Path(top) / name)
    return dict(sorted(found.items()))


def describe(path: Path) -> str:
    """One entry of a snapshot (`SshHost.snapshot`): what is at `path`, without its times."""
    st = path.lstat()
    owner = f"{st.st_uid}:{st.st_gid}"
    if stat.S_ISLNK(st.st_mode):
        return f"link -> {os.readlink(path)}"
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0):
        return "whiteout"
    mode = f"{stat.S_IMODE(st.st_mode):04o} {owner}"
    if stat.S_ISDIR(st.st_mode):
        try:
            opaque = os.getxattr(path, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
        except OSError:
            opaque = False
        return f"dir {mode}" + (" opaque" if opaque else "")
    if stat.S_ISREG(st.st_mode):
        return f"file {mode} sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}"
    return f"{stat.filemode(st.st_mode)[0]} {mode}"


def changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """What changed between two snapshots, one line a path: `+ PATH: what`, `- PATH: what`, `~ PATH: was -> is`."""
    lines = []
    for path in sorted(before.keys() | after.keys()):
        was, now = before.get(path), after.get(path)
        if was is None:
            lines.append(f"+ {path}: {now}")
        elif now is None:
            lines.append(f"- {path}: {was}")
        elif was != now:
            lines.append(f"~ {path}: {was} -> {now}")
    return lines


# -- the hosts ----------------------------------------------------------------------------------


@dataclass
class SshHost:
    """One sshd "host": its name, address and port, and (with a private root) its tree and namespace."""

    name: str
    address: str
    port: int
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    root: Path | None = None  # private roots only: the host's tree on the machine (PrivateRoot)
    namespace: str | None = None  # private roots only: its sshd's mount namespace, "mnt:[N]"
    leftovers: list[int] = field(default_factory=list)  # the pids `stop()` found in that namespace and ended

    def snapshot(self, skip: Iterable[str] = ()) -> dict[str, str]:
        """The host's tree as the host sees it, path (`/etc/profile.d/x`) to what is there: `dir MODE
        UID:GID` (` opaque` when the machine's entries are hidden), `file MODE UID:GID sha256:...`,
        `link -> TARGET`, `whiteout` (the machine's entry deleted for this host). Not times. `skip`:
        paths left out with everything under them (e.g. "/tmp"). Compare two with `changes()`."""
        if self.root is None:
            raise ValueError(f"{self.name} has no private root (SshHosts(..., private_roots=True))")
        return snapshot(self.root, skip)


class SshHosts:
    """Several sshd "hosts" on loopback, started together, stopped by `stop()`.

    `private_roots=True` (root only): each host's sshd runs in a mount namespace of its own whose
    /etc, /opt, /usr/local, /var/lib, /var/spool and /tmp are the host's (`SshHost.root`, see
    `PrivateRoot`); `start()` raises `Unavailable` (say `pytest.skip`) where this machine cannot
    (`private_roots_unavailable`). `stop()` then also ends every process left in a host's namespace
    (a daemon a session detached), by pid, and lists them in `host.leftovers`."""

    def __init__(self, root: Path, names: list[str], env: dict[str, dict[str, str]] | None = None, *,
                 private_roots: bool = False) -> None:
        self.root, self.user, self.private_roots = root, getpass.getuser(), private_roots
        root.mkdir(parents=True, exist_ok=True)
        self.client_key = root / "client_key"
        _keygen(self.client_key)
        (root / "authorized_keys").write_text(Path(f"{self.client_key}.pub").read_text())
        self.hosts = []
        for index, name in enumerate(names):
            address = f"127.0.0.{index + 2}"
            self.hosts.append(SshHost(name, address, _free_port(address), (env or {}).get(name, {}),
                                      root=root / name / "root" if private_roots else None))
        self.unreachable_port = _free_port(UNREACHABLE_ADDRESS)  # nothing will listen there

    def start(self, timeout: float = 15) -> SshHosts:
        if self.private_roots and (why := private_roots_unavailable(self.root)) is not None:
            raise Unavailable(why)
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        argvs = [self._argv(host) for host in self.hosts]  # every root laid out before any sshd runs
        for host, argv in zip(self.hosts, argvs):
            host.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                         stderr=open(self.root / f"{host.name}.log", "ab"))
        deadline = time.monotonic() + timeout
        for host in self.hosts:
            while not self._listening(host):
                if host.proc is not None and host.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"sshd for {host.name} did not start:\n"
                                       + (self.root / f"{host.name}.log").read_text(errors="replace"))
                time.sleep(0.05)
            if host.root is not None:
                self._note_namespace(host)
        return self

    def _argv(self, host: SshHost) -> list[str]:
        sshd = [str(SSHD), "-D", "-e", "-f", self._visible(self._config(host))]
        if host.root is None:
            return sshd
        return in_private_root(host.root, self.root / host.name / "ns-scratch", f"sshd-{host.name}", sshd)

    def _note_namespace(self, host: SshHost) -> None:
        """Record the listening sshd's mount namespace (unshare has exec'd it by now); never the machine's."""
        assert host.proc is not None
        host.namespace = os.readlink(f"/proc/{host.proc.pid}/ns/mnt")
        if host.namespace == os.readlink("/proc/self/ns/mnt"):
            self.stop()
            raise RuntimeError(f"sshd for {host.name} runs in this machine's mount namespace, not its own")

    def _visible(self, path: Path) -> str:
        """`path` as the sshds reach it: a private root's /tmp hides the machine's, so through this
        process's root (/proc/PID/root, which resolves in this process's mount namespace)."""
        return f"/proc/{os.getpid()}/root{path.resolve()}" if self.private_roots else str(path)

    def _config(self, host: SshHost) -> Path:
        key = self.root / f"host_key_{host.name}"
        _keygen(key)
        pid_file = f"{self.root / host.name}.pid" if host.root is None else "none"
        lines = [
            f"ListenAddress {host.address}:{host.port}", f"HostKey {self._visible(key)}",
            f"AuthorizedKeysFile {self._visible(self.root / 'authorized_keys')}", f"PidFile {pid_file}",
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

    def host(self, name: str) -> SshHost:
        """The host called `name`."""
        return next(h for h in self.hosts if h.name == name)

    def ssh(self, name: str, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run `command` on host `name` through its sshd, as the test user (its `$SHELL -c`)."""
        host = self.host(name)
        return subprocess.run(["ssh", "-i", str(self.client_key), "-p", str(host.port), "-o", "BatchMode=yes",
                               "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                               "-o", "LogLevel=ERROR", f"{self.user}@{host.address}", command],
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

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
        """Stop the sshds; with private roots, then end what is left in their namespaces (`host.leftovers`)."""
        for host in self.hosts:
            if host.proc is not None and host.proc.poll() is None:
                host.proc.terminate()
                try:
                    host.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    host.proc.kill()
                    host.proc.wait()
        survivors = []
        for host in self.hosts:
            if host.namespace is not None:
                ended, left = end_namespace(host.namespace)
                host.leftovers += ended
                survivors += [f"{host.name}: {left}"] if left else []
        if survivors:
            raise RuntimeError(f"processes of sshd hosts outlived SIGKILL: {'; '.join(survivors)}")


# -- what a host's sessions leave behind -------------------------------------------------------


def in_namespace(namespace: str) -> list[int]:
    """The live processes whose mount namespace is `namespace` (zombies have none)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if os.readlink(f"/proc/{entry}/ns/mnt") == namespace:
                    found.append(int(entry))
            except OSError:
                continue
    return found


def _signal(pid: int, namespace: str, sig: int) -> bool:
    """Send `sig` to `pid` if it is still in `namespace`: through a pidfd, so a pid reused meanwhile is never hit."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if os.readlink(f"/proc/{pid}/ns/mnt") != namespace:
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def end_namespace(namespace: str, grace: float = 3) -> tuple[list[int], list[int]]:
    """End every process left in a host's namespace: SIGTERM, then SIGKILL after `grace` seconds.
    The pids signalled, and any still there 10 seconds later."""
    ended: list[int] = []
    killed: set[int] = set()
    started = time.monotonic()
    while pids := in_namespace(namespace):
        waited = time.monotonic() - started
        if waited > grace + 10:
            return ended, pids
        for pid in pids:
            if pid not in ended:  # new or not yet asked: SIGTERM once
                if _signal(pid, namespace, signal.SIGTERM):
                    ended.append(pid)
            elif waited > grace and pid not in killed and _signal(pid, namespace, signal.SIGKILL):
                killed.add(pid)
        time.sleep(0.05)
    return ended, []
