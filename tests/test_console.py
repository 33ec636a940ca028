"""`ombot console` in a real terminal (a pty, driven with pexpect): the /om grammar through the same
dispatcher as Slack, a real master with the local backend, cards printed as text."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import termios
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pexpect
import pytest

from ombot.bot.console import PROMPT
from tests import rigs
from tests.rigs import CONSOLE_TIMEOUT as TIMEOUT
from tests.rigs import SHOWN_PROMPT, TERMINAL_ENV, console_site, quit_console, say
from tests.support import Cluster, child_env, wait_for

GREETING = "OMBot console: you are U0DEMO. Type /om help; /as USER switches user; /quit leaves."


@pytest.fixture
def console(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[pexpect.spawn]:
    allow_as = getattr(request, "param", True)
    with console_site(tmp_path / "console", console_allow_as=allow_as) as site, rigs.console(site, GREETING) as child:
        yield child


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
    say(console, "/om service localhost action=explode name=-x")  # every problem at once, not the first
    console.expect_exact("action: expected one of start, stop, restart, reload, status, got 'explode'")
    console.expect_exact("name: expected a value that does not start with '-', got '-x'")
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
    console.expect_exact("Results of #1")  # the reply and the card print from two threads, in either order
    if "(to U0DEMO) Cancelling job #1." not in console.logfile_read.text:
        console.expect_exact("(to U0DEMO) Cancelling job #1.")
    assert re.search(r"\[#1 cancelled\] test.sleep", console.logfile_read.text)

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


# -- a terminal: line editing, history, Ctrl-C, output above the prompt ----------------------------

UP, CTRL_C = "\x1b[A", "\x03"


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Cluster]:
    with console_site(tmp_path / "site", schedule_min_interval_seconds=1) as cluster:
        yield cluster


def opened(cluster: Cluster) -> AbstractContextManager[pexpect.spawn]:
    """`ombot console` on `cluster`, at its first prompt; killed if the test leaves it running."""
    return rigs.console(cluster, "OMBot console: you are U0DEMO.")


@pytest.mark.slow
def test_up_arrow_recalls_a_line_and_history_outlives_the_console(site: Cluster) -> None:
    with opened(site) as console:
        say(console, "/om echo localhost message=recalled")
        console.expect_exact("Results of #1")
        console.send(UP + "\r")  # the previous line again, not `^[[A`
        console.expect_exact("(to U0DEMO) Starting job #2: `echo` on 1 host(s) in local: localhost")
        console.expect(r"\[#2 ok\] echo on 1 host\(s\) in local by U0DEMO")
        console.expect_exact("Results of #2")
        assert quit_console(console) == 0
    assert "^[[A" not in console.logfile_read.text
    history = site.root / "state" / "console_history"
    assert stat.S_IMODE(history.stat().st_mode) == 0o600
    assert [line for line in history.read_text().splitlines() if line.startswith("+")] == [
        "+/om echo localhost message=recalled", "+/quit"]
    with opened(site) as again:  # a new console starts from the same history
        again.send(UP + UP + "\r")
        again.expect_exact("(to U0DEMO) Starting job #3: `echo` on 1 host(s) in local: localhost")
        again.expect_exact("Results of #3")
        assert quit_console(again) == 0


@pytest.mark.slow
def test_ctrl_c_clears_a_half_typed_line_and_the_console_goes_on(site: Cluster) -> None:
    with opened(site) as console:
        console.send("/om echo localhost message=half-typed" + CTRL_C)
        console.expect_exact(SHOWN_PROMPT)
        say(console, "/om echo localhost message=next")
        console.expect_exact("(to U0DEMO) Starting job #1: `echo` on 1 host(s) in local: localhost")
        console.expect(r"localhost\s+ok\s+[\d.]+s\s+next")  # the half line never ran: this is job #1
        assert console.isalive()
        # The prompt drawn again: the terminal is raw once more. A Ctrl-D sent between prompts meets the
        # cooked terminal, whose line discipline eats it as an end of file the console never reads.
        console.expect_exact(SHOWN_PROMPT)
        console.sendcontrol("d")  # Ctrl-D on an empty line leaves
        console.expect(pexpect.EOF)
        console.close()
        assert console.exitstatus == 0
    assert "half-typed" not in (site.root / "state" / "console_history").read_text()
    assert "Traceback" not in console.logfile_read.text and "KeyboardInterrupt" not in console.logfile_read.text


def cooked(console: pexpect.spawn) -> bool:
    """Whether the console's terminal is in canonical (line) mode: prompt_toolkit makes it raw while it
    reads a line and puts it back while a command works, and when it leaves."""
    return bool(termios.tcgetattr(console.child_fd)[3] & termios.ICANON)


def audit_holder(console: pexpect.spawn) -> str:
    """Who the console's first audit line says pulls the feed (it may print before the first prompt)."""
    said = re.compile(r"audit: (this console|another process) pulls the audit feed")
    if not said.search(console.logfile_read.text):
        console.expect(said)
    found = said.search(console.logfile_read.text)
    assert found is not None
    return found.group(1)


@pytest.mark.slow
def test_ctrl_c_while_a_command_works_gives_the_prompt_back_and_its_answer_comes_later(site: Cluster) -> None:
    with opened(site) as console:
        say(console, "/om echo localhost message=warm")  # the console's link to the master is open now
        console.expect_exact("Results of #1")
        console.expect_exact(SHOWN_PROMPT)
        master = site.processes["m1"].proc
        assert master is not None
        os.kill(master.pid, signal.SIGSTOP)  # the next command waits on it
        try:
            say(console, "/om echo localhost message=waited-for")
            wait_for(lambda: cooked(console), why="the command to start (the prompt gone)")
            console.send(CTRL_C)  # the terminal is cooked: its line discipline sends SIGINT
            console.expect_exact("(still working on it: its answer will show here)")
            console.expect_exact(SHOWN_PROMPT)
            say(console, "/as U0BOB")  # the console goes on while the command still waits
            console.expect_exact("/as is disabled")
        finally:
            os.kill(master.pid, signal.SIGCONT)
        console.expect_exact("(to U0DEMO) Starting job #2: `echo` on 1 host(s) in local: localhost")
        console.expect(r"localhost\s+ok\s+[\d.]+s\s+waited-for")
        console.expect_exact(SHOWN_PROMPT)
        os.kill(console.pid, signal.SIGINT)  # a SIGINT between commands (`kill -INT`) ends nothing either
        say(console, "/as U0BOB")
        console.expect_exact("/as is disabled")
        assert console.isalive()
        assert quit_console(console) == 0
    assert "Traceback" not in console.logfile_read.text and "KeyboardInterrupt" not in console.logfile_read.text


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_leaves_the_terminal_as_it_was_and_lets_go_at_once(site: Cluster, sig: signal.Signals) -> None:
    """`kill` (SIGTERM) or a closed terminal (SIGHUP): the console leaves as /quit does, exit 0, the
    terminal cooked again (not left raw for the shell), its hold on the audit feed let go: the next
    console takes the feed at its start, not when the lease runs out."""
    with opened(site) as console:
        assert audit_holder(console) == "this console"
        assert not cooked(console)
        os.kill(console.pid, sig)
        console.expect(pexpect.EOF)
        assert cooked(console)
        console.close()
        assert (console.exitstatus, console.signalstatus) == (0, None)
    with opened(site) as again:
        assert audit_holder(again) == "this console"  # not "another process": the lease was let go
        assert quit_console(again) == 0


@pytest.mark.slow
def test_log_lines_print_above_the_prompt_and_leave_the_typed_line_alone(site: Cluster) -> None:
    with opened(site) as console:
        say(console, "/om schedule every 1s run test.sleep localhost seconds=60")
        console.expect(r"Schedule #1 is active")
        console.expect(r"\[#1 running\] test.sleep")
        console.send("/om ech")  # half typed, while the scheduler logs from its own thread
        console.expect(r"INFO ombot.bot.schedules: schedule 1: run at \d+ skipped, job #1 still runs\r\n")
        console.expect_exact(f"{PROMPT}/om ech")  # the prompt is drawn again below it, the line as typed
        say(console, "o localhost message=typed-around-a-log-line")
        console.expect_exact("(to U0DEMO) Starting job #2: `echo` on 1 host(s) in local: localhost")
        console.expect(r"localhost\s+ok\s+[\d.]+s\s+typed-around-a-log-line")
        say(console, "/om schedule delete 1")
        console.expect_exact("Deleted schedule #1")
        say(console, "/om cancel 1")
        console.expect(r"\[#1 cancelled\] test.sleep")
        assert quit_console(console) == 0


def test_a_pipe_gets_the_plain_line_reader(site: Cluster) -> None:
    """Not a terminal: lines are read as they come (the end of input leaves), nothing is drawn, no
    history is kept."""
    result = subprocess.run([sys.executable, "-m", "ombot", "--config", str(site.config_path), "console"],
                            input="/om echo localhost message=piped\n", capture_output=True, text=True,
                            timeout=TIMEOUT * 2, env=child_env(TERMINAL_ENV))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("OMBot console: you are U0DEMO. Type /om help; /as USER switches user; "
                                    "/quit leaves.\nom> (to U0DEMO) Starting job #1: `echo` on 1 host(s) in local: "
                                    "localhost\n"), result.stdout
    assert result.stdout.count(PROMPT) == 2 and "\x1b" not in result.stdout
    assert not (site.root / "state" / "console_history").exists()
