"""The embedded default shows the audit (issue 20, item 4): the console pulls the audit feed while no
other process does and prints the alerts above its prompt; a Slack bot on the same database takes the
feed from it, and gives it back when it stops; a console key never pulls. The quickstart of
docs/audit.md, run as written: `ombot up` in a pty, the enrol command, the agent, a real bash with
the hook (tests/shells.py: the machine's /etc is never read or written), the alert in the console and
`/om audit` finding the event.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import peewee
import pexpect
import pytest

from ombot import lease
from ombot.audit import Match
from ombot.audit.feed import LEASE
from ombot.audit.rules import Threshold
from ombot.bot import store
from ombot.bot.alerts import AlertPoster
from ombot.bot.console import AlertScreen, ConsoleTransport, lead_note
from ombot.timers import Timers
from tests.rigs import (AGENT_CLIENTS, ALERT_RULES, AUDIT_CHANNEL, SHOWN_PROMPT, TERMINAL_ENV, AuditRig,
                        ConsoleLog, audit_site, event, ingest, say, spawn_console, with_agent_hosts)
from tests.shells import PROMPT, Shell
from tests.support import Cluster, bot_table, child_env, free_port, wait_for

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = "## Quickstart: an alert in the console in five minutes"
TAKEN = "audit: this console pulls the audit feed: alerts print here"
TO_SLACK = "audit: alerts go to Slack (the bot on "
QUIET = 2.0  # seconds in which a process that pulled (polls of 0.2 s) would have shown an alert


# -- who pulls: the lease, and what the console says -------------------------------------------------------


@pytest.fixture
def lease_db(store_url: str) -> Iterator[peewee.Database]:
    db = store.open_store(store_url)
    lease.prepare()
    try:
        yield db
    finally:
        db.close()


def test_a_slack_bot_takes_the_feed_from_a_console_and_never_the_other_way(lease_db: peewee.Database) -> None:
    console, bot, other_bot = "console:h:1:aa", "slack:h:2:bb", "slack:h:3:cc"
    assert lease.acquire(LEASE, console, 60_000)
    assert not lease.acquire(LEASE, bot, 60_000)  # without preempt a held lease waits its ttl out
    assert lease.acquire(LEASE, bot, 60_000, preempt="console:")  # the bot's start: at once
    assert lease.holder_of(LEASE) == bot
    assert not lease.acquire(LEASE, console, 60_000)  # the console's next renewal fails: it stops pulling
    assert not lease.acquire(LEASE, other_bot, 60_000, preempt="console:")  # a bot never takes a bot's
    assert not lease.acquire(LEASE, "console:h:4:dd", 60_000)
    lease.release(LEASE, bot)  # the bot stops: the console takes the feed back at its next poll
    assert lease.acquire(LEASE, console, 60_000) and lease.holder_of(LEASE) == console


def test_preempt_is_an_exact_prefix_on_every_backend(lease_db: peewee.Database) -> None:
    """Not LIKE: `_` and `%` are plain characters, and a holder merely containing the prefix is not taken.
    (Case is the database's collation: MySQL's ignores it. Holders are always written in lower case.)"""
    for holder in ("xconsole:h:1:aa", "slack:console:1:aa", "consoleX:h:1"):
        lease.release(LEASE, lease.holder_of(LEASE) or "")
        assert lease.acquire(LEASE, holder, 60_000)
        assert not lease.acquire(LEASE, "slack:h:2:bb", 60_000, preempt="console:"), holder
        assert not lease.acquire(LEASE, "slack:h:2:bb", 60_000, preempt="con_ole:"), holder
        assert not lease.acquire(LEASE, "slack:h:2:bb", 60_000, preempt="%"), holder
    lease.release(LEASE, lease.holder_of(LEASE) or "")
    assert lease.acquire(LEASE, "console:h:1:aa", 60_000)
    assert lease.acquire(LEASE, "slack:h:2:bb", 60_000, preempt="console:")


def test_the_console_names_who_pulls() -> None:
    assert lead_note(True, None) == ("audit: this console pulls the audit feed: alerts print here (a Slack bot "
                                     "that starts on this database takes it over)")
    assert lead_note(False, "slack:ops1:4242:ab12cd34") == (
        "audit: alerts go to Slack (the bot on ops1, pid 4242 holds the feed); /om audit searches what it stored")
    assert lead_note(False, "ops1:4242:ab12cd34") == lead_note(False, "slack:ops1:4242:ab12cd34")  # a bot before 0.2
    assert lead_note(False, "console:ops2:77:ab12cd34") == (
        "audit: alerts print in another console (ops2, pid 77 holds the feed); this console takes it if it stops")
    assert lead_note(False, None) == "audit: another process pulls the audit feed; this console takes it if it stops"


# -- the console's courier ------------------------------------------------------------------------------


def test_an_alert_prints_whole_in_the_console_and_its_update_names_it() -> None:
    """The console's courier (AlertScreen under the real AlertPoster and queue): the headline, who, the
    directory and the command, as plain text; the group's next match updates alert #1."""
    out = io.StringIO()
    timers = Timers()
    timers.start()
    poster = AlertPoster(AlertScreen(ConsoleTransport(out)), lambda text: text.replace("S3cret", "****"), timers,
                         rate=100.0, burst=10)
    match = Match("wipe <!channel>", "critical", AUDIT_CHANNEL, "wipe:web01", 300, Threshold(1, 0))
    command = {"id": "web01:b:q:1", "idc": "bj", "host": "web01", "kind": "command", "at": 1_700_000_000_000,
               "user": "alice", "uid": 1000, "cwd": "/srv/app", "command": "mysql -pS3cret `x` ``` done",
               "exit_status": 0}
    try:
        poster.alert(match, command, True, AUDIT_CHANNEL)
        wait_for(lambda: "$ mysql" in out.getvalue(), 30, "the alert printed")
        poster.alert(match, {**command, "id": "web01:b:q:2", "at": 1_700_000_001_000}, False, AUDIT_CHANNEL)
        wait_for(lambda: "updated" in out.getvalue(), 30, "the update printed")
    finally:
        poster.close()
        timers.close()
    text = out.getvalue()
    assert text.startswith("[audit alert #1] :rotating_light: *critical* \u00b7 audit rule *wipe <!channel>* on "
                           "`web01` in `bj`\n*user* alice (uid 1000) \u00b7 2023-11-14 22:13 UTC\n"), text
    assert "\n/srv/app\n$ mysql -p**** `x` ``` done\n" in text  # redacted; plain text as typed, the fence kept visible
    assert "S3cret" not in text and "&lt;" not in text
    assert "[audit alert #1 updated] :rotating_light: *critical* \u00b7 audit rule *wipe <!channel>* on `web01` in " \
           "`bj` \u2014 *2 matching commands*" in text


def test_what_a_server_user_typed_cannot_drive_the_operators_terminal() -> None:
    """A local user on an audited server controls the command text: a `\r` or backspaces would
    overwrite on screen the command the alert shows, ESC starts terminal sequences (a title, a
    clear screen), bidi overrides reorder it. The console shows each as its escape, whatever it prints."""
    out = io.StringIO()
    timers = Timers()
    timers.start()
    poster = AlertPoster(AlertScreen(ConsoleTransport(out)), lambda text: text, timers, rate=100.0, burst=10)
    typed = "rm -rf / --no-preserve-root\r# tidy up\b\b \x1b]0;ok\x07\x1b[2J \u202eevil\u202c \x9b1m"
    match = Match("wipe", "critical", AUDIT_CHANNEL, "wipe:web01", 0, Threshold(1, 0))
    try:
        poster.alert(match, {"id": "web01:b:q:1", "idc": "bj", "host": "web\x1b[8m01", "kind": "command",
                             "at": 1_700_000_000_000, "user": "alice", "uid": 1000, "cwd": "/tmp\r/etc",
                             "command": typed, "exit_status": 0}, True, AUDIT_CHANNEL)
        wait_for(lambda: "$ rm" in out.getvalue(), 30, "the alert printed")
    finally:
        poster.close()
        timers.close()
    text = out.getvalue()
    assert ("$ rm -rf / --no-preserve-root\\x0d# tidy up\\x08\\x08 \\x1b]0;ok\\x07\\x1b[2J "
            "\\u202eevil\\u202c \\x9b1m\n") in text
    assert "on `web\\x1b[8m01`" in text and "\n/tmp\\x0d/etc\n" in text
    assert not any(c in text for c in "\r\b\x07\x1b\x9b\u202e\u202c")  # nothing a terminal acts on


# -- a real console and a real Slack bot on one database ---------------------------------------------------


def alarm(seq: int, word: str) -> dict[str, object]:
    return event(seq, data={"command": f"echo {word} {seq}", "user": "alice", "exit": 0})


def console_lines(child: pexpect.spawn) -> str:
    """Everything the console printed so far (reads what is pending for a moment first)."""
    try:
        child.expect(pexpect.TIMEOUT, timeout=QUIET)
    except pexpect.EOF:
        pass
    return str(child.logfile_read.text)


@contextmanager
def running_console(cluster: Cluster) -> Iterator[pexpect.spawn]:
    """A real console (spawn_console) that quits when the block ends, or is killed when the block
    failed; what it printed is shown either way."""
    child = spawn_console(cluster)
    try:
        yield child
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        print(child.logfile_read.text)
        if child.isalive():
            child.terminate(force=True)


def reader_rows(rig: AuditRig) -> dict[str, int]:
    """Which client ids read the master's audit, and how far: the console reads as `console`, the bot as `bot`."""
    return {reader: after for reader, after in rig.master_rows("m1", "SELECT reader, after FROM auditreader")}


@pytest.mark.slow
def test_the_console_yields_the_feed_to_a_slack_bot_and_takes_it_while_none_runs(
        make_slack_rig: Callable[..., AuditRig]) -> None:
    rig = make_slack_rig(kind=AuditRig, console_user="U0DEMO", **audit_site(ALERT_RULES))
    wait_for(lambda: (rig.rows("SELECT holder FROM bot_lease WHERE name = ?", LEASE) or [("",)])[0][0]
             .startswith("slack:"), 30, "the bot to hold the audit feed")
    with running_console(rig.cluster) as child:
        child.expect_exact(f"{TO_SLACK}")  # said once at the start: a bot holds the feed
        child.expect_exact(SHOWN_PROMPT)
        # 1. A bot runs: the alert goes to Slack only, and the console never even reads the masters.
        rig.ingest("m1", [alarm(1, "ALARM")])
        rig.fake.wait_for(lambda: rig.alerts("alarm"), 30, what="the alarm alert in Slack")
        assert "[audit alert" not in console_lines(child)
        assert set(reader_rows(rig)) == {"bot"}

        # 2. The bot stops: the console takes the feed at its next poll and prints the alert.
        rig.stop_bots()
        child.expect_exact(TAKEN, timeout=30)
        rig.ingest("m1", [alarm(2, "MARKER")])
        child.expect_exact("[audit alert #1] :warning: *warning* \u00b7 audit rule *marker* on `web01` in `local`")
        child.expect_exact("$ echo MARKER 2")
        assert not rig.alerts("marker") and "console" in reader_rows(rig)

        # 3. A bot starts again: it takes the feed from the console at its first poll, before the lease runs out.
        rig.start_bot()
        child.expect_exact(TO_SLACK, timeout=30)
        rig.ingest("m1", [alarm(3, "TWICE")])
        rig.fake.wait_for(lambda: rig.alerts("twice"), 30, what="the twice alert in Slack")
        assert "audit rule *twice*" not in console_lines(child)
        assert not rig.alerts("marker")  # what the console showed is not posted again
        assert "taking the audit feed over from console:" in rig.bot.log()
        holder = rig.rows("SELECT holder FROM bot_lease WHERE name = ?", LEASE)[0][0]
        assert holder.startswith("slack:") and holder.split(":")[2] == str(rig.bot.proc.pid if rig.bot.proc else "")
        assert sorted(command for _, command in rig.stored()) == ["echo ALARM 1", "echo MARKER 2", "echo TWICE 3"]
        text = child.logfile_read.text
        assert text.count(TAKEN) == 1 and text.count(TO_SLACK) == 2  # once per change, not once per poll
    assert "Traceback" not in child.logfile_read.text


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["chat", "console"])
def test_only_a_console_with_a_chat_key_pulls_the_audit(tmp_path: Path, kind: str) -> None:
    """With no bot, a console speaking with a chat key (the demo's) pulls and prints the alert. One with
    a `console` key (`ombot init`'s, for production), which masters refuse `audit_read`, does not try
    (it logs why, once): no note of who pulls, no alert, no lease, nothing stored."""
    clients = {**AGENT_CLIENTS, "console": kind}
    settings = {"console_user": "U0DEMO"} if kind == "chat" else {}
    cluster = with_agent_hosts(Cluster(tmp_path / "site", {"local": ["m1"]}, clients=clients, extra_toml=bot_table(
        audit_rules="audit-rules.toml", audit_poll_seconds=0.2, **settings)))
    (cluster.root / "audit-rules.toml").write_text(ALERT_RULES)
    cluster.start("m1")
    try:
        with running_console(cluster) as child:
            child.expect_exact("OMBot console: you are ")
            if kind == "chat":
                child.expect_exact(TAKEN)  # said once, when its first poll took the feed
            assert ingest(cluster, "m1", [alarm(1, "ALARM")])["stored"] == 1
            if kind == "chat":
                child.expect_exact("[audit alert #1] :warning: *warning* \u00b7 audit rule *alarm* on `web01` in `local`")
            text = console_lines(child)
    finally:
        cluster.stop_all()
    with sqlite3.connect(cluster.root / "state-m1" / "m1.db") as db:
        readers = [reader for reader, in db.execute("SELECT reader FROM auditreader")]
    with sqlite3.connect(cluster.root / "state" / "bot.db") as db:
        events = db.execute("SELECT command FROM bot_audit_event").fetchall()
        holders = db.execute("SELECT holder FROM bot_lease WHERE name = ?", (LEASE,)).fetchall()
    if kind == "chat":
        assert readers == ["console"] and events == [("echo ALARM 1",)]
        assert holders == []  # let go when it quit: a bot starting now takes the feed at once
    else:
        assert "audit:" not in text and "[audit alert" not in text
        assert readers == [] and events == [] and holders == []  # it never asked, stored or leased


@pytest.mark.slow
def test_a_console_reading_a_pipe_leaves_the_audit_alone(tmp_path: Path) -> None:
    """A script's console (`ombot console < commands`) has nobody to show alerts to: with a chat key
    and no bot, it still does not pull, so the events wait for a console in a terminal, or a bot."""
    cluster = with_agent_hosts(Cluster(tmp_path / "site", {"local": ["m1"]}, clients=dict(AGENT_CLIENTS),
                                       extra_toml=bot_table(audit_rules="audit-rules.toml", audit_poll_seconds=0.2,
                                                            console_user="U0DEMO")))
    (cluster.root / "audit-rules.toml").write_text(ALERT_RULES)
    cluster.start("m1")
    try:
        assert ingest(cluster, "m1", [alarm(1, "ALARM")])["stored"] == 1
        proc = subprocess.Popen([sys.executable, "-m", "ombot", "--config", str(cluster.config_path), "console"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=child_env())
        assert proc.stdin is not None
        proc.stdin.write("/om echo localhost message=piped\n")
        proc.stdin.flush()
        time.sleep(2 * QUIET)  # ten of its polls, had it pulled
        out, _ = proc.communicate("/quit\n", timeout=60)
    finally:
        cluster.stop_all()
    assert proc.returncode == 0 and "Starting job #1" in out, out
    assert "audit" not in out, out
    with sqlite3.connect(cluster.root / "state-m1" / "m1.db") as db:
        assert db.execute("SELECT reader FROM auditreader").fetchall() == []


# -- the quickstart, as written ---------------------------------------------------------------------------


def quickstart_blocks() -> list[tuple[str, str]]:
    """(language, text) of each fenced block of docs/audit.md's quickstart, in order."""
    text = (REPO / "docs" / "audit.md").read_text()
    start = text.index(QUICKSTART)
    section = text[start:text.index("\n## ", start + 1)]
    return re.findall(r"^```(\w*)\n(.*?)^```$", section, re.S | re.M)


def shell_commands(block: str) -> list[str]:
    """A sh block's commands: its lines, with backslash continuations joined."""
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]


@pytest.mark.slow
def test_the_quickstart_runs_as_written(tmp_path: Path) -> None:
    """docs/audit.md's quickstart, its commands taken from the page: terminal 1 `./dev up` (the venv's
    `ombot up`, as `./dev up` execs it, on a free port), terminal 2 the enrolment, the hook under the
    demo directory and the agent, terminal 3 the hooked bash and the command; then the alert text the
    page shows appears in the console, and `/om audit` as the page types it finds the event."""
    blocks = quickstart_blocks()
    sh = [text for lang, text in blocks if lang == "sh"]
    assert len(sh) == 3 and sh[0].strip() == "./dev up", blocks
    agent_steps, shell_steps = shell_commands(sh[1]), shell_commands(sh[2])
    assert agent_steps[-1].startswith(".venv/bin/ombot audit-agent run "), agent_steps
    shown = next(text for lang, text in blocks if lang == "text" and "[audit alert #1]" in text)

    clone = tmp_path / "clone"  # the clone's root as the page's commands see it: .venv/ and, once up, demo/
    clone.mkdir()
    (clone / ".venv").symlink_to(Path(sys.executable).parent.parent)
    env = child_env(TERMINAL_ENV)
    up = pexpect.spawn(str(clone / ".venv" / "bin" / "ombot"), ["up", "--master-port", str(free_port())], env=env,
                       encoding="utf-8", timeout=60, dimensions=(50, 250), cwd=str(clone), echo=False)
    up.logfile_read = ConsoleLog()
    agent: subprocess.Popen[bytes] | None = None
    shell: Shell | None = None
    try:
        up.expect_exact(TAKEN)
        up.expect_exact(SHOWN_PROMPT)
        for step in agent_steps[:-1]:
            done = subprocess.run(["bash", "-ec", step], cwd=clone, env=child_env(), capture_output=True, text=True,
                                  timeout=120)
            assert done.returncode == 0, f"{step}\n{done.stdout}{done.stderr}"
        agent = subprocess.Popen(["bash", "-ec", f"exec {agent_steps[-1]}"], cwd=clone, env=child_env(),
                                 stdout=open(tmp_path / "agent.log", "ab"), stderr=subprocess.STDOUT,
                                 start_new_session=True)
        command = shlex.split(shell_steps[0])
        assert command[:2] == ["bash", "--rcfile"], shell_steps
        # Terminal 3, in the clone's root; every global rc file of the machine covered (tests/shells.py)
        shell = Shell(None, clone, argv=(*command[1:], "-i"), env={"PS1": PROMPT})
        for line in shell_steps[1:]:
            shell.run(line)

        headline = next(line for line in shown.splitlines() if line.startswith("[audit alert #1]"))
        up.expect_exact(headline, timeout=60)
        typed = next(line for line in shown.splitlines() if line.startswith("$ "))
        up.expect_exact(typed)
        for line in shown.splitlines():
            if line.startswith("om> "):
                say(up, line[len("om> "):])
        up.expect_exact("(to U0LEAD1) 1 audit event(s) match grep=curl, newest first:")
        up.expect(r"\d\d:\d\d:\d\dZ local localhost \S+ .*\[0\] " + re.escape(typed))  # where, who, what
        say(up, "/quit")
        up.expect(pexpect.EOF)
    finally:
        if shell is not None and shell.child.isalive():
            shell.child.terminate(force=True)
        if agent is not None and agent.poll() is None:
            os.killpg(agent.pid, signal.SIGTERM)
            agent.wait(timeout=10)
        print(up.logfile_read.text)
        print((tmp_path / "agent.log").read_text(errors="replace") if (tmp_path / "agent.log").exists() else "")
        if up.isalive():
            up.terminate(force=True)
    assert "Traceback" not in up.logfile_read.text
