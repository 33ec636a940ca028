"""The agent without systemd (a container, CI): started detached and tracked by a pidfile.

`service start` starts the agent detached (double fork, a new session, its output appended to
STATE_DIR/agent.log) and writes its pid to STATE_DIR/agent.pid, created with O_EXCL; `service stop`
signals that pid only once /proc says it is this agent (its command line runs the agent with this
config, as our uid), through a pidfd, so a stale pidfile never kills a process that took the pid over.
audit_agent/service.py decides when systemd keeps the agent instead.

Runs on the servers: Python 3.9 and the standard library only.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from pathlib import Path
from typing import Optional

from ombot.audit_agent import hook
from ombot.audit_agent.records import printable
from ombot.audit_agent.settings import DEFAULT_STATE_DIR, agent_dirs, load
from ombot.errors import OmbotError

PIDFILE = "agent.pid"
LOGFILE = "agent.log"
START_TIMEOUT_SECONDS = 30.0  # at most this long to see the agent start (its start line) or die at once
STOP_SECONDS = 15.0  # SIGTERM, then SIGKILL after this long (the agent ends its pass first)
FRESH_PIDFILE_SECONDS = 10.0  # an empty pidfile this young is another `service start` under way


def start(config: Path) -> list[str]:
    """Start the agent of the agent.toml `config` detached, with a pidfile. A live agent with that
    pidfile is never started twice."""
    config = config.absolute()
    settings = load(config)  # a broken agent.toml is refused here, before anything starts
    settings.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    pidfile = settings.state_dir / PIDFILE
    done: list[str] = []
    pid = _read_pid(pidfile)
    if pid is not None and _runs(pid, config):
        return [f"the agent already runs (pid {pid}, {pidfile}): not started again"]
    fd = _claim(pidfile, pid, config, done)
    log = settings.state_dir / LOGFILE
    offset = log.stat().st_size if log.exists() else 0
    try:
        pid = _spawn([sys.executable, "-m", "ombot.audit_agent", "run", "--config", str(config)], log)
        os.write(fd, f"{pid}\n".encode())
    except BaseException:
        os.close(fd)
        hook.unlink_entry(pidfile)
        raise
    os.close(fd)
    if not _starts(pid, config, log, offset, settings.start_line()):
        hook.unlink_entry(pidfile)
        raise OmbotError(f"the agent exited at once; the end of {log}:\n{_tail(log)}")
    return done + [f"started the agent: pid {pid}, pidfile {pidfile}, log {log}"]


def _claim(pidfile: Path, pid: Optional[int], config: Path, done: list[str]) -> int:
    """The pidfile, created with O_EXCL; a stale one (its pid dead, or not this agent) goes first."""
    if os.path.lexists(pidfile):
        if pid is None and _age(pidfile) < FRESH_PIDFILE_SECONDS:
            raise OmbotError(f"{pidfile} is empty and new: another `service start` is under way; try again")
        hook.unlink_entry(pidfile)
        done.append(f"removed a stale pidfile {pidfile} ({_describe(pid)})")
    try:
        return os.open(pidfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        raise OmbotError(f"{pidfile} appeared meanwhile: another `service start` is under way") from None


def stop(config: Path, quiet: bool = False) -> list[str]:
    """Stop the agent that `service start` started with `config`, by its pidfile: only a process that
    /proc shows is that agent (our uid, running the agent with that config) is signalled."""
    config = config.absolute()
    pidfile = _pidfile(config)
    pid = _read_pid(pidfile)
    if pid is None and not os.path.lexists(pidfile):
        return [] if quiet else [f"the agent is not running (no {pidfile})"]
    handle = None if pid is None else _agent_process(pid, config)
    if handle is None:
        hook.unlink_entry(pidfile)
        return [f"removed a stale pidfile {pidfile} ({_describe(pid)}); nothing was signalled"]
    try:
        how = _terminate(handle, pid or 0)
    finally:
        if handle >= 0:
            os.close(handle)
    hook.unlink_entry(pidfile)
    return [f"stopped the agent (pid {pid}{how}); removed {pidfile}"]


def status(config: Path) -> tuple[int, str]:
    """Whether the agent `service start` started with `config` runs: (0, or 3 when not; the line saying so)."""
    config = config.absolute()
    pidfile = _pidfile(config)
    pid = _read_pid(pidfile)
    if pid is not None and _runs(pid, config):
        return 0, f"the agent runs: pid {pid} ({pidfile})"
    if os.path.lexists(pidfile):
        return 3, f"the agent is not running: {pidfile} is stale ({_describe(pid)})"
    return 3, f"the agent is not running (no {pidfile})"


def _pidfile(config: Path) -> Path:
    """STATE_DIR/agent.pid of the agent.toml `config`; where it cannot be read (gone, broken), the
    default state directory beside it (/etc/ombot/agent.toml -> /var/lib/ombot-audit, under a root)."""
    try:
        if config.is_file():
            return Path(agent_dirs(config, config.parent)[1]) / PIDFILE
    except OmbotError:
        pass
    base = config.parent.parent.parent if config.parent.name == "ombot" else Path("/")
    return base / DEFAULT_STATE_DIR.lstrip("/") / PIDFILE


def _read_pid(pidfile: Path) -> Optional[int]:
    try:
        fd = os.open(pidfile, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        text = os.read(fd, 64).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    return int(text) if text.isascii() and text.isdigit() and 1 < int(text) < 2**22 else None


def _age(path: Path) -> float:
    try:
        return time.time() - os.lstat(path).st_mtime
    except OSError:
        return 0.0


def _agent_process(pid: int, config: Path) -> Optional[int]:
    """A handle on process `pid` if it is the agent of `config`, else None: a pidfd opened before /proc
    is read (so the answer is about that very process, whatever reuses the pid later), or -1 where
    the kernel has no pidfds (then a signal may race a reuse of the pid, as with any pidfile)."""
    opener = getattr(os, "pidfd_open", None)
    handle = -1
    if opener is not None:
        try:
            handle = opener(pid)
        except ProcessLookupError:
            return None
        except OSError:  # ENOSYS: a kernel before 5.3
            handle = -1
    if _is_agent(pid, config):
        return handle
    if handle >= 0:
        os.close(handle)
    return None


def _runs(pid: int, config: Path) -> bool:
    """Process `pid` is the agent of `config`."""
    handle = _agent_process(pid, config)
    if handle is not None and handle >= 0:
        os.close(handle)
    return handle is not None


def _is_agent(pid: int, config: Path) -> bool:
    """/proc/PID is alive, ours, and runs the agent (`... ombot.audit_agent run --config CONFIG`, or the
    ombot-agent entry point) with this very config."""
    proc = f"/proc/{pid}"
    try:
        if os.stat(proc).st_uid != os.geteuid() or _gone(pid):
            return False
        argv = Path(proc, "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    words = [w.decode("utf-8", "surrogateescape") for w in argv if w]
    return _runs_agent(words) and _names_config(words, config)


def _runs_agent(words: list[str]) -> bool:
    if "run" not in words:
        return False
    before = words[:words.index("run")]
    module = any(a == "-m" and b == "ombot.audit_agent" for a, b in zip(before, before[1:]))
    entry = any(os.path.basename(w) == "ombot-agent" for w in before[:2])
    return module or entry


def _names_config(words: list[str], config: Path) -> bool:
    wanted = os.path.abspath(str(config))
    return any(a == "--config" and os.path.abspath(b) == wanted for a, b in zip(words, words[1:]))


def _gone(pid: int) -> bool:
    """The process has ended: no /proc/PID, or a zombie (Z) or dead (X) one."""
    return _state(pid) in ("Z", "X", "")


def _state(pid: int) -> str:
    """The process state letter from /proc/PID/stat ('' if it is gone): Z, a zombie, is no agent."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return text.rsplit(")", 1)[-1].split()[0] if ")" in text else ""


def _describe(pid: Optional[int]) -> str:
    if pid is None:
        return "no pid in it"
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").strip()
    except OSError:
        return f"pid {pid} is not running"
    if not argv or _gone(pid):
        return f"pid {pid} is not running"
    shown = printable(argv[:120].decode("utf-8", "surrogateescape"))
    return f"pid {pid} is not this agent: {shown!r}"


def _terminate(handle: int, pid: int) -> str:
    """SIGTERM, then SIGKILL after STOP_SECONDS; through the pidfd when there is one."""
    _signal(handle, pid, signal.SIGTERM)
    if _wait_exit(handle, pid, STOP_SECONDS):
        return ""
    _signal(handle, pid, signal.SIGKILL)
    _wait_exit(handle, pid, 5.0)
    return f", killed: it did not stop within {STOP_SECONDS:.0f} s of SIGTERM"


def _signal(handle: int, pid: int, signum: int) -> None:
    sender = getattr(signal, "pidfd_send_signal", None)
    try:
        if handle >= 0 and sender is not None:
            sender(handle, signum)
        else:
            os.kill(pid, signum)
    except ProcessLookupError:
        pass  # it ended meanwhile


def _wait_exit(handle: int, pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    if handle >= 0:  # a pidfd turns readable when its process exits
        poller = select.poll()
        poller.register(handle, select.POLLIN)
        return bool(poller.poll(int(seconds * 1000)))
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.05)
    return False


def _starts(pid: int, config: Path, log: Path, offset: int, start_line: str) -> bool:
    """The agent got through its start (its start line is in the log past `offset`: key and config
    loaded) and is still there; False if it died first (a bad key, a broken install). A machine too slow
    for either within START_TIMEOUT_SECONDS: the process being the agent (it has exec'd) counts."""
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        started = start_line in _read_from(log, offset)  # read first: a start line and then still there
        if _gone(pid):
            return False
        if started:
            return True
        time.sleep(0.05)
    return _is_agent(pid, config)


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(65536).decode("utf-8", "replace")
    except OSError:
        return ""


def _spawn(argv: list[str], log: Path) -> int:
    """Start `argv` detached: fork, setsid, fork again (no controlling terminal can ever be taken),
    stdin /dev/null, stdout and stderr appended to `log`, a clean environment. Returns its pid."""
    log_fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
           "PYTHONUNBUFFERED": "1"}
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (runs in the forked child)
        try:
            os.close(read_end)
            os.setsid()
            grandchild = os.fork()
            if grandchild == 0:
                _become(argv, env, log_fd)
            os.write(write_end, str(grandchild).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    os.close(log_fd)
    os.waitpid(child, 0)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    if not data.isdigit():
        raise OmbotError("could not start the agent (the fork failed)")
    return int(data)


def _become(argv: list[str], env: dict[str, str], log_fd: int) -> None:  # pragma: no cover (the grandchild)
    try:
        os.chdir("/")
        os.umask(0o077)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.closerange(3, 65536)
        for name in ("SIGPIPE", "SIGXFSZ", "SIGHUP", "SIGINT", "SIGTERM"):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
        os.execve(argv[0], argv, env)
    except BaseException as exc:
        os.write(2, f"could not start {argv[0]}: {exc}\n".encode())
    finally:
        os._exit(127)


def _tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"

