"""The Slack face in Socket Mode: the real `ombot bot` process connects to our fake Slack's websocket
(apps.connections.open hands out its loopback ws:// URL), acks envelopes, and runs jobs on a real
master with the local backend."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.rigs import CHANNEL, SlackRig

pytestmark = pytest.mark.slow  # a bot and a master per test; the HTTP face is in the fast tier


class SocketRig(SlackRig):
    """The rig in Socket Mode: commands and clicks are envelopes pushed down the bot's websocket."""

    def command(self, text: str, **fields: Any) -> tuple[str, dict[str, Any]]:  # type: ignore[override]
        """Push a /om slash-command envelope; return its envelope id and the payload pushed."""
        payload = self.fake.slash_command(text=text, **fields)
        return self.fake.socket.push("slash_commands", payload), payload

    def card(self, number: int, condition: Callable[[dict[str, Any]], bool] = lambda _: True,  # type: ignore[override]
             timeout: float = 30, what: str = "") -> dict[str, Any]:
        """Job #number's card as the channel shows it, once `condition` holds for it."""
        def find() -> dict[str, Any] | None:
            card = next((m for m in self.fake.messages(CHANNEL) if f"[#{number} " in m.get("text", "")), None)
            return card if card is not None and condition(card) else None
        return self.fake.wait_for(find, timeout, what=what or f"the card of job #{number}")

    def results(self, card: dict[str, Any]) -> dict[str, Any]:
        return self.replies(card)[0]


@pytest.fixture
def rig(make_slack_rig) -> SocketRig:
    return make_slack_rig(kind=SocketRig, socket_mode=True)


def test_slash_commands_are_acked_then_answered(rig: SocketRig) -> None:
    opened = rig.fake.calls_to("apps.connections.open")
    assert opened and all(c.ok for c in opened) and rig.fake.socket.hellos == 1  # the app token worked

    envelope_id, _ = rig.command("echo localhost message=hi")
    ack = rig.fake.socket.wait_ack(envelope_id)
    assert ack.envelope_id == envelope_id and json.loads(ack.raw)["envelope_id"] == envelope_id
    assert not ack.payload  # a bare ack: answers come later, from OMBot's own workers
    card = rig.final_card(1)
    assert "[#1 ok] echo on 1 host(s) in local by U0ALICE" in card["text"]
    assert not any(b["type"] == "actions" for b in card["blocks"])  # no Cancel button once ended
    results = rig.results(card)
    assert "localhost" in results["text"] and "hi" in results["text"]
    rig.fake.wait_for(lambda: any("Starting job #1" in (e.get("text") or "") for e in rig.fake.ephemerals),
                      what="the ephemeral 'Starting job #1'")

    envelope_id, _ = rig.command('echo localhost message="unclosed')
    assert not rig.fake.socket.wait_ack(envelope_id).payload
    rig.fake.wait_for(lambda: any("close every quote" in (e.get("text") or "") for e in rig.fake.ephemerals),
                      what="the parse error, to the sender only")
    assert len(rig.fake.messages(CHANNEL)) == 1  # still only job #1's card


def test_cancel_click_envelope_cancels_a_running_job(rig: SocketRig) -> None:
    envelope_id, _ = rig.command("test.sleep localhost seconds=60")
    rig.fake.socket.wait_ack(envelope_id)
    card = rig.card(1, lambda c: "running" in c["text"], what="a running card")
    button = next(b for b in card["blocks"] if b["type"] == "actions")["elements"][0]
    click = rig.fake.block_actions(button["action_id"], button["value"], message_ts=card["ts"])
    click_id = rig.fake.socket.push("interactive", click)
    ack = rig.fake.socket.wait_ack(click_id)
    assert ack.envelope_id == click_id and not ack.payload
    final = rig.final_card(1)
    assert "[#1 cancelled] test.sleep" in final["text"]
    rig.fake.wait_for(lambda: any("Cancelling job #1" in (c.body.get("text") or "") for c in rig.fake.response_posts),
                      what="'Cancelling job #1' to the clicker")


def test_reconnects_when_slack_asks_for_a_refresh(rig: SocketRig) -> None:
    rig.fake.socket.request_refresh()
    # Push only once the old socket is gone: an envelope sent down a closing socket is lost (so is it
    # with Slack, which then retries; the fake does not).
    rig.fake.wait_for(lambda: rig.fake.socket.hellos >= 2 and rig.fake.socket.connections == 1, timeout=30,
                      what="the bot on a fresh connection, the old one closed")
    envelope_id, _ = rig.command("jobs")
    rig.fake.socket.wait_ack(envelope_id)
    rig.fake.wait_for(lambda: any("No jobs yet" in (e.get("text") or "") for e in rig.fake.ephemerals),
                      what="the answer to /om jobs after the refresh")
