"""The console rig: `ombot console` in a real terminal (a pty, driven with pexpect) on a site whose
masters run, the /om grammar through the same dispatcher as Slack."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pexpect

from ombot.bot.console import PROMPT
from tests.rigs.slack import SITE_MODULES
from tests.support import ALLOW_ALL_POLICY, Cluster, bot_table, child_env

CONSOLE_TIMEOUT = 30  # generous: pexpect waits for output, it asserts nothing about time
# prompt_toolkit asks the terminal where its cursor is; pexpect's never answers, so the console would
# wait for the answer and then print a warning. Real terminals answer.
TERMINAL_ENV = {"PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm"}
# How the prompt shows on a terminal: prompt_toolkit draws its trailing space as a cursor move.
SHOWN_PROMPT = PROMPT.rstrip()


class ConsoleLog:
    """Keeps what the console printed, to show when a test fails."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, data: str) -> None:
        self.text += data

    def flush(self) -> None:
        pass


def spawn_console(cluster: Cluster, *args: str) -> pexpect.spawn:
    """`ombot console` (or `args` instead of `console`, e.g. `up DIR`) in a real terminal of 50x250."""
    child = pexpect.spawn(sys.executable, ["-m", "ombot", "--config", str(cluster.config_path), *(args or ["console"])],
                          env=child_env(TERMINAL_ENV), encoding="utf-8", timeout=CONSOLE_TIMEOUT, dimensions=(50, 250),
                          cwd=str(cluster.root), echo=False)  # the console draws what is typed itself
    child.logfile_read = ConsoleLog()
    return child


def say(child: pexpect.spawn, line: str) -> None:
    """Type a line. Not waiting for a prompt: cards and results print from worker threads, so a prompt
    may already have gone by inside earlier output; the terminal keeps what is typed until it is read."""
    child.sendline(line)


def quit_console(child: pexpect.spawn) -> int:
    say(child, "/quit")
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


@contextmanager
def console_site(root: Path, idcs: dict[str, list[str]] | None = None, *, user: str = "U0DEMO",
                 policy: str = ALLOW_ALL_POLICY, module_dirs: Sequence[Path] = (SITE_MODULES,), extra_toml: str = "",
                 **settings: object) -> Iterator[Cluster]:
    """A site for the console (`[bot] console_user = user` and the other `[bot]` keys in `settings`),
    its masters running until the block ends."""
    cluster = Cluster(root, idcs or {"local": ["m1"]}, policy=policy, module_dirs=list(module_dirs),
                      extra_toml=bot_table(console_user=user, **settings) + extra_toml)
    try:
        for master in cluster.ports:
            cluster.start(master)
        yield cluster
    finally:
        cluster.stop_all()


@contextmanager
def console(cluster: Cluster, greeting: str | None = None) -> Iterator[pexpect.spawn]:
    """`ombot console` on `cluster`; with `greeting`, once it printed that and its first prompt. Its
    output is printed at the end (pytest shows it when the test failed) and it is killed if still running."""
    child = spawn_console(cluster)
    try:
        if greeting is not None:
            child.expect_exact(greeting)
            child.expect_exact(SHOWN_PROMPT)
        yield child
    finally:
        print(child.logfile_read.text)
        if child.isalive():
            child.terminate(force=True)
