"""The bot side of a job's lifecycle, through real processes: a real `ombot bot` (HTTP mode, signed
requests) against the fake Slack Web API, and real masters.

A card never stays stuck: a bot killed mid-job is replaced (by itself restarted, or by another bot
process on the same database) once its job leases run out, and the card is finished exactly once;
a job caught before any master answered its submit is looked for at every master of its IDC and
never re-sent. History (`/om jobs` filters, `/om status`) comes from the bot's database, which
forgets old rows after `[bot] retention_days`.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from slack_sdk import WebClient

from ombot.bot.commands import CommandError
from ombot.bot.jobs import JobFilter, parse_job_filter
from ombot.masters import FINAL_STATES, JobRef, Refused
from ombot.since import parse_since
from tests.rigs import CHANNEL, Reply, SlackRig
from tests.storage import scratch
from tests.support import Cluster, bot_table, free_port, wait_for

ALICE, BOB = "U0ALICE", "U0BOB"
# A dead bot's jobs are adopted within the lease (15 s) and a tick (5 s); generous for a shared machine.
TAKEOVER_BOUND = 60.0


class Rig(SlackRig):
    """The rig, with restarts in mind: bots killed and started again, each card finished exactly once."""

    def kill_bot(self, port: int | None = None) -> None:
        """SIGKILL: no clean stop, its leases are left to run out."""
        bot = self.bots[port or self.port]
        assert bot.proc is not None
        os.killpg(bot.proc.pid, signal.SIGKILL)
        bot.proc.wait()

    def answer(self, reply: Reply, needle: str = "") -> str:
        """The first answer to a command whose body (as JSON) holds `needle`."""
        return reply.wait_body(needle)

    def started(self, reply: Reply) -> int:
        return reply.number("Starting job #")

    def card_in(self, number: int, state: str, timeout: float = 30) -> dict[str, Any]:
        return self.fake.wait_for(lambda: (c := self.card(number)) and f"[#{number} {state}]" in c["text"] and c,
                                  timeout, what=f"job #{number} {state}")

    def results_posts(self, card: dict[str, Any]) -> list[Any]:
        """Every message posted into the card's thread (the results), counted as Slack received them."""
        return [c for c in self.fake.calls_to("chat.postMessage") if c.body.get("thread_ts") == card["ts"]]

    def final_updates(self, card: dict[str, Any], number: int) -> list[Any]:
        return [c for c in self.fake.calls_to("chat.update") if c.body.get("ts") == card["ts"]
                and str(c.body.get("text", "")).split("]")[0].split()[-1] in FINAL_STATES
                and str(c.body.get("text", "")).startswith(f"[#{number} ")]

    def results_once(self, card: dict[str, Any], number: int) -> str:
        """The results, after checking they and the final card went out exactly once."""
        self.fake.wait_for(lambda: self.results_posts(card), what=f"the results of job #{number}")
        time.sleep(1.0)  # a second poster, if there were one, would show up here
        posts = self.results_posts(card)
        assert len(posts) == 1, [p.body for p in posts]
        assert len(self.final_updates(card, number)) == 1
        return str(posts[0].body.get("text", ""))

    def bot_db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.cluster.root / "state" / "bot.db", timeout=10)


@pytest.fixture
def make_rig(make_slack_rig: Callable[..., Rig]) -> Callable[..., Rig]:
    """make_rig(idcs, env, **[bot] keys): a rig whose masters all run."""
    def make(idcs: dict[str, list[str]] | None = None, env: dict[str, str] | None = None,
             **bot_settings: object) -> Rig:
        return make_slack_rig(idcs, kind=Rig, env=env, **bot_settings)
    return make


# -- restarts never leave a card stuck ------------------------------------------------------------


@pytest.mark.slow
def test_a_bot_killed_mid_job_finishes_the_card_in_place_when_restarted(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    number = rig.started(rig.command("test.sleep localhost seconds=6"))
    running = rig.card_in(number, "running")
    rig.kill_bot()
    rig.start_bot()
    final = rig.final_card(number, timeout=TAKEOVER_BOUND)
    assert final["ts"] == running["ts"] and f"[#{number} ok]" in final["text"]  # the same card, in place
    assert "woke" in rig.results_once(final, number)
    # stored as reported, and its lease let go, just after the results post the test saw
    wait_for(lambda: rig.rows("SELECT state, reported FROM bot_job WHERE number = ?", number) == [("ok", 1)],
             why="the job stored as reported")
    wait_for(lambda: rig.rows("SELECT name FROM bot_lease WHERE name LIKE 'job:%'") == [],
             why="the job's lease let go once finished")


@pytest.mark.slow
def test_a_job_on_a_busy_host_says_on_its_card_what_it_waits_for_until_the_host_frees(
        make_rig: Callable[..., Rig]) -> None:
    """The master holds the second job for the host the first one has; its card says so, and stops
    saying so once the host is free and it runs."""
    rig = make_rig()
    first = rig.started(rig.command("test.sleep localhost seconds=5"))
    rig.card_in(first, "running")
    second = rig.started(rig.command("test.sleep localhost seconds=2"))
    [(first_id,)] = rig.rows("SELECT job_id FROM bot_job WHERE number = ?", first)
    waiting = rig.fake.wait_for(lambda: (c := rig.card(second)) and "waiting for localhost" in c["text"] and c,
                                what=f"job #{second}'s card to say what it waits for")
    assert f"waiting for localhost (busy with job {first_id})" in waiting["text"]
    assert "waiting for" in json.dumps(waiting["blocks"])
    holder = rig.card(first)
    assert holder is not None and "waiting for" not in holder["text"]
    assert f"[#{first} ok]" in rig.final_card(first)["text"]
    final = rig.final_card(second)
    assert f"[#{second} ok]" in final["text"] and "waiting for" not in json.dumps(final)
    assert rig.rows("SELECT note FROM bot_job WHERE number = ?", second) == [(None,)]


def _post_card(rig: Rig, text: str) -> str:
    """A card as the bot would have posted it before dying (the fake Slack knows its ts)."""
    client = WebClient(token=rig.fake.bot_token, base_url=rig.fake.url)
    return str(client.chat_postMessage(channel=CHANNEL, text=text)["ts"])


def _insert_submitting(rig: Rig, job_id: str, card_ts: str, hosts: list[str]) -> int:
    with rig.bot_db() as conn:
        cursor = conn.execute(
            "INSERT INTO bot_job (job_id, requester, origin, channel, card_ts, idc, module, params, host_count, "
            "hosts, state, approvers, cancel_roles, reported, created_at) "
            "VALUES (?, ?, 'slack', ?, ?, 'local', 'echo', ?, ?, ?, 'submitting', '[]', '[]', 0, ?)",
            (job_id, ALICE, CHANNEL, card_ts, json.dumps({"message": "caught"}), len(hosts), json.dumps(hosts),
             int(time.time() * 1000)))
        return int(cursor.lastrowid or 0)


@pytest.mark.slow
def test_jobs_caught_submitting_are_asked_for_at_every_master_and_never_resent(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig({"local": ["m1", "m2"]})
    rig.bots[rig.port].stop()
    # The bot died after its submit reached m2 (the second master of the IDC), before it stored the answer:
    arrived = str(uuid.uuid4())
    router = rig.cluster.router(ALICE)  # with the bot's key, as the bot sent it
    try:
        router.links["m2"].call("submit", {"module": "echo", "params": {"message": "caught"}, "hosts": ["web01"],
                                           "idc": "local", "approvers": [], "timeout": None, "wait": 0},
                                arrived, ALICE)
    finally:
        router.close()
    first = _insert_submitting(rig, arrived, _post_card(rig, "[#? submitting] echo"), ["web01"])
    # ... and one whose submit never reached any master:
    lost = str(uuid.uuid4())
    second = _insert_submitting(rig, lost, _post_card(rig, "[#? submitting] echo"), ["web02"])

    rig.start_bot()
    found = rig.final_card(first)
    assert f"[#{first} ok]" in found["text"]
    assert "caught" in rig.results_once(found, first)
    never = rig.final_card(second)
    assert f"[#{second} unknown]" in never["text"] and "never reached a master" in never["text"]
    assert "not re-sent" in never["text"]
    assert not rig.results_posts(never)  # nothing ran: no results
    wait_for(lambda: rig.rows("SELECT master_id, state, reported FROM bot_job WHERE number IN (?, ?) ORDER BY number",
                              first, second) == [("m2", "ok", 1), (None, "unknown", 1)],
             why="both jobs stored as reported (just after their cards)")
    router = rig.cluster.router(ALICE)
    try:  # the lost job was asked about, never sent: no master has it even now
        for master in ("m1", "m2"):
            with pytest.raises(Refused, match="no job"):
                router.job_state(JobRef(lost, "local", master))
    finally:
        router.close()
    status = rig.answer(rig.command(f"status {second}"), "unknown")
    assert "never reached a master" in status and "web02" in status


# -- several bot processes on one database --------------------------------------------------------


@pytest.fixture
def postgres_url(tmp_path: Path) -> Iterator[str]:
    with scratch("postgres", tmp_path) as url:
        yield url


@pytest.mark.slow
def test_two_bots_on_one_postgres_finish_each_card_once_and_take_over_a_dead_ones(
        make_rig: Callable[..., Rig], postgres_url: str) -> None:
    rig = make_rig(env={"OMBOT_BOT_DATABASE_URL": postgres_url})
    first_port = rig.port
    other_port = free_port()
    rig.start_bot(other_port)

    # Both alive: jobs started through either bot are each finished once, by the bot that started them.
    numbers = [rig.started(rig.command("test.sleep localhost seconds=2", port=port))
               for port in (first_port, other_port, first_port)]
    for number in numbers:
        card = rig.final_card(number)
        assert f"[#{number} ok]" in card["text"]
        assert "woke" in rig.results_once(card, number)

    # The follower dies mid-job: the other bot adopts the job within the bound and finishes its card.
    number = rig.started(rig.command("test.sleep localhost seconds=8", port=first_port))
    running = rig.card_in(number, "running")
    rig.kill_bot(first_port)
    killed_at = time.monotonic()
    final = rig.final_card(number, timeout=TAKEOVER_BOUND)
    assert time.monotonic() - killed_at < TAKEOVER_BOUND
    assert final["ts"] == running["ts"] and f"[#{number} ok]" in final["text"]
    assert "woke" in rig.results_once(final, number)
    assert "adopted 1 unfinished job" in rig.bots[other_port].log()


# -- a master killed mid-job ----------------------------------------------------------------------


@pytest.mark.slow
def test_a_master_killed_mid_job_ends_the_card_unknown_with_the_reason(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    number = rig.started(rig.command("test.sleep localhost seconds=60"))
    running = rig.card_in(number, "running")
    rig.cluster.processes["m1"].kill()
    rig.cluster.start("m1")  # within the bot's 10 s of retrying: the master itself says what happened
    final = rig.final_card(number, timeout=TAKEOVER_BOUND)
    assert final["ts"] == running["ts"] and f"[#{number} unknown]" in final["text"]
    assert "the master stopped while the job ran" in final["text"]
    status = rig.answer(rig.command(f"status {number}"), "*unknown*")
    assert "the master stopped while the job ran" in status


# -- history -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_jobs_filters_and_status_read_the_history(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    jobs = {name: rig.started(rig.command(text, user)) for name, text, user in (
        ("match", "echo web01,web02 message=a", ALICE),
        ("other host", "echo web02 message=b", ALICE),
        ("other user", "echo web01 message=c", BOB),
        ("other module", "test.sleep web01 seconds=0", ALICE),
        ("too old", "echo web[01-03] message=d", ALICE),
    )}
    for number in jobs.values():
        rig.final_card(number)
    with rig.bot_db() as conn:  # started three hours ago
        conn.execute("UPDATE bot_job SET created_at = created_at - ? WHERE number = ?", (3 * 3_600_000,
                                                                                      jobs["too old"]))
    listing = rig.answer(rig.command("jobs mine module=echo host=web01 since=1h"), "#")
    for name, number in jobs.items():
        assert (f"#{number} " in listing) == (name == "match"), (name, listing)
    everyone = rig.answer(rig.command("jobs host=web01 since=2026-01-01"), "#")
    assert all(f"#{jobs[n]} " in everyone for n in ("match", "other user", "other module", "too old"))
    assert f"#{jobs['other host']} " not in everyone
    assert "No jobs match" in rig.answer(rig.command("jobs host=web0"), "No jobs")  # a host is matched whole
    assert "cannot read 'colour=red'" in rig.answer(rig.command("jobs colour=red"), "cannot read")
    assert "since is a time ago" in rig.answer(rig.command("jobs since=yesterday"), "since is")
    help_text = rig.answer(rig.command("help"), "OMBot commands")
    assert "/om jobs [mine] [module=NAME] [host=HOST] [since=2h|3d|2026-11-20]" in help_text

    status = rig.answer(rig.command(f"status {jobs['match']}"), "*ok*")
    assert "hosts: web01, web02" in status and "ended" in status


@pytest.mark.slow
def test_retention_deletes_old_jobs_and_trail_rows(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(retention_days=1)
    old, recent = (rig.started(rig.command(f"echo localhost message={m}")) for m in ("old", "recent"))
    for number in (old, recent):
        rig.final_card(number)
    rig.bots[rig.port].stop()
    two_days = 2 * 86_400_000
    with rig.bot_db() as conn:
        conn.execute("UPDATE bot_job SET created_at = created_at - ? WHERE number = ?", (two_days, old))
        conn.execute("INSERT INTO chat_trail (at, user, channel, origin, action, detail, outcome) "
                     "VALUES (?, 'U0OLD', 'C0OPS', 'slack', 'command', 'ancient', 'ok')",
                     (int(time.time() * 1000) - two_days,))
        for event, at in (("web01:b:bash:1", int(time.time() * 1000) - two_days), ("web01:b:bash:2", int(time.time() * 1000))):
            conn.execute("INSERT INTO bot_audit_event (id, idc, host, kind, at, user, login_user, tty, cwd, command, "
                         "ssh_client, source, data, stored_at) VALUES (?, 'local', 'web01', 'command', ?, 'alice', "
                         "'alice', 'pts/0', '/', 'ls', '', 'bash', '{}', ?)", (event, at, at))
    trail_before = rig.rows("SELECT COUNT(*) FROM chat_trail WHERE user != 'U0OLD'")[0][0]
    rig.start_bot()
    rig.fake.wait_for(lambda: not rig.rows("SELECT 1 FROM bot_job WHERE number = ?", old), what="the old job deleted")
    # one pass deletes jobs, then trail entries, then audit events: wait for the last of them
    rig.fake.wait_for(lambda: len(rig.rows("SELECT id FROM bot_audit_event")) == 1, what="the old audit event deleted")
    assert rig.rows("SELECT number FROM bot_job") == [(recent,)]
    assert rig.rows("SELECT COUNT(*) FROM chat_trail WHERE user = 'U0OLD'") == [(0,)]
    assert rig.rows("SELECT id FROM bot_audit_event") == [("web01:b:bash:2",)]  # audit events are kept as long
    assert rig.rows("SELECT COUNT(*) FROM chat_trail WHERE user != 'U0OLD'")[0][0] >= trail_before


# -- the pieces without processes -----------------------------------------------------------------


def test_since_reads_durations_and_utc_dates() -> None:
    now = 1_800_000_000_000
    assert parse_since("30m", now) == now - 30 * 60_000
    assert parse_since("2H", now) == now - 2 * 3_600_000
    assert parse_since("3d", now) == now - 3 * 86_400_000
    assert parse_since("1w", now) == now - 7 * 86_400_000
    assert parse_since("2026-11-20", now) == 1_795_132_800_000  # midnight UTC
    assert parse_since("2026-11-20T08:00", now) == 1_795_132_800_000 + 8 * 3_600_000
    assert parse_since("2026-11-20T08:00+08:00", now) == 1_795_132_800_000
    for bad in ("yesterday", "2h30m", "-1d", "9999999d", "", "2026-13-01", "1e3"):
        with pytest.raises(CommandError, match="since is"):
            parse_since(bad, now)


def test_jobs_filters_are_each_given_once() -> None:
    filters = parse_job_filter(["mine", "module=echo", "host=web01"])["filters"]
    assert filters == JobFilter(mine=True, module="echo", host="web01")
    assert parse_job_filter([])["filters"] == JobFilter()
    for bad in (["mine", "mine"], ["module=a", "module=b"], ["host="], ["colour=red"], ["web01"]):
        with pytest.raises(CommandError, match="usage: /om jobs"):
            parse_job_filter(bad)


def test_retention_days_must_be_above_zero(make_cluster: Callable[..., Cluster]) -> None:
    from ombot.bot import BotSettings
    from ombot.errors import ConfigError

    assert BotSettings.from_config(make_cluster(extra_toml=bot_table()).config()).retention_days == 90
    assert BotSettings.from_config(make_cluster(extra_toml=bot_table(retention_days=0.5)).config()).retention_days == 0.5
    for bad in (0, -3, "90", True):
        with pytest.raises(ConfigError, match="retention_days"):
            BotSettings.from_config(make_cluster(extra_toml=bot_table(retention_days=bad)).config())
