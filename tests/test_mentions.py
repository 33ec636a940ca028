"""Nothing a person types or a module prints pings anyone (issue 18, item 7): `<!channel>`, `<!here>` and
`<@U0OTHER>` sent through every kind of message OMBot posts, by a real `ombot bot` on the fake Slack with
a real master. The same message model rendered as plain text for the terminal (item 10), and the Slack
app that refuses to start without the one workspace it serves (item 8)."""

from __future__ import annotations

import html
import io
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import pytest

from ombot.bot.console import ConsoleTransport
from ombot.bot.transport import ChatRequest
from ombot.errors import ConfigError
from ombot.message import Markup, Message, code, error_message, escape, for_slack, plain, section
from tests.fakeslack import FakeSlack, post_to_bot
from tests.rigs import (
    AUDIT_CHANNEL, CHANNEL, SECRET, SlackRig, approval, audit_site, event, floor, ingest, policy, role, rule, slack_env,
    table,
)
from tests.support import CLI_CLIENT, Cluster, bot_table, child_env, free_port

ALICE, LEAD, OTHER = "U0ALICE", "U0LEAD", "U0OTHER"
PINGS = ("<!channel>", "<!here>", f"<@{OTHER}>")
LOUD = " ".join(PINGS)
QUIET = escape(LOUD)  # what each message must show instead: &lt;!channel&gt; &lt;!here&gt; &lt;@U0OTHER&gt;
POLICY = policy(role("ops", ALICE), role("leads", LEAD), role("auditors", ALICE),
                rule("shell needs a lead", modules=["shell.exec"], request=["ops"], approval=approval()),
                rule("everyday", modules=["echo"], request=["ops"]),
                table("audit", viewers=["auditors"]))
RULES = f"""
channel = "{AUDIT_CHANNEL}"

[[rules]]
name = "loud"
keywords = ["LOUD"]
cooldown_seconds = 0
"""
FLOOR = floor("m1")


def typed(text: str) -> str:
    """A slash command's text as Slack sends it: &, < and > as entities."""
    return html.escape(text, quote=False)


class Rig(SlackRig):
    """The rig, asked as a person types: `ask` sends the text with Slack's entities."""

    def ask(self, text: str, user: str = ALICE) -> Callable[[str], str]:
        """`/om TEXT` typed in Slack; returns a waiter for an answer to `user` alone (its whole body as
        JSON) that holds a needle."""
        return self.command(typed(text), user).wait_body

    def ingest(self, events: list[dict[str, Any]]) -> None:
        """A batch straight from web01's agent key to the master, as the agent would send it."""
        assert ingest(self.cluster, "m1", events)["stored"] == len(events)


def sent_to_slack(fake: FakeSlack) -> list[str]:
    """Every message body the bot sent: posts, updates, ephemerals and response_url answers."""
    methods = ("chat.postMessage", "chat.update", "chat.postEphemeral", "response_url")
    return [json.dumps(c.body) for c in fake.calls if c.method in methods]


def assert_pings_nobody(shown: str) -> None:
    for ping in PINGS:
        assert ping not in shown, f"{ping} reached Slack in {shown[:2000]}"


@pytest.fixture(scope="module")
def rig(make_module_slack_rig) -> Rig:
    return make_module_slack_rig(kind=Rig, policy=POLICY, admins=(CLI_CLIENT,), extra_toml=FLOOR, **audit_site(RULES))


# -- through Slack -------------------------------------------------------------------------------------


def test_a_job_card_and_its_results_ping_nobody(rig: Rig) -> None:
    rig.ask(f'echo localhost message="{LOUD}"')("Starting job #")
    card = rig.posted(CHANNEL, "echo on 1 host(s) in local by U0ALICE: 1/1 hosts")  # its final state
    results = rig.posted(CHANNEL, "Results of #")
    assert results.get("thread_ts") == card["ts"]
    assert QUIET in results["text"]  # the plain-text fallback: the module's output, escaped
    assert QUIET in json.dumps(results["blocks"]) and QUIET in json.dumps(card["blocks"])  # the params
    assert_pings_nobody(json.dumps([card, results]))


def test_a_dry_run_pings_nobody(rig: Rig) -> None:
    shown = rig.ask(f'echo localhost message="{LOUD}" dry_run=yes')("would run")
    assert QUIET in shown
    assert_pings_nobody(shown)


def test_an_approval_and_its_denial_ping_nobody(rig: Rig) -> None:
    number = int(re.search(r"Waiting as request #(\d+)", rig.ask(f'shell.exec localhost cmd="echo {LOUD}"')(
        "Waiting as request #")).group(1))  # type: ignore[union-attr]
    rig.ask(f"deny {number} {LOUD}", user=LEAD)(f"Denied request #{number}.")
    card = rig.posted(CHANNEL, f"[approval #{number} denied]")
    told = rig.posted(CHANNEL, f"Request #{number} (`shell.exec`) was denied by <@{LEAD}>: {QUIET}")
    assert QUIET in json.dumps(card["blocks"]) and QUIET in card["text"]  # the command and the reason
    assert_pings_nobody(json.dumps([card, told]))


def test_a_schedule_reply_and_the_listing_ping_nobody(rig: Rig) -> None:
    reply = rig.ask(f'schedule every 1h run echo localhost message="{LOUD}"')("is active")
    number = int(re.search(r"Schedule #(\d+) is active", reply).group(1))  # type: ignore[union-attr]
    listing = rig.ask("schedules")(f"#{number} active")
    assert f'message="{QUIET}" by <@{ALICE}>' in json.loads(listing)["text"]  # the parameter as typed, escaped
    cli = rig.cluster.ombot("schedules")  # an admin's CLI sees them all: what was typed, no Slack markup
    assert cli.returncode == 0 and f'message="{LOUD}" by U0ALICE in {CHANNEL}' in cli.stdout, cli.stdout
    assert "<!date" not in cli.stdout
    rig.ask(f"schedule delete {number}")(f"Deleted schedule #{number}")
    assert_pings_nobody(reply + listing)


@pytest.mark.parametrize("text, said", [
    (f"echo localhost {PINGS[2]}", f"unexpected '{escape(PINGS[2])}'"),  # the grammar
    (f"status {PINGS[0]}", f"No job '{escape(PINGS[0])}'"),
    (f"nosuch{PINGS[1]} localhost", f"No module `nosuch{escape(PINGS[1])}`"),
    (f"echo localhost message=hi timeout={PINGS[0]}", f"got '{escape(PINGS[0])}'"),
    (f"jobs since={PINGS[1]}", escape(PINGS[1])),
    (f"schedule pause {PINGS[2]}", f"No schedule '{escape(PINGS[2])}'"),
    (f"echo {PINGS[2]} message=hi", "Refused: "),  # the master refuses the targets
    (f"audit grep=x user={PINGS[0]} colour={PINGS[2]}", escape(PINGS[2])),
], ids=["grammar", "status", "module", "timeout", "since", "schedule", "targets", "audit"])
def test_error_replies_echo_the_words_escaped(rig: Rig, text: str, said: str) -> None:
    shown = rig.ask(text)(said)
    assert_pings_nobody(shown)


def test_an_error_that_names_the_requester_still_mentions_them(rig: Rig) -> None:
    """A refusal raised as Markup keeps OMBot's own mention (the one exception to escaping errors)."""
    started = rig.ask("echo localhost message=mine")("Starting job #")
    job = int(re.search(r"Starting job #(\d+)", started).group(1))  # type: ignore[union-attr]
    rig.ask(f"cancel {job}", user=LEAD)(f"Refused: only the requester (<@{ALICE}>)")


def test_an_alert_and_a_search_ping_nobody(rig: Rig) -> None:
    rig.ingest([event(1, data={"command": f"echo LOUD {LOUD}", "user": "alice", "exit": 0})])
    alert = rig.posted(AUDIT_CHANNEL, "] loud on ", timeout=45)
    assert QUIET in alert["text"] and QUIET in json.dumps(alert["blocks"])
    search = rig.ask("audit grep=LOUD")(QUIET)
    assert_pings_nobody(json.dumps(alert) + search)


def test_requests_without_a_team_or_from_another_are_refused(rig: Rig) -> None:
    fields = rig.fake.slash_command(text="help", channel_id=CHANNEL)
    del fields["team_id"]
    assert post_to_bot(rig.port, urlencode(fields), SECRET)[0] == 403
    other = rig.fake.slash_command(text="help", channel_id=CHANNEL, team_id="T0OTHER")
    assert post_to_bot(rig.port, urlencode(other), SECRET)[0] == 403


def test_nothing_the_bot_sent_pinged_anyone(rig: Rig) -> None:
    """After every test above on the rig (module scope, file order): each post, update and answer."""
    sent = sent_to_slack(rig.fake)
    assert len(sent) > 20 and any(QUIET in s for s in sent)
    for body in sent:
        assert_pings_nobody(body)


# -- the message model, per surface ---------------------------------------------------------------------


def test_the_slack_boundary_disarms_a_broadcast_a_builder_let_through() -> None:
    careless = Message(f"{LOUD} <!date^1^{{date}}|2001-09-09>",
                       [section(f"*hi* {LOUD}"), {"type": "context", "elements": [{"type": "mrkdwn", "text": LOUD}]},
                        {"type": "section", "text": {"type": "plain_text", "text": LOUD}}])
    sent = for_slack(careless)
    assert sent.blocks is not None
    shown = sent.text + json.dumps(sent.blocks[:2])
    assert "<!channel>" not in shown and "<!here>" not in shown and "&lt;!channel>" in shown
    assert "<!date^1^{date}|2001-09-09>" in sent.text  # OMBot's own dates stay
    assert sent.blocks[2]["text"]["text"] == LOUD  # plain_text never pings
    quiet = Message(QUIET, [section(QUIET)])
    assert for_slack(quiet) is quiet


def test_plain_text_shows_what_was_typed_without_slack_markup() -> None:
    for typed_text in (LOUD, "a ``` b", "&lt; &amp; <x>", "`id` *bold* web*"):
        assert plain(escape(typed_text)) == typed_text
        assert plain(code(typed_text)).strip("\n") == typed_text
    marked = f"by <@{ALICE}> <!date^4102444800^{{date_short_pretty}}|2100-01-01 00:00 UTC>:\n{code('rows')}"
    assert plain(marked) == f"by @{ALICE} 2100-01-01 00:00 UTC:\nrows\n"


def test_an_error_is_escaped_unless_raised_as_markup() -> None:
    assert error_message(ValueError(f"unexpected {PINGS[0]!r}")).text == f"unexpected '{escape(PINGS[0])}'"
    assert error_message(ValueError(Markup(f"only <@{ALICE}>")), "Refused: ").text == f"Refused: only <@{ALICE}>"


def test_the_console_shows_plain_text(make_cluster: Callable[..., Cluster]) -> None:
    """The console's own transport on a real master, with no team_id (the console needs none)."""
    from ombot.bot.service import BotService

    cluster = make_cluster(extra_toml=bot_table(team_id=None, console_user=ALICE))
    cluster.start("m1")
    out = io.StringIO()
    service = BotService(cluster.config(), origin="console")
    try:
        transport = ConsoleTransport(out)
        service.start(transport)
        for text in (f'echo localhost message="{LOUD} a ``` b"', f"echo localhost {PINGS[2]}", "jobs", "masters"):
            service.dispatcher.command(ChatRequest(ALICE, "console", text, origin="console"), transport)
        wait_until(lambda: "Results of #1" in out.getvalue() and out.getvalue().count(f"(to {ALICE})") >= 4)
    finally:
        service.close()
    shown = out.getvalue()
    assert f"{LOUD} a ``` b" in shown.split("Results of #1", 1)[1]  # the module's output, as it printed it
    assert f"unexpected '{PINGS[2]}'" in shown  # the typed words, not &lt;...&gt;
    assert f"by @{ALICE}" in shown and f"<@{ALICE}>" not in shown  # mentions as @user
    assert "&lt;" not in shown and "<!date" not in shown
    assert re.search(rf"\(to {ALICE}\)\nm1\s+local\s+up, ", shown), shown  # the masters' table, no ``` fences
    assert shown.count("```") == 2  # only the two the module printed (in the card's thread and its log)


def wait_until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# -- the one workspace --------------------------------------------------------------------------------


def test_the_slack_app_refuses_to_start_without_a_team_id(make_cluster: Callable[..., Cluster]) -> None:
    with FakeSlack() as fake:
        port = free_port()
        cluster = make_cluster(extra_toml=bot_table(port, team_id=None))
        cluster.start("m1")
        started = subprocess.run([sys.executable, "-m", "ombot", "--config", str(cluster.config_path), "bot"],
                                 capture_output=True, text=True, timeout=60, env=child_env(slack_env(fake)))
        assert started.returncode != 0
        assert "[bot] team_id is not set" in started.stderr + started.stdout
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0  # it never listened
        assert not fake.calls  # nor spoke to Slack


def test_a_team_id_must_look_like_one(make_cluster: Callable[..., Cluster]) -> None:
    from ombot.bot.settings import BotSettings

    assert BotSettings.from_config(make_cluster(extra_toml=bot_table(team_id="T0AB12")).config()).team_id == "T0AB12"
    for bad in ("ombot-test", "t0ab12", "C0OPS", "T"):
        with pytest.raises(ConfigError) as info:
            BotSettings.from_config(make_cluster(extra_toml=bot_table(team_id=bad)).config())
        assert "team_id" in str(info.value) and "workspace id" in str(info.value)

