"""Issue 17, item 4: the pending alert queue of a channel is bounded and ordered by severity. A flood
of low alerts delays a critical one by one post at most (the one under way), and what does not fit
the queue is counted in one overflow summary per channel, never dropped silently. The poster over
the real Slack transport (its posts held at a gate where the test needs the queue to fill), and the
real `ombot bot` pulling a flood from a real master."""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from typing import Any

import pytest

from ombot.audit import MAX_PENDING
from ombot.audit.rules import Match, Threshold
from ombot.bot.alerts import AlertPoster
from ombot.message import Message, section
from tests.fakeslack import FakeSlack, message_problems
from tests.rigs import AUDIT_CHANNEL as CHANNEL
from tests.rigs import AuditRig, audit_site, event, record
from tests.support import wait_for

SUMMARY = "[audit overflow]"
COUNTED = re.compile(r"(\d+) more match(?:es)? of (?:rule|\d+ other rules?)")


def rule(name: str, severity: str, key: str | None = None, cooldown: int = 300) -> Match:
    return Match(name, severity, CHANNEL, key or f"{name}:web01", cooldown, Threshold(1, 0))


class Gate:
    """The real Slack transport, holding the one post `hold` picks until `release`: the queue fills
    meanwhile, and what leaves it next is what the order says, whatever the timing."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.when: Callable[[Message], bool] = lambda message: False
        self.held = threading.Event()  # a post waits at the gate
        self._release = threading.Event()

    def hold(self, when: Callable[[Message], bool] = lambda message: True) -> None:
        self._release, self.when = threading.Event(), when
        self.held.clear()

    def release(self, then: Callable[[Message], bool] | None = None) -> None:
        """Let the held post go; `then`: hold the next post it picks (armed before the first goes)."""
        current = self._release
        self.hold(then or (lambda message: False))
        current.set()

    def post(self, channel: str, message: Message, thread_ts: str | None = None, req: Any = None) -> str | None:
        if self.when(message):
            self.when = lambda message: False
            release = self._release
            self.held.set()
            assert release.wait(30), "the test never released the gate"
        return self.transport.post(channel, message, thread_ts, req)

    def update(self, channel: str, ts: str, message: Message) -> None:
        self.transport.update(channel, ts, message)


def sent(fake: FakeSlack, channel: str = CHANNEL) -> list[str]:
    """The text of every post and update Slack accepted in the channel, in order."""
    return [c.body.get("text", "") for c in fake.calls if c.method in ("chat.postMessage", "chat.update")
            and c.ok and c.body.get("channel") == channel]


def label(text: str) -> str:
    """An alert's rule, a notice's text, or "summary"."""
    if text.startswith(SUMMARY):
        return "summary"
    found = re.match(r"\[audit \w+\] (.+?) on ", text)
    return found.group(1) if found else text


def summaries(fake: FakeSlack) -> list[dict[str, Any]]:
    return [m for m in fake.messages(CHANNEL) if m["text"].startswith(SUMMARY)]


def summarised(message: dict[str, Any]) -> int:
    """The matches a summary counts (from its blocks: its plain text may be clipped)."""
    return sum(int(n) for n in COUNTED.findall(json.dumps(message["blocks"])))


def shown(fake: FakeSlack) -> int:
    """The matches the channel's alert messages count, each message as it stands now."""
    total = 0
    for message in fake.messages(CHANNEL):
        text = message["text"]
        if text.startswith("[audit ") and not text.startswith(SUMMARY) and " on " in text:
            found = re.search(r", (\d+) matching commands", text)
            total += int(found.group(1)) if found else 1
    return total


def overflow_logs(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "ombot.bot.alerts" and r.levelno == logging.WARNING
            and "overflow" in r.getMessage()]


# -- the poster over the real Slack transport -------------------------------------------------------------


def test_a_flood_of_low_alerts_delays_a_critical_one_by_the_post_under_way_at_most(
        slack: tuple[FakeSlack, Any], timers: Any) -> None:
    fake, transport = slack
    gate = Gate(transport)
    poster = AlertPoster(gate, lambda text: text, timers, rate=20.0, burst=3)
    for n in range(200):  # 200 dedupe keys: 200 messages, while the channel drains a few
        severity = ("info", "warning")[n % 2]
        poster.alert(rule(f"low-{severity}", severity, f"low:{n}"), record(n, "echo LOW", user=f"u{n}"), True, CHANNEL)
    gate.hold()  # a low post under way when the critical alert comes (whatever the machine's timing)
    assert gate.held.wait(10)
    before = len(sent(fake))
    poster.alert(rule("wipe", "critical"), record(500, "rm -rf /"), True, CHANNEL)
    gate.release()
    fake.wait_for(lambda: "wipe" in map(label, sent(fake)), what="the critical alert")
    order = [label(text) for text in sent(fake)]
    assert order.index("wipe") == before + 1, order[before:]  # behind the post under way, and nothing else
    # the flood did not fit: the rest is summarised, and every match is in a message or in a summary
    fake.wait_for(lambda: shown(fake) + sum(summarised(m) for m in summaries(fake)) == 201,
                  what="every match counted, in an alert's message or in a summary")
    assert summaries(fake) and shown(fake) < 201
    poster.close()


def test_the_queue_is_bounded_and_what_overflows_is_summarised_once_never_lost(
        slack: tuple[FakeSlack, Any], timers: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ombot.bot.alerts")
    fake, transport = slack
    gate = Gate(transport)
    poster = AlertPoster(gate, lambda text: text, timers, rate=50.0, burst=5)
    gate.hold()
    poster.alert(rule("first", "warning"), record(0), True, CHANNEL)
    assert gate.held.wait(10)  # on its way, held: nothing leaves the queue meanwhile
    state = poster._channels[CHANNEL]
    hosts = [f"web{n:02d}" for n in range(40)]
    for n in range(MAX_PENDING + 380):
        poster.alert(rule("flood", "info", f"flood:{n}"), record(1 + n, "echo FLOOD", host=hosts[n % 40], user=f"u{n}"),
                     True, CHANNEL)
        assert len(state.pending) <= MAX_PENDING
    for n in range(5):  # matches again of queued alerts: counted on them, each queued once still
        poster.alert(rule("flood", "info", f"flood:{n}"), record(1_000 + n, "echo FLOOD again", user=f"u{n}"), False,
                     CHANNEL)
        assert len(state.pending) == MAX_PENDING
    assert len(overflow_logs(caplog)) == 1  # logged once for the summary, not once per match
    gate.release()
    fake.wait_for(lambda: len(fake.messages(CHANNEL)) == 1 + MAX_PENDING + 1, what="every queued alert and the summary")
    summary = summaries(fake)
    assert len(summary) == 1
    blocks = json.dumps(summary[0]["blocks"])
    # the flood's first 50 hosts web00...web49 % 40 were queued; the overflow starts at n = 50, web10
    assert "380 more matches of rule *flood* (info) on `web10`, `web11`, `web12` and 37 more hosts" in blocks
    assert "380 more matches of rule flood (info) on web10, web11, web12 and 37 more hosts" in summary[0]["text"]
    assert "/om audit" in blocks and "were not posted one by one" in blocks
    order = [label(text) for text in sent(fake)]
    # the summary joins the queue at the first room, as a warning: ahead of the infos still waiting
    assert order[:3] == ["first", "flood", "summary"] and set(order[3:]) == {"flood"}
    assert shown(fake) == 1 + MAX_PENDING + 5 and summarised(summary[0]) == 380  # 1 + 430 + 5: none lost
    assert len(overflow_logs(caplog)) == 1
    poster.close()


def test_the_most_severe_go_first_and_in_order_within_a_severity(slack: tuple[FakeSlack, Any], timers: Any) -> None:
    fake, transport = slack
    gate = Gate(transport)
    poster = AlertPoster(gate, lambda text: text, timers, rate=50.0, burst=5)
    gate.hold()
    poster.alert(rule("first", "warning"), record(0), True, CHANNEL)
    assert gate.held.wait(10)
    for n, (name, severity) in enumerate([("i1", "info"), ("w1", "warning"), ("c1", "critical"), ("n1", None),
                                          ("i2", "info"), ("c2", "critical"), ("w2", "warning"),
                                          ("n2", "critical")]):
        if name.startswith("n"):
            message = Message(f"{name} notice", [section(name)])
            if severity is None:
                poster.notice(CHANNEL, message)
            else:
                poster.notice(CHANNEL, message, severity)
        else:
            poster.alert(rule(name, severity), record(n), True, CHANNEL)
    gate.release()
    fake.wait_for(lambda: len(sent(fake)) == 9, what="nine posts")
    # a notice is a warning unless told otherwise
    assert [label(text) for text in sent(fake)] == ["first", "c1", "c2", "n2 notice", "w1", "n1 notice", "w2",
                                                    "i1", "i2"]
    poster.close()


def test_a_full_queue_gives_way_to_the_more_severe_and_a_posted_alert_keeps_its_update(
        slack: tuple[FakeSlack, Any], timers: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ombot.bot.alerts")
    fake, transport = slack
    gate = Gate(transport)
    poster = AlertPoster(gate, lambda text: text, timers, rate=50.0, burst=5, max_pending=4)
    posted = rule("posted", "info")
    poster.alert(posted, record(1), True, CHANNEL)
    fake.wait_for(lambda: fake.messages(CHANNEL), what="the info alert, posted")
    gate.hold()
    poster.alert(rule("first", "warning"), record(2), True, CHANNEL)
    assert gate.held.wait(10)
    state = poster._channels[CHANNEL]
    poster.alert(posted, record(3), False, CHANNEL)  # counted on the posted message: its update waits, an info
    poster.alert(rule("low", "info", "low:1"), record(4), True, CHANNEL)
    poster.alert(rule("w1", "warning"), record(5), True, CHANNEL)
    poster.alert(rule("low", "info", "low:2"), record(6, host="web02"), True, CHANNEL)  # full now
    assert len(state.pending) == 4 and not overflow_logs(caplog)
    poster.alert(rule("c1", "critical"), record(7), True, CHANNEL)  # takes the place of the newest info: low:2
    poster.alert(rule("w2", "warning"), record(8), True, CHANNEL)  # of the next newest: low:1
    poster.alert(rule("c2", "critical"), record(9), True, CHANNEL)  # of the posted alert's update: it waits for room
    poster.alert(rule("low", "info", "low:3"), record(10, host="web03"), True, CHANNEL)  # nothing below it: summarised
    poster.alert(posted, record(11), False, CHANNEL)  # counted on the waiting update: still waits, not summarised
    poster.notice(CHANNEL, Message("[audit] agent on web09 (local) is silent\nsince a while", [section("silent")]),
                  "info")
    assert len(state.pending) == 4 and len(overflow_logs(caplog)) == 1
    gate.release()
    fake.wait_for(lambda: "3 matching commands" in " ".join(sent(fake)), what="the posted alert's update")
    order = [label(text) for text in sent(fake)]
    assert order == ["posted", "first", "c1", "c2", "w1", "w2", "summary", "posted"]
    assert "posted" in fake.calls_to("chat.update")[0].body["text"]  # an update in place: its own severity's turn
    summary = summaries(fake)[0]
    blocks = json.dumps(summary["blocks"])
    assert "3 more matches of rule *low* (info) on `web02`, `web01` and `web03`" in blocks
    assert "1 more notice: [audit] agent on web09 (local) is silent" in blocks and "since a while" not in blocks
    assert "*posted*" not in blocks  # a posted alert's matches show on its message, not in the summary
    assert shown(fake) + summarised(summary) == 3 + 1 + 2 + 2 + 3  # posted x3, first, c1 and c2, w1 and w2, low x3
    poster.close()


def test_overflow_while_the_summary_is_on_its_way_goes_in_the_next_one(
        slack: tuple[FakeSlack, Any], timers: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ombot.bot.alerts")
    fake, transport = slack
    gate = Gate(transport)
    poster = AlertPoster(gate, lambda text: text, timers, rate=50.0, burst=5, max_pending=2)

    def low(name: str, at: int, fired: bool = True) -> None:
        poster.alert(rule("low", "info", f"low:{name}"), record(at, host=f"h-{name}"), fired, CHANNEL)

    gate.hold()
    poster.alert(rule("first", "warning"), record(0), True, CHANNEL)
    assert gate.held.wait(10)
    for n, name in enumerate("abcd"):
        low(name, n)  # a and b queued, c and d summarised
    low("c", 10, fired=False)  # c again: its group was summarised, so is this match
    gate.release(then=lambda message: message.text.startswith(SUMMARY))
    assert gate.held.wait(10)  # the first summary on its way, held
    state = poster._channels[CHANNEL]
    assert state.overflow is None and len(overflow_logs(caplog)) == 1
    for n, name in enumerate("efg"):
        low(name, 20 + n)  # e fills the queue again; f and g overflow into a new summary
    low("c", 30, fired=False)
    assert len(overflow_logs(caplog)) == 2 and state.overflow is not None
    gate.release()
    fake.wait_for(lambda: len(summaries(fake)) == 2 and len(sent(fake)) == 6, what="both summaries")
    assert [label(text) for text in sent(fake)] == ["first", "low", "summary", "low", "summary", "low"]
    first, second = summaries(fake)
    assert summarised(first) == 3 and "`h-c` and `h-d`" in json.dumps(first["blocks"])
    assert summarised(second) == 3 and "`h-f`, `h-g` and `h-c`" in json.dumps(second["blocks"])
    assert shown(fake) + summarised(first) + summarised(second) == 1 + 7 + 2
    poster.close()


def test_the_summary_is_escaped_and_fits_slack_however_much_overflows(slack: tuple[FakeSlack, Any],
                                                                       timers: Any) -> None:
    fake, transport = slack
    gate = Gate(transport)
    poster = AlertPoster(gate, lambda text: text, timers, rate=50.0, burst=5, max_pending=1)
    gate.hold()
    poster.alert(rule("first", "warning"), record(0), True, CHANNEL)
    assert gate.held.wait(10)
    poster.alert(rule("queued", "warning"), record(1), True, CHANNEL)
    for n in range(60):  # sixty rules with names and hosts of markup: more than one section holds
        name = f"<!channel> *rule* `{n}` " + "x" * 500
        poster.alert(rule(name, "info", f"k{n}"), record(2 + n, host=f"<@U0BOSS>{n}" * 50), True, CHANNEL)
    # a warning: not below the queued one, so summarised too, and its line first (ahead of the infos)
    poster.notice(CHANNEL, Message("<!here> &lt;!here&gt; " + "y" * 5000, [section("n")]))
    gate.release()
    summary = fake.wait_for(lambda: summaries(fake), what="the summary")[0]
    shown_text = json.dumps(summary["blocks"]) + summary["text"]
    for ping in ("<!channel>", "<!here>", "<@U0BOSS>"):
        assert ping not in shown_text
    assert "&lt;!channel&gt;" in shown_text and "&amp;lt;" not in json.dumps(summary["blocks"])  # escaped once
    assert message_problems(summary["text"], summary["blocks"]) == []
    for block in summary["blocks"]:
        assert len(block["text"]["text"]) <= 3000
    assert summarised(summary) == 60 and "other rules" in json.dumps(summary["blocks"])  # the rest counted, not cut
    assert "1 more notice: &lt;!here&gt; &lt;!here&gt; yyy" in json.dumps(summary["blocks"])
    poster.close()


# -- end to end: a flood through a real master and the real bot -------------------------------------------


FLOOD = 200
FLOOD_RULES = f"""
channel = "{CHANNEL}"

[[rules]]
name = "flood"
severity = "info"
keywords = ["FLOOD"]
dedupe = "{{rule}}:{{host}}:{{user}}"

[[rules]]
name = "wipe the root filesystem"
severity = "critical"
keywords = ["rm -rf /"]
cooldown_seconds = 0
"""


@pytest.fixture
def flood_rig(make_slack_rig: Callable[..., AuditRig]) -> AuditRig:
    """test_audit_alerts' rig (one master, the real bot, fake Slack) with a rules file of a flood rule."""
    return make_slack_rig(kind=AuditRig, **audit_site(FLOOD_RULES))


@pytest.mark.slow
def test_a_flood_through_the_real_bot_delays_a_critical_alert_by_one_post_at_most(flood_rig: AuditRig) -> None:
    rig = flood_rig
    wipe = "rm -rf / --no-preserve-root"
    # 200 users' commands on web01: 200 dedupe keys, 200 info alerts, at one message a second
    rig.ingest("m1", [event(n, data={"command": f"echo FLOOD {n}", "user": f"user{n:03d}", "exit": 0})
                      for n in range(FLOOD)])
    rig.fake.wait_for(lambda: rig.alerts("flood"), what="the flood's first alerts", timeout=45)
    rig.ingest("m1", [event(FLOOD, data={"command": wipe, "user": "root", "exit": 0})])
    wait_for(lambda: wipe in (c for _, c in rig.stored()), within=30, why="the critical event in the bot's store")
    seen = len(sent(rig.fake))  # the posts before the bot had it; the next may be under way already
    rig.fake.wait_for(lambda: rig.alerts("wipe the root filesystem"), what="the critical alert", timeout=20)
    order = [label(text) for text in sent(rig.fake)]
    assert order.index("wipe the root filesystem") <= seen + 1, order[seen:]
    # what did not fit the queue is counted in summaries, posted ahead of the infos still waiting
    rig.fake.wait_for(lambda: sum(summarised(m) for m in summaries(rig.fake)) >= FLOOD - MAX_PENDING - 10,
                      what="the summaries of the flood", timeout=20)
    text = json.dumps(summaries(rig.fake)[0]["blocks"])
    assert "more matches of rule *flood* (info) on `web01`" in text and "/om audit" in text
    assert "audit alerts to C0AUDIT overflow its queue" in rig.bot.log()
    assert len(rig.alerts("flood")) < FLOOD - 100  # not posted one by one
