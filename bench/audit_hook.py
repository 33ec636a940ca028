"""Time the shell audit hook adds per prompt, against a bare bash in the same run.

    .venv/bin/python bench/audit_hook.py [--n 2000] [--warmup 100]

Prints figures, asserts nothing. Two interactive bash shells, each in its own pty and its own
private mount namespace (tests/shells.py), where no global rc file of this machine is read: `bare`
(no hook: an empty /etc/bash.bashrc) and `hooked` (the hook installed into a temp root by
`audit_agent install --root`, that root's etc/bash.bashrc seen as /etc/bash.bashrc). So the
difference is OMBot's hook alone, whatever this machine's own rc files hold. One sample = write one
command line (`: N`, a new history entry each time) to the pty and read until the next prompt: the
whole prompt cycle the user waits for, readline and PROMPT_COMMAND included. Samples alternate
bare/hooked, so machine noise hits both alike.

Three agent states, since the hook only appends to the spool and never talks to the agent:

  stopped  no agent process: the spool just grows.
  up       `python -m ombot.audit_agent run` on the same spool, its only master an unused loopback port
           (it scans, queues, rotates the spool and retries in the background, on the same CPUs).
  hung     that agent SIGSTOPped after it had opened and read the spool.

The issue's goal: added p50 <= 1 ms and added p99 <= 5 ms in every state.
"""

from __future__ import annotations

import argparse
import os
import pty
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROMPT = b"@@bench-prompt@@ "
READ_TIMEOUT = 10.0  # seconds without a prompt: the shell is stuck, and the benchmark says so


class Shell:
    """An interactive bash in a pty (pty.fork: it gets a controlling terminal, as a login does), in a
    private mount namespace where /etc/bash.bashrc is ROOT's (or empty: root None) and every other
    global rc file is hidden (tests/shells.py)."""

    def __init__(self, home: Path, root: Path | None) -> None:
        from ombot.audit_agent import hook
        from tests.shells import BASH, bash_files, isolated_argv

        home.mkdir(parents=True, exist_ok=True)
        files, armed = bash_files(root)
        rc_lines = [f". {root / hook.BASHRC}"] if root is not None and not armed else []  # no /etc/bash.bashrc here
        rcfile = home / ".bashrc"
        # --rcfile: not a real ~/.bashrc; HISTCONTROL unset
        rcfile.write_text("\n".join(rc_lines + ["unset HISTCONTROL", f"PS1='{PROMPT.decode()}'"]) + "\n")
        env = {"HOME": str(home), "PATH": os.environ["PATH"], "TERM": "dumb", "HISTFILE": str(home / ".hist"),
               "LOGNAME": "bench", "USER": "bench"}
        argv = isolated_argv([BASH or "bash", "--rcfile", str(rcfile), "-i"], files)
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: nothing but exec
            os.chdir(home)
            os.execve(argv[0], argv, env)
        self.read_prompt()

    def read_prompt(self) -> None:
        seen = b""
        while not seen.endswith(PROMPT):
            ready, _, _ = select.select([self.fd], [], [], READ_TIMEOUT)
            if not ready:
                raise RuntimeError(f"no prompt from bash {self.pid} within {READ_TIMEOUT}s; got {seen[-200:]!r}")
            seen += os.read(self.fd, 65536)

    def prompt_ms(self, line: bytes) -> float:
        start = time.perf_counter_ns()
        os.write(self.fd, line)
        self.read_prompt()
        return (time.perf_counter_ns() - start) / 1e6

    def close(self) -> None:
        os.write(self.fd, b"exit\n")
        try:
            os.waitpid(self.pid, 0)
        finally:
            os.close(self.fd)


class Agent:
    """`python -m ombot.audit_agent run` on the benchmark's spool, with no reachable master."""

    def __init__(self, root: Path, spool_dir: Path) -> None:
        from ombot.masters import Identity

        key = root / "agent.key"
        Identity.generate().save(key)
        master_key = Identity.generate().public
        self.config = root / "agent.toml"
        self.config.write_text("\n".join([
            'host = "bench01"', 'idc = "local"', f'key_file = "{key}"', f'spool_dir = "{spool_dir}"',
            f'state_dir = "{root / "agent-state"}"', "", "[[masters]]", 'id = "m1"',
            f'address = "127.0.0.1:{unused_port()}"', f'public_key = "{master_key}"', ""]))
        self.log = root / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with open(self.log, "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen([sys.executable, "-m", "ombot.audit_agent", "run", "--config", str(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO),
                                         start_new_session=True)
        deadline = time.monotonic() + 20
        while "audit agent for" not in self.log.read_text(errors="replace"):  # its start-up line
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the agent did not start:\n{self.log.read_text(errors='replace')}")
            time.sleep(0.05)
        time.sleep(1.0)  # a few scans: it has read the spool before the series starts

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def queued(self) -> int:
        """Events in the agent's queue (nothing ships: no master answers)."""
        import sqlite3

        with sqlite3.connect(self.config.parent / "agent-state" / "queue.db") as db:
            return int(db.execute("SELECT count(*) FROM events WHERE kind = 'command'").fetchone()[0])

    def wait_queued(self, expected: int, within: float) -> int:
        """Once resumed, the agent catches up on what was spooled while it hung; how far it got."""
        deadline = time.monotonic() + within
        while (count := self.queued()) < expected and time.monotonic() < deadline:
            time.sleep(0.1)
        return count

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def unused_port() -> int:
    """A loopback port nobody listens on: the agent's connects are refused, as to a dead master."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spool_lines(spool_dir: Path) -> int:
    user_dir = spool_dir / str(os.geteuid())
    if not user_dir.is_dir():
        return 0
    return sum(p.read_bytes().count(b"\n") for p in user_dir.iterdir() if not p.name.startswith(".scratch"))


def series(bare: Shell, hooked: Shell, n: int, warmup: int, first: int) -> tuple[list[float], list[float]]:
    """n interleaved samples from each shell (after `warmup` uncounted ones); `first` numbers the lines."""
    bare_ms: list[float] = []
    hooked_ms: list[float] = []
    for i in range(warmup + n):
        line = f": {first + i}\n".encode()
        if i % 2:  # alternate which shell goes first
            b = bare.prompt_ms(line)
            h = hooked.prompt_ms(line)
        else:
            h = hooked.prompt_ms(line)
            b = bare.prompt_ms(line)
        if i >= warmup:
            bare_ms.append(b)
            hooked_ms.append(h)
    return bare_ms, hooked_ms


def p50_p99(samples: list[float]) -> tuple[float, float]:
    return statistics.median(samples), statistics.quantiles(samples, n=100, method="inclusive")[98]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="counted prompts per shell and state")
    parser.add_argument("--warmup", type=int, default=100, help="uncounted prompts per shell and state")
    opts = parser.parse_args()
    from ombot.audit_agent import hook
    from tests.shells import Unavailable

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="ombot-bench-hook-") as tmp:
        root = Path(tmp)
        hook.install(root / "root")
        spool_dir = root / "root" / hook.DEFAULT_SPOOL_DIR.lstrip("/")
        try:
            bare = Shell(root / "home-bare", None)
            hooked = Shell(root / "home-hooked", root / "root")
        except Unavailable as exc:
            sys.exit(f"audit_hook.py: {exc}")
        agent = Agent(root, spool_dir)
        results: dict[str, tuple[list[float], list[float]]] = {}
        recorded = queued = 0
        try:
            before = spool_lines(spool_dir)
            results["stopped"] = series(bare, hooked, opts.n, opts.warmup, 0)
            recorded = spool_lines(spool_dir) - before
            agent.start()
            results["up"] = series(bare, hooked, opts.n, opts.warmup, 1_000_000)
            agent.signal(signal.SIGSTOP)
            time.sleep(0.2)
            results["hung"] = series(bare, hooked, opts.n, opts.warmup, 2_000_000)
            agent.signal(signal.SIGCONT)
            queued = agent.wait_queued(3 * (opts.n + opts.warmup), within=15)
        finally:
            agent.stop()
            bare.close()
            hooked.close()
        report(opts, results, recorded, queued, load_before)


def report(opts: argparse.Namespace, results: dict[str, tuple[list[float], list[float]]], recorded: int,
           queued: int, load_before: float) -> None:
    bash = subprocess.run(["bash", "-c", "echo $BASH_VERSION"], capture_output=True, text=True, check=False).stdout.strip()
    print(f"audit hook per prompt: n={opts.n} per shell and state (after {opts.warmup} warm-up), bash {bash}, "
          f"{os.cpu_count()} CPUs, load {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    prompts = opts.n + opts.warmup
    print(f"  hook records written with the agent stopped: {recorded} for {prompts} prompts; "
          f"queued by the agent once resumed: {queued} of {3 * prompts}")
    print(f"  {'state':<8} {'bare p50':>9} {'bare p99':>9} {'hook p50':>9} {'hook p99':>9} "
          f"{'added p50':>10} {'added p99':>10} {'count':>6}   (ms)")
    worst = (0.0, 0.0)
    for state, (bare_ms, hooked_ms) in results.items():
        b50, b99 = p50_p99(bare_ms)
        h50, h99 = p50_p99(hooked_ms)
        worst = (max(worst[0], h50 - b50), max(worst[1], h99 - b99))
        print(f"  {state:<8} {b50:9.3f} {b99:9.3f} {h50:9.3f} {h99:9.3f} {h50 - b50:+10.3f} {h99 - b99:+10.3f} "
              f"{len(hooked_ms):6d}")
    print(f"  worst added: p50 {worst[0]:+.3f} ms, p99 {worst[1]:+.3f} ms   (goal: <= 1 ms and <= 5 ms in every state)")


if __name__ == "__main__":
    main()
