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

import ombot
from ombot.envelope import (
    ACCEPTED_VERSIONS, AGENT_SOFTWARE, REFUSAL_MAGIC, REPLY_MAGIC, REQUEST_MAGIC, SOFTWARE, VERSION, Opener, Peer,
    Refused, Request, VersionRefused, dumps, new_request,
)
from ombot.keys import Identity
from tests import envelope_010

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
                              "args": {"module": "echo"}, "sw": f"ombot {ombot.__version__}"}


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
        (b"OMBx" + good[4:], "bad_frame", "not an OMBot request frame"),
        (b"OMB", "bad_frame", "not an OMBot request frame"),
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
        ({**good, "v": True}, "unsupported envelope version True"),
        ({**good, "v": "1"}, "unsupported envelope version '1'"),
        ({**good, "v": "x" * 38}, "unsupported envelope version '" + "x" * 38 + "'"),  # 40 characters: whole
        ({**good, "v": "x" * 39}, "unsupported envelope version '" + "x" * 36 + "..."),
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


# -- versions: "v", "sw" and "rid" (docs/protocol.md, "Versions") ----------------------------------------


NEXT = "ombot 0.3.0"  # a later release that writes envelope version 2


def test_this_release_names_its_software_and_reads_its_own_version() -> None:
    assert (VERSION, ACCEPTED_VERSIONS) == (1, (1,))
    assert SOFTWARE == f"ombot {ombot.__version__}" and AGENT_SOFTWARE == f"ombot-agent {ombot.__version__}"
    assert new_request("health", "m1", "cli:ops", "cli", {}).software == SOFTWARE
    assert new_request("ingest", "m1", "agent:web01", "agent", {}).software == AGENT_SOFTWARE
    assert new_request("health", "m1", "cli:ops", "cli", {}, software="").software == ""
    made = new_request("health", "m1", "cli:ops", "cli", {}, rid="op-7.a:b_c", software=NEXT)
    assert (made.version, made.software, made.rid) == (1, NEXT, "op-7.a:b_c")
    assert {k: made.payload()[k] for k in ("v", "sw", "rid")} == {"v": 1, "sw": NEXT, "rid": "op-7.a:b_c"}
    assert "sw" not in request(software="").payload() and "rid" not in request().payload()


def test_additive_fields_reach_the_opened_request(opener: Opener, peer: Peer) -> None:
    sent = request(rid="r" * 64, software="ombot-agent 0.2.0rc1+local.3")
    opened, _ = opener.open(peer.seal_request(sent), "submit", now=NOW)
    assert (opened.version, opened.software, opened.rid) == (1, "ombot-agent 0.2.0rc1+local.3", "r" * 64)
    assert opened.payload() == sent.payload()
    longest = request(software="n" * 32 + " " + "9" * 32)
    assert opener.open(peer.seal_request(longest), "submit", now=NOW)[0].software == "n" * 32 + " " + "9" * 32


def test_malformed_additive_fields_are_refused(opener: Opener, peer: Peer, client: Identity) -> None:
    good = request().payload()
    software = 'sw must be NAME VERSION, such as "ombot 0.2.0" (letters, digits, . _ - +)'
    rid = "rid must be 1-64 letters, digits and . _ : - (a correlation id)"
    cases: list[tuple[dict[str, Any], str]] = [
        *(({**good, "sw": bad}, software) for bad in (
            "", "ombot", "ombot  0.2.0", "ombot 0.2.0\nFORGED log line", "ombot 0.2.0 ", " ombot 0.2.0", "0mbot 1",
            "ombot .2", "n" * 33 + " 1", "ombot " + "9" * 33, "ombot 0.2.0\u200b", None, 2, ["ombot 0.2.0"])),
        *(({**good, "rid": bad}, rid) for bad in ("", "r" * 65, "a b", "-lead", "tab\t", "é", None, 7, {"id": "x"})),
    ]
    for payload, message in cases:
        refused = refusal(opener, payload_frame(client, peer, payload))
        assert (refused.code, refused.message) == ("bad_request", message), payload


def test_a_0_1_0_master_opens_a_request_with_the_new_fields(client: Identity, master: Identity) -> None:
    """v1 readers ignore header fields they do not know: a master of the last release serves this one."""
    old = envelope_010.Opener(master, "m1", {"cli:test": client.verify_key}, max_frame=MAX_FRAME, skew=SKEW,
                              max_validity=MAX_VALIDITY)
    peer = Peer(client, master.verify_key)
    sent = request(rid="corr-1")
    opened, reply_peer = old.open(peer.seal_request(sent), "submit", now=NOW)
    assert (opened.id, opened.nonce, opened.requester, opened.args) == (sent.id, sent.nonce, "U0ALICE", {"module": "echo"})
    # its reply names neither version nor software, and this release reads it
    assert peer.open_reply(old.seal_reply(reply_peer, opened, {"ok": 1}), sent) == {"ok": 1}


def test_a_0_1_0_client_is_served_and_reads_the_reply(opener: Opener, client: Identity, master: Identity) -> None:
    old_peer = envelope_010.Peer(client, master.verify_key)
    sent = envelope_010.new_request("submit", "m1", "U0ALICE", "slack", {"module": "echo"}, now=NOW)
    opened, reply_peer = opener.open(old_peer.seal_request(sent), "submit", now=NOW)
    assert (opened.version, opened.software, opened.rid, opened.nonce) == (1, "", "", sent.nonce)
    assert old_peer.open_reply(opener.seal_reply(reply_peer, opened, {"job": "j1"}), sent) == {"job": "j1"}
    with pytest.raises(envelope_010.Refused) as caught:
        old_peer.open_reply(opener.seal_refusal(reply_peer, opened, Refused("expired", "gone")), sent)
    assert (caught.value.code, caught.value.message) == ("expired", "gone")


def test_replies_carry_the_version_and_the_masters_software(opener: Opener, peer: Peer) -> None:
    sent = request()
    opened, reply_peer = opener.open(peer.seal_request(sent), "submit", now=NOW)
    assert json.loads(peer.box.decrypt(opener.seal_reply(reply_peer, opened, {"a": 1})[4:])) == {
        "re": sent.nonce, "v": 1, "sw": SOFTWARE, "ok": True, "result": {"a": 1}}
    sealed = Opener.seal_refusal(reply_peer, opened, Refused("expired", "gone"))
    assert json.loads(peer.box.decrypt(sealed[4:])) == {
        "re": sent.nonce, "v": 1, "sw": SOFTWARE, "ok": False, "error": {"code": "expired", "message": "gone"}}
    assert SOFTWARE.encode() not in Opener.seal_refusal(None, None, Refused("unknown_sender", "no"))


def later(peer: Peer, client: Identity, version: int, **fields: Any) -> tuple[Request, bytes]:
    """A request of another envelope version as a later (or earlier) release would seal it."""
    sent = request(version=version, software=NEXT)
    return sent, payload_frame(client, peer, {**sent.payload(), **fields})


def test_a_later_envelope_version_is_refused_naming_both_releases(opener: Opener, peer: Peer, client: Identity) -> None:
    sent, frame = later(peer, client, 2, args="a later layout", op=["anything"])  # fields of v2 are not parsed
    refused = refusal(opener, frame)
    assert isinstance(refused, VersionRefused) and refused.code == "unsupported_version"
    assert refused.message == (f"this master runs {SOFTWARE} and reads envelope version 1; the request is envelope "
                               f"version 2 from {NEXT}: upgrade the master, or use a client of the same release line")
    assert refused.details == {"master_software": SOFTWARE, "accepted_versions": [1], "request_version": 2,
                               "request_software": NEXT}
    # sealed to the sender (who alone learns the master's software), in version 1's reply layout
    reply = Opener.seal_refusal(None, None, refused)
    assert reply[:4] == REPLY_MAGIC
    assert json.loads(peer.box.decrypt(reply[4:])) == {"re": sent.nonce, "v": 1, "sw": SOFTWARE, "ok": False,
                                                       "error": refused.as_dict()}
    with pytest.raises(Refused) as caught:
        peer.open_reply(reply, sent)
    assert (caught.value.code, caught.value.message, caught.value.details) == (
        "unsupported_version", refused.message, refused.details)


def test_an_earlier_or_unnamed_version_is_refused_too(opener: Opener, peer: Peer, client: Identity) -> None:
    _, frame = later(peer, client, 0)
    assert refusal(opener, frame).message == (
        f"this master runs {SOFTWARE} and reads envelope version 1; the request is envelope version 0 from {NEXT}: "
        "upgrade the client to this master's release line")
    unnamed = "software that does not name its release"
    for fields in ({"sw": "ombot\n0.3.0"}, {"sw": 3}):
        refused = refusal(opener, later(peer, client, 2, **fields)[1])
        assert f"version 2 from {unnamed}: upgrade the master" in refused.message
        assert refused.details["request_software"] is None
    bare = {k: v for k, v in request(version=2).payload().items() if k != "sw"}
    assert f"version 2 from {unnamed}:" in refusal(opener, payload_frame(client, peer, bare)).message
    huge = refusal(opener, later(peer, client, 10 ** 50)[1])
    assert f"envelope version {str(10 ** 50)[:37]}... from" in huge.message
    assert huge.details["request_version"] == 10 ** 50


def test_a_version_refusal_echoes_only_a_nonce_it_can(opener: Opener, peer: Peer, client: Identity) -> None:
    for nonce, echoed in (("n" * 64, "n" * 64), ("n" * 65, ""), (7, "")):
        refused = refusal(opener, later(peer, client, 2, nonce=nonce)[1])
        assert isinstance(refused, VersionRefused) and refused.nonce == echoed
        assert json.loads(peer.box.decrypt(Opener.seal_refusal(None, None, refused)[4:]))["re"] == echoed
    _, frame = later(peer, client, 2)
    frame = frame[:4] + bytes(32) + frame[36:]  # an unknown key: refused before the version is read
    assert refusal(opener, frame).code == "unknown_sender"


def test_a_frame_of_a_later_layout_is_refused_without_naming_the_software(opener: Opener, peer: Peer) -> None:
    good = peer.seal_request(request())
    for magic in (b"OMB2", b"OMB0", b"OMB9"):
        refused = refusal(opener, magic + good[4:])
        assert (refused.code, refused.details) == ("unsupported_version", {"accepted_versions": [1]})
        assert refused.message == (
            f"this master reads envelope version 1, whose request frames begin OMB1; this frame begins "
            f"{magic.decode()}, a later envelope's: upgrade the master, or use a client of the same release line")
        plain = Opener.seal_refusal(None, None, refused)
        assert plain[:4] == REFUSAL_MAGIC and b"ombot 0" not in plain
    assert refusal(opener, b"OMB2").code == "unsupported_version"  # before the length is even looked at


def test_a_reply_this_client_cannot_read_names_both_releases(opener: Opener, peer: Peer) -> None:
    sent = request(software="ombot-agent 0.2.0")
    _, reply_peer = opener.open(peer.seal_request(sent), "submit", now=NOW)

    def sealed(body: dict[str, Any]) -> bytes:
        return REPLY_MAGIC + bytes(reply_peer.box.encrypt(dumps({"re": sent.nonce, **body})))

    both = f" (the master runs {NEXT}, this client ombot-agent 0.2.0)"
    cases = [
        (sealed({"v": 2, "sw": NEXT, "ok": True, "result": {}}),
         "the reply is envelope version 2, the request was version 1" + both),
        (sealed({"v": True, "ok": True, "result": {}}), "the reply is envelope version True, the request was version 1"),
        (sealed({"v": "1", "sw": "x", "ok": True, "result": {}}),
         "the reply is envelope version '1', the request was version 1"),
        (sealed({"sw": NEXT, "ok": True, "result": []}), "the reply's result is not an object" + both),
        (sealed({"sw": NEXT, "ok": "yes"}), "the reply is neither a result nor an error" + both),
        (sealed({"sw": NEXT + "\n", "ok": "yes"}), "the reply is neither a result nor an error"),
        (REFUSAL_MAGIC + dumps({"sw": NEXT, "ok": False, "error": 5}), "the reply is neither a result nor an error"),
    ]
    for frame, message in cases:
        with pytest.raises(Refused) as caught:
            peer.open_reply(frame, sent)
        assert (caught.value.code, caught.value.message) == ("bad_reply", message), frame[:20]
    anonymous = request(software="")
    _, reply_peer = opener.open(peer.seal_request(anonymous), "submit", now=NOW)
    frame = REPLY_MAGIC + bytes(reply_peer.box.encrypt(dumps({"re": anonymous.nonce, "sw": NEXT, "ok": 2})))
    with pytest.raises(Refused) as caught:
        peer.open_reply(frame, anonymous)
    assert caught.value.message == f"the reply is neither a result nor an error (the master runs {NEXT}, this client {SOFTWARE})"
    # a refusal keeps version 1's layout whatever the reply's version: it is read, not "unreadable"
    with pytest.raises(Refused) as caught:
        peer.open_reply(sealed({"v": 2, "ok": False, "error": {"code": "busy", "message": "later"}}), sent)
    assert (caught.value.code, caught.value.message) == ("busy", "later")


def test_a_key_the_master_does_not_accept_learns_no_software(client: Identity, master: Identity) -> None:
    """`bind` opens frames of unregistered keys: anyone's. A later version from one is refused plainly."""
    opener = Opener(master, "m1", {"cli:test": client.verify_key}, max_frame=MAX_FRAME, skew=SKEW,
                    max_validity=MAX_VALIDITY, unregistered={"bind": MAX_FRAME})
    stranger = Identity.generate()
    peer = Peer(stranger, master.verify_key)
    sent = request(op="bind", version=2, software=NEXT)
    refused = refusal(opener, payload_frame(stranger, peer, sent.payload()), op="bind")
    assert not isinstance(refused, VersionRefused)
    assert (refused.code, refused.details) == ("unsupported_version", {"accepted_versions": [1], "request_version": 2})
    assert refused.message == ("this master reads envelope version 1; the request is envelope version 2: "
                               "upgrade the master, or use a client of the same release line")
    plain = Opener.seal_refusal(None, None, refused)
    assert plain[:4] == REFUSAL_MAGIC and SOFTWARE.encode() not in plain
    earlier = refusal(opener, payload_frame(stranger, peer, request(op="bind", version=0).payload()), op="bind")
    assert earlier.message.endswith("envelope version 0: upgrade the client to this master's release line")
    # the same request from an accepted key is told both releases
    mine = Peer(client, master.verify_key)
    assert SOFTWARE in refusal(opener, payload_frame(client, mine, sent.payload()), op="bind").message


def test_a_master_reading_two_versions_answers_each_in_its_own(monkeypatch: pytest.MonkeyPatch, opener: Opener,
                                                               peer: Peer, client: Identity) -> None:
    """The release that brings version 2 reads 1 and 2 (docs/protocol.md): its opener, in its own words."""
    import ombot.envelope

    monkeypatch.setattr(ombot.envelope, "ACCEPTED_VERSIONS", (1, 2))
    for version in (1, 2):
        sent, frame = later(peer, client, version)
        opened, reply_peer = opener.open(frame, "submit", now=NOW)
        assert (opened.version, opened.software) == (version, NEXT)
        assert json.loads(peer.box.decrypt(opener.seal_reply(reply_peer, opened, {})[4:]))["v"] == version
    too_new = refusal(opener, later(peer, client, 3)[1])
    assert too_new.message == (f"this master runs {SOFTWARE} and reads envelope versions 1, 2; the request is envelope "
                               f"version 3 from {NEXT}: upgrade the master, or use a client of the same release line")
    assert too_new.details["accepted_versions"] == [1, 2]
