"""The envelope alone, in one process: sealing, opening and every refusal of ombot/envelope.py.

The same checks through a running master are in tests/test_attacks.py; these are the fast unit tests
the mutation run (scripts/mutate.py) uses, so each assertion names the exact code, message and details.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest

from ombot.envelope import (
    REFUSAL_MAGIC, REPLY_MAGIC, REQUEST_MAGIC, Opener, Peer, Refused, Request, dumps, new_request,
)
from ombot.keys import Identity

NOW = 1_700_000_000
SKEW, MAX_VALIDITY, MAX_FRAME = 30, 300, 4096


@pytest.fixture(scope="module")
def client() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="module")
def master() -> Identity:
    return Identity.generate()


@pytest.fixture
def opener(client: Identity, master: Identity) -> Opener:
    return Opener(master, "m1", {"cli:test": client.verify_key}, max_frame=MAX_FRAME, skew=SKEW,
                  max_validity=MAX_VALIDITY)


@pytest.fixture
def peer(client: Identity, master: Identity) -> Peer:
    return Peer(client, master.verify_key)


def request(**changes: Any) -> Request:
    base = new_request("submit", "m1", "U0ALICE", "slack", {"module": "echo"}, now=NOW)
    return Request(**{**base.__dict__, **changes})


def payload_frame(sender: Identity, peer: Peer, payload: dict[str, Any] | bytes) -> bytes:
    """A request frame around any signed payload, even one no honest client would build."""
    body = payload if isinstance(payload, bytes) else dumps(payload)
    return REQUEST_MAGIC + sender.verify_key_bytes + bytes(peer.box.encrypt(bytes(sender.signing_key.sign(body))))


def refusal(opener: Opener, frame: object, op: str = "submit", now: float = NOW) -> Refused:
    with pytest.raises(Refused) as caught:
        opener.open(frame, op, now=now)
    return caught.value


# -- the honest path ---------------------------------------------------------------------------------


def test_new_request_fills_in_the_time_a_uuid_and_a_fresh_nonce() -> None:
    made = new_request("events", "m2", "cli:ops", "cli", {"job": "j"}, validity=60, now=NOW + 0.9)
    assert (made.op, made.to, made.requester, made.origin, made.args) == ("events", "m2", "cli:ops", "cli", {"job": "j"})
    assert (made.issued_at, made.expires_at) == (NOW, NOW + 60)
    assert str(uuid.UUID(made.id)) == made.id
    assert len(made.nonce) == 32 and int(made.nonce, 16) >= 0
    again = new_request("events", "m2", "cli:ops", "cli", {}, request_id="fixed", now=NOW)
    assert again.id == "fixed" and again.nonce != made.nonce and again.expires_at == NOW + 120


def test_payload_names_every_signed_field() -> None:
    made = request()
    assert made.payload() == {"v": 1, "op": "submit", "id": made.id, "to": "m1", "iat": NOW, "exp": NOW + 120,
                              "nonce": made.nonce, "requester": "U0ALICE", "origin": "slack",
                              "args": {"module": "echo"}}


def test_dumps_is_canonical() -> None:
    assert dumps({"b": 1, "a": [1, "é"]}) == '{"a":[1,"é"],"b":1}'.encode()


def test_a_sealed_request_opens_to_the_same_request_with_its_sender(opener: Opener, peer: Peer) -> None:
    sent = request()
    frame = peer.seal_request(sent)
    assert frame[:4] == REQUEST_MAGIC
    opened, reply_peer = opener.open(frame, "submit", now=NOW)
    assert opened.payload() == sent.payload()
    assert opened.sender == "cli:test"
    assert json.loads(reply_peer.peer_key.verify(opened.signed)) == sent.payload()  # the evidence verifies
    result = {"job": "j1", "hosts": ["web01"]}
    assert peer.open_reply(opener.seal_reply(reply_peer, opened, result), sent) == result


def test_a_reply_without_a_result_is_an_empty_result(opener: Opener, peer: Peer) -> None:
    sent = request()
    _, reply_peer = opener.open(peer.seal_request(sent), "submit", now=NOW)
    frame = REPLY_MAGIC + bytes(reply_peer.box.encrypt(dumps({"re": sent.nonce, "ok": True})))
    assert peer.open_reply(frame, sent) == {}


def test_the_clock_limits_are_inclusive(opener: Opener, peer: Peer) -> None:
    for issued, now in ((NOW - SKEW, NOW), (NOW + SKEW, NOW)):
        sent = request(issued_at=issued, expires_at=issued + MAX_VALIDITY)
        assert opener.open(peer.seal_request(sent), "submit", now=now)[0].issued_at == issued
    sent = request(expires_at=NOW + 1)
    assert opener.open(peer.seal_request(sent), "submit", now=NOW + 0.5)[0].expires_at == NOW + 1


def test_the_limits_on_fields_are_inclusive(opener: Opener, peer: Peer) -> None:
    for origin in ("cli", "slack", "console"):
        assert opener.open(peer.seal_request(request(origin=origin)), "submit", now=NOW)[0].origin == origin
    longest = "u" * 256
    assert opener.open(peer.seal_request(request(requester=longest)), "submit", now=NOW)[0].requester == longest


# -- refusals of the master ----------------------------------------------------------------------------


def test_frames_that_are_not_requests(opener: Opener, peer: Peer, client: Identity) -> None:
    good = peer.seal_request(request())
    cases: list[tuple[object, str, str]] = [
        (bytearray(good), "bad_frame", "a frame must be bytes, got bytearray"),
        ("OMB1", "bad_frame", "a frame must be bytes, got str"),
        (b"OMB2" + good[4:], "bad_frame", "not an OMBot request frame"),
        (good[:4 + 32 + 24 + 15], "bad_frame", "not an OMBot request frame"),
        (REQUEST_MAGIC + bytes(32) + good[36:], "unknown_sender", "the sender's key is not accepted by this master"),
        (good[:-1] + bytes([good[-1] ^ 1]), "bad_mac",
         "the frame failed authentication (tampered, or sealed for another key)"),
    ]
    for frame, code, message in cases:
        refused = refusal(opener, frame)
        assert (refused.code, refused.message, refused.details) == (code, message, {})
    # The shortest frame with room for a key, a nonce and a MAC is not cut off as "not a frame".
    assert refusal(opener, good[:4 + 32 + 24 + 16]).code == "bad_mac"


def test_the_frame_cap_is_inclusive_and_named(opener: Opener, peer: Peer) -> None:
    big = peer.seal_request(request(args={"pad": ""}))
    pad = MAX_FRAME - len(big)
    at_cap = peer.seal_request(request(args={"pad": "x" * pad}))
    assert len(at_cap) == MAX_FRAME and opener.open(at_cap, "submit", now=NOW)[0].args == {"pad": "x" * pad}
    over = peer.seal_request(request(args={"pad": "x" * (pad + 1)}))
    refused = refusal(opener, over)
    assert refused.code == "frame_too_large"
    assert refused.message == f"frame of {MAX_FRAME + 1} bytes exceeds the cap of {MAX_FRAME}"
    assert refused.details == {"size": MAX_FRAME + 1, "cap": MAX_FRAME}


def test_a_signature_by_another_key_is_refused(opener: Opener, peer: Peer, client: Identity) -> None:
    forger = Identity.generate()
    signed = bytes(forger.signing_key.sign(dumps(request().payload())))
    frame = REQUEST_MAGIC + client.verify_key_bytes + bytes(peer.box.encrypt(signed))
    refused = refusal(opener, frame)
    assert (refused.code, refused.message) == ("bad_signature", "the request's signature does not verify")


def test_malformed_requests(opener: Opener, peer: Peer, client: Identity) -> None:
    good = request().payload()
    cases: list[tuple[dict[str, Any] | bytes, str]] = [
        (b"not json", "the message is not JSON"),
        (b"[" * 3000, "the message is not JSON"),  # nested deeper than json.loads recurses
        (b"\xff\xfe", "the message is not JSON"),
        (b"[1, 2]", "the message is not a JSON object"),
        (dumps(good).replace(b'"U0ALICE"', b'"\\ud800"'),
         "the message holds a string that is not valid Unicode text (a lone surrogate)"),
        (dumps(good).replace(b'"echo"', b'["\\udfff"]'),
         "the message holds a string that is not valid Unicode text (a lone surrogate)"),
        (dumps(good).replace(b'"module"', b'"\\ud800"'),
         "the message holds a string that is not valid Unicode text (a lone surrogate)"),
        ({**good, "v": 2}, "unsupported envelope version 2"),
        ({**good, "v": True}, "unsupported envelope version True"),
        ({**good, "v": 1.0}, "unsupported envelope version 1.0"),
        ({k: v for k, v in good.items() if k != "v"}, "unsupported envelope version None"),
        ({k: v for k, v in good.items() if k != "args"}, "malformed request field: 'args'"),
        ({**good, "op": 5}, "malformed request field: op must be a string"),
        ({**good, "iat": "1"}, "malformed request field: iat must be an integer"),
        ({**good, "exp": True}, "malformed request field: exp must be an integer"),
        ({**good, "args": []}, "args must be an object"),
        ({**good, "nonce": "ab" * 15}, "nonce must be 32 lowercase hex digits"),
        ({**good, "nonce": "AB" * 16}, "nonce must be 32 lowercase hex digits"),
        ({**good, "nonce": "X" * 32}, "nonce must be 32 lowercase hex digits"),
        ({**good, "id": "not-a-uuid"}, "request id must be a UUID"),
        ({**good, "id": good["id"].upper()}, "request id must be a UUID"),
        ({**good, "origin": "email"}, "origin must be one of cli, slack, console, agent"),
        ({**good, "requester": ""}, "requester must be 1-256 characters"),
        ({**good, "requester": "u" * 257}, "requester must be 1-256 characters"),
    ]
    for payload, message in cases:
        refused = refusal(opener, payload_frame(client, peer, payload))
        assert (refused.code, refused.message) == ("bad_request", message), payload


def test_requests_for_another_op_master_or_time(opener: Opener, peer: Peer) -> None:
    sent = request()
    frame = peer.seal_request(sent)
    wrong_op = refusal(opener, frame, op="cancel")
    assert (wrong_op.code, wrong_op.message) == ("wrong_op", "a 'submit' request was sent to 'cancel'")
    elsewhere = refusal(opener, peer.seal_request(request(to="m2")))
    assert (elsewhere.code, elsewhere.message) == ("wrong_recipient", "the request is for master 'm2', this is 'm1'")

    stale = refusal(opener, frame, now=NOW + SKEW + 1)
    assert (stale.code, stale.details) == ("stale", {"skew": SKEW + 1, "allowed": SKEW})
    assert stale.message == f"issued-at is +{SKEW + 1} s from this master's clock; allowed skew is {SKEW} s"
    future = refusal(opener, frame, now=NOW - SKEW - 1)
    assert (future.code, future.details) == ("future", {"skew": -SKEW - 1, "allowed": SKEW})
    assert future.message == f"issued-at is -{SKEW + 1} s from this master's clock; allowed skew is {SKEW} s"

    short = peer.seal_request(request(expires_at=NOW + 10))
    expired = refusal(opener, short, now=NOW + 10)
    assert (expired.code, expired.message) == ("expired", "the request has expired")
    too_long = refusal(opener, peer.seal_request(request(expires_at=NOW + MAX_VALIDITY + 1)))
    assert (too_long.code, too_long.message) == ("bad_request", f"validity over {MAX_VALIDITY} s")


def test_without_a_given_time_the_clock_is_used(opener: Opener, peer: Peer) -> None:
    before = int(time.time())
    made = new_request("submit", "m1", "U0ALICE", "slack", {})
    assert before <= made.issued_at <= int(time.time()) and made.expires_at == made.issued_at + 120
    assert opener.open(peer.seal_request(made), "submit")[0].nonce == made.nonce
    old = request(issued_at=before - 3600, expires_at=before - 3600 + 60)
    assert refusal_of_now(opener, peer.seal_request(old)).code == "stale"


def refusal_of_now(opener: Opener, frame: bytes) -> Refused:
    with pytest.raises(Refused) as caught:
        opener.open(frame, "submit")
    return caught.value


def test_with_no_skew_allowed_one_second_either_way_is_refused(client: Identity, master: Identity,
                                                               peer: Peer) -> None:
    strict = Opener(master, "m1", {"cli:test": client.verify_key}, max_frame=MAX_FRAME, skew=0,
                    max_validity=MAX_VALIDITY)
    frame = peer.seal_request(request())
    assert strict.open(frame, "submit", now=NOW)[0].issued_at == NOW
    assert refusal(strict, frame, now=NOW + 1).code == "stale"
    assert refusal(strict, frame, now=NOW - 1).code == "future"


# -- refusals travelling back ----------------------------------------------------------------------------


def test_refusals_travel_sealed_when_the_sender_is_known(opener: Opener, peer: Peer) -> None:
    sent = request()
    opened, reply_peer = opener.open(peer.seal_request(sent), "submit", now=NOW)
    refused = Refused("stale", "too old", skew=40, allowed=30)
    assert str(refused) == "too old"  # what a caller that prints the exception shows
    assert refused.as_dict() == {"code": "stale", "message": "too old", "details": {"skew": 40, "allowed": 30}}
    assert Refused("expired", "gone").as_dict() == {"code": "expired", "message": "gone"}

    sealed = Opener.seal_refusal(reply_peer, opened, refused)
    assert sealed[:4] == REPLY_MAGIC
    plain = Opener.seal_refusal(None, None, refused)
    assert plain == REFUSAL_MAGIC + dumps({"ok": False, "error": refused.as_dict()})
    assert Opener.seal_refusal(reply_peer, None, refused) == plain
    for frame in (sealed, plain):
        with pytest.raises(Refused) as caught:
            peer.open_reply(frame, sent)
        assert (caught.value.code, caught.value.message, caught.value.details) == (
            "stale", "too old", {"skew": 40, "allowed": 30})


def test_a_bare_refusal_has_defaults(peer: Peer) -> None:
    with pytest.raises(Refused) as caught:
        peer.open_reply(REFUSAL_MAGIC + dumps({"ok": False, "error": {}}), request())
    assert (caught.value.code, caught.value.message, caught.value.details) == ("refused", "refused", {})


def test_replies_the_client_refuses(opener: Opener, peer: Peer) -> None:
    sent = request()
    _, reply_peer = opener.open(peer.seal_request(sent), "submit", now=NOW)

    def sealed(body: dict[str, Any]) -> bytes:
        return REPLY_MAGIC + bytes(reply_peer.box.encrypt(dumps(body)))

    cases = [
        (b"HTTP/1.1", "not an OMBot reply frame"),
        (REPLY_MAGIC + b"x" * 40, "the reply failed authentication"),
        (REFUSAL_MAGIC + dumps({"ok": True, "result": {}}), "a result arrived in an unauthenticated frame"),
        (REFUSAL_MAGIC + b"[1]", "the reply is malformed: the message is not a JSON object"),
        (sealed({"re": "0" * 32, "ok": True, "result": {}}), "the reply answers another request"),
        (sealed({"re": sent.nonce, "ok": True, "result": [1]}), "the reply's result is not an object"),
        (sealed({"re": sent.nonce, "ok": 1, "result": {}}), "the reply is neither a result nor an error"),
        (sealed({"re": sent.nonce, "ok": False, "error": "no"}), "the reply is neither a result nor an error"),
    ]
    for frame, message in cases:
        with pytest.raises(Refused) as caught:
            peer.open_reply(frame, sent)
        assert (caught.value.code, caught.value.message) == ("bad_reply", message), frame[:20]
