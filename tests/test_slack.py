"""The Slack face end to end: signed requests to the real `ombot bot` process, our fake Slack Web API,
and a real master with the local backend."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests import rigs
from tests.fakeslack import block_actions_body, signed_request, slash_command_body, view_submission_body
from tests.rigs import CHANNEL, SECRET


class SlackRig(rigs.SlackRig):
    """The rig, spoken raw: a command is the bot's (HTTP status, body), its answers go to a bare response_url."""

    def command(self, text: str, **fields: Any) -> tuple[int, str]:  # type: ignore[override]
        fields.setdefault("response_url", self.fake.new_response_url())
        return self.send(slash_command_body(text=text, **fields))

    def results(self, card: dict[str, Any]) -> dict[str, Any]:
        return self.replies(card)[0]

    def replies_to_user(self) -> list[str]:
        return [json.dumps(c.body) for c in self.fake.response_posts]


@pytest.fixture
def rig(make_slack_rig) -> SlackRig:
    return make_slack_rig(kind=SlackRig)


def test_signature_is_checked(rig: SlackRig) -> None:
    body = slash_command_body(text="help")
    assert rig.send(body)[0] == 200
    assert rig.send(body, signed_request("wrong-secret", body))[0] == 401
    assert rig.send(body, signed_request(SECRET, body, timestamp=int(time.time()) - 6 * 60))[0] == 401
    assert rig.send(body, {"Content-Type": "application/x-www-form-urlencoded"})[0] == 401


@pytest.mark.slow
def test_other_workspace_is_refused(rig: SlackRig) -> None:
    status, _ = rig.send(slash_command_body(text="help", team_id="T0OTHER"))
    assert status == 403
    time.sleep(0.5)
    assert not rig.fake.response_posts


def test_slash_command_card_progress_and_thread_results(rig: SlackRig) -> None:
    status, body = rig.command("echo web[01-03] message=\u201chello there\u201d")
    assert status == 200 and body == ""  # acked at once, nothing else in the ack
    card = rig.final_card(1)
    assert "[#1 ok] echo on 3 host(s) in local by U0ALICE: 3/3 hosts \u00b7 3 ok" in card["text"]
    assert not any(b["type"] == "actions" for b in card["blocks"])  # no Cancel button once ended
    assert rig.fake.calls_to("chat.update")
    results = rig.results(card)
    for host in ("web01", "web02", "web03"):
        assert host in results["text"]
    assert "hello there" in results["text"]
    assert any("Starting job #1" in r for r in rig.replies_to_user())


@pytest.mark.slow
def test_bad_input_always_gets_an_answer(rig: SlackRig) -> None:
    cases = {
        "ech localhost": "Did you mean",
        "echo localhost message=x colour=red": "colour",
        "echo nohost message=x": "no host or group matches",
        'echo localhost message="unclosed': "close every quote",
        "facts web[0:2]": "Ansible subscripts",
        "status 999": "No job",
    }
    for text, expected in cases.items():
        url = rig.fake.new_response_url()
        assert rig.command(text, response_url=url)[0] == 200
        reply = rig.fake.wait_for(lambda: [c for c in rig.fake.response_posts if c.path.endswith(url.rsplit("/", 1)[1])],
                                  what=f"an answer to {text!r}")
        assert expected in json.dumps(reply[0].body), (text, reply[0].body)


@pytest.mark.slow
def test_missing_params_open_a_generated_modal_with_field_errors(rig: SlackRig) -> None:
    trigger = rig.fake.issue_trigger()
    assert rig.command("run test.sleep", trigger_id=trigger)[0] == 200
    opened = rig.fake.wait_for_call("views.open")
    view = opened.body["view"] if isinstance(opened.body["view"], dict) else json.loads(opened.body["view"])
    blocks = {b.get("block_id"): b for b in view["blocks"]}
    assert blocks["p:seconds"]["element"]["type"] == "number_input"
    assert "targets" in blocks
    bad = {"targets": {"v": "localhost"}, "p:seconds": {"v": {"type": "number_input", "value": "9999"}}}
    status, answer = rig.send(view_submission_body("om_run", bad, private_metadata=view["private_metadata"]))
    assert status == 200
    errors = json.loads(answer)
    assert errors["response_action"] == "errors" and "0 to 600" in errors["errors"]["p:seconds"]
    good = {"targets": {"v": "localhost"}, "p:seconds": {"v": {"type": "number_input", "value": "0"}}}
    status, answer = rig.send(view_submission_body("om_run", good, private_metadata=view["private_metadata"]))
    assert status == 200 and answer == ""
    assert "[#1 ok] test.sleep" in rig.final_card(1)["text"]


@pytest.mark.slow
def test_cancel_button_mid_run(rig: SlackRig) -> None:
    rig.command("test.sleep localhost seconds=60")
    card = rig.fake.wait_for(lambda: (c := rig.card(1)) and "running" in c["text"] and c, what="a running card")
    button = next(b for b in card["blocks"] if b["type"] == "actions")["elements"][0]
    stranger = block_actions_body(button["action_id"], button["value"], user_id="U0MALLORY", message_ts=card["ts"],
                                  response_url=rig.fake.new_response_url())
    assert rig.send(stranger)[0] == 200
    rig.fake.wait_for(lambda: any("only the requester" in r for r in rig.replies_to_user()), what="a refusal")
    click = block_actions_body(button["action_id"], button["value"], message_ts=card["ts"],
                               response_url=rig.fake.new_response_url())
    assert rig.send(click)[0] == 200
    final = rig.final_card(1)
    assert "[#1 cancelled]" in final["text"] and "cancel requested by <@U0ALICE>" in final["text"]


@pytest.mark.slow
def test_rate_limit_storm_loses_nothing(rig: SlackRig) -> None:
    rig.fake.rate_limit("chat.postMessage", times=4, retry_after=1)
    rig.fake.rate_limit("chat.update", times=4, retry_after=1)
    rig.command("echo web[01-03] message=storm")
    card = rig.final_card(1, timeout=60)
    assert "3/3 hosts" in card["text"]
    assert "storm" in rig.results(card)["text"]
    assert len(rig.fake.calls_to("chat.postMessage", include_rate_limited=True)) > len(rig.fake.calls_to("chat.postMessage"))


@pytest.mark.slow
def test_long_output_goes_to_a_file_in_the_thread(rig: SlackRig) -> None:
    rig.command('shell.exec localhost cmd="seq 1 4000"')
    card = rig.final_card(1)
    rig.results(card)
    upload = rig.fake.wait_for(lambda: rig.fake.files, what="an uploaded file")[0]
    assert upload.thread_ts == card["ts"]
    assert b"\n3999\n4000\n" in upload.content


@pytest.mark.slow
def test_jobs_status_and_masters(rig: SlackRig) -> None:
    rig.command("echo localhost message=one")
    rig.final_card(1)
    for text, expected in (("jobs", "#1 ok"), ("jobs mine", "#1 ok"), ("status 1", "*ok*"), ("masters", "m1")):
        url = rig.fake.new_response_url()
        rig.command(text, response_url=url)
        rig.fake.wait_for(lambda: any(expected in json.dumps(c.body) for c in rig.fake.response_posts
                                      if c.path.endswith(url.rsplit("/", 1)[1])), what=f"reply to {text}")


@pytest.mark.slow
def test_not_in_the_channel_the_card_goes_by_response_url(rig: SlackRig) -> None:
    rig.fake.fail("chat.postMessage", "not_in_channel", times=2)
    url = rig.fake.new_response_url(channel=CHANNEL)
    rig.command("echo localhost message=private", response_url=url)
    token = url.rsplit("/", 1)[1]
    posts = rig.fake.wait_for(lambda: (p := [c for c in rig.fake.response_posts if c.path.endswith(token)])
                              and len(p) >= 3 and p, what="card and results by response_url")
    texts = [json.dumps(p.body) for p in posts]
    assert any("in_channel" in t and "[#1 " in t for t in texts)
    assert any("private" in t for t in texts)
    assert len(posts) <= 5


@pytest.mark.slow
def test_restarted_bot_finds_its_cards(rig: SlackRig) -> None:
    rig.command("test.sleep localhost seconds=4")
    card = rig.fake.wait_for(lambda: (c := rig.card(1)) and "running" in c["text"] and c, what="a running card")
    rig.bot.stop()
    rig.bot.start(rig.port)
    final = rig.final_card(1, timeout=30)
    assert final["ts"] == card["ts"] and "[#1 ok]" in final["text"]
    assert "woke" in rig.results(final)["text"]


@pytest.mark.slow
def test_card_updates_are_throttled_but_the_final_state_is_always_written(rig: SlackRig) -> None:
    # web01..web03 finish 1, 2 and 3 s in: four events inside three seconds.
    rig.command('shell.exec web[01-03] cmd="sleep ${OMBOT_HOST#web0}; echo done"')
    card = rig.final_card(1)
    assert "3/3 hosts \u00b7 3 ok" in card["text"]
    updates = [c for c in rig.fake.calls_to("chat.update") if c.body.get("ts") == card["ts"]]
    progress = [u for u in updates if "[#1 ok]" not in json.dumps(u.body)]
    gaps = [later.at - earlier.at for earlier, later in zip(progress, progress[1:])]
    assert progress and all(gap >= 1.9 for gap in gaps), gaps  # at most one update per 2 s per card
    assert "[#1 ok]" in json.dumps(updates[-1].body)


@pytest.mark.slow
def test_a_dry_run_through_the_modal_stays_a_dry_run(rig: SlackRig) -> None:
    trigger = rig.fake.issue_trigger()
    url = rig.fake.new_response_url(channel=CHANNEL)
    rig.command("run test.sleep dry_run=yes seconds=0", trigger_id=trigger, response_url=url)
    opened = rig.fake.wait_for_call("views.open")
    view = opened.body["view"] if isinstance(opened.body["view"], dict) else json.loads(opened.body["view"])
    good = {"targets": {"v": "localhost"}, "p:seconds": {"v": {"type": "number_input", "value": "0"}}}
    assert rig.send(view_submission_body("om_run", good, private_metadata=view["private_metadata"]))[0] == 200
    token = url.rsplit("/", 1)[1]
    rig.fake.wait_for(lambda: any("Dry run" in json.dumps(c.body) for c in rig.fake.response_posts
                                  if c.path.endswith(token)), what="the dry-run answer by response_url")
    time.sleep(0.5)
    assert not rig.fake.messages(CHANNEL)  # no job card: nothing ran
