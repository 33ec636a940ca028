"""Issue 12: in the bot, the central audit and the masters nothing hand-rolls timers. Periodic work
and later retries are jobs on the process's one APScheduler scheduler (ombot.timers.Timers); the
audit agent (audit_agent/, outside this check) keeps its own retry and heartbeat loops.

The check reads the source: no `threading.Timer`, no `sched`, and no `while` loop that sleeps or
waits with a timeout, except the few places below, each a wait inside one call rather than a timer.
"""

from __future__ import annotations

import ast
import logging
import time
from dataclasses import dataclass

import pytest

from ombot.timers import Timers
from tests.support import REPO

ROOTS = ("bot", "audit", "masters")
# "file::function" -> why its timed wait in a loop is not a hand-rolled timer. Keep it short and true:
# an entry that no longer waits fails test_every_allowed_place_still_waits.
ALLOWED = {
    "audit/queue.py::AlertQueue.take":
        "pacing, not periodic work: a channel's worker waits for its token bucket's next token, "
        "and new alerts wake it at once",
    "audit/syslog5424.py::SyslogSender._run":
        "a connection's backoff, not periodic work: the sender waits before it connects again to a syslog "
        "server that refused, and close() wakes it at once",
    "masters/client.py::Router.follow":
        "a retry inside one call: a master that stopped answering a job's long-poll is asked again "
        "every 0.5 s until lost_retry, then the job ends unknown",
    "masters/backends/local.py::_wait":
        "process supervision inside one call: waits for the command with a timeout, to see a cancel "
        "or the job's deadline",
    "masters/backends/local.py::_kill_group":
        "process supervision inside one call: waits out the SIGTERM grace before SIGKILL",
    "masters/backends/cgroup.py::_kill_cgroup":
        "process supervision inside one call: until the job's cgroup is empty, up to a deadline",
    "masters/backends/cgroup.py::_remove":
        "process supervision inside one call: until the kernel lets the emptied cgroup go, up to a deadline",
}
SLEEPS = {"sleep"}  # time.sleep, asyncio.sleep
WAITS = {"wait": 0, "wait_for": 1}  # Event/Condition/Popen .wait(timeout), Condition.wait_for(pred, timeout)


@dataclass(frozen=True)
class Finding:
    place: str  # file::function
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.place} (line {self.line}): {self.what}"


class _Timers(ast.NodeVisitor):
    """Timers, `sched`, and timed waits inside `while` loops (their test or body), per function."""

    def __init__(self, rel: str) -> None:
        self.rel, self.loops = rel, 0
        self.scope: list[str] = []
        self.found: list[Finding] = []

    def _add(self, node: ast.AST, what: str) -> None:
        place = f"{self.rel}::{'.'.join(self.scope) or '<module>'}"
        self.found.append(Finding(place, getattr(node, "lineno", 0), what))

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.scope.append(node.name)
        outer, self.loops = self.loops, 0  # a function defined in a loop is not the loop's body
        self.generic_visit(node)
        self.scope.pop()
        self.loops = outer

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    def visit_While(self, node: ast.While) -> None:
        self.loops += 1
        self.generic_visit(node)
        self.loops -= 1

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == "sched":
                self._add(node, "imports sched")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module == "sched":
            self._add(node, "imports from sched")
        if node.module == "threading" and any(alias.name == "Timer" for alias in node.names):
            self._add(node, "imports threading.Timer")

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name == "Timer":
            self._add(node, "starts a threading.Timer")
        elif self.loops and name in SLEEPS:
            self._add(node, f"a while loop calls {name}()")
        elif self.loops and name in WAITS and (len(node.args) > WAITS[name] or node.keywords):
            self._add(node, f"a while loop calls {name}() with a timeout")
        self.generic_visit(node)


def timers_in(source: str, rel: str) -> list[Finding]:
    visitor = _Timers(rel)
    visitor.visit(ast.parse(source, rel))
    return visitor.found


def findings() -> list[Finding]:
    found = []
    for root in ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            rel = str(path.relative_to(REPO))
            found += timers_in(path.read_text(), rel)
    return found


def test_nothing_in_the_bot_or_the_masters_hand_rolls_a_timer() -> None:
    wrong = [str(f) for f in findings() if f.place not in ALLOWED or "Timer" in f.what or "sched" in f.what]
    assert not wrong, "periodic work goes on the process's APScheduler scheduler:\n" + "\n".join(wrong)


def test_every_allowed_place_still_waits() -> None:
    places = {f.place for f in findings()}
    stale = [place for place in ALLOWED if place not in places]
    assert not stale, f"allow-list entries with nothing left to allow: {stale}"


def test_the_check_sees_timers_sched_and_loops_that_sleep() -> None:
    source = '''
import sched
import threading
import time
from threading import Timer

def later(work):
    threading.Timer(5, work).start()

class Feed:
    def run(self):
        while not self.stop.wait(self.poll_seconds):
            self.poll()

    def loop(self):
        while True:
            self.poll()
            time.sleep(5)

    def fine(self, cond, proc):
        while not self.ready:
            cond.wait()  # woken by notify: no timer
        proc.wait(timeout=3)  # not in a loop
        for _ in range(3):
            time.sleep(1)  # a bounded retry
'''
    found = {(f.place, f.what) for f in timers_in(source, "bot/x.py")}
    assert found == {
        ("bot/x.py::<module>", "imports sched"),
        ("bot/x.py::<module>", "imports threading.Timer"),
        ("bot/x.py::later", "starts a threading.Timer"),
        ("bot/x.py::Feed.run", "a while loop calls wait() with a timeout"),
        ("bot/x.py::Feed.loop", "a while loop calls sleep()"),
    }, found


# -- the bot's scheduler as the feed and the alerts use it ---------------------------------------------------


def test_a_periodic_job_that_overruns_delays_the_next_run_and_skips_none(caplog: pytest.LogCaptureFixture) -> None:
    """The audit feed's poll is `Timers.every`: a poll longer than the interval (a hung master) must
    neither overlap the next nor have APScheduler log a skipped run at every beat."""
    timers = Timers()
    timers.scheduler.start()
    runs: list[tuple[float, float]] = []

    def work() -> None:
        started = time.monotonic()
        time.sleep(0.6 if not runs else 0.0)  # the first run overruns six beats
        runs.append((started, time.monotonic()))

    try:
        with caplog.at_level(logging.WARNING, logger="apscheduler"):
            timers.every("t", 0.1, work)
            deadline = time.monotonic() + 10
            while len(runs) < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
        timers.cancel("t")
        timers.cancel("t")  # cancelling twice, or a job already gone, is no error
    finally:
        timers.scheduler.shutdown(wait=True)
    assert len(runs) >= 4, runs
    assert all(later[0] >= earlier[1] for earlier, later in zip(runs, runs[1:])), runs  # never two at once
    assert runs[1][0] - runs[0][1] <= 0.3, runs  # the next beat after the long run, not a backlog or a pause
    assert not [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
