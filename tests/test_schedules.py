"""Scheduled runs end to end: signed Slack requests to real `ombot bot` processes (HTTP mode), the
fake Slack Web API, and a real master; two bots on one PostgreSQL database for the takeover.

Intervals of a few seconds are allowed here by `[bot] schedule_min_interval_seconds = 1` (the
default is 60). A bot stopped with SIGTERM lets go of the schedules lease and the next one fires at
once; one killed with SIGKILL holds it until it runs out (bot.schedules.service.LEASE_TTL_MS), and the
other takes over then. Every wait is a generous bound, never a measurement.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import peewee
import pexpect
import pytest
from playhouse.migrate import SchemaMigrator
from playhouse.migrate import migrate as run_operations

from ombot.bot import schedules as sched
from ombot.bot import store
from ombot.bot.schedules.render import plain_when
from ombot.bot.settings import BotSettings
from ombot.clock import now_ms
from ombot.errors import CommandError, ConfigError
from ombot.storage import SchemaVersion, connect_url
from tests import rigs
from tests.rigs import Reply, SlackRig, approval, console, console_site, floor, role, rule, say, slack_rig, table
from tests.storage import BACKENDS, scratch
from tests.support import CLI_CLIENT, Cluster, bot_table, child_env

ALICE, LEAD1, LEAD2, MALLORY = "U0ALICE", "U0LEAD1", "U0LEAD2", "U0MALLORY"
ONCALL, AUDITOR = "U0ONCALL", "U0AUDIT"  # a `cancel` role of the shell rule; a `[jobs] viewers` role
TAKEOVER = 40.0  # the lease's 10 s, a renewal, a bot start: generously
DAY_MS = 86_400_000

MASTER_FLOOR = floor("m1")


def policy(leads: str = '"U0LEAD1", "U0LEAD2"', ops: str = '"U0ALICE"') -> str:
    """The suite's policy; `leads` and `ops` are the users of those roles as a TOML list spells its items."""
    def users(items: str) -> list[str]:
        return list(tomllib.loads(f"users = [{items}]")["users"])
    return rigs.policy(
        role("ops", *users(ops)), role("leads", *users(leads)), role("oncall", ONCALL), role("auditors", AUDITOR),
        table("jobs", viewers=["auditors"]),
        rule("db hosts are for nobody", modules=["echo"], targets=["db*"], request=[]),
        rule("shell needs a lead", modules=["shell.exec"], targets=["localhost"], request=["ops"], approval=approval(),
             cancel=["oncall"]),
        rule("shell on web needs a lead", modules=["shell.exec"], targets=["web*"], request=["ops"],
             approval=approval()),
        rule("everyday", modules=["echo", "test.sleep"], targets=["web*", "localhost"], request=["ops"]))


class Rig(SlackRig):
    """The rig, with schedules in mind: each test keeps to its own channel, answers come on the schedule's
    time (so they are waited for longer), and `bots` may be two on one database."""

    reply_wait = 30.0

    def command(self, text: str, channel: str, user: str = ALICE, bot: int = 0) -> Reply:  # type: ignore[override]
        return super().command(text, user, channel, port=list(self.bots)[bot])

    def schedule(self, text: str, channel: str) -> int:
        return self.command(f"schedule {text}", channel).number("Schedule #")

    def cards(self, channel: str, schedule: int) -> list[dict[str, Any]]:  # type: ignore[override]
        return [m for m in self.fake.messages(channel)
                if m.get("text", "").startswith("[#") and f"schedule #{schedule} (" in m["text"]]

    def wait_cards(self, channel: str, schedule: int, count: int, timeout: float = 30) -> list[dict[str, Any]]:
        return self.fake.wait_for(lambda: (lambda c: c if len(c) >= count else None)(self.cards(channel, schedule)),
                                  timeout, what=f"{count} cards of schedule #{schedule}")

    def settle(self, schedule: int) -> None:
        """Wait until every run the schedule claimed has posted its card: a run claimed just before a
        pause, a delete or a policy change stores its job and posts its card moments later."""
        unposted = ("SELECT count(*) FROM bot_schedule_run r LEFT JOIN bot_job j ON j.job_id = r.job_id "
                    "WHERE r.schedule = ? AND j.card_ts IS NULL")
        self.fake.wait_for(lambda: self.rows(unposted, schedule)[0][0] == 0, 30,
                           what=f"a card for every run schedule #{schedule} claimed")

    def said(self, channel: str, needle: str, timeout: float = 30) -> dict[str, Any]:
        return self.posted(channel, needle, timeout, replies=False)

    def approval(self, channel: str, schedule: int, state: str = "pending") -> dict[str, Any]:
        shape = re.compile(rf"^\[approval #\d+ {state}\] .* on schedule #{schedule} \(")
        return self.fake.wait_for(lambda: next((m for m in reversed(self.fake.messages(channel))
                                                if shape.match(m.get("text", ""))), None),
                                  30, what=f"a {state} approval of schedule #{schedule}")

    def approve(self, message: dict[str, Any], user: str, channel: str) -> Reply:
        buttons = next(b for b in message["blocks"] if b["type"] == "actions")["elements"]
        return self.click("om_approve", buttons[0]["value"], message["ts"], user, channel)

    def state_of(self, schedule: int) -> str:
        return str(self.rows("SELECT state FROM bot_schedule WHERE number = ?", schedule)[0][0])

    def master_hosts(self) -> list[list[str]]:
        """The host list of every job the master accepted."""
        return [json.loads(row[0]) for row in self.master_rows("m1", "SELECT hosts FROM job")]

    def master_jobs(self) -> list[str]:
        return [row[0] for row in self.master_rows("m1", "SELECT id FROM job")]

    def cli_schedules(self, admin: bool) -> str:
        """`ombot schedules` with the cluster's CLI key (`cli:test`, in no role), or that key made an admin."""
        config = self.cluster.config_path
        if admin:
            config = config.with_name("ombot-admin.toml")
            config.write_text(self.cluster.config_path.read_text().replace(
                f'[clients.{CLI_CLIENT}]\nkind = "cli"\n', f'[clients.{CLI_CLIENT}]\nkind = "cli"\nadmin = true\n'))
        done = subprocess.run([sys.executable, "-m", "ombot", "--config", str(config), "schedules"],
                              capture_output=True, text=True, timeout=60, env=child_env())
        assert done.returncode == 0, done.stderr
        return done.stdout

    restart = SlackRig.restart_bot


def site(grace: int = 5, **settings: Any) -> dict[str, Any]:
    """slack_rig's keywords for this suite's site: its policy and floor, schedules allowed every second."""
    return {"kind": Rig, "policy": policy(), "extra_toml": MASTER_FLOOR, "schedule_min_interval_seconds": 1,
            "misfire_grace_seconds": grace, **settings}


def run_id(rig: Rig, number: int, at: int) -> str:
    """The job id of schedule `number`'s run due `at`: derived from the two, as the bot derives it."""
    [(schedule_id,)] = rig.rows("SELECT schedule_id FROM bot_schedule WHERE number = ?", number)
    return str(uuid.uuid5(sched.RUN_NAMESPACE, f"{schedule_id}@{at}"))


@pytest.fixture(scope="module")
def shared(make_module_slack_rig) -> Rig:
    return make_module_slack_rig(**site())


@pytest.fixture
def rig(shared: Rig) -> Iterator[Rig]:
    yield shared
    shared.fake.assert_no_violations()


# -- timing and words, no processes -----------------------------------------------------------------


def test_timing_is_read_by_apscheduler_and_bad_timings_are_explained() -> None:
    assert sched.parse_timing("every 15m").interval == 900
    assert sched.parse_timing("*/5  * * * *").text == "*/5 * * * *"
    for bad, needle in [("every 15", "every N"), ("every 0s", "too often"), ("every 5s", "too often"),
                        ("*/5 * * *", "five fields"), ("61 * * * *", "cannot read the cron line"),
                        ("every 1x", "every N")]:
        with pytest.raises(CommandError, match=needle):
            sched.parse_timing(bad, min_interval=60)
    cron = sched.parse_timing("0 3 * * *").trigger(0)
    day = 86_400_000
    times, total = sched.fire_times(cron, 0, 3 * day)
    assert times == [3 * 3_600_000, day + 3 * 3_600_000, 2 * day + 3 * 3_600_000] and total == 3
    every = sched.parse_timing("every 2s").trigger(1_000)
    assert sched.fire_times(every, 1_000, 7_500)[0] == [3_000, 5_000, 7_000]


def test_schedule_words() -> None:
    words = sched.schedule_words(["*/5 * * * *", "run", "echo", "web01", "message=hi", "idc=local"])
    assert words["timing"] == "*/5 * * * *" and words["run"].module == "echo" and words["run"].idc == "local"
    assert sched.schedule_words(["every", "15m", "run", "echo", "web01"])["timing"] == "every 15m"
    assert sched.schedule_words(["pause", "3"]) == {"action": "pause", "ref": "3", "timing": None, "run": None}
    for bad in ([], ["pause"], ["every", "15m", "echo"], ["run", "echo"], ["every", "15m", "run"]):
        with pytest.raises(CommandError):
            sched.schedule_words(bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_schedule_tables_and_the_run_claim_on_every_database(backend: str, tmp_path: Path) -> None:
    """The tables migrate on SQLite, MariaDB and PostgreSQL; a run is claimed once, and a run row
    with the same (schedule, time) is refused."""
    with scratch(backend, tmp_path) as url:
        db = store.open_store(url)
        try:
            sched.prepare()
            sched.prepare()  # idempotent
            now = now_ms()
            row = sched.Schedule.create(
                schedule_id="s-1", requester=ALICE, origin="slack", channel="C0X", idc="local", module="echo",
                params={"message": "hi"}, targets="web01", hosts=["web01"], timing="every 1m", state=sched.ACTIVE,
                anchor_at=now, last_fire_at=now, created_at=now)
            runner = sched.Schedules.__new__(sched.Schedules)  # only the claim, which needs no collaborators
            run = sched.ScheduleRun(job_id="j-1", schedule=row.number, scheduled_at=now + 60_000, fired_at=now,
                                    label="x")
            assert runner._claim(row, now + 60_000, run=run)
            assert not runner._claim(row, now + 60_000)  # the same snapshot loses: it was taken
            assert sched.schedule_label("j-1") == "x"
            with pytest.raises(peewee.IntegrityError):
                sched.ScheduleRun.create(job_id="j-2", schedule=row.number, scheduled_at=now + 60_000,
                                         fired_at=now, label="y")
            # a table from version 1, before pauses recorded their pauser, gains the columns
            migrator = SchemaMigrator.from_database(db)
            run_operations(migrator.drop_column("bot_schedule", "paused_by"),
                           migrator.drop_column("bot_schedule", "paused_authority"))
            with db.bind_ctx([SchemaVersion]):
                SchemaVersion.update(version=1).where(SchemaVersion.component == "schedules").execute()
            sched.prepare()
            sched.Schedule.update(paused_by=LEAD1, paused_authority=3).where(
                sched.Schedule.number == row.number).execute()
            kept = sched.Schedule.get_by_id(row.number)
            assert (kept.paused_by, kept.paused_authority, kept.last_job_id) == (LEAD1, 3, "j-1")
        finally:
            db.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_job_history_shows_each_viewer_what_the_policy_lets_them_see_on_every_database(backend: str,
                                                                                       tmp_path: Path) -> None:
    """The SQL narrowing of `/om jobs` keeps every job the rule (Viewer.sees) allows and the rule drops
    the rest, with LIKE's wildcards and JSON's escapes in ids and role names taken literally."""
    from ombot.approvals import Viewer
    from ombot.bot.jobs import JobFilter, history

    odd_role = 'on%call_\\"x'  # a role name with LIKE wildcards, a backslash and a quote
    jobs = {"own": ("U0A_B", [], []), "approved": ("U0OTHER", ["U0A_B"], []), "role": ("U0OTHER", [], [odd_role]),
            "lookalike": ("U0AXB", ["U0AXB"], ["on%callX\\\"x", "oncall"]), "none": ("U0OTHER", ["U0LEAD"], ["ops"])}
    with scratch(backend, tmp_path) as url:
        db = store.open_store(url)
        try:
            for name, (requester, approvers, roles) in jobs.items():
                store.BotJob.create(job_id=name, requester=requester, origin="slack", channel="C0X", idc="local",
                                    module="echo", params={}, host_count=1, hosts=["web01"], state="ok",
                                    approvers=approvers, cancel_roles=roles, created_at=now_ms())

            def seen(viewer: Viewer) -> set[str]:
                return {j.job_id for j in history(JobFilter(), viewer.user, 50, viewer)}

            assert seen(Viewer("U0A_B", frozenset({odd_role}))) == {"own", "approved", "role"}
            assert seen(Viewer("U0NOBODY")) == set()
            assert seen(Viewer("U0NOBODY", everything=True)) == set(jobs)
            assert {j.job_id for j in history(JobFilter(), "U0A_B", 50)} == set(jobs)  # no viewer: unfiltered
        finally:
            db.close()


def test_schedule_settings_default_and_are_read(make_cluster: Callable[..., Cluster]) -> None:
    defaults = BotSettings.from_config(make_cluster(extra_toml=bot_table()).config())
    assert (defaults.schedule_approval_days, defaults.misfire_grace_seconds,
            defaults.schedule_min_interval_seconds) == (30, 300, 60)
    table = bot_table(schedule_approval_days=2, misfire_grace_seconds=9, schedule_min_interval_seconds=5)
    assert BotSettings.from_config(make_cluster(extra_toml=table).config()).misfire_grace_seconds == 9
    for key in ("schedule_approval_days", "misfire_grace_seconds", "schedule_min_interval_seconds"):
        with pytest.raises(ConfigError, match=key):
            BotSettings.from_config(make_cluster(extra_toml=bot_table(**{key: 0})).config())


# -- through the bot --------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_schedule_fires_cards_naming_it_and_survives_a_restart(rig: Rig) -> None:
    channel = "C0FIRE"
    number = rig.schedule("every 2s run echo localhost message=tick", channel)
    cards = rig.wait_cards(channel, number, 2)
    assert all("echo on 1 host(s) in local by U0ALICE" in c["text"] for c in cards)
    assert rig.fake.wait_for(lambda: all(" ok]" in c["text"].split("\n")[0] for c in rig.cards(channel, number)[:2]),
                             what="the first runs to end ok")
    assert not [e for e in rig.fake.ephemerals if "Starting job" in e.get("text", "")]  # each card says it
    listing = rig.command("schedules", channel).wait(f"#{number} active")
    assert "every 2s (UTC): `echo` on localhost (1 host(s)) in local message=tick" in listing
    assert f"#{number} active   every 2s (UTC): `echo` on localhost" in rig.cli_schedules(admin=True)

    rig.restart()  # restored from the table; the new bot takes over the lease, then fires again
    before = len(rig.cards(channel, number))
    rig.wait_cards(channel, number, before + 2, timeout=TAKEOVER)
    # every run's job id is derived from (schedule, fire time), and the master ran each once
    runs = rig.rows("SELECT job_id, scheduled_at FROM bot_schedule_run WHERE schedule = ?", number)
    assert [job for job, _ in runs] == [run_id(rig, number, at) for _, at in runs]
    claimed = {job for job, _ in runs}  # the newest may still be on its way to the master
    assert rig.fake.wait_for(lambda: claimed <= set(rig.master_jobs()), what="every claimed run at the master")

    rig.command(f"schedule delete {number}", channel).wait(f"Deleted schedule #{number}")
    rig.settle(number)
    settled = len(rig.cards(channel, number))
    time.sleep(5)
    assert len(rig.cards(channel, number)) == settled and rig.state_of(number) == "deleted"
    assert f"#{number} " not in rig.command("schedules", channel).wait("")


@pytest.mark.slow
def test_pause_and_resume(rig: Rig) -> None:
    channel = "C0PAUSE"
    number = rig.schedule("every 2s run echo web01 message=p", channel)
    rig.wait_cards(channel, number, 1)
    rig.command(f"schedule pause {number}", channel, user=MALLORY).wait("Refused: only its requester")
    rig.command(f"schedule pause {number}", channel).wait(f"Paused schedule #{number}")
    rig.settle(number)
    paused = len(rig.cards(channel, number))
    time.sleep(5)
    assert len(rig.cards(channel, number)) == paused and rig.state_of(number) == "paused"
    assert "paused by <@U0ALICE>" in rig.command("schedules", channel).wait(f"#{number} paused")
    rig.command(f"schedule resume {number}", channel).wait(f"Resumed schedule #{number}")
    rig.wait_cards(channel, number, paused + 1)
    rig.command(f"schedule delete {number}", channel).wait("Deleted")
    rig.command("schedule pause 99999", channel).wait("No schedule '99999'")


def runs_of(rig: Rig, number: int) -> int:
    """How many runs schedule `number` has claimed: each is a job sent to the master."""
    return int(rig.rows("SELECT count(*) FROM bot_schedule_run WHERE schedule = ?", number)[0][0])


def assert_still(rig: Rig, channel: str, number: int, seconds: float = 5) -> None:
    """Several firings pass and none runs: no card, no claimed run."""
    rig.settle(number)
    cards, runs = len(rig.cards(channel, number)), runs_of(rig, number)
    time.sleep(seconds)
    assert (len(rig.cards(channel, number)), runs_of(rig, number)) == (cards, runs)


@pytest.mark.slow
def test_a_leads_pause_holds_until_a_fresh_approval_or_a_lead_lifts_it(rig: Rig) -> None:
    """A lead pauses an approved shell.exec schedule: neither its requester nor a `cancel` role can
    start it again alone (each gets a fresh approval request, in the requester's name), a denial
    keeps it held, and a lead's approval or a lead's resume lifts it."""
    channel = "C0HOLD"
    rig.command('schedule every 2s run shell.exec localhost cmd="echo held"', channel).wait("Waiting as request #")
    [(number,)] = rig.rows("SELECT number FROM bot_schedule WHERE channel = ?", channel)
    rig.approve(rig.approval(channel, number), LEAD1, channel).wait("is active now")
    rig.wait_cards(channel, number, 1)
    rig.command(f"schedule pause {number}", channel, user=LEAD1).wait(f"Paused schedule #{number}")
    listing = rig.command("schedules", channel).wait(f"#{number} paused")
    assert f"paused by <@{LEAD1}>, an approver (a member of its approval roles)" in listing
    assert rig.rows("SELECT paused_by, paused_authority FROM bot_schedule WHERE number = ?", number) == [(LEAD1, 3)]
    assert_still(rig, channel, number, 3)

    # a `cancel` role may resume only through a fresh approval, asked in the requester's name
    reply = rig.command(f"schedule resume {number}", channel, user=ONCALL).wait("needs a fresh approval")
    assert f"<@{LEAD1}> paused it as an approver" in reply
    first = int(re.search(r"asked as request #(\d+)", reply).group(1))
    assert rig.rows("SELECT requester, state FROM approval_request WHERE number = ?", first) == [(ALICE, "pending")]
    assert rig.state_of(number) == "awaiting"
    assert_still(rig, channel, number)
    rig.command(f"deny {first} not yet", channel, user=LEAD1).wait(f"Denied request #{first}")
    rig.said(channel, f"Schedule #{number} is paused: its approval request #{first} was denied")

    # the requester alone cannot undo it either, though the first approval is still good for 30 days
    reply = rig.command(f"schedule resume {number}", channel).wait("needs a fresh approval")
    second = int(re.search(r"asked as request #(\d+)", reply).group(1))
    assert rig.state_of(number) == "awaiting"
    # pausing it again meanwhile does not make the hold the requester's own
    rig.command(f"schedule pause {number}", channel).wait(f"Paused schedule #{number}")
    assert rig.rows("SELECT paused_by FROM bot_schedule WHERE number = ?", number) == [(LEAD1,)]
    third = rig.command(f"schedule resume {number}", channel).number("asked as request #")
    # the request it replaces is withdrawn: approving it would start the command once as a plain job
    assert rig.rows("SELECT state FROM approval_request WHERE number = ?", second) == [("withdrawn",)]
    rig.command(f"approve {second}", channel, user=LEAD1).wait("it was withdrawn")
    assert_still(rig, channel, number)
    assert rig.state_of(number) == "awaiting"

    # a lead's approval lifts the hold: it runs again
    rig.command(f"approve {third}", channel, user=LEAD2).wait("is active now")
    runs = runs_of(rig, number)
    rig.fake.wait_for(lambda: runs_of(rig, number) > runs, what="a run after the fresh approval")
    assert rig.rows("SELECT state, paused_by, paused_authority FROM bot_schedule WHERE number = ?",
                    number) == [("active", None, None)]

    # more say lifts a pause at once: a `cancel` role resumes what its requester paused
    rig.command(f"schedule pause {number}", channel).wait(f"Paused schedule #{number}")
    rig.command(f"schedule resume {number}", channel, user=ONCALL).wait(f"Resumed schedule #{number}")
    runs = runs_of(rig, number)
    rig.fake.wait_for(lambda: runs_of(rig, number) > runs, what="a run after the `cancel` role resumed it")

    # a pause by more say takes the hold over; the same say cannot pause it twice
    rig.command(f"schedule pause {number}", channel).wait(f"Paused schedule #{number}")
    rig.command(f"schedule pause {number}", channel, user=ONCALL).wait(f"Paused schedule #{number}")
    rig.command(f"schedule pause {number}", channel, user=ONCALL).wait("is already paused")
    assert rig.rows("SELECT paused_by, paused_authority FROM bot_schedule WHERE number = ?", number) == [(ONCALL, 2)]
    rig.command(f"schedule resume {number}", channel).wait("needs a fresh approval")
    rig.command(f"schedule pause {number}", channel, user=LEAD2).wait(f"Paused schedule #{number}")
    assert rig.rows("SELECT paused_by, paused_authority FROM bot_schedule WHERE number = ?", number) == [(LEAD2, 3)]
    rig.command(f"schedule resume {number}", channel, user=LEAD2).wait(f"Resumed schedule #{number}")
    runs = runs_of(rig, number)
    rig.fake.wait_for(lambda: runs_of(rig, number) > runs, what="a run after the lead resumed it")
    rig.command(f"schedule delete {number}", channel).wait("Deleted")


@pytest.mark.slow
def test_a_pause_of_a_schedule_that_needs_no_approval_holds_against_less_say(rig: Rig) -> None:
    """No approval can lift it: the requester is refused, naming who paused it; the pauser may resume."""
    channel = "C0HOLDPLAIN"
    number = rig.schedule("every 2s run echo web01 message=held", channel)
    rig.wait_cards(channel, number, 1)
    with sqlite3.connect(rig.cluster.root / "state" / "bot.db", timeout=10) as conn:  # as if a `cancel` role
        conn.execute("UPDATE bot_schedule SET cancel_roles = '[\"oncall\"]' WHERE number = ?", (number,))
    rig.command(f"schedule pause {number}", channel, user=ONCALL).wait(f"Paused schedule #{number}")
    rig.command(f"schedule resume {number}", channel).wait(
        f"Refused: <@{ONCALL}> paused it as a canceller (one of its approvers or a `cancel` role): only they, or "
        f"someone with as much say over schedule #{number}, may resume it")
    assert rig.state_of(number) == "paused"
    assert_still(rig, channel, number, 3)
    rig.command(f"schedule resume {number}", channel, user=ONCALL).wait(f"Resumed schedule #{number}")
    rig.wait_cards(channel, number, len(rig.cards(channel, number)) + 1)
    rig.command(f"schedule delete {number}", channel).wait("Deleted")


@pytest.mark.slow
def test_jobs_and_schedules_are_shown_only_to_those_the_policy_names(rig: Rig) -> None:
    """Requesters, approvers, `cancel` roles and `[jobs] viewers` see a job or schedule; a user with
    no role sees nothing of others' in `/om schedules`, `/om jobs` or `/om status`; the CLI's key sees
    what its identity may, and everything when it is an admin key."""
    channel = "C0SEE"
    rig.command('schedule every 2s run shell.exec localhost cmd="echo seen"', channel).wait("Waiting as request #")
    [(shell,)] = rig.rows("SELECT number FROM bot_schedule WHERE channel = ?", channel)
    rig.approve(rig.approval(channel, shell), LEAD1, channel).wait("is active now")
    rig.wait_cards(channel, shell, 1)
    rig.command(f"schedule pause {shell}", channel).wait(f"Paused schedule #{shell}")
    plain = rig.schedule("every 2s run echo localhost message=seen", channel)
    rig.wait_cards(channel, plain, 1)
    rig.command(f"schedule pause {plain}", channel).wait(f"Paused schedule #{plain}")
    rig.settle(shell)
    rig.settle(plain)

    def jobs_of(number: int) -> set[int]:
        return {row[0] for row in rig.rows("SELECT number FROM bot_job WHERE job_id IN "
                                           "(SELECT job_id FROM bot_schedule_run WHERE schedule = ?)", number)}

    plain_jobs, shell_jobs = jobs_of(plain), jobs_of(shell)
    assert plain_jobs and shell_jobs

    def listed(user: str, command: str) -> set[int]:
        text = rig.command(command, channel, user=user).first()
        return {int(n) for n in re.findall(r"^#(\d+) ", text, re.M)}

    sees = {user: (listed(user, "schedules") & {plain, shell}, listed(user, "jobs") & (plain_jobs | shell_jobs))
            for user in (ALICE, LEAD1, LEAD2, ONCALL, AUDITOR, MALLORY)}
    assert sees == {
        ALICE: ({plain, shell}, plain_jobs | shell_jobs),  # the requester
        LEAD1: ({shell}, shell_jobs),  # its approver
        LEAD2: (set(), set()),  # a lead who approved neither
        ONCALL: ({shell}, shell_jobs),  # the `cancel` role of the shell rule
        AUDITOR: ({plain, shell}, plain_jobs | shell_jobs),  # `[jobs] viewers`
        MALLORY: (set(), set()),  # no role at all
    }
    assert rig.command("schedules", channel, user=MALLORY).first() == "No schedules that you may see."
    assert rig.command("jobs", channel, user=MALLORY).first() == "No jobs that you may see yet."
    assert rig.command("jobs module=echo", channel, user=MALLORY).first() == "No jobs that you may see match."
    job = min(plain_jobs)
    rig.command(f"status {job}", channel, user=MALLORY).wait(f"Refused: job #{job} is not yours to see")
    rig.command(f"status {job}", channel, user=LEAD1).wait(f"Refused: job #{job} is not yours to see")
    rig.command(f"status {min(shell_jobs)}", channel, user=LEAD1).wait(f"#{min(shell_jobs)} `shell.exec`")
    rig.command(f"status {job}", channel, user=AUDITOR).wait(f"#{job} `echo` on 1 host(s)")

    # pending approval requests: the same rule, and the roles asked to approve one see it too
    pending = rig.command('shell.exec localhost cmd="echo pending"', channel).number("Waiting as request #")
    shown = {user: f"#{pending} `shell.exec`" in rig.command("approvals", channel, user=user).first()
             for user in (ALICE, LEAD2, ONCALL, AUDITOR, MALLORY)}
    assert shown == {ALICE: True, LEAD2: True, ONCALL: True, AUDITOR: True, MALLORY: False}
    assert rig.command("approvals", channel, user=MALLORY).first() == "No pending approval requests that you may see."
    rig.command(f"deny {pending} not now", channel, user=LEAD1).wait(f"Denied request #{pending}")

    # the CLI: `cli:test` holds no role, an admin key sees every schedule
    assert not re.search(rf"^#({plain}|{shell}) ", rig.cli_schedules(admin=False), re.M)
    admin = rig.cli_schedules(admin=True)
    assert f"#{plain} paused" in admin and f"#{shell} paused" in admin
    for number in (plain, shell):
        rig.command(f"schedule delete {number}", channel).wait("Deleted")


@pytest.mark.slow
def test_creation_is_refused_without_permission_and_bad_words_are_explained(rig: Rig) -> None:
    channel = "C0REFUSE"
    rig.command("schedule every 1m run echo localhost message=x", channel, user=MALLORY).wait(
        "Refused: you hold no role")
    rig.command("schedule every 1m run echo db01 message=x", channel).wait(
        "Refused: rule `db hosts are for nobody`")
    rig.command("schedule every 1m run echo localhost", channel).wait("missing: message")
    rig.command("schedule every 1m run nosuch localhost", channel).wait("No module `nosuch`")
    rig.command('schedule "61 * * * *" run echo localhost message=x', channel).wait("cannot read the cron line")
    rig.command("schedule every 1m echo localhost", channel).wait("a schedule says what to run")
    assert rig.rows("SELECT count(*) FROM bot_schedule WHERE channel = ?", channel) == [(0,)]


@pytest.mark.slow
def test_a_run_in_flight_makes_the_next_firings_skip_and_the_next_card_counts_them(rig: Rig) -> None:
    channel = "C0BUSY"
    number = rig.schedule("every 1s run test.sleep localhost seconds=3", channel)
    cards = rig.wait_cards(channel, number, 2)
    rig.command(f"schedule delete {number}", channel).wait("Deleted")
    second = cards[1]["text"]
    skipped = int(re.search(r"(\d+) run\(s\) skipped while the previous one was still running", second).group(1))
    assert skipped >= 1
    # never two at once: each run started after the one before it ended
    jobs = rig.rows("SELECT created_at, finished_at FROM bot_job WHERE job_id IN "
                    "(SELECT job_id FROM bot_schedule_run WHERE schedule = ?) ORDER BY created_at", number)
    for (_, ended), (started, _) in zip(jobs, jobs[1:]):
        assert ended is not None and started >= ended


@pytest.mark.slow
def test_missed_runs_coalesce_within_the_grace_and_older_ones_are_skipped(rig: Rig) -> None:
    channel = "C0MISS"
    number = rig.schedule("every 2s run echo localhost message=m", channel)
    rig.wait_cards(channel, number, 1)

    def away() -> None:
        time.sleep(8)

    rig.restart(between=away)  # down 8 s and a start: misfire_grace is 5 s here
    card = rig.fake.wait_for(lambda: next((c for c in rig.cards(channel, number) if "missed run(s)" in c["text"]),
                                          None), TAKEOVER, what="a card after the missed runs")
    missed = int(re.search(r"(\d+) missed run\(s\) coalesced into this one", card["text"]).group(1))
    too_old = int(re.search(r"(\d+) missed run\(s\) older than misfire_grace skipped", card["text"]).group(1))
    assert missed >= 1 and too_old >= 1
    rig.command(f"schedule delete {number}", channel).wait("Deleted")
    # one run for all of them: no fire time between the run before and this one ran on its own
    [(due,)] = rig.rows("SELECT scheduled_at FROM bot_schedule_run JOIN bot_job USING (job_id) WHERE number = ?",
                        int(re.match(r"\[#(\d+) ", card["text"]).group(1)))
    [(before,)] = rig.rows("SELECT max(scheduled_at) FROM bot_schedule_run WHERE schedule = ? AND scheduled_at < ?",
                           number, due)
    between = range(before + 2000, due, 2000)
    busy = re.search(r"(\d+) run\(s\) skipped while", card["text"])  # a firing as the old bot stopped
    assert len(between) == missed + too_old + (int(busy.group(1)) if busy else 0)
    never = {run_id(rig, number, at) for at in between}
    assert not never & set(rig.master_jobs())
    assert rig.rows("SELECT count(*) FROM bot_schedule_run WHERE scheduled_at > ? AND scheduled_at < ? "
                    "AND schedule = ?", before, due, number) == [(0,)]


def claim_without_a_job(rig: Rig, number: int, job_id: str, at: int) -> None:
    """What a bot killed between claiming the run due `at` and storing its job leaves behind."""
    lease = "SELECT count(*) FROM bot_lease WHERE name = 'schedules:slack' AND expires_at >= ?"
    rig.fake.wait_for(lambda: rig.rows(lease, now_ms()) == [(0,)], TAKEOVER, what="the old bot's lease to end")
    with sqlite3.connect(rig.cluster.root / "state" / "bot.db", timeout=10) as conn:
        conn.execute("INSERT INTO bot_schedule_run (job_id, schedule, scheduled_at, fired_at, label) "
                     "VALUES (?, ?, ?, ?, ?)", (job_id, number, at, now_ms(), f"schedule #{number} (claimed)"))
        conn.execute("UPDATE bot_schedule SET last_job_id = ?, last_fire_at = ? WHERE number = ?",
                     (job_id, at, number))


@pytest.mark.slow
def test_a_run_claimed_by_a_bot_that_died_before_starting_it_is_started_by_the_next(rig: Rig) -> None:
    channel = "C0ORPHAN"
    number = rig.schedule("every 1h run echo localhost message=orphan", channel)
    job_id = str(uuid.uuid4())
    # claimed just now: within misfire_grace when the next bot starts
    rig.restart(between=lambda: claim_without_a_job(rig, number, job_id, now_ms()))
    card = rig.wait_cards(channel, number, 1, timeout=TAKEOVER)[0]
    assert "echo on 1 host(s)" in card["text"]
    assert rig.fake.wait_for(lambda: job_id in rig.master_jobs(), what="the run at the master")
    assert rig.rows("SELECT count(*) FROM bot_job WHERE job_id = ?", job_id) == [(1,)]
    rig.command(f"schedule delete {number}", channel).wait("Deleted")


@pytest.mark.slow
def test_a_claimed_run_too_old_to_start_is_reported_and_holds_up_no_later_run(rig: Rig) -> None:
    """The next bot comes after misfire_grace (5 s here): the run is never started late, the channel
    hears of it, the next card counts it, and the next firing runs at once, though the claim is
    younger than the START_GRACE_MS (60 s) that covers a run its live claimer is still starting."""
    channel = "C0LOST"
    number = rig.schedule("every 2s run echo localhost message=lost", channel)
    rig.wait_cards(channel, number, 1)
    job_id, at = str(uuid.uuid4()), [0]

    def died_after_claiming_then_nobody_ran() -> None:
        [(last,)] = rig.rows("SELECT last_fire_at FROM bot_schedule WHERE number = ?", number)
        at[0] = last + 2000  # the next fire time, claimed by the bot that "died"
        claim_without_a_job(rig, number, job_id, at[0])
        time.sleep(max(0.0, (at[0] - now_ms()) / 1000) + 7)

    rig.restart(between=died_after_claiming_then_nobody_ran)
    rig.said(channel, f"Schedule #{number} skipped its run due {plain_when(at[0])}: the bot that claimed it "
                      "stopped before starting it", 20)
    # the next card comes at once (nothing runs), and counts the lost run with the firings too old to run

    def next_card() -> dict[str, Any] | None:
        due = first_after(rig, number, at[0])
        return next((c for c in rig.cards(channel, number) if due and f"run due {plain_when(due)}" in c["text"]),
                    None)

    card = rig.fake.wait_for(next_card, 20, what="the first card after the lost run")
    latest = first_after(rig, number, at[0])
    assert latest is not None
    text = card["text"]
    assert "still running" not in text
    coalesced = re.search(r"(\d+) missed run\(s\) coalesced", text)
    too_old = int(re.search(r"(\d+) missed run\(s\) older than misfire_grace skipped", text).group(1))
    fired = (latest - at[0]) // 2000  # the fire times after the lost run, up to this one
    # the lost run, and the fire times before this one that were not coalesced into it
    assert too_old == 1 + (fired - 1 - (int(coalesced.group(1)) if coalesced else 0))
    assert job_id not in rig.master_jobs()
    assert rig.rows("SELECT count(*) FROM bot_job WHERE job_id = ?", job_id) == [(0,)]
    rig.command(f"schedule delete {number}", channel).wait("Deleted")


def first_after(rig: Rig, number: int, at: int) -> int | None:
    """The fire time of the first run of schedule `number` after `at`."""
    return rig.rows("SELECT min(scheduled_at) FROM bot_schedule_run WHERE schedule = ? AND scheduled_at > ?",
                    number, at)[0][0]


@pytest.mark.slow
def test_approval_covers_the_schedule_and_a_lost_right_pauses_it(rig: Rig) -> None:
    channel = "C0APPROVE"
    reply = rig.command('schedule every 2s run shell.exec localhost cmd="echo scheduled"', channel)
    assert "needs 1 approval(s) from leads" in reply.wait("Waiting as request #")
    number = rig.rows("SELECT number FROM bot_schedule WHERE channel = ?", channel)[0][0]
    assert rig.state_of(number) == "awaiting"
    time.sleep(3)
    assert rig.cards(channel, number) == []  # nothing runs before the approval
    rig.approve(rig.approval(channel, number), LEAD1, channel).wait(f"schedule #{number} (every 2s, UTC) is active now")
    rig.said(channel, f"Schedule #{number} is active")
    cards = rig.wait_cards(channel, number, 2)
    # the master's own floor wants an approver other than the requester: the envelope carried LEAD1
    assert rig.fake.wait_for(lambda: any(" ok]" in c["text"].split("\n")[0] for c in rig.cards(channel, number)),
                             what="a run that the master let through")
    assert rig.rows("SELECT count(*) FROM approval_request WHERE channel = ?", channel) == [(1,)]  # one approval
    assert len(cards) >= 2

    # LEAD1 is no longer a lead: the schedule pauses and asks again in its channel
    rig.restart(between=lambda: (rig.cluster.root / "policy.toml").write_text(policy(leads='"U0LEAD2"')))
    rig.said(channel, f"Schedule #{number} is paused: approver(s) <@{LEAD1}> may no longer approve it", TAKEOVER)
    asked = rig.approval(channel, number)
    assert rig.state_of(number) == "awaiting"
    rig.approve(asked, LEAD2, channel).wait("is active now")
    active = len(rig.cards(channel, number))
    rig.wait_cards(channel, number, active + 1)

    # the approval covers it for schedule_approval_days: once that has passed, it asks again
    with sqlite3.connect(rig.cluster.root / "state" / "bot.db", timeout=10) as conn:
        conn.execute("UPDATE bot_schedule SET approval_expires_at = ? WHERE number = ?", (now_ms() - 1000, number))
    rig.said(channel, f"Schedule #{number} is paused: its approval ran out")
    rig.approve(rig.approval(channel, number), LEAD2, channel).wait("is active now")
    active = len(rig.cards(channel, number))
    rig.wait_cards(channel, number, active + 1)

    # the requester loses the right: paused, no approval can help
    rig.restart(between=lambda: (rig.cluster.root / "policy.toml").write_text(
        policy(leads='"U0LEAD2"', ops='"U0OTHER"')))
    rig.said(channel, f"Schedule #{number} is paused: <@{ALICE}> may no longer run it", TAKEOVER)
    assert rig.state_of(number) == "paused"
    rig.settle(number)
    settled = len(rig.cards(channel, number))
    time.sleep(4)
    assert len(rig.cards(channel, number)) == settled
    rig.restart(between=lambda: (rig.cluster.root / "policy.toml").write_text(policy()))


def approved_until(rig: Rig, number: int, approve: Callable[[], object]) -> tuple[int, int, int]:
    """Approve schedule `number`: (before, after, the approval_expires_at its row stores)."""
    before = now_ms()
    approve()
    rig.said(rig.rows("SELECT channel FROM bot_schedule WHERE number = ?", number)[0][0],
             f"Schedule #{number} is active: ")  # posted once the row is stored
    after = now_ms()
    [(until,)] = rig.rows("SELECT approval_expires_at FROM bot_schedule WHERE number = ?", number)
    return before, after, until


@pytest.mark.slow
def test_a_rule_that_now_asks_more_approvals_pauses_the_schedule_and_asks_again(rig: Rig) -> None:
    """The rule of an approved schedule asks two approvals now, and one that needed none asks one: both
    pause, ask again in their channel, and run again once approved. An approval covers a schedule for
    `schedule_approval_days`, 30 by default, from when it was approved."""
    channel = "C0MORE"
    rig.command('schedule every 2s run shell.exec localhost cmd="echo more"', channel).wait("Waiting as request #")
    [(shell,)] = rig.rows("SELECT number FROM bot_schedule WHERE channel = ?", channel)
    before, after, until = approved_until(rig, shell, lambda: rig.approve(
        rig.approval(channel, shell), LEAD1, channel).wait("is active now"))
    assert before + 30 * DAY_MS <= until <= after + 30 * DAY_MS
    plain = rig.schedule("every 2s run echo web01 message=more", channel)
    rig.wait_cards(channel, shell, 1)
    rig.wait_cards(channel, plain, 1)

    stricter = (policy().replace('approval = { count = 1, roles = ["leads"] }',
                                 'approval = { count = 2, roles = ["leads"] }', 1)  # "shell needs a lead"
                + 'approval = { count = 1, roles = ["leads"] }\n')  # "everyday" asks one too
    try:
        rig.restart(between=lambda: (rig.cluster.root / "policy.toml").write_text(stricter))
        rig.said(channel, f"Schedule #{shell} is paused: the policy now asks 2 approval(s), it has 1. "
                          "Asking for approval again.", TAKEOVER)
        rig.said(channel, f"Schedule #{plain} is paused: the policy now asks 1 approval(s) for it. "
                          "Asking for approval again.", TAKEOVER)
        asked_shell, asked_plain = rig.approval(channel, shell), rig.approval(channel, plain)
        assert rig.state_of(shell) == rig.state_of(plain) == "awaiting"
        rig.settle(shell)
        rig.settle(plain)
        cards = len(rig.cards(channel, shell)), len(rig.cards(channel, plain))
        time.sleep(4)  # firings pass while they wait: none runs
        assert (len(rig.cards(channel, shell)), len(rig.cards(channel, plain))) == cards

        rig.approve(asked_shell, LEAD1, channel).first()
        time.sleep(3)  # one of two: still waiting
        assert rig.state_of(shell) == "awaiting" and len(rig.cards(channel, shell)) == cards[0]
        rig.approve(rig.approval(channel, shell), LEAD2, channel).wait("is active now")
        rig.approve(asked_plain, LEAD2, channel).wait("is active now")
        rig.wait_cards(channel, shell, cards[0] + 1)
        rig.wait_cards(channel, plain, cards[1] + 1)
        assert json.loads(rig.rows("SELECT approvers FROM bot_schedule WHERE number = ?", shell)[0][0]) == [LEAD1,
                                                                                                              LEAD2]
        assert rig.rows("SELECT count(*) FROM approval_request WHERE channel = ?", channel) == [(3,)]
    finally:
        for number in (shell, plain):
            rig.command(f"schedule delete {number}", channel).wait("Deleted")
        rig.restart(between=lambda: (rig.cluster.root / "policy.toml").write_text(policy()))


@pytest.mark.slow
def test_a_group_that_expands_to_other_hosts_pauses_the_schedule_and_asks_again(tmp_path: Path) -> None:
    """The approvers saw `web` as web01..web03; once the master's inventory says otherwise, nothing runs
    on the new hosts until someone approves them."""
    with slack_rig(tmp_path / "regroup", **site(schedule_approval_days=2)) as rig:
        fake = rig.fake
        channel = "C0REGROUP"
        rig.command('schedule every 2s run shell.exec web cmd="echo regrouped"', channel).wait("Waiting as request #")
        number = rig.rows("SELECT number FROM bot_schedule WHERE channel = ?", channel)[0][0]
        before, after, until = approved_until(rig, number, lambda: rig.approve(
            rig.approval(channel, number), LEAD1, channel).wait("is active now"))
        assert before + 2 * DAY_MS <= until <= after + 2 * DAY_MS  # [bot] schedule_approval_days = 2
        first = ["web01", "web02", "web03"]
        assert rig.fake.wait_for(lambda: any(" ok]" in c["text"].split("\n")[0]
                                             for c in rig.cards(channel, number)), what="an approved run")
        assert {tuple(h) for h in rig.master_hosts()} == {tuple(first)}

        # the group changes at the master: web01 leaves, web04 and web05 join
        master = rig.cluster.processes["m1"]
        master.stop()
        inventory = rig.cluster.root / "inventory.ini"
        inventory.write_text(inventory.read_text().replace(
            "web01 ansible_connection=local\n", "").replace(
            "web03 ansible_connection=local\n",
            "web03 ansible_connection=local\nweb04 ansible_connection=local\nweb05 ansible_connection=local\n"))
        master.start()
        moved = ["web02", "web03", "web04", "web05"]
        rig.said(channel, f"Schedule #{number} is paused: its targets now expand to 4 host(s), not the 3 approved. "
                          "Asking for approval again.", TAKEOVER)
        asked = rig.approval(channel, number)
        assert "web04" in json.dumps(asked["blocks"])
        row = rig.rows("SELECT state, hosts, approval_request FROM bot_schedule WHERE number = ?", number)[0]
        assert row[0] == "awaiting" and sorted(json.loads(row[1])) == moved
        [(request_state, request_hosts)] = rig.rows("SELECT state, hosts FROM approval_request WHERE request_id = ?",
                                                    row[2])
        assert request_state == "pending" and sorted(json.loads(request_hosts)) == moved
        before = len(rig.cards(channel, number))
        time.sleep(5)  # a few firings pass while it waits: none runs
        assert len(rig.cards(channel, number)) == before and rig.state_of(number) == "awaiting"
        assert all(sorted(h) == first for h in rig.master_hosts())  # nothing ran on the new hosts

        rig.approve(asked, LEAD2, channel).wait("is active now")
        card = rig.wait_cards(channel, number, before + 1)[before]
        assert "shell.exec on 4 host(s)" in card["text"]
        assert rig.fake.wait_for(lambda: any(sorted(h) == moved for h in rig.master_hosts()),
                                 what="a run on the new host list at the master")
        assert rig.state_of(number) == "active"
        assert rig.rows("SELECT count(*) FROM approval_request WHERE channel = ?", channel) == [(2,)]
        fake.assert_no_violations()


# -- two bots on one PostgreSQL database ------------------------------------------------------------


@pytest.mark.slow
def test_two_bots_fire_each_run_once_and_one_takes_over_when_the_other_dies(tmp_path: Path) -> None:
    with scratch("postgres", tmp_path) as url, \
            slack_rig(tmp_path / "two", bots=2, env={"OMBOT_BOT_DATABASE_URL": url}, **site()) as rig:
        fake = rig.fake
        db = connect_url(url)
        try:
            channel = "C0TWO"
            number = rig.schedule("every 2s run echo localhost message=both", channel)
            rig.wait_cards(channel, number, 4, timeout=TAKEOVER)

            def holder() -> str:
                row = db.execute_sql("SELECT holder FROM bot_lease WHERE name = 'schedules:slack'").fetchone()
                return str(row[0])

            pid = int(holder().split(":")[1])
            leader = next(b for b in rig.bots.values() if b.proc is not None and b.proc.pid == pid)
            assert leader.proc is not None
            os.killpg(leader.proc.pid, signal.SIGKILL)  # it dies holding the lease, which has to run out
            leader.proc.wait()
            killed_at = now_ms()
            fake.wait_for(lambda: holder().split(":")[1] != str(pid), TAKEOVER, what="another bot to take the lease")
            fake.wait_for(lambda: db.execute_sql("SELECT count(*) FROM bot_schedule_run WHERE fired_at > %s",
                                                 (killed_at,)).fetchone()[0] >= 2, TAKEOVER,
                          what="runs fired by the bot that took over")
            db.execute_sql("UPDATE bot_schedule SET state = 'paused' WHERE number = %s", (number,))

            def in_flight() -> int:  # runs the living bots claimed and have not yet sent to the master
                fired = db.execute_sql("SELECT job_id FROM bot_schedule_run WHERE schedule = %s AND fired_at > %s",
                                       (number, killed_at)).fetchall()
                return len({row[0] for row in fired} - set(rig.master_jobs()))
            fake.wait_for(lambda: in_flight() == 0, TAKEOVER, what="every run of the living bots at the master")

            runs = db.execute_sql("SELECT job_id, scheduled_at FROM bot_schedule_run WHERE schedule = %s",
                                  (number,)).fetchall()
            jobs = {row[0] for row in db.execute_sql("SELECT job_id FROM bot_job").fetchall()}
            at_master = rig.master_jobs()
            assert len(runs) >= 4 and set(at_master) <= jobs <= {job for job, _ in runs}
            # one job at the master per run, never two; the bot killed while starting a run may have lost
            # that one run (claimed, not yet sent), never doubled it
            assert len(runs) - len(at_master) <= 1
            for job, at in runs:
                due = f"run due {plain_when(at)}"
                if job in jobs:  # exactly one card, whichever bot posted or finished it
                    fake.wait_for(lambda: any(due in c["text"] for c in rig.cards(channel, number)), what=due)
                    assert len([c for c in rig.cards(channel, number) if due in c["text"]]) == 1, due
                else:  # claimed, never stored as a job, too old to start by the takeover: the channel hears of it
                    rig.said(channel, f"Schedule #{number} skipped its run due {plain_when(at)}: the bot that "
                                      "claimed it stopped before starting it")
            # a takeover that sent a run again would get the first job back, marked a duplicate
            router = rig.cluster.router(ALICE)
            try:
                _, reply = router.submit("local", "echo", {"message": "both"}, ["localhost"], requester=ALICE,
                                         request_id=at_master[0])
            finally:
                router.close()
            assert reply["duplicate"] is True and sorted(rig.master_jobs()) == sorted(at_master)
        finally:
            db.close()


# -- the console ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_console_schedules(tmp_path: Path) -> None:
    with console_site(tmp_path / "console", schedule_min_interval_seconds=1) as cluster, console(cluster) as child:
        child.expect_exact("OMBot console: you are U0DEMO.")
        say(child, "/om schedule every 2s run echo localhost message=console")
        child.expect(r"Schedule #(\d+) is active")
        number = child.match.group(1)
        child.expect_exact(f"schedule #{number} (every 2s, UTC)", timeout=40)
        say(child, "/om schedules")
        child.expect_exact(f"#{number} active   every 2s (UTC)")
        say(child, f"/om schedule delete {number}")
        child.expect_exact(f"Deleted schedule #{number}")
        say(child, "/quit")
        child.expect(pexpect.EOF)
