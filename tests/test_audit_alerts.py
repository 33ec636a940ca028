"""Shell audit, from the masters to the channel (issue 11, "Store, rules and alerts"): real masters
and a real audit agent shipping to them, the real `ombot bot` pulling into its store, running the
rules and posting to our fake Slack; the pure parts (token bucket, grouping, the alert's text) and
the poster over the real Slack transport directly."""

from __future__ import annotations

import json
import pwd
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peewee
import pytest
import rpyc
from apscheduler.triggers.date import DateTrigger

from ombot.audit.alerts import AlertGroup, Grouper, Thresholds, alert_message
from ombot.audit.rules import Match, Threshold, parse_rules
from ombot.bot.alerts import AlertPoster
from ombot.ratelimit import TokenBucket
from ombot.masters import audit
from ombot.envelope import Peer, Refused, new_request
from ombot.keys import decode_public
from ombot.storage import migrate
from ombot.timers import Timers
from tests.fakeslack import FakeSlack
from tests.rigs import AUDIT_CHANNEL as CHANNEL
from tests.rigs import OTHER_AUDIT_CHANNEL as OTHER_CHANNEL
from tests.rigs import AGENT, AGENT_CLIENTS, HOST, UID, AuditRig, event, record, with_agent_hosts
from tests.storage import current_schema
from tests.support import Cluster, bot_table, wait_for


# -- pure parts ----------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_token_bucket_allows_a_small_burst_then_one_a_second() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=1.0, burst=3, clock=clock)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(1.0)  # empty: the next token in a second, nothing taken
    clock.now += 0.5
    assert bucket.take() == pytest.approx(0.5)
    clock.now += 0.5
    assert bucket.take() == 0.0
    clock.now += 5  # a post that took 5 s (a 429 waited out) saves nothing up while on its way
    bucket.finished()
    assert bucket.take() > 0
    clock.now += 60  # a quiet minute saves up no more than the burst
    assert [bucket.take() for _ in range(4)][-1] > 0


def match(rule: str = "alarm", key: str = "alarm:web01", cooldown: int = 300, count: int = 1) -> Match:
    return Match(rule, "warning", CHANNEL, key, cooldown, Threshold(count, 60 if count > 1 else 0))


def test_matches_within_the_cooldown_or_a_burst_count_on_one_group() -> None:
    grouper = Grouper(burst_ms=10_000)
    first = grouper.add(match(), record(1_000), True, CHANNEL)
    assert first is not None and first.count == 1
    held = grouper.add(match(), record(200_000), False, CHANNEL)  # held back by the 300 s cooldown: counted
    assert held is first and first.count == 2 and first.last["at"] == 200_000
    assert grouper.add(match(), record(400_000), False, CHANNEL) is None  # cooldown over, threshold not met
    # a rule without cooldown: every match fires, a burst is still one message
    burst = [grouper.add(match("wipe", "wipe:web01", 0), record(t), True, CHANNEL) for t in (0, 3_000, 9_000)]
    assert burst[0] is burst[1] is burst[2] and burst[0] is not None and burst[0].count == 3
    later = grouper.add(match("wipe", "wipe:web01", 0), record(30_000), True, CHANNEL)
    assert later is not burst[0] and later is not None and later.count == 1
    # a count threshold fires on its count-th match: the message counts them all
    thresholds, key = Thresholds(), match("sudo", "sudo:web01", 300, count=3)
    fired = [grouper.add(key, record(t), thresholds.fire(key, t), CHANNEL) for t in (1, 2, 3)]
    assert fired[:2] == [None, None] and fired[2] is not None and fired[2].count == 3


def test_the_alert_escapes_and_redacts_what_users_typed() -> None:
    rules = parse_rules(Path("rules.toml"), {"redact": {"patterns": [r"(?i)\btoken=(\S+)"]},
                                             "rules": [{"name": "x", "keywords": ["x"]}]})
    typed = "mysql -pS3cret -e 'x' <!channel> <@U0BOSS> ```done``` token=abc123 `id`"
    group = AlertGroup("k", CHANNEL, match(), record(5, typed, cwd="/tmp/<!here>", user="<!everyone>"),
                       record(5, typed), 5, 5)
    message = alert_message(group, rules.redact)
    shown = json.dumps(message.blocks) + message.text
    for secret in ("S3cret", "abc123"):
        assert secret not in shown
    for ping in ("<!channel>", "<@U0BOSS>", "<!here>", "<!everyone>"):
        assert ping not in shown
    command_block = next(b["text"]["text"] for b in message.blocks if "$ mysql" in b["text"]["text"])
    body = command_block[command_block.index("```") + 3:command_block.rindex("```")]
    assert "```" not in body  # the typed backticks cannot end the code block early
    assert "-p****" in body and "&lt;!channel&gt;" in body and "/tmp/&lt;!here&gt;" in body


def test_the_audit_settings_are_checked(make_cluster: Callable[..., Cluster]) -> None:
    from ombot.bot.settings import BotSettings
    from ombot.errors import ConfigError

    good = make_cluster(extra_toml=bot_table(audit_rules="audit-rules.toml", audit_poll_seconds=0.5,
                                             audit_alert_channel="C0AUDIT"))
    settings = BotSettings.from_config(good.config())
    assert settings.audit_rules == good.root / "audit-rules.toml" and settings.audit_poll_seconds == 0.5
    assert settings.audit_silent_after_seconds == 300 and settings.audit_alert_channel == "C0AUDIT"
    for bad in ({"audit_alert_channel": "#audit"}, {"audit_poll_seconds": 0}, {"audit_silent_after_seconds": 0}):
        cluster = make_cluster(extra_toml=bot_table(**bad))
        with pytest.raises(ConfigError) as info:
            BotSettings.from_config(cluster.config())
        assert next(iter(bad)) in str(info.value)


def test_a_huge_command_of_markup_still_fits_slack_with_its_code_block_closed() -> None:
    from tests.fakeslack import message_problems

    huge = "<&>" * 20_000
    group = AlertGroup("k", CHANNEL, match(), record(1, huge, cwd=huge, user=huge, host=huge, tty=huge),
                       record(2, huge), 1, 2, count=3)
    message = alert_message(group, lambda text: text)
    assert message_problems(message.text, message.blocks) == []
    for block in message.blocks:
        text = block["text"]["text"] if block["type"] == "section" else block["elements"][0]["text"]
        assert text.count("```") % 2 == 0 and len(text) <= 3000


# -- the poster over the real Slack transport -------------------------------------------------------------
# (`slack` and `timers` are tests/conftest.py's)


def test_a_burst_is_one_message_updated_in_place_with_its_count(slack: tuple[FakeSlack, Any],
                                                                timers: Timers) -> None:
    fake, transport = slack
    poster = AlertPoster(transport, lambda text: text, timers)
    thresholds, key = Thresholds(), match()
    for n in range(6):
        poster.alert(key, record(1_000 + n, f"echo ALARM {n}"), thresholds.fire(key, 1_000 + n), CHANNEL)
        if n == 0:  # posted before the rest arrive: they must be counted on it in place
            fake.wait_for(lambda: fake.messages(CHANNEL), what="the first alert")
    final = fake.wait_for(lambda: [m for m in fake.messages(CHANNEL) if "6 matching commands" in m["text"]],
                          what="the message counting six")
    assert len(fake.messages(CHANNEL)) == 1 and len(fake.calls_to("chat.postMessage")) == 1
    assert fake.calls_to("chat.update")  # counted in place
    assert "echo ALARM 5" in json.dumps(final[0]["blocks"])  # the latest command is shown too
    poster.close()


def test_each_channel_is_paced_and_a_429_is_waited_out(slack: tuple[FakeSlack, Any],
                                                       timers: Timers) -> None:
    fake, transport = slack
    poster = AlertPoster(transport, lambda text: text, timers, rate=4.0, burst=2)
    fake.rate_limit("chat.postMessage", times=1, retry_after=1)
    for n in range(8):  # eight dedupe keys: eight messages
        poster.alert(match(key=f"k{n}"), record(n), True, CHANNEL)
    fake.wait_for(lambda: len(fake.messages(CHANNEL)) == 8, what="eight alerts", timeout=30)
    calls = fake.calls_to("chat.postMessage", include_rate_limited=True)
    limited = [c for c in calls if c.rate_limited]
    assert len(limited) == 1
    after = next(c for c in calls if c.at > limited[0].at)
    assert after.at - limited[0].at >= 1.0  # Retry-After honoured, and the alert then delivered
    posted = [c.at for c in calls if not c.rate_limited]  # the retry of a 429 is the same message
    for i in range(2, len(posted)):  # at most `burst` in a row, then one per 1/rate seconds
        assert posted[i] - posted[i - 2] >= 1 / 4.0 - 0.02
    assert sorted(m["text"] for m in fake.messages(CHANNEL)) == sorted(
        alert_message(AlertGroup(f"k{n}", CHANNEL, match(key=f"k{n}"), record(n), record(n), n, n),
                      lambda t: t).text for n in range(8))
    poster.close()


def test_a_failed_post_is_retried_by_a_one_shot_job_on_the_scheduler(slack: tuple[FakeSlack, Any],
                                                                      timers: Timers) -> None:
    fake, transport = slack
    poster = AlertPoster(transport, lambda text: text, timers)
    fake.fail("chat.postMessage", "internal_error", times=1)  # not a 429: the transport gives up on it
    poster.alert(match(), record(1), True, CHANNEL)
    retry = fake.wait_for(lambda: [job for job in timers.scheduler.get_jobs() if isinstance(job.trigger, DateTrigger)],
                          what="the retry, a date job on the scheduler")
    assert len(retry) == 1 and not fake.messages(CHANNEL)
    fake.wait_for(lambda: fake.messages(CHANNEL), what="the alert, posted by the retry", timeout=10)
    assert len(fake.calls_to("chat.postMessage")) == 2 and len(fake.messages(CHANNEL)) == 1
    # the retry ran once and is gone (APScheduler removes a date job once it handed it to its executor)
    fake.wait_for(lambda: not timers.scheduler.get_jobs(), what="the retry job removed", timeout=10)
    assert len(fake.calls_to("chat.postMessage")) == 2  # and nothing posted again meanwhile
    poster.close()


# -- the masters' side: audit_read -------------------------------------------------------------------------


def call(cluster: Cluster, client: str, op: str, args: dict[str, Any], requester: str, origin: str) -> dict[str, Any]:
    peer = Peer(cluster.identity(client), decode_public(cluster.config().masters["m1"].public_key))
    conn = rpyc.connect("127.0.0.1", cluster.ports["m1"], config={"allow_pickle": False})
    try:
        request = new_request(op, "m1", requester, origin, args)
        return peer.open_reply(getattr(conn.root, op)(peer.seal_request(request)), request)
    finally:
        conn.close()


def test_audit_read_pages_through_a_batch_of_one_received_at_on_every_backend(master_db: peewee.Database) -> None:
    """A batch's rows share one received_at: the (received_at, id) cursor still pages through it,
    each row once, in order; on SQLite, MariaDB and PostgreSQL."""
    migrate(master_db, "audit", audit.MIGRATIONS)
    schema = current_schema(master_db)
    indexes = master_db.get_indexes("auditevent", schema=schema) if schema else master_db.get_indexes("auditevent")
    assert any(i.columns == ["received_at", "id"] for i in indexes), indexes
    rows = [{"id": f"web01:b:q:{n:02d}", "host": "web01", "kind": "command", "at": n, "received_at": 5_000 + n // 7,
             "sender": AGENT, "data": {"command": f"c{n}"}} for n in range(10)]
    audit.AuditEvent.insert_many(rows).execute()
    seen: list[str] = []
    page = audit.read_page(True, {"after": 5_000, "limit": 3})
    while True:
        seen += [e["id"] for e in page["events"]]
        if not page["more"]:
            break
        last = page["events"][-1]
        page = audit.read_page(True, {"after": last["received_at"], "after_id": last["id"], "limit": 3})
    assert seen == [r["id"] for r in rows]  # ordered by (received_at, id), none skipped or repeated
    assert audit.read_page(True, {"after": 5_001})["events"][0]["id"] == rows[7]["id"]  # >= after: re-read is safe
    assert audit.read_page(False, {})["events"] == []  # a master without agents has no table to read


@pytest.mark.slow
def test_only_the_bot_reads_audit_events_a_bounded_page_at_a_time(make_cluster: Callable[..., Cluster]) -> None:
    cluster = with_agent_hosts(make_cluster({"local": ["m1"]}, clients=dict(AGENT_CLIENTS)))
    cluster.start("m1")
    bot = cluster.config().clients["bot"].identity
    events = [event(n) for n in range(7)]
    stored = call(cluster, AGENT, "ingest", {"host": HOST, "events": events, "status": {
        "spool_depth": 3, "dropped_total": 0, "sent_total": 7}}, f"agent:{HOST}", "agent")
    assert stored["stored"] == 7
    for client, requester, origin in ((AGENT, f"agent:{HOST}", "agent"), ("test", "cli:test", "cli")):
        with pytest.raises(Refused) as info:
            call(cluster, client, "audit_read", {}, requester, origin)
        assert info.value.code == "not_permitted"
    read: list[str] = []
    received: list[int] = []
    page = call(cluster, "bot", "audit_read", {"limit": 3, "agents_since": 0}, bot, "slack")
    assert [a["host"] for a in page["agents"]] == [HOST] and page["agents"][0]["spool_depth"] == 3
    while True:
        read += [e["id"] for e in page["events"]]
        received += [e["received_at"] for e in page["events"]]
        assert len(page["events"]) <= 3
        if not page["more"]:
            break
        last = page["events"][-1]
        page = call(cluster, "bot", "audit_read", {"limit": 3, "after": last["received_at"], "after_id": last["id"]},
                    bot, "slack")
        assert page["agents"] == []  # heartbeat rows only when asked
    assert sorted(read) == sorted(e["id"] for e in events) and len(read) == 7  # every event, each once
    assert received == sorted(received) and page["now"] >= received[-1]  # in order; `now` from the master's clock
    with pytest.raises(Refused) as info:
        call(cluster, "bot", "audit_read", {"limit": 100_000}, bot, "slack")
    assert info.value.code == "bad_request"


# -- end to end: agent -> masters -> bot -> fake Slack ---------------------------------------------------
# (`make_rig` is tests/conftest.py's: an AuditRig on ALERT_RULES, tests/rigs/audit.py)


def type_commands(spool_dir: Path, commands: list[str], ssh: str = "192.0.2.7 50000 22", cwd: str = "/srv/app") -> None:
    """Spool lines as the hook writes them: the login uid is ours, so the login user resolves."""
    user_dir = spool_dir / str(UID)
    user_dir.mkdir(mode=0o700, exist_ok=True)
    with open(user_dir / "spool", "a") as f:
        for n, text in enumerate(commands):
            f.write("\t".join(["om1", f"{time.time():.6f}", "4242", str(n), "0", "history", str(UID), "", "tester",
                               "/dev/pts/3", ssh.split()[0], cwd, text, str(len(text))]) + "\n")


@pytest.mark.slow
def test_a_keyword_rule_alerts_in_its_channel_escaped_redacted_grouped_and_rate_limited(
        make_rig: Callable[..., AuditRig]) -> None:
    rig = make_rig(["m1", "m2"])
    rig.fake.rate_limit("chat.postMessage", times=1, retry_after=1)  # the first alert meets a 429
    rig.agent(["m1", "m2"])
    wipe = "rm -rf / --no-preserve-root # <!channel> ``` `whoami`"
    type_commands(rig.spool_dir, [wipe, "mysql -uroot -pS3cret -e 'drop database app'", "ls /tmp"]
                  + [f"echo ALARM {n}" for n in range(5)])
    alert = rig.fake.wait_for(lambda: rig.alerts("wipe the root filesystem"), what="the wipe alert", timeout=45)[0]
    shown = json.dumps(alert["blocks"]) + alert["text"]
    assert "<!channel>" not in shown and "&lt;!channel&gt;" in shown  # pings nobody
    user = pwd.getpwuid(UID).pw_name
    assert f"on `{HOST}` in `local`" in shown and f"*user* {user} (uid {UID})" in shown
    # pid 4242 is no live shell of ours: the login is the shell's word only, and said so
    assert f"_claimed by the shell:_ login {user} from 192.0.2.7" in shown and "/dev/pts/3" in shown
    body = next(b["text"]["text"] for b in alert["blocks"] if "$ rm -rf" in b["text"]["text"])
    assert body.count("```") == 2 and "/srv/app" in body  # one code block: the cwd, then the command
    assert "*critical*" in shown
    limited = [c for c in rig.fake.calls_to("chat.postMessage", include_rate_limited=True) if c.rate_limited]
    assert limited  # the 429 was answered, and the alert still arrived
    secret = rig.fake.wait_for(lambda: rig.alerts("mysql with a password", OTHER_CHANNEL), what="the mysql alert")[0]
    assert "S3cret" not in json.dumps(secret) and "-p****" in json.dumps(secret["blocks"])
    rig.fake.wait_for(lambda: any("5 matching commands" in m["text"] for m in rig.alerts("alarm")),
                      what="the burst counted on one message")
    assert len(rig.alerts("alarm")) == 1 and len(rig.posts_for("alarm")) == 1
    assert not rig.alerts("ls")  # no rule, no alert; still stored
    wait_for(lambda: len(rig.stored()) == 8, why=f"eight events stored: {rig.stored()}")


@pytest.mark.slow
def test_an_event_on_two_masters_alerts_once(make_rig: Callable[..., AuditRig]) -> None:
    rig = make_rig(["m1", "m2"])
    twice = event(1, data={"command": "echo TWICE", "user": "alice", "exit": 0})
    marker = event(2, data={"command": "echo MARKER", "user": "alice", "exit": 0})

    rig.ingest("m1", [twice])
    rig.fake.wait_for(lambda: rig.alerts("twice"), what="the first delivery's alert", timeout=45)
    rig.ingest("m2", [twice, marker])  # the same event again, through the IDC's other master
    rig.fake.wait_for(lambda: rig.alerts("marker"), what="the marker read in the same page")
    assert len(rig.posts_for("twice")) == 1 and "matching commands" not in rig.alerts("twice")[0]["text"]
    assert not rig.fake.calls_to("chat.update")  # not even counted again on the first message
    assert sorted(i for i, _ in rig.stored()) == sorted([twice["id"], marker["id"]])


@pytest.mark.slow
def test_a_collector_outage_under_a_steady_stream_loses_and_repeats_nothing(make_rig: Callable[..., AuditRig]) -> None:
    rig = make_rig(["m1", "m2"])
    agent = rig.agent(["m1", "m2"])
    sent: list[str] = []
    for wave in range(7):  # every master of the IDC is down for waves 2-4
        if wave == 2:
            rig.cluster.processes["m1"].stop()
            rig.cluster.processes["m2"].stop()
        if wave == 5:
            rig.cluster.start("m1")
            rig.cluster.start("m2")
        texts = [f"echo wave-{wave}-{n}" for n in range(30)]
        if wave == 3:
            texts.append("rm -rf / # typed while the collector was down")
        type_commands(rig.spool_dir, texts)
        sent += texts
        time.sleep(0.6)
    wait_for(lambda: len(rig.stored()) >= len(sent), within=60,
             why=f"{len(sent)} events in the bot's store, {len(rig.stored())} so far; agent log:\n{agent.log()}")
    rig.fake.wait_for(lambda: rig.alerts("wipe the root filesystem"), what="the alert of the outage's command",
                      timeout=45)
    time.sleep(2)  # ten polls: anything read again would have been stored or alerted by now
    stored = rig.stored()
    assert len(stored) == len(sent) and sorted(c for _, c in stored) == sorted(sent)  # nothing lost, none twice
    assert len(rig.posts_for("wipe the root filesystem")) == 1
    assert "matching commands" not in rig.alerts("wipe the root filesystem")[0]["text"]
    assert "did not answer" in rig.bot.log()  # the down masters were logged, not raised


@pytest.mark.slow
def test_a_silent_agent_is_alerted_once_and_its_return_announced(make_rig: Callable[..., AuditRig]) -> None:
    # 8 s: a loaded machine may stall the agent (heartbeat every 1 s) for a few seconds without it being silent
    rig = make_rig(["m1"], audit_silent_after_seconds=8, audit_alert_channel=OTHER_CHANNEL)
    agent = rig.agent(["m1"])
    type_commands(rig.spool_dir, ["echo hello"])
    wait_for(lambda: len(rig.stored()) == 1, why="the agent's first event in the bot's store")
    assert not [m for m in rig.fake.messages(OTHER_CHANNEL) if "silent" in m["text"]]
    agent.stop(signal.SIGKILL)

    def silent() -> list[dict[str, Any]]:
        return [m for m in rig.fake.messages(OTHER_CHANNEL) if f"agent on {HOST} (local) is silent" in m["text"]]

    rig.fake.wait_for(silent, what="the silent-agent alert", timeout=30)
    time.sleep(1.5)  # several more polls: still one alert
    assert len(silent()) == 1
    rig.agent(["m1"])
    rig.fake.wait_for(lambda: [m for m in rig.fake.messages(OTHER_CHANNEL) if "is back" in m["text"]],
                      what="the agent's return", timeout=30)
    assert len(silent()) == 1
