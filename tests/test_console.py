"""`ombot console` in a real terminal (a pty, driven with pexpect): the /om grammar through the same
dispatcher as Slack, a real master with the local backend, cards printed as text."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

import pexpect
import pytest

from bot.console import PROMPT
from tests.support import REPO, Cluster, bot_table, child_env

TIMEOUT = 30  # generous: pexpect waits for output, it asserts nothing about time


def spawn_console(cluster: Cluster) -> pexpect.spawn:
    child = pexpect.spawn(sys.executable, ["-m", "ombot", "--config", str(cluster.config_path), "console"],
                          env=child_env(), encoding="utf-8", timeout=TIMEOUT, dimensions=(50, 250),
                          cwd=str(cluster.root), echo=False)  # no echo: expectations see only the console
    child.logfile_read = ConsoleLog()
    return child


class ConsoleLog:
    """Keeps what the console printed, to show when a test fails."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, data: str) -> None:
        self.text += data

    def flush(self) -> None:
        pass


def say(child: pexpect.spawn, line: str) -> None:
    """Type a line. Not waiting for a prompt: cards and results print from worker threads, so a prompt
    may already have gone by inside earlier output; the terminal keeps what is typed until it is read."""
    child.sendline(line)


def quit_console(child: pexpect.spawn) -> int:
    say(child, "/quit")
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


@pytest.fixture
def console(make_cluster: Callable[..., Cluster], request: pytest.FixtureRequest) -> Iterator[pexpect.spawn]:
    allow_as = getattr(request, "param", True)
    cluster = make_cluster(module_dirs=[REPO / "tests" / "site_modules"],
                           extra_toml=bot_table(console_user="U0DEMO", console_allow_as=allow_as))
    cluster.start("m1")
    child = spawn_console(cluster)
    try:
        child.expect_exact("OMBot console: you are U0DEMO. Type /om help; /as USER switches user; /quit leaves.")
        child.expect_exact(PROMPT)
        yield child
    finally:
        print(child.logfile_read.text)  # pytest shows it only when the test failed
        if child.isalive():
            child.terminate(force=True)


def test_job_card_results_jobs_and_help(console: pexpect.spawn) -> None:
    say(console, "/om echo localhost message=hi")
    console.expect_exact("(to U0DEMO) Starting job #1: `echo` on 1 host(s) in local: localhost")
    console.expect(r"\[console #\d+\] \[#1 \w+\] echo on 1 host\(s\) in local by U0DEMO")  # the card
    console.expect(r"\[#1 ok\] echo on 1 host\(s\) in local by U0DEMO: 1/1 hosts")  # its final state
    console.expect_exact("Results of #1")
    console.expect(r"localhost\s+ok\s+[\d.]+s\s+hi")

    say(console, "/om jobs")
    console.expect(r"#1 ok\s+`echo` on 1 host\(s\) in local by @U0DEMO")  # mentions shown as @user

    say(console, "/om help")
    console.expect_exact("*OMBot commands*")
    console.expect_exact("/om run MODULE TARGETS")
    console.expect_exact("/om deny REQUEST REASON` \u2014 deny a request, saying why")  # from its declaration

    say(console, "/om help echo")
    console.expect_exact("*echo* (diagnostics, risk low)")

    say(console, "/om status 1")
    console.expect_exact("#1 `echo` on 1 host(s) in local: *ok*")
    assert quit_console(console) == 0


@pytest.mark.slow
def test_bad_input_is_answered_and_the_console_goes_on(console: pexpect.spawn) -> None:
    say(console, '/om echo localhost message="unclosed')
    console.expect_exact("close every quote")
    say(console, "/om echo localhost message=\u201csmart\u201d colour=red")
    console.expect_exact("colour: expected a parameter of echo (one of message)")
    say(console, "/om ech localhost")
    console.expect_exact("Did you mean `echo`")
    say(console, "/om status 42")
    console.expect_exact("No job '42'")
    say(console, "")  # an empty line just prompts again
    say(console, "/as")
    console.expect_exact("usage: /as USER")
    say(console, "/om jobs")
    console.expect_exact("No jobs yet.")
    assert console.isalive()
    assert quit_console(console) == 0


@pytest.mark.slow
def test_as_switches_user_for_cancel(console: pexpect.spawn) -> None:
    say(console, "/om test.sleep localhost seconds=60")
    console.expect_exact("Starting job #1")
    console.expect(r"\[#1 running\] test.sleep")  # the card, updated once the master runs it

    say(console, "/as U0BOB")
    console.expect_exact("you are now U0BOB")
    say(console, "/om cancel 1")
    console.expect(r"\(to U0BOB\) Refused: only the requester \(@U0DEMO\)")

    say(console, "/as U0DEMO")
    console.expect_exact("you are now U0DEMO")
    say(console, "/om cancel 1")
    console.expect_exact("(to U0DEMO) Cancelling job #1.")
    console.expect(r"\[#1 cancelled\] test.sleep")
    console.expect_exact("Results of #1")

    say(console, "/om cancel 1")
    console.expect(r"Job #1 already ended: cancelled")
    assert quit_console(console) == 0


@pytest.mark.slow
@pytest.mark.parametrize("console", [False], indirect=True, ids=["console_allow_as=false"])
def test_as_is_refused_when_the_config_says_so(console: pexpect.spawn) -> None:
    say(console, "/as U0BOB")
    console.expect_exact("/as is disabled (set console_allow_as = true under [bot] to allow it).")
    say(console, "/om echo localhost message=still-demo")
    console.expect(r"\[#1 ok\] echo on 1 host\(s\) in local by U0DEMO")
    console.expect_exact("Results of #1")
    console.sendeof()  # end of input leaves like /quit
    console.expect(pexpect.EOF)
    console.close()
    assert console.exitstatus == 0
    assert "Traceback" not in console.logfile_read.text
