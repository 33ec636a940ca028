"""The signed and encrypted envelope between a client (bot, CLI) and a master.

Request frame:  b"OMB1" | sender Ed25519 public key (32) | Box(sender -> recipient)(Ed25519-signed JSON)
Reply frame:    b"OMR1" | Box(master -> sender)(JSON {"re": request nonce, "ok": ..., ...})
Refusal frame:  b"OMX1" | JSON {"ok": false, "error": {...}}, for refusals made while the frame is
                opened (unknown key, bad MAC, malformed): never encrypted, so it names no software.

The Box (X25519 + XSalsa20-Poly1305) keeps the request secret and authenticates the sender to the
recipient; the inner signature is kept with the job as proof of who asked, which a Box alone cannot
give (the recipient could have made it). The signed JSON names its recipient, so a master cannot
forward a request it received to another master. See docs/protocol.md.

Versions (docs/protocol.md, "Versions"): "v" is the envelope version, bumped only when a reader of the
previous one would misread a request; "sw" (the sender's software, "ombot 0.2.0") and "rid" (a
correlation id) are additive header fields, which readers of the same "v" ignore when they do not know
them. A master reads the versions in ACCEPTED_VERSIONS and refuses another naming both sides' software.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from nacl.exceptions import BadSignatureError, CryptoError
from nacl.public import Box
from nacl.signing import VerifyKey

from ombot import __version__
from ombot.keys import Identity, box_public
from ombot.errors import OmbotError

REQUEST_MAGIC = b"OMB1"
REPLY_MAGIC = b"OMR1"
REFUSAL_MAGIC = b"OMX1"
VERSION = 1  # the envelope version this release writes
ACCEPTED_VERSIONS = (1,)  # the versions its masters read: always VERSION, and the one before it once there is one
SOFTWARE = f"ombot {__version__}"  # "sw" of the bot, the CLI, the console and the masters' replies
AGENT_SOFTWARE = f"ombot-agent {__version__}"  # "sw" of an audit agent (origin "agent")
# "sw": NAME VERSION, printable and short, as masters log and store it; "rid": a short token.
_SOFTWARE_FORM = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,31} [A-Za-z0-9][A-Za-z0-9.+-]{0,31}")
_RID_FORM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
# ingest: audit agents only; audit_read: the bot; registry: admin CLI keys; bind: an agent's first contact,
# the one op a key the master does not know yet may send (docs/protocol.md)
OPS = ("catalog", "expand", "submit", "events", "cancel", "health", "ingest", "audit_read", "preview", "registry",
       "jobs", "bind", "binding")
ORIGINS = ("cli", "slack", "console", "agent")
_KEY_LEN = 32


class Refused(OmbotError):
    """A request the master will not act on; travels back as structured data, never a traceback."""

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code, self.message, self.details = code, message, details

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, **({"details": self.details} if self.details else {})}


class VersionRefused(Refused):
    """`unsupported_version` for a frame that authenticated: sealed to its sender (Opener.seal_refusal),
    in version 1's reply layout, which every release reads, so only that sender learns the master's software."""

    def __init__(self, peer: Peer, nonce: str, message: str, **details: Any) -> None:
        super().__init__("unsupported_version", message, **details)
        self.peer, self.nonce = peer, nonce


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
    version: int = VERSION  # "v"
    software: str = ""  # "sw": the sender's software, "ombot 0.2.0"; "" from senders before 0.2.0
    rid: str = ""  # "rid": a correlation id, "" when the sender gave none

    def payload(self) -> dict[str, Any]:
        """The signed JSON; the additive fields only when set, so a request without them reads as 0.1.0 wrote it."""
        return {
            "v": self.version, "op": self.op, "id": self.id, "to": self.to, "iat": self.issued_at,
            "exp": self.expires_at, "nonce": self.nonce, "requester": self.requester,
            "origin": self.origin, "args": self.args,
            **({"sw": self.software} if self.software else {}), **({"rid": self.rid} if self.rid else {}),
        }


def new_request(
    op: str, to: str, requester: str, origin: str, args: dict[str, Any],
    request_id: str | None = None, validity: int = 120, now: float | None = None,
    rid: str = "", software: str | None = None,
) -> Request:
    """A fresh request (new nonce, issued now) naming this release's software: the agent's for origin "agent"."""
    issued = int(time.time() if now is None else now)
    if software is None:
        software = AGENT_SOFTWARE if origin == "agent" else SOFTWARE
    return Request(
        op=op, id=request_id or str(uuid.uuid4()), to=to, issued_at=issued, expires_at=issued + validity,
        nonce=os.urandom(16).hex(), requester=requester, origin=origin, args=args, software=software, rid=rid,
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
        only ever refuse, never carry a result. Anything malformed is `bad_reply`, naming the master's
        software and ours when the sealed reply says which it runs ("sw").
        """
        reply = self._reply_of(frame, request)
        if reply.get("ok") is True:
            return _result(frame, reply, request)
        error = reply.get("error")
        if not isinstance(error, dict):
            raise Refused("bad_reply", "the reply is neither a result nor an error" + _both_sides(frame, reply, request))
        raise _refusal(error)

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
                 max_frame: int, skew: int, max_validity: int, unregistered: Mapping[str, int] | None = None) -> None:
        """`unregistered`: the ops a key the master does not accept may still send (`bind`), each with
        its own, small frame cap; such a request opens with sender "" and its key is never cached."""
        self.me, self.master_id = me, master_id
        self.max_frame, self.skew, self.max_validity = max_frame, skew, max_validity
        self.unregistered = dict(unregistered or {})
        if isinstance(accepted, Mapping):
            fixed = {bytes(key): client_id for client_id, key in accepted.items()}
            self.sender_of: SenderLookup = fixed.get
        else:
            self.sender_of = accepted
        self._peers: dict[bytes, Peer] = {}  # a Box per accepted key, made on its first frame

    def _peer(self, sender_key: bytes, op: str, size: int) -> tuple[str, Peer]:
        client_id = self.sender_of(sender_key)
        if client_id is None:
            return "", self._stranger(sender_key, op, size)
        peer = self._peers.get(sender_key)
        if peer is None:  # two threads may both make it: the same Box either way
            peer = self._peers[sender_key] = Peer(self.me, VerifyKey(sender_key))
        return client_id, peer

    def _stranger(self, sender_key: bytes, op: str, size: int) -> Peer:
        """A Peer for a key this master does not accept, for the ops open to such keys only, in a small
        frame; never cached (anyone can make keys), and a key that is no curve point is a bad frame."""
        cap = self.unregistered.get(op)
        if cap is None:
            raise Refused("unknown_sender", "the sender's key is not accepted by this master")
        if size > cap:
            raise Refused("frame_too_large", f"a {op} frame from an unregistered key is at most {cap} bytes",
                          size=size, cap=cap)
        try:
            return Peer(self.me, VerifyKey(sender_key))
        except Exception:  # libsodium refuses a key that is not a point on the curve
            raise Refused("bad_frame", "the sender's key is not a usable public key") from None

    def open(self, frame: object, op: str, now: float | None = None) -> tuple[Request, Peer]:
        if type(frame) is not bytes:  # a netref or bytes subclass would be a live remote object
            raise Refused("bad_frame", f"a frame must be bytes, got {type(frame).__name__}")
        if len(frame) > self.max_frame:
            raise Refused("frame_too_large", f"frame of {len(frame)} bytes exceeds the cap of {self.max_frame}",
                          size=len(frame), cap=self.max_frame)
        if frame[:3] == REQUEST_MAGIC[:3] and frame[3:4].isdigit() and frame[:4] != REQUEST_MAGIC:
            raise _later_frame(frame[:4])
        if frame[:4] != REQUEST_MAGIC or len(frame) < 4 + _KEY_LEN + Box.NONCE_SIZE + 16:
            raise Refused("bad_frame", "not an OMBot request frame")
        client_id, peer = self._peer(frame[4 : 4 + _KEY_LEN], op, len(frame))
        try:
            signed = peer.box.decrypt(frame[4 + _KEY_LEN :])
        except CryptoError:
            raise Refused("bad_mac", "the frame failed authentication (tampered, or sealed for another key)") from None
        try:
            message = peer.peer_key.verify(signed)
        except BadSignatureError:
            raise Refused("bad_signature", "the request's signature does not verify") from None
        data = _json(message)
        _check_version(data, peer if client_id else None)  # first: another version's fields may differ
        request = self._parse(data, client_id, signed)
        self._check(request, op, time.time() if now is None else now)
        return request, peer

    def _parse(self, data: dict[str, Any], client_id: str, signed: bytes) -> Request:
        software, rid = data.get("sw", ""), data.get("rid", "")
        if "sw" in data and not (isinstance(software, str) and _SOFTWARE_FORM.fullmatch(software)):
            raise Refused("bad_request", 'sw must be NAME VERSION, such as "ombot 0.2.0" (letters, digits, . _ - +)')
        if "rid" in data and not (isinstance(rid, str) and _RID_FORM.fullmatch(rid)):
            raise Refused("bad_request", "rid must be 1-64 letters, digits and . _ : - (a correlation id)")
        try:
            request = Request(
                op=_str(data, "op"), id=_str(data, "id"), to=_str(data, "to"), issued_at=_int(data, "iat"),
                expires_at=_int(data, "exp"), nonce=_str(data, "nonce"), requester=_str(data, "requester"),
                origin=_str(data, "origin"), args=data["args"], sender=client_id, signed=signed,
                version=data["v"], software=software, rid=rid,
            )
        except (KeyError, TypeError) as exc:
            raise Refused("bad_request", f"malformed request field: {exc}") from None
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
        """The result, sealed to the sender, in the request's envelope version, naming this master's software."""
        body = {"re": request.nonce, "v": request.version, "sw": SOFTWARE, "ok": True, "result": result}
        return REPLY_MAGIC + bytes(peer.box.encrypt(dumps(body)))

    @staticmethod
    def seal_refusal(peer: Peer | None, request: Request | None, refused: Refused) -> bytes:
        """Sealed to the sender when it is known; plain (OMX1, no software named) when not."""
        body = {"ok": False, "error": refused.as_dict()}
        if isinstance(refused, VersionRefused):  # authenticated, unparsed: version 1's layout, which all read
            return REPLY_MAGIC + bytes(refused.peer.box.encrypt(dumps({"re": refused.nonce, "v": 1, "sw": SOFTWARE,
                                                                       **body})))
        if peer is None or request is None:
            return REFUSAL_MAGIC + dumps(body)
        return REPLY_MAGIC + bytes(peer.box.encrypt(dumps({"re": request.nonce, "v": request.version, "sw": SOFTWARE,
                                                           **body})))


def _result(frame: bytes, reply: dict[str, Any], request: Request) -> dict[str, Any]:
    """A success reply's result, if this client can read it."""
    if frame[:4] != REPLY_MAGIC:
        raise Refused("bad_reply", "a result arrived in an unauthenticated frame")
    version = reply.get("v", request.version)  # masters before 0.2.0 do not say
    if type(version) is not int or version != request.version:
        raise Refused("bad_reply", f"the reply is envelope version {_shown(version)}, the request was version "
                                   f"{request.version}" + _both_sides(frame, reply, request))
    result = reply.get("result", {})
    if not isinstance(result, dict):
        raise Refused("bad_reply", "the reply's result is not an object" + _both_sides(frame, reply, request))
    return result


def _both_sides(frame: bytes, reply: dict[str, Any], request: Request) -> str:
    """' (the master runs ombot 0.3.0, this client ombot 0.2.0)' for a sealed reply naming its software, else ''."""
    master = reply.get("sw")
    if frame[:4] != REPLY_MAGIC or not isinstance(master, str) or not _SOFTWARE_FORM.fullmatch(master):
        return ""
    return f" (the master runs {master}, this client {request.software or SOFTWARE})"


def _check_version(data: dict[str, Any], peer: Peer | None) -> None:
    """Refuse an envelope version this master does not read, naming both sides to an accepted sender (`peer`),
    only the versions to a key it does not accept (`bind`); a "v" that is no integer is malformed."""
    version = data.get("v")
    if type(version) is not int:  # not isinstance: True is an int (and 1.0 == 1)
        raise Refused("bad_request", f"unsupported envelope version {_shown(version)}")
    if version in ACCEPTED_VERSIONS:
        return
    advice = ("upgrade the master, or use a client of the same release line" if version > max(ACCEPTED_VERSIONS)
              else "upgrade the client to this master's release line")
    if peer is None:  # anyone can make a key: a stranger learns no software
        raise Refused("unsupported_version", f"this master reads {_versions()}; the request is envelope version "
                      f"{_shown(version)}: {advice}", accepted_versions=list(ACCEPTED_VERSIONS), request_version=version)
    software = data.get("sw")
    named = isinstance(software, str) and _SOFTWARE_FORM.fullmatch(software) is not None
    nonce = data.get("nonce")
    raise VersionRefused(
        peer, nonce if isinstance(nonce, str) and len(nonce) <= 64 else "",
        f"this master runs {SOFTWARE} and reads {_versions()}; the request is envelope version {_shown(version)} "
        f"from {software if named else 'software that does not name its release'}: {advice}",
        master_software=SOFTWARE, accepted_versions=list(ACCEPTED_VERSIONS), request_version=version,
        request_software=software if named else None)


def _later_frame(magic: bytes) -> Refused:
    """A request frame of a later layout ("OMB2"): not authenticated, so it names versions, never software."""
    return Refused("unsupported_version",
                   f"this master reads {_versions()}, whose request frames begin {REQUEST_MAGIC.decode()}; this frame "
                   f"begins {magic.decode()}, a later envelope's: upgrade the master, or use a client of the same "
                   f"release line", accepted_versions=list(ACCEPTED_VERSIONS))


def _versions() -> str:
    return ("envelope version " if len(ACCEPTED_VERSIONS) == 1 else "envelope versions ") + ", ".join(
        str(v) for v in ACCEPTED_VERSIONS)


def _shown(value: Any) -> str:
    """A value a request sent, for a message: at most 40 characters of its repr."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _refusal(error: dict[str, Any]) -> Refused:
    """The master's refusal as an exception to raise."""
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
