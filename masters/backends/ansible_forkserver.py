"""ansible-playbook started warm: a fork server that has already imported Ansible.

    python -I ansible_forkserver.py serve SOCKET MASTER_PID          # the server (ansible_warm.py starts it)
    python -I -S ansible_forkserver.py launch REAL SOCKET ARGS...    # what ansible-runner runs as ansible-playbook

Before it does anything, every ansible-playbook spends ~0.4 s importing Ansible and reading its
configuration: a quarter of a one-host job. The server pays that once. For each run, the launcher
(started by ansible-runner in ansible-playbook's place, on its pty) hands the server its argv, working
directory, environment and terminal (stdin, stdout and stderr, passed over the Unix socket); the server
forks, and the child, Ansible already in memory, runs ansible-playbook's main with them. ansible-runner
sees an ordinary ansible-playbook: the same pty, the same events, and the child's exit status, which
the launcher exits with. When the launcher dies (ansible-runner kills its process group on a cancel or
a timeout), its connection closes and the server kills the child's process group.

When the server dies in the middle of a run, the kernel sends its children SIGTERM, which Ansible
passes on to its workers (each in its own session) before it ends. The launcher, told the child's
pid when the run started, waits for the child to end, removes the local temp directories the server
and the child could not remove, and exits with LOST: the master reports those hosts `unknown`, as
what they did is not known.

The launcher execs the real ansible-playbook when the server is not there; a child execs it when the
run's environment differs from the server's in anything but the per-run names (Ansible reads much of
its configuration at import). So a warm start changes how fast a run starts, never what it does.

Runs as its own script, outside the master: only the standard library here, and Ansible in the server.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import select
import signal
import socket
import struct
import sys
from typing import Any, BinaryIO, NoReturn

HEADER = struct.Struct("!I")  # the length of the JSON request that follows the fds
MAX_REQUEST = 1 << 20
# Set for each run, and read by Ansible only after start-up: ansible-runner's artifact dir (the event
# callback) and fact cache path, and the shell's PWD (the launcher is a sh script; the child moves to
# the run's working directory). They may differ from the server's; any other difference means a cold start.
PER_RUN = frozenset({"AWX_ISOLATED_DATA_DIR", "ANSIBLE_CACHE_PLUGIN_CONNECTION", "PWD"})
LOST = 255  # the launcher's status when the server went away in the middle of a run
LOST_WAIT_SECONDS = 10  # how long a launcher waits for its run to end after the server died, before SIGKILL
_PR_SET_PDEATHSIG = 1


# -- the launcher -----------------------------------------------------------------------------------


def launch(real: str, sock_path: str, args: list[str]) -> NoReturn:
    """Run ansible-playbook ARGS through the server, or `real` itself when the server cannot be reached."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(sock_path)
    except OSError:
        os.execv(real, [real, *args])  # nothing was sent: a cold start is the same run
    body = json.dumps({"argv": [real, *args], "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    server, child, reply = _peer_pid(conn), 0, b""
    try:
        socket.send_fds(conn, [HEADER.pack(len(body))], [0, 1, 2])
        conn.sendall(body)
        lines = conn.makefile("rb")  # the server says which process runs this run, then its status
        child = int(_line(lines) or b"0")
        reply = _line(lines)
    except (OSError, ValueError):
        pass
    if not reply:  # the run may have started: never start it a second time
        os.write(2, b"ombot: the warm ansible-playbook server went away during the run\n")
        _clean_up_after(server, child)
        os._exit(LOST)
    os._exit(int(reply))


def _peer_pid(conn: socket.socket) -> int:
    return int(struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0])


def _clean_up_after(server: int, child: int) -> None:
    """The run's child got SIGTERM when the server died and ends its workers: wait for it (SIGKILL it if
    it takes too long), then remove the local temp directories a killed server and child leave behind."""
    if child:
        _wait_gone(child, LOST_WAIT_SECONDS)
    root = os.environ.get("ANSIBLE_LOCAL_TEMP")
    for pid in (server, child):
        if root and pid:
            remove_local_temp(root, pid)


def _wait_gone(pid: int, seconds: float) -> None:
    try:
        fd = os.pidfd_open(pid)  # from here on the number cannot name another process
    except OSError:
        return  # gone already
    try:
        if not select.select([fd], [], [], seconds)[0]:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
            select.select([fd], [], [], seconds)
    finally:
        os.close(fd)


def remove_local_temp(root: str, pid: int) -> None:
    """Remove the temp directory Ansible made for process `pid` under ANSIBLE_LOCAL_TEMP (`root`):
    ansible-local-PID and 8 random characters, removed at exit by a process that was not killed.
    Nothing is removed while `pid` still runs."""
    if _running(pid):
        return
    import glob
    import shutil

    for path in glob.glob(os.path.join(glob.escape(root), f"ansible-local-{pid}" + "[a-z0-9_]" * 8)):
        shutil.rmtree(path, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def _line(lines: BinaryIO) -> bytes:
    """One whole line from the server; b"" if the connection ended first."""
    line = lines.readline(64)
    return line.strip() if line.endswith(b"\n") else b""


# -- the server -------------------------------------------------------------------------------------


def serve(sock_path: str, master_pid: int) -> None:
    _die_with(master_pid)
    import ansible.cli.playbook  # noqa: F401  (the point of the server: imported once, before any fork)

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    os.umask(0o077)
    if os.path.exists(sock_path):
        os.unlink(sock_path)  # a server before this one died without removing it
    listener.bind(sock_path)
    listener.listen(64)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the select below
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    runs: dict[socket.socket, int] = {}  # a launcher's connection -> the child running its run
    try:
        while True:
            watched: list[Any] = [listener, wake_r, *runs]
            ready, _, _ = select.select(watched, [], [])
            if wake_r in ready:
                os.read(wake_r, 4096)
                _reap(runs)
            if listener in ready:
                _accept(listener, runs, [listener.fileno(), wake_r, wake_w])
            for conn in [c for c in ready if c in runs]:  # a launcher sends nothing more: it died
                _kill_group(runs.pop(conn))  # reaped by _reap, with no one left to tell
                conn.close()
    finally:
        for pid in runs.values():  # Ansible ends its workers (in sessions of their own) on SIGTERM, then itself
            _signal(pid, signal.SIGTERM)
        os.unlink(sock_path)


def _accept(listener: socket.socket, runs: dict[socket.socket, int], own_fds: list[int]) -> None:
    conn, _ = listener.accept()
    fds: list[int] = []
    try:
        conn.settimeout(5)
        uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        if uid != os.getuid():
            raise ValueError(f"a peer of uid {uid}")
        head, fds, _, _ = socket.recv_fds(conn, HEADER.size, 3)
        (size,) = HEADER.unpack(head)
        if len(fds) != 3 or size > MAX_REQUEST:
            raise ValueError("a malformed request")
        request = json.loads(_read_exactly(conn, size))
        server = os.getpid()
        pid = os.fork()
        if pid == 0:
            _child(request, fds, server, [*own_fds, conn.fileno(), *(c.fileno() for c in runs)])
        runs[conn] = pid
        conn.sendall(b"%d\n" % pid)  # the launcher cleans up after the run if this server dies
        conn.settimeout(None)
    except (OSError, ValueError) as exc:
        print(f"ansible fork server: refused a run: {exc}", file=sys.stderr, flush=True)
        if conn in runs:
            _kill_group(runs.pop(conn))
        conn.close()
    finally:
        for fd in fds:
            os.close(fd)


def _read_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ValueError("a request cut short")
        data += chunk
    return data


def _reap(runs: dict[socket.socket, int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        for conn, child in list(runs.items()):
            if child == pid:
                del runs[conn]
                code = os.waitstatus_to_exitcode(status)
                try:
                    conn.sendall(b"%d\n" % (code if code >= 0 else 128 - code))
                except OSError:
                    pass  # the launcher is gone already
                conn.close()


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def _die_with(parent_pid: int, sig: int = signal.SIGTERM) -> None:
    """Get `sig` when the process that started this one dies, even by SIGKILL."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


# -- one run, in the forked child -------------------------------------------------------------------


def _child(request: dict[str, Any], fds: list[int], server: int, server_fds: list[int]) -> NoReturn:
    code = 1
    try:
        os.setsid()  # its own process group: what the server kills when the launcher dies
        _die_with(server, signal.SIGTERM)  # not SIGKILL: Ansible ends its workers on SIGTERM (their own sessions)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        argv, env = request["argv"], request["env"]
        differs = sorted(k for k in {*os.environ, *env} - PER_RUN if os.environ.get(k) != env.get(k))
        if differs:  # said on the server's stderr (its log) while that is still fd 2
            print(f"ansible fork server: a cold start: the run's environment differs in {', '.join(differs)}",
                  file=sys.stderr, flush=True)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)  # sys.stdin/stdout/stderr now read and write the launcher's pty
        for fd in {*fds, *server_fds}:
            os.close(fd)
        if os.isatty(1):  # as Python sets up a terminal's stdout: each event line goes out as it is written
            sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        os.chdir(request["cwd"])
        if differs:
            os.execve(argv[0], argv, env)  # not the environment the server imported Ansible with
        os.environ.clear()
        os.environ.update(env)
        sys.argv = argv
        atexit._clear()  # the server's exit handlers (its own temp dir) are not this run's
        code = _run_playbook()
        atexit._run_exitfuncs()
    except BaseException as exc:  # noqa: B036 (nothing may escape into the server's loop)
        print(f"ansible fork server: {exc!r}", file=sys.stderr)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def _run_playbook() -> int:
    """ansible-playbook's main, its configuration read again from this run's environment."""
    from ansible import constants
    from ansible.cli.playbook import main

    for setting in constants.config.get_configuration_definitions():  # what constants.py does at import
        constants.set_constant(setting, constants.config.get_config_value(setting, variables=vars(constants)))
    try:
        main()
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["launch"]:
        launch(sys.argv[2], sys.argv[3], sys.argv[4:])
    elif sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit("usage: ansible_forkserver.py serve SOCKET MASTER_PID | launch REAL SOCKET ARGS...")
