"""Run plans on the master host itself: the embedded default and the test backend.

Only hosts the inventory marks `ansible_connection=local` (or `localhost`) are eligible; any other
host is reported unreachable rather than silently run here. Commands are argv lists run without a
shell, in their own process group so a cancel or timeout kills the whole tree.
"""

from __future__ import annotations

import logging
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO

from ombot.masters.backends import cgroup, put_file
from ombot.masters.backends.base import CappedText, HostResult, HostStatus, RunContext, Unsupported
from ombot.modules import (
    AgentSetup, Arg, Command, Emit, FirstAvailable, Ping, Plan, PutFile, RequireWithin, RunPlaybook, Shell, Step, TailFile,
    TempPath, within,
)

CHILD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
log = logging.getLogger("ombot.master.local")
_NEEDS_TMP = (Command, Shell, PutFile, FirstAvailable)
LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
KILL_GRACE_SECONDS = 2.0
READER_GRACE_SECONDS = 2.0
_POLL_SECONDS = 0.05
_TAIL_BLOCK = 64 * 1024


class StepFailed(Exception):
    """A step that ended the host's run, with the status and exit code the host is reported with."""

    def __init__(self, status: HostStatus, message: str, rc: int | None = None) -> None:
        super().__init__(message)
        self.status, self.rc = status, rc


class LocalBackend:
    """Runs plans on the master host itself, for hosts the inventory marks local (see the module docstring)."""

    name = "local"

    def vet(self, plan: Plan, check: bool) -> Plan:
        """At submit: the local backend cannot tell what a command would change, so it has no check runs."""
        if check:
            raise Unsupported("the local backend has no check mode: check=yes needs an Ansible or Salt master")
        if any(isinstance(step, RunPlaybook) for step in plan.steps):
            raise Unsupported("the local backend cannot run Ansible playbooks")
        if any(isinstance(step, AgentSetup) for step in plan.steps):  # it would install on the master's own host
            raise Unsupported("the local backend does not install audit agents: roll out through an Ansible or Salt "
                              "master, or install by hand (docs/audit.md)")
        return plan

    def run(self, ctx: RunContext) -> None:
        if len(ctx.hosts) == 1:  # no pool for the common single-host case
            ctx.report(self._run_host(ctx, ctx.hosts[0]))
            return
        with ThreadPoolExecutor(max_workers=min(ctx.max_parallel, len(ctx.hosts))) as pool:
            for host in ctx.hosts:
                pool.submit(self._run_and_report, ctx, host)

    def _run_and_report(self, ctx: RunContext, host: str) -> None:
        ctx.report(self._run_host(ctx, host))

    def _run_host(self, ctx: RunContext, host: str) -> HostResult:
        try:
            return self._run_host_steps(ctx, host)
        except Exception as exc:  # a bug here must cost one host, loudly, not the job's bookkeeping
            log.exception("local backend failed on host %s of job %s", host, ctx.job_id)
            return HostResult(host, HostStatus.FAILED, error=f"backend error: {type(exc).__name__}")

    def _run_host_steps(self, ctx: RunContext, host: str) -> HostResult:
        started = time.time()
        out, err = CappedText(ctx.output_cap), CappedText(ctx.output_cap)
        status, rc, error = HostStatus.OK, None, None
        if not _is_local(host, ctx.host_vars(host)):
            status, error = HostStatus.UNREACHABLE, "the local backend runs only on hosts with ansible_connection=local"
        else:
            # A private working directory only for plans that run or write something: making and
            # removing one costs milliseconds, more than the rest of an echo.
            tmp = tempfile.mkdtemp(prefix="ombot-") if any(isinstance(s, _NEEDS_TMP) for s in ctx.plan.steps) else None
            try:
                for step in ctx.plan.steps:
                    _check_stop(ctx)  # a cancelled or overdue job starts nothing more on this host
                    rc = _run_step(step, ctx, host, Path(tmp or "/nonexistent"), out, err)
            except StepFailed as exc:
                status, rc, error = exc.status, exc.rc, str(exc)
            except OSError as exc:
                status, error = HostStatus.FAILED, f"{type(exc).__name__}: {exc.strerror or exc}"
            finally:
                if tmp is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
        result = HostResult.from_output(host, status, out, err, rc=rc, started=started, ended=time.time(), error=error)
        if status is HostStatus.OK and ctx.plan.parse is not None:
            _attach_data(result, ctx)
        return result


def _check_stop(ctx: RunContext) -> None:
    if ctx.cancelled.is_set():
        raise StepFailed(HostStatus.CANCELLED, "cancelled before this step started")
    if ctx.remaining() <= 0:
        raise StepFailed(HostStatus.TIMED_OUT, "timed out before this step started")


def _attach_data(result: HostResult, ctx: RunContext) -> None:
    try:
        result.data = ctx.plan.parse(result.stdout)  # type: ignore[misc]
    except Exception as exc:  # a module's parser failing is that host's failure, not the job's
        result.status, result.error = HostStatus.FAILED, f"could not parse output: {type(exc).__name__}: {exc}"


def _is_local(host: str, host_vars: dict[str, object]) -> bool:
    return host in LOCAL_NAMES or host_vars.get("ansible_connection") == "local"


def _run_step(step: Step, ctx: RunContext, host: str, tmp: Path, out: CappedText, err: CappedText) -> int | None:
    match step:
        case Emit(text):
            out.write(text.encode() + b"\n")
        case Ping():
            out.write(b"pong\n")
        case Command(argv, stdin):
            return _execute([_resolve(a, tmp) for a in argv], stdin, ctx, host, tmp, out, err)
        case FirstAvailable(commands):
            return _run_step(_first_installed(commands), ctx, host, tmp, out, err)
        case Shell(cmd):
            return _execute(["/bin/sh", "-c", cmd], None, ctx, host, tmp, out, err)
        case PutFile():
            _put_file(step, ctx, tmp)
        case RequireWithin(path, roots, param):
            _require_within(path, os.path.realpath(path), roots, param)
        case TailFile():
            return _tail_file(step, ctx, out, err)
        case _:
            raise StepFailed(HostStatus.FAILED, f"the local backend cannot run {type(step).__name__}")
    return None


def _require_within(path: str, real: str, roots: tuple[str, ...], param: str | None) -> None:
    if not any(within(real, root) for root in roots):
        label = f"{param}: " if param else ""
        raise StepFailed(HostStatus.FAILED, f"{label}{path} resolves to {real}, outside {', '.join(roots)}")


def _tail_file(step: TailFile, ctx: RunContext, out: CappedText, err: CappedText) -> int:
    """`tail -n` done here, on a descriptor checked after opening: what is read is what was checked."""
    label = f"{step.param}: " if step.param else ""
    _require_within(step.path, os.path.realpath(step.path), step.roots, step.param)  # the plain, clear refusal
    try:
        # O_NOFOLLOW: a final symlink swapped in after the check above fails here instead of being
        # followed; O_NONBLOCK: a FIFO planted there cannot hang the job.
        fd = os.open(os.path.realpath(step.path),
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        err.write(f"{step.path}: {exc.strerror}\n".encode())
        raise StepFailed(HostStatus.FAILED, f"{label}cannot open {step.path}: {exc.strerror}", rc=1) from None
    try:
        _check_opened(fd, step, label)
        _copy_tail(fd, step.lines, ctx, out)
    finally:
        os.close(fd)
    return 0


def _check_opened(fd: int, step: TailFile, label: str) -> None:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise StepFailed(HostStatus.FAILED, f"{label}{step.path} is not a regular file", rc=1)
    if info.st_nlink != 1:  # a hardlink under a root may name any file on the same filesystem
        raise StepFailed(HostStatus.FAILED, f"{label}{step.path} has {info.st_nlink} links; only single-link "
                         "files are shown", rc=1)
    _require_within(step.path, os.readlink(f"/proc/self/fd/{fd}"), step.roots, step.param)


def _copy_tail(fd: int, lines: int, ctx: RunContext, out: CappedText) -> None:
    """The last `lines` lines, as tail prints them, into `out` (first output_cap bytes kept, all counted)."""
    size = os.fstat(fd).st_size
    start = _tail_start(fd, size, lines, ctx)
    os.lseek(fd, start, os.SEEK_SET)
    while len(out.kept) < out.cap:
        chunk = os.read(fd, min(_TAIL_BLOCK, out.cap - len(out.kept)))
        if not chunk:
            return
        out.write(chunk)
    out.total += max(0, size - start - len(out.kept))  # the rest is counted, not read


def _tail_start(fd: int, size: int, lines: int, ctx: RunContext) -> int:
    """Offset of the first of the last `lines` lines; a final newline ends a line, it does not start one."""
    end = size
    if size and os.pread(fd, 1, size - 1) == b"\n":
        end -= 1
    seen, pos = 0, end
    while pos > 0:
        _check_stop(ctx)  # scanning a huge file for newlines must still obey cancel and timeout
        block_start = max(0, pos - _TAIL_BLOCK)
        block = os.pread(fd, pos - block_start, block_start)
        index = len(block)
        while True:
            index = block.rfind(b"\n", 0, index)
            if index < 0:
                break
            seen += 1
            if seen == lines:
                return block_start + index + 1
        pos = block_start
    return 0


def _resolve(arg: Arg, tmp: Path) -> str:
    return str(tmp / arg.name) if isinstance(arg, TempPath) else arg


def _first_installed(commands: tuple[Command, ...]) -> Command:
    for command in commands:
        if shutil.which(str(command.argv[0]), path=CHILD_PATH):
            return command
    names = ", ".join(str(c.argv[0]) for c in commands)
    raise StepFailed(HostStatus.FAILED, f"none of these programs is installed: {names}", rc=127)


def _put_file(step: PutFile, ctx: RunContext, tmp: Path) -> None:
    """Check and write in one go, by descriptors (put_file.py): no symlink swapped in can redirect it."""
    label = f"{step.param}: " if step.param else ""
    try:
        put_file.put(_resolve(step.dest, tmp), _file_data(step, ctx), step.mode, step.owner, step.group,
                     step.roots or ("/",), label)
    except put_file.PutError as exc:
        raise StepFailed(HostStatus.FAILED, str(exc)) from None


def _file_data(step: PutFile, ctx: RunContext) -> bytes:
    if step.source is None:
        return (step.content or "").encode()
    if ctx.file_store is None:
        raise StepFailed(HostStatus.FAILED, "this master has no file store configured")
    source = (ctx.file_store / step.source).resolve()
    if not within(str(source), str(ctx.file_store.resolve())) or not source.is_file():
        raise StepFailed(HostStatus.FAILED, f"{step.source} is not a file in the master's store")
    return source.read_bytes()


def _child_env(ctx: RunContext, host: str, tmp: Path) -> dict[str, str]:
    # A fixed, minimal environment: the master's own secrets never reach a module's commands.
    return {
        "PATH": CHILD_PATH,
        "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": str(tmp), "TMPDIR": str(tmp),
        "OMBOT_JOB_ID": ctx.job_id, "OMBOT_HOST": host,
    }


def _execute(argv: list[str], stdin: str | None, ctx: RunContext, host: str, tmp: Path,
             out: CappedText, err: CappedText) -> int:
    if not _installed(argv[0], tmp):
        raise StepFailed(HostStatus.FAILED, f"command not found: {argv[0]}", rc=127)
    # Everything the command starts, even `setsid x &`, lives in its confinement and dies with it.
    confinement = cgroup.confine(re.sub(r"[^A-Za-z0-9_.-]", "_", f"{ctx.job_id}-{host}")[:64])
    try:
        with cgroup.spawning():
            proc = subprocess.Popen(
                confinement.wrap(argv), stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp,
                env={**_child_env(ctx, host, tmp), **confinement.env}, start_new_session=True, close_fds=True,
            )
            confinement.started(proc.pid)
    except BaseException:
        confinement.end()
        raise
    stop_reading = threading.Event()
    readers = [_drain(proc.stdout, out, stop_reading), _drain(proc.stderr, err, stop_reading)]
    if stdin is not None:  # from a thread: a child that never reads must not hold off cancel and timeout
        threading.Thread(target=_feed, args=(proc, stdin), daemon=True).start()
    try:
        stopped = _wait(proc, ctx)
    finally:
        # The command is over: whatever it left behind is killed, so the pipes reach their end and
        # the readers collect what is left in them. A reader still busy after that is stopped.
        confinement.end()
        for reader in readers:
            reader.join(timeout=READER_GRACE_SECONDS)
        stop_reading.set()
        for reader in readers:
            reader.join(timeout=READER_GRACE_SECONDS)
    if stopped is not None:
        raise StepFailed(stopped, "cancelled" if stopped is HostStatus.CANCELLED else "timed out", rc=proc.returncode)
    if proc.returncode != 0:
        raise StepFailed(HostStatus.FAILED, f"{argv[0]} exited with {proc.returncode}", rc=proc.returncode)
    return proc.returncode


def _installed(program: str, cwd: Path) -> bool:
    """What Popen would find: a path (relative to the command's directory) or a name on CHILD_PATH."""
    if "/" in program:
        return os.path.exists(program if os.path.isabs(program) else cwd / program)
    return shutil.which(program, path=CHILD_PATH) is not None


def _drain(stream: IO[bytes] | None, sink: CappedText, stop: threading.Event) -> threading.Thread:
    def pump() -> None:
        assert stream is not None
        with stream:
            fd = stream.fileno()
            poller = select.poll()
            poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
            while not stop.is_set():
                if not poller.poll(_POLL_SECONDS * 1000):
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    return
                sink.write(chunk)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def _feed(proc: subprocess.Popen[bytes], text: str) -> None:
    assert proc.stdin is not None
    try:
        proc.stdin.write(text.encode())
        proc.stdin.close()
    except (BrokenPipeError, ValueError, OSError):  # the child exited or was killed first
        pass


def _wait(proc: subprocess.Popen[bytes], ctx: RunContext) -> HostStatus | None:
    """Wait for the process; kill its group on cancel or deadline and say which."""
    while True:
        if not ctx.cancelled.is_set() and ctx.remaining() > 0:
            try:
                proc.wait(timeout=min(_POLL_SECONDS, max(ctx.remaining(), 0.001)))
                return None
            except subprocess.TimeoutExpired:
                pass
        if ctx.cancelled.is_set():
            _kill_group(proc)
            return HostStatus.CANCELLED
        if ctx.remaining() <= 0:
            _kill_group(proc)
            return HostStatus.TIMED_OUT


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the command's whole process group, then SIGKILL to whatever of it is left: a
    child that ignores SIGTERM must not outlive its cancelled job."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + KILL_GRACE_SECONDS
    while time.monotonic() < deadline and _group_alive(proc.pid):
        try:
            proc.wait(timeout=_POLL_SECONDS)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
