"""ombot/envelope.py as OMBot 0.1.0 shipped it, frozen: the request parser and reply opener an old master
and an old client run. tests/test_envelope.py opens 0.2.0 requests with it (additive header fields must not
bother a 0.1.0 master) and 0.1.0 requests with the new opener. Never edit it: it stands for released code."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from nacl.exceptions import BadSignatureError, CryptoError
from nacl.public import Box
from nacl.signing import VerifyKey

from ombot.keys import Identity, box_public
from ombot.errors import OmbotError

REQUEST_MAGIC = b"OMB1"
REPLY_MAGIC = b"OMR1"
REFUSAL_MAGIC = b"OMX1"
VERSION = 1
# ingest: audit agents only; audit_read: the bot; registry: admin CLI keys (docs/protocol.md)
OPS = ("catalog", "expand", "submit", "events", "cancel", "health", "ingest", "audit_read", "preview", "registry",
       "jobs")
ORIGINS = ("cli", "slack", "console", "agent")
_KEY_LEN = 32

class Refused(OmbotError):
    """A request the master will not act on; travels back as structured data, never a traceback."""

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code, self.message, self.details = code, message, details

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, **({"details": self.details} if self.details else {})}

def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()

@dataclass(frozen=True)
class Request:
    """One opened (or about to be sealed) request: its header fields and the operation's args."""

    op: str
    id: str
    to: str
    issued_at: int
    expires_at: int
    nonce: str
    requester: str
    origin: str
    args: dict[str, Any]
    sender: str = ""  # the client id the sender key maps to, filled in by the opener
    signed: bytes = field(default=b"", repr=False)  # the signed inner message, kept as evidence

    def payload(self) -> dict[str, Any]:
        return {
            "v": VERSION, "op": self.op, "id": self.id, "to": self.to, "iat": self.issued_at,
            "exp": self.expires_at, "nonce": self.nonce, "requester": self.requester,
            "origin": self.origin, "args": self.args,
        }

def new_request(
    op: str, to: str, requester: str, origin: str, args: dict[str, Any],
    request_id: str | None = None, validity: int = 120, now: float | None = None,
) -> Request:
    issued = int(time.time() if now is None else now)
    return Request(
        op=op, id=request_id or str(uuid.uuid4()), to=to, issued_at=issued, expires_at=issued + validity,
        nonce=os.urandom(16).hex(), requester=requester, origin=origin, args=args,
    )

class Peer:
    """One side's view of a conversation with one other party: a precomputed Box."""

    def __init__(self, me: Identity, peer_key: VerifyKey) -> None:
        self.me, self.peer_key = me, peer_key
        self.box = Box(me.box_key, box_public(peer_key))

    def seal_request(self, request: Request) -> bytes:
        signed = self.me.signing_key.sign(dumps(request.payload()))
        return REQUEST_MAGIC + self.me.verify_key_bytes + bytes(self.box.encrypt(bytes(signed)))

    def open_reply(self, frame: bytes, request: Request) -> dict[str, Any]:
        """The reply's result, or raise Refused with the master's reason.

        A refusal frame is not authenticated, so whoever sits on the link can write one: it may
        only ever refuse, never carry a result. Anything malformed is `bad_reply`.
        """
        reply = self._reply_of(frame, request)
        if reply.get("ok") is True:
            if frame[:4] != REPLY_MAGIC:
                raise Refused("bad_reply", "a result arrived in an unauthenticated frame")
            result = reply.get("result", {})
            if not isinstance(result, dict):
                raise Refused("bad_reply", "the reply's result is not an object")
            return result
        raise _refusal(reply.get("error"))

    def _reply_of(self, frame: bytes, request: Request) -> dict[str, Any]:
        if frame[:4] == REFUSAL_MAGIC:
            body = frame[4:]
        elif frame[:4] == REPLY_MAGIC:
            try:
                body = self.box.decrypt(frame[4:])
            except CryptoError:
                raise Refused("bad_reply", "the reply failed authentication") from None
        else:
            raise Refused("bad_reply", "not an OMBot reply frame")
        try:
            reply = _json(body)
        except Refused as exc:  # e.g. our own request frame reflected back: it opens with the same Box
            raise Refused("bad_reply", f"the reply is malformed: {exc.message}") from None
        if frame[:4] == REPLY_MAGIC and reply.get("re") != request.nonce:
            raise Refused("bad_reply", "the reply answers another request")
        return reply

# The sender key's client id, or None for a key the master does not accept; it may raise Refused
# itself (a revoked key). Asked for every frame, so a revocation holds from the very next one.
SenderLookup = Callable[[bytes], Optional[str]]  # Optional: evaluated at import, also on Python 3.9

class Opener:
    """The master's side: authenticate, decrypt, verify and check a request frame.

    `accepted` is a fixed map (client id -> key) or a SenderLookup consulted per frame (the master's
    live registry, masters.registry)."""

    def __init__(self, me: Identity, master_id: str, accepted: Mapping[str, VerifyKey] | SenderLookup,
                 max_frame: int, skew: int, max_validity: int) -> None:
        self.me, self.master_id = me, master_id
        self.max_frame, self.skew, self.max_validity = max_frame, skew, max_validity
        if isinstance(accepted, Mapping):
            fixed = {bytes(key): client_id for client_id, key in accepted.items()}
            self.sender_of: SenderLookup = fixed.get
        else:
            self.sender_of = accepted
        self._peers: dict[bytes, Peer] = {}  # a Box per accepted key, made on its first frame

    def _peer(self, sender_key: bytes) -> tuple[str, Peer]:
        client_id = self.sender_of(sender_key)
        if client_id is None:
            raise Refused("unknown_sender", "the sender's key is not accepted by this master")
        peer = self._peers.get(sender_key)
        if peer is None:  # two threads may both make it: the same Box either way
            peer = self._peers[sender_key] = Peer(self.me, VerifyKey(sender_key))
        return client_id, peer

    def open(self, frame: object, op: str, now: float | None = None) -> tuple[Request, Peer]:
        if type(frame) is not bytes:  # a netref or bytes subclass would be a live remote object
            raise Refused("bad_frame", f"a frame must be bytes, got {type(frame).__name__}")
        if len(frame) > self.max_frame:
            raise Refused("frame_too_large", f"frame of {len(frame)} bytes exceeds the cap of {self.max_frame}",
                          size=len(frame), cap=self.max_frame)
        if frame[:4] != REQUEST_MAGIC or len(frame) < 4 + _KEY_LEN + Box.NONCE_SIZE + 16:
            raise Refused("bad_frame", "not an OMBot request frame")
        client_id, peer = self._peer(frame[4 : 4 + _KEY_LEN])
        try:
            signed = peer.box.decrypt(frame[4 + _KEY_LEN :])
        except CryptoError:
            raise Refused("bad_mac", "the frame failed authentication (tampered, or sealed for another key)") from None
        try:
            message = peer.peer_key.verify(signed)
        except BadSignatureError:
            raise Refused("bad_signature", "the request's signature does not verify") from None
        request = self._parse(_json(message), client_id, signed)
        self._check(request, op, time.time() if now is None else now)
        return request, peer

    def _parse(self, data: dict[str, Any], client_id: str, signed: bytes) -> Request:
        try:
            request = Request(
                op=_str(data, "op"), id=_str(data, "id"), to=_str(data, "to"), issued_at=_int(data, "iat"),
                expires_at=_int(data, "exp"), nonce=_str(data, "nonce"), requester=_str(data, "requester"),
                origin=_str(data, "origin"), args=data["args"], sender=client_id, signed=signed,
            )
        except (KeyError, TypeError) as exc:
            raise Refused("bad_request", f"malformed request field: {exc}") from None
        version = data.get("v")
        if type(version) is not int or version != VERSION:  # not `!=` alone: True == 1 and 1.0 == 1
            raise Refused("bad_request", f"unsupported envelope version {version!r}")
        if not isinstance(request.args, dict):
            raise Refused("bad_request", "args must be an object")
        if len(request.nonce) != 32 or not all(c in "0123456789abcdef" for c in request.nonce):
            raise Refused("bad_request", "nonce must be 32 lowercase hex digits")
        if not _is_uuid(request.id):
            raise Refused("bad_request", "request id must be a UUID")
        if request.origin not in ORIGINS:
            raise Refused("bad_request", f"origin must be one of {', '.join(ORIGINS)}")
        if not request.requester or len(request.requester) > 256:
            raise Refused("bad_request", "requester must be 1-256 characters")
        return request

    def _check(self, request: Request, op: str, now: float) -> None:
        if request.op != op:
            raise Refused("wrong_op", f"a {request.op!r} request was sent to {op!r}")
        if request.to != self.master_id:
            raise Refused("wrong_recipient", f"the request is for master {request.to!r}, this is {self.master_id!r}")
        skew = int(now) - request.issued_at
        if abs(skew) > self.skew:
            code = "stale" if skew > 0 else "future"
            raise Refused(code, f"issued-at is {skew:+d} s from this master's clock; allowed skew is {self.skew} s",
                          skew=skew, allowed=self.skew)
        if request.expires_at <= now:
            raise Refused("expired", "the request has expired")
        if request.expires_at - request.issued_at > self.max_validity:
            raise Refused("bad_request", f"validity over {self.max_validity} s")

    def seal_reply(self, peer: Peer, request: Request, result: dict[str, Any]) -> bytes:
        return REPLY_MAGIC + bytes(peer.box.encrypt(dumps({"re": request.nonce, "ok": True, "result": result})))

    @staticmethod
    def seal_refusal(peer: Peer | None, request: Request | None, refused: Refused) -> bytes:
        body = {"ok": False, "error": refused.as_dict()}
        if peer is None or request is None:
            return REFUSAL_MAGIC + dumps(body)
        return REPLY_MAGIC + bytes(peer.box.encrypt(dumps({"re": request.nonce, **body})))

def _refusal(error: Any) -> Refused:
    """The master's refusal as an exception to raise."""
    if not isinstance(error, dict):
        return Refused("bad_reply", "the reply is neither a result nor an error")
    refused = Refused(str(error.get("code", "refused")), str(error.get("message", "refused")))
    details = error.get("details")
    refused.details = dict(details) if isinstance(details, dict) else {}  # not **details: it may hold "code"
    return refused

def _json(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: [[[[... nested too deep
        raise Refused("bad_request", "the message is not JSON") from None
    if not isinstance(value, dict):
        raise Refused("bad_request", "the message is not a JSON object")
    if not _is_unicode_text(value):
        raise Refused("bad_request", "the message holds a string that is not valid Unicode text (a lone surrogate)")
    return value

def _is_unicode_text(value: Any) -> bool:
    """Whether every string in the decoded JSON (keys too) is Unicode scalar text. JSON's \\ud800
    escapes decode to lone surrogates, which no UTF-8 store or log line can take later."""
    stack = [value]
    while stack:  # a loop, not recursion: json.loads already accepted the nesting depth
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True

def _str(data: dict[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str):
        raise TypeError(f"{key} must be a string")
    return value

def _int(data: dict[str, Any], key: str) -> int:
    value = data[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{key} must be an integer")
    return value

def _is_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False
