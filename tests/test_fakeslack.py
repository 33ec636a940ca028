"""The fake Slack itself, exercised with the real slack_sdk WebClient and slack_bolt (all on loopback)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from urllib.parse import parse_qs

import pytest
from slack_bolt import App, BoltRequest
from slack_bolt.adapter.socket_mode import SocketModeHandler
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_handlers import RateLimitErrorRetryHandler
from slack_sdk.signature import SignatureVerifier
from slack_sdk.webhook import WebhookClient
from websockets.sync.client import connect as ws_connect

from tests.fakeslack import (
    MAX_BLOCKS_JSON,
    FakeSlack,
    block_actions_body,
    fake_slack,  # noqa: F401  (fixture)
    signed_request,
    slash_command_body,
    view_submission_body,
)

QUIET = logging.getLogger("fakeslack-test-bolt")
QUIET.setLevel(logging.CRITICAL)


@pytest.fixture
def lax_fake() -> Iterator[FakeSlack]:
    """A fake whose violations the test inspects itself (no assertion at teardown)."""
    with FakeSlack() as fake:
        yield fake


def client_for(fake: FakeSlack, token: str | None = None, **kw) -> WebClient:
    return WebClient(token=token or fake.bot_token, base_url=fake.url, **kw)


def section(text: str, **kw) -> dict:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}, **kw}


def button(action_id: str, value: str = "v", text: str = "Go") -> dict:
    return {"type": "button", "action_id": action_id, "value": value, "text": {"type": "plain_text", "text": text}}


def modal(blocks: list | None = None, **kw) -> dict:
    view = {"type": "modal", "callback_id": "run", "title": {"type": "plain_text", "text": "Run"},
            "submit": {"type": "plain_text", "text": "Run"},
            "blocks": blocks if blocks is not None else [
                {"type": "input", "block_id": "target", "label": {"type": "plain_text", "text": "Hosts"},
                 "element": {"type": "plain_text_input", "action_id": "value"}}]}
    view.update(kw)
    return view


def slack_error(call) -> str:
    with pytest.raises(SlackApiError) as caught:
        call()
    return caught.value.response["error"]


# --- Web API basics ---------------------------------------------------------------------------------


def test_auth_test_answers_for_the_configured_team(fake_slack: FakeSlack) -> None:
    answer = client_for(fake_slack).auth_test()
    assert answer["team_id"] == fake_slack.team_id
    assert answer["user_id"] == fake_slack.bot_user_id
    assert answer["bot_id"] == fake_slack.bot_id
    call = fake_slack.calls_to("auth.test")[0]
    assert call.headers["authorization"] == f"Bearer {fake_slack.bot_token}"


def test_a_wrong_token_is_invalid_auth_and_the_app_token_is_refused(lax_fake: FakeSlack) -> None:
    assert slack_error(client_for(lax_fake, "xoxb-wrong").auth_test) == "invalid_auth"
    assert slack_error(client_for(lax_fake, lax_fake.app_token).auth_test) == "not_allowed_token_type"
    assert slack_error(lambda: client_for(lax_fake).apps_connections_open(app_token=lax_fake.bot_token)) == \
        "not_allowed_token_type"


def test_messages_threads_and_edits_keep_the_state_a_user_sees(fake_slack: FakeSlack) -> None:
    client = client_for(fake_slack)
    parent = client.chat_postMessage(channel="C1", text="run #1 started", blocks=[section("*run #1*")])
    reply1 = client.chat_postMessage(channel="C1", text="web01 ok", thread_ts=parent["ts"])
    reply2 = client.chat_postMessage(channel="C1", text="web02 ok", thread_ts=reply1["ts"])  # a reply's ts
    assert parent["ts"] < reply1["ts"] < reply2["ts"]
    assert reply2["message"]["thread_ts"] == parent["ts"]
    client.chat_update(channel="C1", ts=parent["ts"], text="run #1 done")

    thread = fake_slack.thread("C1", parent["ts"])
    assert [m["text"] for m in thread] == ["run #1 done", "web01 ok", "web02 ok"]
    assert thread[0]["blocks"] == [section("*run #1*")]  # chat.update without blocks keeps them
    assert thread[0]["reply_count"] == 2
    assert [m["text"] for m in fake_slack.messages("C1")] == ["run #1 done"]
    assert len(fake_slack.messages("C1", include_replies=True)) == 3
    assert fake_slack.calls_to("chat.postMessage")[0].body["blocks"] == [section("*run #1*")]


def test_form_encoded_calls_are_parsed_too(fake_slack: FakeSlack) -> None:
    client = client_for(fake_slack)
    answer = client.api_call("chat.postMessage", data={"channel": "C1", "text": "hi",
                                                       "blocks": json.dumps([section("hi")])})
    assert answer["message"]["blocks"] == [section("hi")]
    call = fake_slack.calls_to("chat.postMessage")[0]
    assert call.body["channel"] == "C1" and call.headers["content-type"].startswith("application/x-www-form")


def test_update_of_an_unknown_message_is_message_not_found(lax_fake: FakeSlack) -> None:
    assert slack_error(lambda: client_for(lax_fake).chat_update(channel="C1", ts="1.000001", text="x")) == \
        "message_not_found"
    assert [v.error for v in lax_fake.violations] == ["message_not_found"]


def test_a_reply_to_an_unknown_thread_fails(lax_fake: FakeSlack) -> None:
    post = lambda: client_for(lax_fake).chat_postMessage(channel="C1", text="x", thread_ts="1.000001")  # noqa: E731
    assert slack_error(post) == "thread_not_found"


def test_ephemeral_messages_answer_message_ts_and_cannot_be_edited(lax_fake: FakeSlack) -> None:
    client = client_for(lax_fake)
    answer = client.chat_postEphemeral(channel="C1", user="U0ALICE", text="only you")
    assert answer["message_ts"]
    assert lax_fake.ephemerals[0]["user"] == "U0ALICE"
    assert slack_error(lambda: client.chat_update(channel="C1", ts=answer["message_ts"], text="x")) == \
        "message_not_found"


def test_directory_lookups(fake_slack: FakeSlack) -> None:
    fake_slack.usergroups["S0OPS"] = ["U0ALICE", "U0BOB"]
    fake_slack.users = {"U0ALICE": {"name": "alice"}}
    client = client_for(fake_slack)
    assert client.usergroups_users_list(usergroup="S0OPS")["users"] == ["U0ALICE", "U0BOB"]
    assert slack_error(lambda: client.usergroups_users_list(usergroup="S0NONE")) == "no_such_subteam"
    assert client.users_info(user="U0ALICE")["user"]["name"] == "alice"
    assert slack_error(lambda: client.users_info(user="U0EVE")) == "user_not_found"
    assert client.conversations_info(channel="C0OPS")["channel"]["id"] == "C0OPS"


def test_an_unknown_method_is_a_violation(lax_fake: FakeSlack) -> None:
    assert slack_error(lambda: client_for(lax_fake).api_call("chat.scheduleMessage")) == "unknown_method"
    with pytest.raises(AssertionError, match="chat.scheduleMessage"):
        lax_fake.assert_no_violations()


def test_injected_failures_answer_the_error_then_stop(fake_slack: FakeSlack) -> None:
    fake_slack.fail("chat.postMessage", "channel_not_found")
    client = client_for(fake_slack)
    assert slack_error(lambda: client.chat_postMessage(channel="C1", text="x")) == "channel_not_found"
    assert client.chat_postMessage(channel="C1", text="x")["ok"]


def test_wait_for_call_sees_output_from_another_thread(fake_slack: FakeSlack) -> None:
    client = client_for(fake_slack)
    threading.Thread(target=lambda: client.chat_postMessage(channel="C1", text="later")).start()
    call = fake_slack.wait_for_call("chat.postMessage", lambda c: c.body["text"] == "later")
    assert call.response["ok"]
    with pytest.raises(AssertionError, match="timed out"):
        fake_slack.wait_for_call("chat.update", timeout=0.1)


# --- Slack's size limits --------------------------------------------------------------------------

BREACHES = {
    "text": ({"text": "x" * 40_001}, "msg_too_long"),
    "51 blocks": ({"blocks": [{"type": "divider"}] * 51}, "invalid_blocks"),
    "section text": ({"blocks": [section("x" * 3_001)]}, "invalid_blocks"),
    "empty section text": ({"blocks": [section("")]}, "invalid_blocks"),
    "button value": ({"blocks": [{"type": "actions", "elements": [button("a", "v" * 2_001)]}]}, "invalid_blocks"),
    "action_id": ({"blocks": [{"type": "actions", "elements": [button("a" * 256)]}]}, "invalid_blocks"),
    "block_id": ({"blocks": [section("x", block_id="b" * 256)]}, "invalid_blocks"),
    "26 elements": ({"blocks": [{"type": "actions", "elements": [button(f"a{i}") for i in range(26)]}]},
                    "invalid_blocks"),
    "duplicate action_id": ({"blocks": [{"type": "actions", "elements": [button("a"), button("a")]}]},
                            "invalid_blocks"),
    "header": ({"blocks": [{"type": "header", "text": {"type": "plain_text", "text": "h" * 151}}]},
               "invalid_blocks"),
    "blocks JSON": ({"blocks": [section("x" * 2_900) for _ in range(5)]}, "msg_blocks_too_long"),
}


@pytest.mark.parametrize("name", list(BREACHES))
def test_each_limit_breach_is_answered_and_recorded(lax_fake: FakeSlack, name: str) -> None:
    fields, error = BREACHES[name]
    post = lambda: client_for(lax_fake).chat_postMessage(channel="C1", text=fields.get("text", "t"),  # noqa: E731
                                                         blocks=fields.get("blocks"))
    assert slack_error(post) == error
    assert error in [v.error for v in lax_fake.violations]
    assert lax_fake.messages("C1") == []
    with pytest.raises(AssertionError, match="broke Slack's rules"):
        lax_fake.assert_no_violations()


def test_messages_at_the_limits_pass(fake_slack: FakeSlack) -> None:
    client = client_for(fake_slack)
    client.chat_postMessage(channel="C1", text="x" * 40_000)
    client.chat_postMessage(channel="C1", text="t", blocks=[{"type": "divider"}] * 50)
    client.chat_postMessage(channel="C1", text="t", blocks=[
        section("x" * 3_000, block_id="b" * 255),
        {"type": "header", "text": {"type": "plain_text", "text": "h" * 150}},
        {"type": "actions", "elements": [button(f"a{i}", "v" * 80) for i in range(25)]},
    ])
    blocks = [section("x" * 2_900) for _ in range(4)]
    assert len(json.dumps(blocks, separators=(",", ":"))) < MAX_BLOCKS_JSON
    client.chat_postMessage(channel="C1", text="t", blocks=blocks)
    assert len(fake_slack.messages("C1")) == 4


def test_chat_update_is_checked_too(lax_fake: FakeSlack) -> None:
    client = client_for(lax_fake)
    ts = client.chat_postMessage(channel="C1", text="ok")["ts"]
    assert slack_error(lambda: client.chat_update(channel="C1", ts=ts, text="x" * 40_001)) == "msg_too_long"
    assert lax_fake.message("C1", ts)["text"] == "ok"


# --- modals ---------------------------------------------------------------------------------------


def test_views_open_needs_a_fresh_issued_trigger(lax_fake: FakeSlack) -> None:
    client = client_for(lax_fake)
    trigger = lax_fake.issue_trigger()
    view = client.views_open(trigger_id=trigger, view=modal(external_id="run-1"))["view"]
    assert lax_fake.views[view["id"]]["callback_id"] == "run"
    assert slack_error(lambda: client.views_open(trigger_id=trigger, view=modal())) == "exchanged_trigger_id"
    assert slack_error(lambda: client.views_open(trigger_id="123.456.abc", view=modal())) == "invalid_trigger_id"
    expired = lax_fake.issue_trigger(ttl=0)
    assert slack_error(lambda: client.views_open(trigger_id=expired, view=modal())) == "expired_trigger_id"
    assert {v.error for v in lax_fake.violations} == {"exchanged_trigger_id", "invalid_trigger_id",
                                                      "expired_trigger_id"}


def test_views_update_by_id_or_external_id_with_hash(fake_slack: FakeSlack) -> None:
    client = client_for(fake_slack)
    opened = client.views_open(trigger_id=fake_slack.issue_trigger(), view=modal(external_id="run-1"))["view"]
    updated = client.views_update(view_id=opened["id"], hash=opened["hash"], view=modal(callback_id="step2"))
    assert fake_slack.views[opened["id"]]["callback_id"] == "step2"
    client.views_update(external_id="run-1", view=modal(callback_id="step3", external_id="run-1"))
    assert fake_slack.views[opened["id"]]["callback_id"] == "step3"
    stale = lambda: client.views_update(view_id=opened["id"], hash=updated["view"]["hash"], view=modal())  # noqa
    assert slack_error(stale) == "hash_conflict"


def test_views_push_stacks_at_most_three(lax_fake: FakeSlack) -> None:
    client = client_for(lax_fake)
    root = client.views_open(trigger_id=lax_fake.issue_trigger(), view=modal())["view"]
    second = client.views_push(trigger_id=lax_fake.issue_trigger(view_id=root["id"]), view=modal())["view"]
    third = client.views_push(trigger_id=lax_fake.issue_trigger(view_id=second["id"]), view=modal())["view"]
    assert third["root_view_id"] == root["id"] and third["previous_view_id"] == second["id"]
    push = lambda: client.views_push(trigger_id=lax_fake.issue_trigger(view_id=third["id"]), view=modal())  # noqa
    assert slack_error(push) == "push_limit_reached"


@pytest.mark.parametrize("view, error", [
    (modal([{"type": "divider"}] * 101), "invalid_arguments"),
    (modal([section("x" * 2_900, block_id=f"b{i}") for i in range(90)]), "view_too_large"),
    (modal(title={"type": "plain_text", "text": "t" * 25}), "invalid_arguments"),
    ({k: v for k, v in modal().items() if k != "submit"}, "invalid_arguments"),
])
def test_views_are_checked_against_modal_limits(lax_fake: FakeSlack, view: dict, error: str) -> None:
    client = client_for(lax_fake)
    assert slack_error(lambda: client.views_open(trigger_id=lax_fake.issue_trigger(), view=view)) == error
    assert lax_fake.views == {}


# --- files ----------------------------------------------------------------------------------------


def test_files_upload_v2_works_end_to_end(fake_slack: FakeSlack) -> None:
    client = client_for(fake_slack)
    parent = client.chat_postMessage(channel="C1", text="run #7")
    answer = client.files_upload_v2(channel="C1", thread_ts=parent["ts"], content="web01: ok\n",
                                    filename="run-7.log", title="run 7 log", initial_comment="full output")
    assert answer["file"]["id"]
    [uploaded] = fake_slack.files
    assert (uploaded.content, uploaded.filename, uploaded.title) == (b"web01: ok\n", "run-7.log", "run 7 log")
    assert (uploaded.channel, uploaded.thread_ts, uploaded.initial_comment) == ("C1", parent["ts"], "full output")
    shared = fake_slack.thread("C1", parent["ts"])[-1]
    assert shared["text"] == "full output" and shared["files"][0]["id"] == uploaded.id
    assert [c.method for c in fake_slack.calls] == ["chat.postMessage", "files.getUploadURLExternal", "upload",
                                                    "files.completeUploadExternal"]


def test_completing_an_upload_never_sent_fails(lax_fake: FakeSlack) -> None:
    client = client_for(lax_fake)
    file_id = client.files_getUploadURLExternal(filename="a.txt", length=3)["file_id"]
    complete = lambda: client.files_completeUploadExternal(files=[{"id": file_id}], channel_id="C1")  # noqa
    assert slack_error(complete) == "file_not_found"


# --- response_url ---------------------------------------------------------------------------------


def test_a_response_url_takes_five_posts_and_refuses_the_sixth(lax_fake: FakeSlack) -> None:
    hook = WebhookClient(lax_fake.new_response_url(channel="C1", user_id="U0ALICE"))
    statuses = [hook.send(text=f"update {i}").status_code for i in range(6)]
    assert statuses == [200] * 5 + [404]
    assert hook.send(text="again").body == "used_url"
    assert [len(lax_fake.ephemerals)] == [5]
    assert lax_fake.response_posts[0].body == {"text": "update 0"}
    assert {v.error for v in lax_fake.violations} == {"used_url"}


def test_response_url_posts_act_on_the_clicked_message(fake_slack: FakeSlack) -> None:
    client = client_for(fake_slack)
    ts = client.chat_postMessage(channel="C1", text="approve?", blocks=[
        {"type": "actions", "elements": [button("approve")]}])["ts"]
    click = fake_slack.block_actions("approve", "v", channel_id="C1", message_ts=ts)
    assert click["message"]["text"] == "approve?"
    hook = WebhookClient(click["response_url"])
    assert hook.send(text="approved by alice", replace_original=True).status_code == 200
    assert fake_slack.message("C1", ts)["text"] == "approved by alice"
    assert hook.send(text="run started", response_type="in_channel").status_code == 200
    assert [m["text"] for m in fake_slack.messages("C1")] == ["approved by alice", "run started"]
    assert hook.send(text="x" * 40_001).status_code == 400
    assert [v.error for v in fake_slack.take_violations()] == ["msg_too_long"]  # on purpose


# --- rate limits ----------------------------------------------------------------------------------


def test_a_rate_limit_answers_429_with_retry_after(lax_fake: FakeSlack) -> None:
    lax_fake.rate_limit("chat.postMessage", times=1, retry_after=7)
    with pytest.raises(SlackApiError) as caught:
        client_for(lax_fake).chat_postMessage(channel="C1", text="x")
    assert caught.value.response.status_code == 429
    assert caught.value.response.headers["Retry-After"] == "7"
    assert caught.value.response["error"] == "ratelimited"
    [call] = lax_fake.calls_to("chat.postMessage", include_rate_limited=True)
    assert call.rate_limited and call.body == {"channel": "C1", "text": "x"}
    assert lax_fake.messages("C1") == []


@pytest.mark.slow
def test_the_sdk_retry_handler_gets_through(fake_slack: FakeSlack) -> None:
    fake_slack.rate_limit("chat.postMessage", times=2, retry_after=0)
    client = client_for(fake_slack, retry_handlers=[RateLimitErrorRetryHandler(max_retry_count=5)])
    assert client.chat_postMessage(channel="C1", text="finally")["ok"]
    assert [c.rate_limited for c in fake_slack.calls_to("chat.postMessage", include_rate_limited=True)] == \
        [True, True, False]
    assert [m["text"] for m in fake_slack.messages("C1")] == ["finally"]


# --- HTTP mode helpers ----------------------------------------------------------------------------


def test_signed_requests_verify_with_the_sdk() -> None:
    body = slash_command_body(command="/om", text="run echo")
    headers = signed_request("s3cret", body)
    verifier = SignatureVerifier("s3cret")
    assert verifier.is_valid_request(body, headers)
    assert not SignatureVerifier("other").is_valid_request(body, headers)
    assert parse_qs(body)["text"] == ["run echo"]


def test_bolt_accepts_the_built_http_bodies(fake_slack: FakeSlack) -> None:
    app = App(client=client_for(fake_slack), signing_secret="s3cret", logger=QUIET)
    seen: list[tuple[str, object]] = []

    @app.command("/om")
    def on_command(ack, command):
        ack("on it")
        seen.append(("command", command["text"]))

    @app.action("approve")
    def on_click(ack, body):
        ack()
        seen.append(("action", body["actions"][0]["value"]))

    @app.view("run")
    def on_submit(ack, view):
        ack(response_action="errors", errors={"target": "no such host"})
        seen.append(("view", view["state"]["values"]["target"]["value"]["value"]))

    bodies = [slash_command_body(text="run echo"), block_actions_body("approve", "job-7", message_ts="1.000001"),
              view_submission_body("run", {"target": {"value": "web99"}})]
    answers = [app.dispatch(BoltRequest(body=b, headers=signed_request("s3cret", b))) for b in bodies]
    assert [a.status for a in answers] == [200, 200, 200]
    assert answers[0].body == "on it"  # Bolt answers a text-only ack as plain text
    assert json.loads(answers[2].body)["errors"] == {"target": "no such host"}
    assert seen == [("command", "run echo"), ("action", "job-7"), ("view", "web99")]
    forged = app.dispatch(BoltRequest(body=bodies[0], headers=signed_request("wrong", bodies[0])))
    assert forged.status == 401


# --- Socket Mode ----------------------------------------------------------------------------------


@pytest.fixture
def bolt_socket(fake_slack: FakeSlack) -> Iterator[tuple[App, SocketModeHandler]]:
    client = client_for(fake_slack)
    app = App(client=client, logger=QUIET)
    handler = SocketModeHandler(app, fake_slack.app_token, web_client=client, logger=QUIET)
    yield app, handler
    handler.close()


@pytest.mark.slow
def test_bolt_socket_mode_acks_echo_the_envelope(fake_slack: FakeSlack, bolt_socket) -> None:
    app, handler = bolt_socket

    @app.command("/om")
    def on_command(ack, command, client):
        ack(f"running {command['text']}")
        client.chat_postMessage(channel=command["channel_id"], text=f"{command['text']} started")

    handler.connect()
    fake_slack.socket.wait_connected()
    assert fake_slack.calls_to("apps.connections.open")[0].headers["authorization"].endswith(fake_slack.app_token)
    envelope_id = fake_slack.socket.push("slash_commands", fake_slack.slash_command("/om", "echo hi"))
    ack = fake_slack.socket.wait_ack(envelope_id)
    assert ack.envelope_id == envelope_id and ack.payload == {"text": "running echo hi"}
    fake_slack.wait_for(lambda: fake_slack.messages("C0OPS"), what="the started message")
    assert fake_slack.messages("C0OPS")[0]["text"] == "echo hi started"
    assert fake_slack.socket.unacked() == []


@pytest.mark.slow
def test_socket_mode_modal_round_trip(fake_slack: FakeSlack, bolt_socket) -> None:
    app, handler = bolt_socket

    @app.command("/om")
    def on_command(ack, body, client):
        ack()
        client.views_open(trigger_id=body["trigger_id"], view=modal(private_metadata="job=7"))

    @app.view("run")
    def on_submit(ack, view):
        host = view["state"]["values"]["target"]["value"]["value"]
        ack(response_action="errors", errors={"target": f"unknown host {host}"})

    handler.connect()
    fake_slack.socket.wait_ack(fake_slack.socket.push("slash_commands", fake_slack.slash_command("/om")))
    [view_id] = fake_slack.wait_for(lambda: list(fake_slack.views), what="the modal")
    submit = fake_slack.view_submission(view_id, {"target": {"value": "web99"}})
    assert submit["view"]["private_metadata"] == "job=7"
    ack = fake_slack.socket.wait_ack(fake_slack.socket.push("interactive", submit))
    assert ack.payload == {"response_action": "errors", "errors": {"target": "unknown host web99"}}


@pytest.mark.slow
def test_socket_mode_checks_ack_payloads(lax_fake: FakeSlack) -> None:
    client = client_for(lax_fake)
    app = App(client=client, logger=QUIET)

    @app.command("/om")
    def on_command(ack):
        ack(text="x" * 40_001)

    @app.view("run")
    def on_submit(ack):
        ack(response_action="errors", errors={"nope": "not an input block"})

    handler = SocketModeHandler(app, lax_fake.app_token, web_client=client, logger=QUIET)
    handler.connect()
    try:
        lax_fake.socket.wait_ack(lax_fake.socket.push("slash_commands", lax_fake.slash_command("/om")))
        submit = lax_fake.view_submission(
            client.views_open(trigger_id=lax_fake.issue_trigger(), view=modal())["view"]["id"], {})
        lax_fake.socket.wait_ack(lax_fake.socket.push("interactive", submit))
    finally:
        handler.close()
    assert [v.error for v in lax_fake.violations] == ["msg_too_long", "invalid_errors"]


def test_socket_mode_refuses_a_url_not_from_apps_connections_open(lax_fake: FakeSlack) -> None:
    with ws_connect(f"ws://127.0.0.1:{lax_fake.socket.port}/link/?ticket=forged") as ws:
        with pytest.raises(Exception):
            ws.recv(timeout=5)
    assert [v.error for v in lax_fake.violations] == ["invalid_ticket"]
    assert lax_fake.socket.connections == 0


def test_acks_must_echo_a_pushed_envelope_once(lax_fake: FakeSlack) -> None:
    url = client_for(lax_fake).apps_connections_open(app_token=lax_fake.app_token)["url"]
    with ws_connect(url) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "hello"
        envelope_id = lax_fake.socket.push("slash_commands", lax_fake.slash_command("/om", "status"))
        envelope = json.loads(ws.recv(timeout=10))
        assert (envelope["envelope_id"], envelope["type"], envelope["accepts_response_payload"]) == \
            (envelope_id, "slash_commands", True)
        assert envelope["payload"]["text"] == "status"
        with pytest.raises(AssertionError, match="not_acked"):
            lax_fake.assert_no_violations()
        ws.send(json.dumps({"envelope_id": "never-pushed"}))
        ws.send(json.dumps({"envelope_id": envelope_id, "payload": {"text": "ok"}}))
        ws.send(json.dumps({"envelope_id": envelope_id}))
        assert lax_fake.socket.wait_ack(envelope_id).payload == {"text": "ok"}
        lax_fake.wait_for(lambda: len(lax_fake.violations) == 2, what="both bad acks")
    assert [v.error for v in lax_fake.violations] == ["unknown_envelope", "double_ack"]
    assert lax_fake.socket.unacked() == []
