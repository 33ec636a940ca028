"""OMBot's own fake Slack: the Web API, response_urls, file uploads and Socket Mode, all on loopback.

`FakeSlack` is a real HTTP server (127.0.0.1, port 0) that slack_sdk's WebClient talks to through
`base_url=fake.url`. It records every call with its full body, keeps the state a user would see
(messages per channel and thread, ephemerals, modals, files) and checks every outgoing message and view
against Slack's documented limits (the project's slack.md notes). A breach is answered the way Slack
answers it (ok:false + error name) AND recorded in `.violations`, so a bot that swallows the error still
fails the test through `assert_no_violations()` (the `fake_slack` fixture calls it at teardown).

Usage:
    with FakeSlack(usergroups={"S0OPS": ["U0ALICE"]}) as fake:
        client = WebClient(token=fake.bot_token, base_url=fake.url)
        ... run the bot (Socket Mode: SocketModeHandler(app, fake.app_token, web_client=client)) ...
        envelope_id = fake.socket.push("slash_commands", fake.slash_command("/om", "run echo"))
        fake.socket.wait_ack(envelope_id)
        fake.wait_for_call("chat.postMessage", lambda c: "started" in c.body.get("text", ""))
        fake.assert_no_violations()

`FakeSocketMode` (`fake.socket`) is the websocket end of apps.connections.open: it says hello, lets the
test push slash-command / interaction envelopes and records the acks, checking each echoes its envelope.

Where Slack is vague the fake is stricter (a reply to an unknown thread_ts fails with thread_not_found,
an unknown method is a violation): a test double should catch bugs, not hide them.
"""

from __future__ import annotations

import copy
import email.parser
import email.policy
import hashlib
import hmac
import itertools
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.server import Server, ServerConnection, serve

T = TypeVar("T")

DEFAULT_TIMEOUT = 15.0  # generous: the machine is shared and noisy; waits poll, they never assert on time

# --- Slack's limits (docs.slack.dev Block Kit reference; slack.md) ---------------------------------
MAX_TEXT = 40_000
MAX_MESSAGE_BLOCKS = 50
MAX_MODAL_BLOCKS = 100
MAX_BLOCKS_JSON = 13_000  # undocumented; seen failing with msg_blocks_too_long (compact JSON, chars)
MAX_VIEW_BYTES = 250_000
MAX_SECTION_TEXT = 3_000
MAX_SECTION_FIELDS = 10
MAX_FIELD_TEXT = 2_000
MAX_HEADER_TEXT = 150
MAX_ID = 255  # action_id, block_id, callback_id, external_id
MAX_ACTIONS_ELEMENTS = 25
MAX_CONTEXT_ELEMENTS = 10
MAX_BUTTON_TEXT = 75
MAX_BUTTON_VALUE = 2_000
MAX_URL = 3_000
MAX_OPTION_TEXT = 75
MAX_OPTION_VALUE = 150
MAX_SELECT_OPTIONS = 100
MAX_CHOICE_OPTIONS = 10  # checkboxes, radio_buttons
MAX_OVERFLOW_OPTIONS = 5
MAX_LABEL = 2_000
MAX_PLACEHOLDER = 150
MAX_MODAL_TITLE = 24  # also submit / close
MAX_PRIVATE_METADATA = 3_000
MAX_MARKDOWN_BLOCK = 12_000
TRIGGER_TTL = 3.0
RESPONSE_URL_USES = 5
RESPONSE_URL_TTL = 30 * 60
MAX_VIEW_STACK = 3  # a root view plus two pushed


@dataclass
class Call:
    """One request the fake received. `headers` keys are lower-case."""

    method: str  # Web API method, "upload" (file bytes) or "response_url"
    body: dict[str, Any]
    headers: dict[str, str]
    at: float
    path: str = ""
    raw: bytes = b""
    status: int = 200
    response: Any = None
    rate_limited: bool = False

    @property
    def ok(self) -> bool:
        return self.status == 200 and not (isinstance(self.response, dict) and self.response.get("ok") is False)


@dataclass
class Violation:
    where: str  # method or "socket_mode ack" etc.
    error: str  # the Slack error name answered (or a short rule name)
    detail: str

    def __str__(self) -> str:
        return f"{self.where}: {self.error}: {self.detail}"


@dataclass
class Trigger:
    id: str
    expires: float  # time.monotonic()
    view_id: str | None = None  # set when the trigger came from an interaction inside a modal
    used: bool = False


@dataclass
class ResponseUrl:
    token: str
    url: str
    issued: float  # time.monotonic()
    channel: str | None = None
    message_ts: str | None = None
    user_id: str | None = None
    thread_ts: str | None = None
    uses: int = 0


@dataclass
class UploadedFile:
    id: str
    filename: str
    length: int
    content: bytes | None = None
    title: str | None = None
    channel: str | None = None
    thread_ts: str | None = None
    initial_comment: str | None = None
    completed: bool = False


@dataclass
class Ack:
    envelope_id: str
    payload: dict[str, Any] | None
    at: float
    latency: float  # seconds since the push; recorded, not asserted (noisy machines)
    raw: str


@dataclass
class Envelope:
    envelope_id: str
    type: str
    payload: dict[str, Any]
    pushed_at: float
    ack: Ack | None = None


class SlackError(Exception):
    """Answer ok:false with `error`; `violation` also records it as a breach of Slack's rules."""

    def __init__(self, error: str, detail: str = "", *, violation: bool = False, messages: list[str] | None = None):
        super().__init__(f"{error}: {detail}" if detail else error)
        self.error, self.detail, self.violation = error, detail, violation
        self.messages = messages or ([detail] if detail else [])


# --- limit checks (pure functions: usable on any payload) -----------------------------------------


def message_problems(text: Any, blocks: Any, attachments: Any = None) -> list[tuple[str, str]]:
    """(error, detail) pairs for a message Slack would refuse, in the error names Slack answers with."""
    problems: list[tuple[str, str]] = []
    if isinstance(text, str) and len(text) > MAX_TEXT:
        problems.append(("msg_too_long", f"text has {len(text)} characters, Slack allows {MAX_TEXT}"))
    if blocks is not None:
        problems += [("invalid_blocks", p) for p in block_problems(blocks, MAX_MESSAGE_BLOCKS)]
        size = _compact_len(blocks)
        if size > MAX_BLOCKS_JSON:
            problems.append(("msg_blocks_too_long", f"blocks JSON is {size} characters, keep under {MAX_BLOCKS_JSON}"))
    for i, attachment in enumerate(attachments or []):
        if isinstance(attachment, dict) and attachment.get("blocks") is not None:
            for p in block_problems(attachment["blocks"], MAX_MESSAGE_BLOCKS):
                problems.append(("invalid_attachments", f"attachments[{i}]: {p}"))
    return problems


def view_problems(view: Any) -> list[tuple[str, str]]:
    """(error, detail) pairs for a modal Slack would refuse."""
    if not isinstance(view, dict):
        return [("invalid_arguments", "view must be a JSON object")]
    problems: list[tuple[str, str]] = []
    size = len(json.dumps(view, separators=(",", ":")).encode())
    if size > MAX_VIEW_BYTES:
        problems.append(("view_too_large", f"view is {size} bytes, Slack allows {MAX_VIEW_BYTES}"))
    details: list[str] = []
    if view.get("type") != "modal":
        details.append(f"view type {view.get('type')!r} is not 'modal'")
    for key in ("title", "submit", "close"):
        if key in view:
            details += _text_problems(view[key], f"view.{key}", MAX_MODAL_TITLE, plain_only=True)
    if "title" not in view:
        details.append("view.title is required")
    for key in ("callback_id", "external_id"):
        if len(str(view.get(key) or "")) > MAX_ID:
            details.append(f"view.{key} is longer than {MAX_ID} characters")
    if len(str(view.get("private_metadata") or "")) > MAX_PRIVATE_METADATA:
        details.append(f"view.private_metadata is longer than {MAX_PRIVATE_METADATA} characters")
    blocks = view.get("blocks")
    if blocks is None:
        details.append("view.blocks is required")
    else:
        details += block_problems(blocks, MAX_MODAL_BLOCKS)
        has_input = isinstance(blocks, list) and any(isinstance(b, dict) and b.get("type") == "input" for b in blocks)
        if has_input and "submit" not in view:
            details.append("a modal with input blocks needs a submit button")
    problems += [("invalid_arguments", d) for d in details]
    return problems


def block_problems(blocks: Any, max_blocks: int) -> list[str]:
    if not isinstance(blocks, list):
        return ["blocks must be an array"]
    problems: list[str] = []
    if len(blocks) > max_blocks:
        problems.append(f"{len(blocks)} blocks, at most {max_blocks} allowed")
    seen_ids: set[str] = set()
    for i, block in enumerate(blocks):
        where = f"blocks[{i}]"
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            problems.append(f"{where} is not an object with a type")
            continue
        block_id = block.get("block_id")
        if block_id is not None:
            if len(str(block_id)) > MAX_ID:
                problems.append(f"{where}.block_id is longer than {MAX_ID} characters")
            if block_id in seen_ids:
                problems.append(f"{where}.block_id {block_id!r} is used twice")
            seen_ids.add(block_id)
        problems += _BLOCK_CHECKS.get(block["type"], _no_problems)(block, where)
    return problems


def _no_problems(_obj: dict, _where: str) -> list[str]:
    return []


def _text_problems(obj: Any, where: str, limit: int, *, plain_only: bool = False) -> list[str]:
    if not isinstance(obj, dict) or obj.get("type") not in ("plain_text", "mrkdwn"):
        return [f"{where} must be a text object (plain_text or mrkdwn)"]
    if plain_only and obj["type"] != "plain_text":
        return [f"{where} must be plain_text"]
    text = obj.get("text")
    if not isinstance(text, str) or not text:
        return [f"{where}.text must be more than 0 characters"]
    if len(text) > limit:
        return [f"{where}.text has {len(text)} characters, at most {limit} allowed"]
    return []


def _section(block: dict, where: str) -> list[str]:
    problems: list[str] = []
    if "text" not in block and "fields" not in block:
        problems.append(f"{where} needs text or fields")
    if "text" in block:
        problems += _text_problems(block["text"], f"{where}.text", MAX_SECTION_TEXT)
    fields = block.get("fields")
    if fields is not None:
        if not isinstance(fields, list) or len(fields) > MAX_SECTION_FIELDS:
            problems.append(f"{where}.fields must be an array of at most {MAX_SECTION_FIELDS}")
        else:
            for j, f in enumerate(fields):
                problems += _text_problems(f, f"{where}.fields[{j}]", MAX_FIELD_TEXT)
    if "accessory" in block:
        problems += _element_problems(block["accessory"], f"{where}.accessory")
    return problems


def _header(block: dict, where: str) -> list[str]:
    return _text_problems(block.get("text"), f"{where}.text", MAX_HEADER_TEXT, plain_only=True)


def _actions(block: dict, where: str) -> list[str]:
    elements = block.get("elements")
    if not isinstance(elements, list) or not elements:
        return [f"{where}.elements must be a non-empty array"]
    problems: list[str] = []
    if len(elements) > MAX_ACTIONS_ELEMENTS:
        problems.append(f"{where} has {len(elements)} elements, at most {MAX_ACTIONS_ELEMENTS} allowed")
    action_ids = [e.get("action_id") for e in elements if isinstance(e, dict) and e.get("action_id") is not None]
    for dup in sorted({a for a in action_ids if action_ids.count(a) > 1}):
        problems.append(f"{where}: action_id {dup!r} is used twice in one block")
    for j, element in enumerate(elements):
        problems += _element_problems(element, f"{where}.elements[{j}]")
    return problems


def _context(block: dict, where: str) -> list[str]:
    elements = block.get("elements")
    if not isinstance(elements, list) or not elements:
        return [f"{where}.elements must be a non-empty array"]
    if len(elements) > MAX_CONTEXT_ELEMENTS:
        return [f"{where} has {len(elements)} elements, at most {MAX_CONTEXT_ELEMENTS} allowed"]
    return []


def _input(block: dict, where: str) -> list[str]:
    problems = _text_problems(block.get("label"), f"{where}.label", MAX_LABEL, plain_only=True)
    if "hint" in block:
        problems += _text_problems(block["hint"], f"{where}.hint", MAX_LABEL, plain_only=True)
    if "element" not in block:
        problems.append(f"{where}.element is required")
    else:
        problems += _element_problems(block["element"], f"{where}.element")
    return problems


def _image(block: dict, where: str) -> list[str]:
    problems = []
    if len(str(block.get("image_url") or "")) > MAX_URL:
        problems.append(f"{where}.image_url is longer than {MAX_URL} characters")
    if len(str(block.get("alt_text") or "")) > MAX_LABEL:
        problems.append(f"{where}.alt_text is longer than {MAX_LABEL} characters")
    return problems


def _markdown(block: dict, where: str) -> list[str]:
    text = block.get("text")
    if not isinstance(text, str) or not text:
        return [f"{where}.text must be a non-empty string"]
    if len(text) > MAX_MARKDOWN_BLOCK:
        return [f"{where}.text has {len(text)} characters, at most {MAX_MARKDOWN_BLOCK} allowed"]
    return []


_BLOCK_CHECKS: dict[str, Callable[[dict, str], list[str]]] = {
    "section": _section,
    "header": _header,
    "actions": _actions,
    "context": _context,
    "input": _input,
    "image": _image,
    "markdown": _markdown,
}


def _element_problems(element: Any, where: str) -> list[str]:
    if not isinstance(element, dict) or not isinstance(element.get("type"), str):
        return [f"{where} is not an object with a type"]
    problems: list[str] = []
    if len(str(element.get("action_id") or "")) > MAX_ID:
        problems.append(f"{where}.action_id is longer than {MAX_ID} characters")
    kind = element["type"]
    if kind == "button":
        problems += _text_problems(element.get("text"), f"{where}.text", MAX_BUTTON_TEXT, plain_only=True)
        if len(str(element.get("value") or "")) > MAX_BUTTON_VALUE:
            problems.append(f"{where}.value has {len(str(element['value']))} characters, at most {MAX_BUTTON_VALUE}")
        if len(str(element.get("url") or "")) > MAX_URL:
            problems.append(f"{where}.url is longer than {MAX_URL} characters")
    elif kind in ("static_select", "multi_static_select"):
        problems += _options_problems(element, where, MAX_SELECT_OPTIONS)
    elif kind in ("checkboxes", "radio_buttons"):
        problems += _options_problems(element, where, MAX_CHOICE_OPTIONS)
    elif kind == "overflow":
        problems += _options_problems(element, where, MAX_OVERFLOW_OPTIONS)
    if "placeholder" in element:
        problems += _text_problems(element["placeholder"], f"{where}.placeholder", MAX_PLACEHOLDER, plain_only=True)
    return problems


def _options_problems(element: dict, where: str, limit: int) -> list[str]:
    options = list(element.get("options") or [])
    for group in element.get("option_groups") or []:
        options += group.get("options") or [] if isinstance(group, dict) else []
    if not options:
        return [f"{where} needs options"]
    problems = []
    if len(options) > limit:
        problems.append(f"{where} has {len(options)} options, at most {limit} allowed")
    for j, option in enumerate(options):
        if not isinstance(option, dict):
            problems.append(f"{where}.options[{j}] is not an object")
            continue
        problems += _text_problems(option.get("text"), f"{where}.options[{j}].text", MAX_OPTION_TEXT)
        if len(str(option.get("value") or "")) > MAX_OPTION_VALUE:
            problems.append(f"{where}.options[{j}].value is longer than {MAX_OPTION_VALUE} characters")
    return problems


def _compact_len(obj: Any) -> int:
    return len(json.dumps(obj, separators=(",", ":"), ensure_ascii=False))


# --- HTTP-mode helpers: signed requests and Slack-shaped bodies -----------------------------------

TEAM_ID = "T0OMBOT"
TEAM_DOMAIN = "ombot-test"
API_APP_ID = "A0OMBOT"


def signed_request(signing_secret: str, body: str, timestamp: int | None = None) -> dict[str, str]:
    """Headers Slack sends with `body`: v0=hex(HMAC-SHA256(secret, "v0:{ts}:{body}"))."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    digest = hmac.new(signing_secret.encode(), f"v0:{ts}:{body}".encode(), hashlib.sha256).hexdigest()
    return {
        "X-Slack-Request-Timestamp": ts,
        "X-Slack-Signature": f"v0={digest}",
        "Content-Type": "application/x-www-form-urlencoded",
    }


def post_to_bot(port: int, body: str, signing_secret: str, headers: dict[str, str] | None = None,
                timeout: float = 20) -> tuple[int, str]:
    """POST `body` to a bot's /slack/events as Slack would (signed, unless `headers` say otherwise):
    (HTTP status, response text), error statuses included."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/slack/events", data=body.encode(),
                                     headers=headers or signed_request(signing_secret, body), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def slash_command_fields(
    command: str = "/om",
    text: str = "",
    *,
    user_id: str = "U0ALICE",
    user_name: str = "alice",
    channel_id: str = "C0OPS",
    channel_name: str = "ops",
    response_url: str = "http://127.0.0.1:9/response/unset",
    trigger_id: str | None = None,
    **extra: str,
) -> dict[str, str]:
    """The fields of a slash command (the form body in HTTP mode, the payload in Socket Mode)."""
    fields = {
        "token": "verification-token-unused",
        "team_id": TEAM_ID,
        "team_domain": TEAM_DOMAIN,
        "channel_id": channel_id,
        "channel_name": channel_name,
        "user_id": user_id,
        "user_name": user_name,
        "command": command,
        "text": text,
        "api_app_id": API_APP_ID,
        "is_enterprise_install": "false",
        "response_url": response_url,
        "trigger_id": trigger_id or _new_trigger_id(),
    }
    fields.update(extra)
    return fields


def slash_command_body(**fields: Any) -> str:
    return urlencode(slash_command_fields(**fields))


def block_actions_payload(
    action_id: str,
    value: str | None = None,
    *,
    block_id: str = "actions",
    action_type: str = "button",
    user_id: str = "U0ALICE",
    user_name: str = "alice",
    channel_id: str | None = "C0OPS",
    message_ts: str | None = None,
    thread_ts: str | None = None,
    view: dict[str, Any] | None = None,
    response_url: str | None = None,
    trigger_id: str | None = None,
    action: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A block_actions payload: a click on a message button (message_ts) or inside a modal (view)."""
    clicked = {"type": action_type, "action_id": action_id, "block_id": block_id, "action_ts": _now_ts()}
    if value is not None:
        clicked["value"] = value
    clicked.update(action or {})
    payload: dict[str, Any] = {
        "type": "block_actions",
        "user": {"id": user_id, "username": user_name, "name": user_name, "team_id": TEAM_ID},
        "api_app_id": API_APP_ID,
        "token": "verification-token-unused",
        "trigger_id": trigger_id or _new_trigger_id(),
        "team": {"id": TEAM_ID, "domain": TEAM_DOMAIN},
        "is_enterprise_install": False,
        "actions": [clicked],
    }
    if view is not None:
        payload["container"] = {"type": "view", "view_id": view.get("id")}
        payload["view"] = view
    else:
        payload["container"] = {"type": "message", "message_ts": message_ts, "channel_id": channel_id,
                                "is_ephemeral": False}
        if thread_ts:
            payload["container"]["thread_ts"] = thread_ts
        payload["message"] = {"type": "message", "ts": message_ts, "thread_ts": thread_ts}
    if channel_id is not None:
        payload["channel"] = {"id": channel_id, "name": "ops"}
    if response_url is not None:
        payload["response_url"] = response_url
    return payload


def view_submission_payload(
    callback_id: str,
    values: dict[str, dict[str, Any]],
    *,
    private_metadata: str = "",
    view_id: str = "V0UNSET",
    user_id: str = "U0ALICE",
    user_name: str = "alice",
    blocks: list[dict[str, Any]] | None = None,
    trigger_id: str | None = None,
    view: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A view_submission payload. `values` is {block_id: {action_id: value}}; a str value becomes a
    plain_text_input state ({"type": "plain_text_input", "value": s}); a dict is used as given."""
    state = {
        block: {action: ({"type": "plain_text_input", "value": v} if isinstance(v, str) else v)
                for action, v in actions.items()}
        for block, actions in values.items()
    }
    shown = copy.deepcopy(view) if view else {"type": "modal", "blocks": blocks or []}
    shown.update({"id": view_id, "callback_id": callback_id, "private_metadata": private_metadata,
                  "state": {"values": state}, "team_id": TEAM_ID, "app_id": API_APP_ID})
    return {
        "type": "view_submission",
        "team": {"id": TEAM_ID, "domain": TEAM_DOMAIN},
        "user": {"id": user_id, "username": user_name, "name": user_name, "team_id": TEAM_ID},
        "api_app_id": API_APP_ID,
        "token": "verification-token-unused",
        "trigger_id": trigger_id or _new_trigger_id(),
        "view": shown,
        "response_urls": [],
        "is_enterprise_install": False,
    }


def block_actions_body(action_id: str, value: str | None = None, **kw: Any) -> str:
    return interactive_body(block_actions_payload(action_id, value, **kw))


def view_submission_body(callback_id: str, values: dict[str, dict[str, Any]], **kw: Any) -> str:
    return interactive_body(view_submission_payload(callback_id, values, **kw))


def interactive_body(payload: dict[str, Any]) -> str:
    """Interactions arrive form-encoded with one field, `payload`, holding the JSON."""
    return "payload=" + quote(json.dumps(payload), safe="")


_trigger_counter = itertools.count(1)


def _new_trigger_id() -> str:
    return f"{next(_trigger_counter)}.{int(time.time())}.{uuid.uuid4().hex[:16]}"


def _now_ts() -> str:
    return f"{time.time():.6f}"


# --- the Web API server ---------------------------------------------------------------------------


class FakeSlack:
    """A fake Slack workspace. Use as a context manager or start()/stop(); point WebClient at `.url`.

    usergroups: {"S0OPS": ["U0ALICE", ...]} answers usergroups.users.list (unknown -> no_such_subteam).
    users / channels: {id: {fields}}; None means "every id exists" (a plausible record is made up).
    Tests may mutate `usergroups`, `users` and `channels` while the bot runs.
    """

    def __init__(
        self,
        *,
        bot_token: str = "xoxb-ombot-test",
        app_token: str = "xapp-1-ombot-test",
        team_id: str = TEAM_ID,
        team_domain: str = TEAM_DOMAIN,
        team_name: str = "OMBot Test",
        bot_user_id: str = "U0OMBOT",
        bot_id: str = "B0OMBOT",
        bot_name: str = "ombot",
        app_id: str = API_APP_ID,
        usergroups: dict[str, list[str]] | None = None,
        users: dict[str, dict[str, Any]] | None = None,
        channels: dict[str, dict[str, Any]] | None = None,
        trigger_ttl: float = TRIGGER_TTL,
    ) -> None:
        self.bot_token, self.app_token = bot_token, app_token
        self.team_id, self.team_domain, self.team_name = team_id, team_domain, team_name
        self.bot_user_id, self.bot_id, self.bot_name, self.app_id = bot_user_id, bot_id, bot_name, app_id
        self.usergroups: dict[str, list[str]] = usergroups if usergroups is not None else {}
        self.users = users
        self.channels = channels
        self.trigger_ttl = trigger_ttl  # Slack's 3 s; a slower bot fails with expired_trigger_id
        self._lock = threading.RLock()
        self._calls: list[Call] = []
        self._violations: list[Violation] = []
        self._messages: dict[str, dict[str, dict[str, Any]]] = {}  # channel -> ts -> message
        self._ephemerals: list[dict[str, Any]] = []
        self._views: dict[str, dict[str, Any]] = {}
        self._triggers: dict[str, Trigger] = {}
        self._response_urls: dict[str, ResponseUrl] = {}
        self._uploads: dict[str, UploadedFile] = {}
        self._rate_limits: dict[str, list[int]] = {}  # method -> [remaining, retry_after]
        self._failures: dict[str, list[Any]] = {}  # method -> [remaining, error]
        self._last_ts_us = 0
        self._ids = itertools.count(1)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.socket = FakeSocketMode(self)

    # -- lifecycle --

    def start(self) -> "FakeSlack":
        server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-slack", daemon=True)
        self._thread.start()
        self.socket.start()
        return self

    def stop(self) -> None:
        self.socket.stop()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeSlack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def root(self) -> str:
        assert self._server is not None, "FakeSlack is not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def url(self) -> str:
        """The Web API base URL for WebClient(base_url=...)."""
        return self.root + "/api/"

    # -- what happened --

    @property
    def calls(self) -> list[Call]:
        with self._lock:
            return list(self._calls)

    def calls_to(self, method: str, *, include_rate_limited: bool = False) -> list[Call]:
        return [c for c in self.calls if c.method == method and (include_rate_limited or not c.rate_limited)]

    @property
    def violations(self) -> list[Violation]:
        with self._lock:
            return list(self._violations)

    def take_violations(self) -> list[Violation]:
        """Return and forget the violations so far (for tests that breach a rule on purpose)."""
        with self._lock:
            taken, self._violations = self._violations, []
            return taken

    def assert_no_violations(self) -> None:
        """Fail on any breach, and on any pushed Socket Mode envelope the bot never acked."""
        found = self.violations + [Violation("socket_mode", "not_acked", f"{e.type} envelope {e.envelope_id}")
                                   for e in self.socket.unacked()]
        if found:
            raise AssertionError("the bot broke Slack's rules:\n" + "\n".join(f"  - {v}" for v in found))

    def wait_for(self, condition: Callable[[], T], timeout: float = DEFAULT_TIMEOUT, what: str = "") -> T:
        """Poll `condition()` until it returns something truthy, and return that."""
        deadline = time.monotonic() + timeout
        while True:
            result = condition()
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g}s waiting for {what or condition}; "
                                     f"calls so far: {[c.method for c in self.calls]}")
            time.sleep(0.02)

    def wait_for_call(self, method: str, where: Callable[[Call], bool] | None = None,
                      timeout: float = DEFAULT_TIMEOUT) -> Call:
        """The first (non-rate-limited) call to `method` that satisfies `where`."""
        def found() -> Call | None:
            return next((c for c in self.calls_to(method) if where is None or where(c)), None)
        return self.wait_for(found, timeout, what=f"a call to {method}")

    def messages(self, channel: str, *, include_replies: bool = False) -> list[dict[str, Any]]:
        """Current state of a channel, oldest first: top-level messages (and replies if asked)."""
        with self._lock:
            stored = sorted(self._messages.get(channel, {}).values(), key=lambda m: _ts_key(m["ts"]))
            return [copy.deepcopy(m) for m in stored if include_replies or m.get("thread_ts") in (None, m["ts"])]

    def thread(self, channel: str, ts: str) -> list[dict[str, Any]]:
        """A thread's parent and replies, oldest first (like conversations.replies)."""
        with self._lock:
            stored = self._messages.get(channel, {})
            found = [m for m in stored.values() if m["ts"] == ts or m.get("thread_ts") == ts]
            return [copy.deepcopy(m) for m in sorted(found, key=lambda m: _ts_key(m["ts"]))]

    def message(self, channel: str, ts: str) -> dict[str, Any] | None:
        with self._lock:
            found = self._messages.get(channel, {}).get(ts)
            return copy.deepcopy(found) if found else None

    @property
    def ephemerals(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._ephemerals)

    @property
    def views(self) -> dict[str, dict[str, Any]]:
        """Modals by view id, as last opened / updated."""
        with self._lock:
            return copy.deepcopy(self._views)

    @property
    def files(self) -> list[UploadedFile]:
        """Completed uploads, in order."""
        with self._lock:
            return [copy.copy(f) for f in self._uploads.values() if f.completed]

    @property
    def response_posts(self) -> list[Call]:
        return self.calls_to("response_url")

    # -- test controls --

    def issue_trigger(self, ttl: float | None = None, view_id: str | None = None) -> str:
        """A trigger_id views.open/push accept once within `ttl` seconds (default trigger_ttl; 0: expired)."""
        lifetime = self.trigger_ttl if ttl is None else ttl
        trigger = Trigger(_new_trigger_id(), time.monotonic() + lifetime, view_id)
        with self._lock:
            self._triggers[trigger.id] = trigger
        return trigger.id

    def new_response_url(self, *, channel: str | None = None, message_ts: str | None = None,
                         user_id: str | None = None, thread_ts: str | None = None) -> str:
        """A response_url; with channel (+ message_ts for a button click) posts to it act on that message."""
        token = uuid.uuid4().hex
        url = f"{self.root}/response/{token}"
        with self._lock:
            self._response_urls[token] = ResponseUrl(token, url, time.monotonic(), channel, message_ts,
                                                     user_id, thread_ts)
        return url

    def rate_limit(self, method: str, times: int = 1, retry_after: int = 1) -> None:
        """The next `times` calls of `method` ("response_url" too) answer HTTP 429 + Retry-After."""
        with self._lock:
            self._rate_limits[method] = [times, retry_after]

    def fail(self, method: str, error: str, times: int = 1) -> None:
        """The next `times` calls of `method` answer {"ok": false, "error": error} (e.g. channel_not_found)."""
        with self._lock:
            self._failures[method] = [times, error]

    def slash_command(self, command: str = "/om", text: str = "", **fields: Any) -> dict[str, str]:
        """Slash command fields with a live trigger_id and response_url (channel_id from fields)."""
        channel = fields.setdefault("channel_id", "C0OPS")
        fields.setdefault("user_id", "U0ALICE")
        fields.setdefault("trigger_id", self.issue_trigger())
        fields.setdefault("response_url", self.new_response_url(channel=channel, user_id=fields.get("user_id")))
        return slash_command_fields(command, text, **fields)

    def block_actions(self, action_id: str, value: str | None = None, **kw: Any) -> dict[str, Any]:
        """A click on a button of a stored message (channel_id + message_ts) or of a stored modal (view_id)."""
        view_id = kw.pop("view_id", None)
        kw.setdefault("user_id", "U0ALICE")
        if view_id is not None:
            kw["view"] = self.views[view_id]
            kw.setdefault("channel_id", None)
        else:
            channel, ts = kw.get("channel_id", "C0OPS"), kw.get("message_ts")
            stored = self.message(channel, ts) if ts else None
            if stored and stored.get("thread_ts") not in (None, ts):
                kw.setdefault("thread_ts", stored["thread_ts"])
            kw.setdefault("response_url", self.new_response_url(channel=channel, message_ts=ts,
                                                                 user_id=kw.get("user_id"),
                                                                 thread_ts=kw.get("thread_ts")))
        kw.setdefault("trigger_id", self.issue_trigger(view_id=view_id))
        payload = block_actions_payload(action_id, value, **kw)
        if view_id is None and kw.get("message_ts"):
            stored = self.message(kw.get("channel_id", "C0OPS"), kw["message_ts"])
            if stored:
                payload["message"] = stored
        return payload

    def view_submission(self, view_id: str, values: dict[str, dict[str, Any]], **kw: Any) -> dict[str, Any]:
        """A submit of a modal the bot opened (callback_id, private_metadata and blocks from `.views`)."""
        view = self.views[view_id]
        return view_submission_payload(view.get("callback_id", ""), values,
                                       private_metadata=view.get("private_metadata", ""),
                                       view_id=view_id, view=view, **kw)

    # -- internals shared by the handlers --

    def _record(self, call: Call) -> None:
        with self._lock:
            self._calls.append(call)

    def _violate(self, where: str, error: str, detail: str) -> None:
        with self._lock:
            self._violations.append(Violation(where, error, detail))

    def _next_ts(self) -> str:
        with self._lock:
            self._last_ts_us = max(int(time.time() * 1_000_000), self._last_ts_us + 1)
            return f"{self._last_ts_us // 1_000_000}.{self._last_ts_us % 1_000_000:06d}"

    def _next_id(self, prefix: str) -> str:
        return f"{prefix}0{next(self._ids):08d}"

    def _take(self, table: dict[str, list[Any]], method: str) -> Any:
        """Consume one use of an injected rate limit / failure; its value, or None."""
        with self._lock:
            entry = table.get(method)
            if not entry or entry[0] <= 0:
                return None
            entry[0] -= 1
            return entry[1]

    # -- Web API --

    def _api(self, method: str, params: dict[str, Any], token: str | None) -> dict[str, Any]:
        if method in _RETIRED:
            raise SlackError("method_deprecated", f"{method} is retired: {_RETIRED[method]}", violation=True)
        handler = _METHODS.get(method)
        if handler is None:
            raise SlackError("unknown_method", f"the fake does not know {method}", violation=True)
        self._check_token(method, token)
        failure = self._take(self._failures, method)
        if failure:
            raise SlackError(failure, "injected by the test")
        return {"ok": True, **handler(self, params)}

    def _check_token(self, method: str, token: str | None) -> None:
        if not token:
            raise SlackError("not_authed")
        if method == "apps.connections.open":
            if token == self.bot_token:
                raise SlackError("not_allowed_token_type", "apps.connections.open needs the app-level token",
                                 violation=True)
            if token != self.app_token:
                raise SlackError("invalid_auth")
        elif token == self.app_token:
            raise SlackError("not_allowed_token_type", f"{method} needs the bot token", violation=True)
        elif token != self.bot_token:
            raise SlackError("invalid_auth")

    def _check_message(self, where: str, text: Any, blocks: Any, attachments: Any = None) -> None:
        problems = message_problems(text, blocks, attachments)
        if problems:
            for error, detail in problems:
                self._violate(where, error, detail)
            raise SlackError(problems[0][0], messages=[d for _, d in problems])

    def _check_view(self, where: str, view: Any) -> None:
        problems = view_problems(view)
        if problems:
            for error, detail in problems:
                self._violate(where, error, detail)
            raise SlackError(problems[0][0], messages=[d for _, d in problems])

    def _use_trigger(self, trigger_id: Any) -> Trigger:
        with self._lock:
            trigger = self._triggers.get(str(trigger_id or ""))
            if trigger is None:
                raise SlackError("invalid_trigger_id", f"trigger_id {trigger_id!r} was never issued",
                                 violation=True)
            if trigger.used:
                raise SlackError("exchanged_trigger_id", "a trigger_id works once", violation=True)
            if time.monotonic() >= trigger.expires:
                raise SlackError("expired_trigger_id", "a trigger_id is valid for 3 seconds", violation=True)
            trigger.used = True
            return trigger

    def _channel_store(self, channel: Any) -> dict[str, dict[str, Any]]:
        if not channel:
            raise SlackError("channel_not_found", "no channel given", violation=True)
        if self.channels is not None and channel not in self.channels:
            raise SlackError("channel_not_found", f"unknown channel {channel}")
        return self._messages.setdefault(str(channel), {})

    def _store_message(self, channel: str, text: Any, blocks: Any, thread_ts: Any,
                       extra: dict[str, Any] | None = None) -> dict[str, Any]:
        with self._lock:
            store = self._channel_store(channel)
            parent = None
            if thread_ts:
                parent = store.get(str(thread_ts))
                if parent is None:
                    raise SlackError("thread_not_found", f"thread_ts {thread_ts} is no message in {channel}",
                                     violation=True)
                thread_ts = parent.get("thread_ts") or parent["ts"]  # a reply's ts means its parent's thread
                parent = store[thread_ts]
            ts = self._next_ts()
            message: dict[str, Any] = {"type": "message", "ts": ts, "user": self.bot_user_id,
                                       "bot_id": self.bot_id, "app_id": self.app_id, "team": self.team_id,
                                       "text": text or ""}
            if blocks is not None:
                message["blocks"] = blocks
            if thread_ts:
                message["thread_ts"] = thread_ts
                parent["thread_ts"] = parent["ts"]
                parent["reply_count"] = parent.get("reply_count", 0) + 1
                parent["latest_reply"] = ts
            message.update(extra or {})
            store[ts] = message
            return copy.deepcopy(message)

    def _edit_message(self, channel: str, ts: str, changes: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            store = self._channel_store(channel)
            message = store.get(str(ts or ""))
            if message is None:
                raise SlackError("message_not_found", f"no message {ts} in {channel}", violation=True)
            message.update({k: v for k, v in changes.items() if v is not None})
            message["edited"] = {"user": self.bot_user_id, "ts": self._next_ts()}
            return copy.deepcopy(message)

    def _delete_message(self, channel: str, ts: str) -> None:
        with self._lock:
            if self._channel_store(channel).pop(str(ts or ""), None) is None:
                raise SlackError("message_not_found", f"no message {ts} in {channel}", violation=True)

    # -- response_url --

    def _response_post(self, token: str, body: bytes, content_type: str) -> tuple[int, str]:
        with self._lock:
            entry = self._response_urls.get(token)
            if entry is None:
                self._violate("response_url", "invalid_url", "POST to a response_url the fake never issued")
                return 404, "invalid_url"
            entry.uses += 1
            if entry.uses > RESPONSE_URL_USES:
                self._violate("response_url", "used_url", f"use #{entry.uses}: Slack allows {RESPONSE_URL_USES}")
                return 404, "used_url"
            if time.monotonic() - entry.issued > RESPONSE_URL_TTL:
                self._violate("response_url", "expired_url", "a response_url lives 30 minutes")
                return 404, "expired_url"
        try:
            payload = json.loads(body or b"null")
        except ValueError:
            payload = None
        if not isinstance(payload, dict) or "json" not in content_type:
            self._violate("response_url", "invalid_payload", "a response_url takes a JSON object")
            return 400, "invalid_payload"
        try:
            self._apply_response(entry, payload)
        except SlackError as err:
            if err.violation:
                self._violate("response_url", err.error, err.detail)
            return 400, err.error
        return 200, "ok"

    def _apply_response(self, entry: ResponseUrl, payload: dict[str, Any]) -> None:
        text, blocks = payload.get("text"), payload.get("blocks")
        if payload.get("delete_original"):
            if not (entry.channel and entry.message_ts):
                raise SlackError("cannot_delete_message", "delete_original needs a message to delete",
                                 violation=True)
            self._delete_message(entry.channel, entry.message_ts)
            return
        if text is None and blocks is None and not payload.get("attachments"):
            raise SlackError("no_text", "a response needs text or blocks", violation=True)
        self._check_message("response_url", text, blocks, payload.get("attachments"))
        if payload.get("replace_original") and entry.channel and entry.message_ts:
            self._edit_message(entry.channel, entry.message_ts, {"text": text, "blocks": blocks})
        elif payload.get("response_type") == "in_channel" and entry.channel:
            self._store_message(entry.channel, text, blocks, payload.get("thread_ts") or entry.thread_ts)
        else:
            with self._lock:
                self._ephemerals.append({"channel": entry.channel, "user": entry.user_id, "ts": self._next_ts(),
                                         "text": text, "blocks": blocks, "via": "response_url"})

    # -- file bytes --

    def _upload_bytes(self, file_id: str, data: bytes) -> tuple[int, str]:
        with self._lock:
            upload = self._uploads.get(file_id)
            if upload is None:
                self._violate("upload", "invalid_upload_url", f"no pending upload {file_id}")
                return 404, "invalid_upload_url"
            upload.content = data
            if len(data) != upload.length:
                self._violate("upload", "length_mismatch",
                              f"{upload.filename}: declared {upload.length} bytes, sent {len(data)}")
        return 200, f"OK - {len(data)}"


# --- Web API methods: each takes (fake, params) and returns the fields after "ok": true ----------


def _auth_test(fake: FakeSlack, _params: dict[str, Any]) -> dict[str, Any]:
    return {"url": f"https://{fake.team_domain}.slack.com/", "team": fake.team_name, "team_id": fake.team_id,
            "user": fake.bot_name, "user_id": fake.bot_user_id, "bot_id": fake.bot_id,
            "is_enterprise_install": False}


def _post_message(fake: FakeSlack, params: dict[str, Any]) -> dict[str, Any]:
    text, blocks, attachments = params.get("text"), _json_field(params, "blocks"), _json_field(params, "attachments")
    if not text and not blocks and not attachments:
        raise SlackError("no_text", "chat.postMessage needs text, blocks or attachments", violation=True)
    fake._check_message("chat.postMessage", text, blocks, attachments)
    extra = {k: params[k] for k in ("metadata", "attachments", "username", "icon_emoji") if k in params}
    if attachments is not None:
        extra["attachments"] = attachments
    channel = str(params.get("channel") or "")
    message = fake._store_message(channel, text, blocks, params.get("thread_ts"), extra)
    return {"channel": channel, "ts": message["ts"], "message": message}


def _update(fake: FakeSlack, params: dict[str, Any]) -> dict[str, Any]:
    text, blocks, attachments = params.get("text"), _json_field(params, "blocks"), _json_field(params, "attachments")
    if text is None and blocks is None and attachments is None:
        raise SlackError("no_text", "chat.update needs text, blocks or attachments", violation=True)
    fake._check_message("chat.update", text, blocks, attachments)
    channel, ts = str(params.get("channel") or ""), str(params.get("ts") or "")
    message = fake._edit_message(channel, ts, {"text": text, "blocks": blocks, "attachments": attachments})
    return {"channel": channel, "ts": ts, "text": message.get("text", ""), "message": message}


def _delete(fake: FakeSlack, params: dict[str, Any]) -> dict[str, Any]:
    channel, ts = str(params.get("channel") or ""), str(params.get("ts") or "")
    fake._delete_message(channel, ts)
    return {"channel": channel, "ts": ts}


def _post_ephemeral(fake: FakeSlack, params: dict[str, Any]) -> dict[str, Any]:
    text, blocks, attachments = params.get("text"), _json_field(params, "blocks"), _json_field(params, "attachments")
    if not params.get("user"):
        raise SlackError("user_not_in_channel", "chat.postEphemeral needs a user", violation=True)
    if not text and not blocks and not attachments:
        raise SlackError("no_text", "chat.postEphemeral needs text, blocks or attachments", violation=True)
    fake._check_message("chat.postEphemeral", text, blocks, attachments)
    fake._channel_store(params.get("channel"))
    ts = fake._next_ts()
    with fake._lock:
        fake._ephemerals.append({"channel": params["channel"], "user": params["user"], "ts": ts, "text": text,
                                 "blocks": blocks, "thread_ts": params.get("thread_ts"), "via": "chat.postEphemeral"})
    return {"message_ts": ts}


def _views_open(fake: FakeSlack, params: dict[str, Any]) -> dict[str, Any]:
    view = _json_field(params, "view")
    fake._check_view("views.open", view)
    fake._use_trigger(params.get("trigger_id"))
    return {"view": _store_view(fake, view, root=None, previous=None)}


def _views_push(fake: FakeSlack, params: dict[str, Any]) -> dict[str, Any]:
    view = _json_field(params, "view")
    fake._check_view("views.push", view)
    trigger = fake._use_trigger(params.get("trigger_id"))
    with fake._lock:
        top = fake._views.get(trigger.view_id or "") or (list(fake._views.values())[-1] if fake._views else None)
        if top is None:
            raise SlackError("not_found", "views.push needs an open modal", violation=True)
        root = top["root_view_id"]
        if sum(1 for v in fake._views.values() if v["root_view_id"] == root) >= MAX_VIEW_STACK:
            raise SlackError("push_limit_reached", "a modal stacks at most 3 views", violation=True)
        return {"view": _store_view(fake, view, root=root, previous=top["id"])}


def _views_update(fake: FakeSlack, params: dict[str, Any]) -> dict[str, Any]:
    view = _json_field(params, "view")
    fake._check_view("views.update", view)
    with fake._lock:
        current = _find_view(fake, params.get("view_id"), params.get("external_id"))
        if params.get("hash") and params["hash"] != current["hash"]:
            raise SlackError("hash_conflict", "the view changed since that hash")
        if current.get("external_id") and "external_id" not in view:
            view = {**view, "external_id": current["external_id"]}  # keeps identifying the same modal
        updated = {**view, "id": current["id"], "hash": uuid.uuid4().hex[:20], "state": {"values": {}},
                   "root_view_id": current["root_view_id"], "previous_view_id": current.get("previous_view_id"),
                   "team_id": fake.team_id, "app_id": fake.app_id, "bot_id": fake.bot_id}
        fake._views[current["id"]] = updated
        return {"view": copy.deepcopy(updated)}


def _find_view(fake: FakeSlack, view_id: Any, external_id: Any) -> dict[str, Any]:
    if view_id:
        found = fake._views.get(str(view_id))
    elif external_id:
        found = next((v for v in fake._views.values() if v.get("external_id") == external_id), None)
    else:
        raise SlackError("invalid_arguments", "views.update needs view_id or external_id", violation=True)
    if found is None:
        raise SlackError("not_found", f"no view {view_id or external_id}", violation=True)
    return found


def _store_view(fake: FakeSlack, view: dict[str, Any], root: str | None, previous: str | None) -> dict[str, Any]:
    with fake._lock:
        if view.get("external_id") and any(v.get("external_id") == view["external_id"] for v in fake._views.values()):
            raise SlackError("duplicate_external_id", f"external_id {view['external_id']} is in use", violation=True)
        view_id = fake._next_id("V")
        stored = {**view, "id": view_id, "hash": uuid.uuid4().hex[:20], "state": {"values": {}},
                  "root_view_id": root or view_id, "previous_view_id": previous,
                  "team_id": fake.team_id, "app_id": fake.app_id, "bot_id": fake.bot_id}
        fake._views[view_id] = stored
        return copy.deepcopy(stored)


def _get_upload_url(fake: FakeSlack, params: dict[str, Any]) -> dict[str, Any]:
    filename, length = params.get("filename"), params.get("length")
    try:
        size = int(length)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SlackError("invalid_arguments", f"length {length!r} is not a number", violation=True) from None
    if not filename:
        raise SlackError("invalid_arguments", "filename is required", violation=True)
    file_id = fake._next_id("F")
    with fake._lock:
        fake._uploads[file_id] = UploadedFile(file_id, str(filename), size)
    return {"upload_url": f"{fake.root}/upload/{file_id}", "file_id": file_id}


def _complete_upload(fake: FakeSlack, params: dict[str, Any]) -> dict[str, Any]:
    entries = _json_field(params, "files")
    if not isinstance(entries, list) or not entries:
        raise SlackError("invalid_arguments", "files must be a non-empty JSON array", violation=True)
    channel = params.get("channel_id") or (str(params.get("channels") or "").split(",")[0] or None)
    thread_ts, comment = params.get("thread_ts"), params.get("initial_comment")
    if thread_ts and not channel:
        raise SlackError("invalid_arguments", "thread_ts needs channel_id", violation=True)
    if comment:
        fake._check_message("files.completeUploadExternal", comment, None)
    with fake._lock:
        uploads = []
        for entry in entries:
            upload = fake._uploads.get(str(entry.get("id") if isinstance(entry, dict) else ""))
            if upload is None or upload.content is None or upload.completed:
                raise SlackError("file_not_found", f"{entry} was not uploaded (or already completed)",
                                 violation=True)
            uploads.append((upload, entry.get("title") or upload.filename))
        infos = []
        for upload, title in uploads:
            upload.title, upload.channel, upload.thread_ts, upload.initial_comment = title, channel, thread_ts, comment
            upload.completed = True
            infos.append(_file_info(upload))
        if channel:
            fake._store_message(str(channel), comment or "", None, thread_ts,
                                {"files": infos, "upload": True, "subtype": "file_share"})
    return {"files": infos}


def _file_info(upload: UploadedFile) -> dict[str, Any]:
    return {"id": upload.id, "name": upload.filename, "title": upload.title, "size": len(upload.content or b""),
            "channels": [upload.channel] if upload.channel else []}


def _files_info(fake: FakeSlack, params: dict[str, Any]) -> dict[str, Any]:
    with fake._lock:
        upload = fake._uploads.get(str(params.get("file") or ""))
        if upload is None or not upload.completed:
            raise SlackError("file_not_found", f"no file {params.get('file')}")
        return {"file": _file_info(upload)}


def _usergroup_users(fake: FakeSlack, params: dict[str, Any]) -> dict[str, Any]:
    group = str(params.get("usergroup") or "")
    members = fake.usergroups.get(group)
    if members is None:
        raise SlackError("no_such_subteam", f"no user group {group!r}")
    return {"users": list(members)}


def _users_info(fake: FakeSlack, params: dict[str, Any]) -> dict[str, Any]:
    user_id = str(params.get("user") or "")
    if fake.users is not None and user_id not in fake.users:
        raise SlackError("user_not_found", f"no user {user_id!r}")
    if not user_id:
        raise SlackError("user_not_found", "no user given", violation=True)
    known = (fake.users or {}).get(user_id, {})
    name = known.get("name", user_id.lower())
    user = {"id": user_id, "team_id": fake.team_id, "name": name, "real_name": name.title(), "deleted": False,
            "is_bot": False, "tz": "UTC", "profile": {"display_name": name, "real_name": name.title()}}
    user.update(known)
    return {"user": user}


def _conversations_info(fake: FakeSlack, params: dict[str, Any]) -> dict[str, Any]:
    channel = str(params.get("channel") or "")
    if not channel or (fake.channels is not None and channel not in fake.channels):
        raise SlackError("channel_not_found", f"no channel {channel!r}")
    info = {"id": channel, "name": channel.lower(), "is_channel": channel.startswith("C"),
            "is_im": channel.startswith("D"), "is_private": channel.startswith("G"), "is_member": True,
            "is_archived": False}
    info.update((fake.channels or {}).get(channel, {}))
    return {"channel": info}


def _connections_open(fake: FakeSlack, _params: dict[str, Any]) -> dict[str, Any]:
    return {"url": fake.socket.new_url()}


_METHODS: dict[str, Callable[[FakeSlack, dict[str, Any]], dict[str, Any]]] = {
    "auth.test": _auth_test,
    "chat.postMessage": _post_message,
    "chat.update": _update,
    "chat.delete": _delete,
    "chat.postEphemeral": _post_ephemeral,
    "views.open": _views_open,
    "views.push": _views_push,
    "views.update": _views_update,
    "files.getUploadURLExternal": _get_upload_url,
    "files.completeUploadExternal": _complete_upload,
    "files.info": _files_info,
    "usergroups.users.list": _usergroup_users,
    "users.info": _users_info,
    "conversations.info": _conversations_info,
    "apps.connections.open": _connections_open,
}


_RETIRED = {"files.upload": "use files_upload_v2 (getUploadURLExternal + completeUploadExternal)"}


def _json_field(params: dict[str, Any], name: str) -> Any:
    """Form bodies carry blocks/view/files as JSON strings, JSON bodies as values: accept both."""
    value = params.get(name)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            error = "invalid_blocks_format" if name == "blocks" else "invalid_arguments"
            raise SlackError(error, f"{name} is not valid JSON", violation=True) from None
    return value


def _ts_key(ts: str) -> tuple[int, int]:
    seconds, _, micros = ts.partition(".")
    return int(seconds), int(micros or 0)


# --- the HTTP plumbing ----------------------------------------------------------------------------


def _parse_body(raw: bytes, content_type: str) -> dict[str, Any]:
    if "application/json" in content_type:
        parsed = json.loads(raw or b"{}")
        return parsed if isinstance(parsed, dict) else {"_json": parsed}
    if "multipart/form-data" in content_type:
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
        fields: dict[str, Any] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            fields[name] = payload if part.get_filename() else payload.decode()
        return fields
    return {k: v[-1] for k, v in parse_qs(raw.decode(), keep_blank_values=True).items()}


def _recorded_body(kind: str, query: str, raw: bytes, headers: dict[str, str]) -> dict[str, Any]:
    """What a Call shows as its body: API params, response_url JSON, or the size of uploaded bytes."""
    if kind == "upload":
        return {"bytes": len(raw)}
    try:
        if kind == "response":
            parsed = json.loads(raw or b"{}")
            return parsed if isinstance(parsed, dict) else {"_json": parsed}
        params: dict[str, Any] = {k: v[-1] for k, v in parse_qs(query).items()}
        params.update(_parse_body(raw, headers.get("content-type", "")))
        return params
    except ValueError:
        return {"_unparsable": raw.decode(errors="replace")}


def _make_handler(fake: FakeSlack) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self._serve()

        def do_GET(self) -> None:
            self._serve()

        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            path = urlsplit(self.path)
            kind, _, rest = path.path.lstrip("/").partition("/")
            method = {"api": rest, "upload": "upload", "response": "response_url"}.get(kind, "unknown")
            call = Call(method, _recorded_body(kind, path.query, raw, headers), headers, time.time(),
                        path=self.path, raw=raw)
            retry_after = fake._take(fake._rate_limits, method)
            if retry_after is not None:
                call.rate_limited = True
                self._answer(call, 429, {"ok": False, "error": "ratelimited"}, {"Retry-After": str(retry_after)})
            elif kind == "api":
                self._web_api(call)
            elif kind == "upload":
                self._answer(call, *fake._upload_bytes(rest, raw))
            elif kind == "response":
                self._answer(call, *fake._response_post(rest, raw, headers.get("content-type", "")))
            else:
                self._answer(call, 404, "not_found")

        def _web_api(self, call: Call) -> None:
            if "_unparsable" in call.body:
                return self._answer(call, 200, {"ok": False, "error": "invalid_json"})
            auth = call.headers.get("authorization", "")
            token = auth[len("Bearer "):] if auth.startswith("Bearer ") else call.body.get("token")
            try:
                response = fake._api(call.method, call.body, token)
            except SlackError as err:
                if err.violation:
                    fake._violate(call.method, err.error, err.detail or str(err.messages))
                response = {"ok": False, "error": err.error}
                if err.messages:
                    response["response_metadata"] = {"messages": err.messages}
            self._answer(call, 200, response)

        def _answer(self, call: Call, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
            call.status, call.response = status, body
            fake._record(call)
            data = json.dumps(body).encode() if isinstance(body, dict) else str(body).encode()
            self.send_response(status)
            ctype = "application/json; charset=utf-8" if isinstance(body, dict) else "text/plain; charset=utf-8"
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

    return Handler


# --- Socket Mode ----------------------------------------------------------------------------------


class FakeSocketMode:
    """The websocket side of Socket Mode, on loopback. apps.connections.open hands out `new_url()`s."""

    def __init__(self, fake: FakeSlack) -> None:
        self.fake = fake
        self._lock = threading.RLock()
        self._server: Server | None = None
        self._tickets: set[str] = set()
        self._connections: list[ServerConnection] = []
        self._envelopes: dict[str, Envelope] = {}
        self._acks: list[Ack] = []
        self._round_robin = itertools.count()
        self.hellos = 0

    def start(self) -> None:
        self._server = serve(self._handle, "127.0.0.1", 0, compression=None, ping_interval=None)
        threading.Thread(target=self._server.serve_forever, name="fake-slack-socket", daemon=True).start()

    def stop(self) -> None:
        with self._lock:
            open_connections = list(self._connections)
        for conn in open_connections:
            conn.close()
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    @property
    def port(self) -> int:
        assert self._server is not None, "FakeSocketMode is not started"
        return self._server.socket.getsockname()[1]

    def new_url(self) -> str:
        ticket = uuid.uuid4().hex
        with self._lock:
            self._tickets.add(ticket)
        return f"ws://127.0.0.1:{self.port}/link/?ticket={ticket}&app_id={self.fake.app_id}"

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._connections)

    @property
    def acks(self) -> list[Ack]:
        with self._lock:
            return list(self._acks)

    def envelope(self, envelope_id: str) -> Envelope:
        with self._lock:
            return self._envelopes[envelope_id]

    def wait_connected(self, count: int = 1, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.fake.wait_for(lambda: self.connections >= count, timeout, what=f"{count} Socket Mode connection(s)")

    def push(self, type: str, payload: dict[str, Any], *, accepts_response_payload: bool = True,
             timeout: float = DEFAULT_TIMEOUT) -> str:
        """Send an envelope ("slash_commands", "interactive", "events_api") to one connection; its id."""
        self.wait_connected(1, timeout)
        envelope_id = str(uuid.uuid4())
        message = {"envelope_id": envelope_id, "type": type, "payload": payload,
                   "accepts_response_payload": accepts_response_payload}
        if type == "events_api":
            message.update({"retry_attempt": 0, "retry_reason": ""})
        with self._lock:
            self._envelopes[envelope_id] = Envelope(envelope_id, type, payload, time.monotonic())
            conn = self._connections[next(self._round_robin) % len(self._connections)]
        conn.send(json.dumps(message))
        return envelope_id

    def wait_ack(self, envelope_id: str, timeout: float = DEFAULT_TIMEOUT) -> Ack:
        return self.fake.wait_for(lambda: self.envelope(envelope_id).ack, timeout, what=f"the ack of {envelope_id}")

    def unacked(self) -> list[Envelope]:
        with self._lock:
            return [e for e in self._envelopes.values() if e.ack is None]

    def forget(self, envelope_id: str) -> None:
        """Drop a pushed envelope the test expects to go unacked (assert_no_violations checks the rest)."""
        with self._lock:
            self._envelopes.pop(envelope_id, None)

    def request_refresh(self) -> None:
        """Ask every connection to reconnect, as Slack does every few hours."""
        with self._lock:
            open_connections = list(self._connections)
        for conn in open_connections:
            conn.send(json.dumps({"type": "disconnect", "reason": "refresh_requested",
                                  "debug_info": {"host": "fake-slack"}}))

    # -- one connection --

    def _handle(self, conn: ServerConnection) -> None:
        ticket = parse_qs(urlsplit(conn.request.path if conn.request else "").query).get("ticket", [""])[0]
        with self._lock:
            known = ticket in self._tickets
            self._tickets.discard(ticket)  # a URL from apps.connections.open is good for one connection
        if not known:
            self.fake._violate("socket_mode", "invalid_ticket", "connected without a fresh apps.connections.open URL")
            conn.close(1008, "invalid ticket")
            return
        conn.send(json.dumps({"type": "hello", "num_connections": self.connections + 1,
                              "debug_info": {"host": "fake-slack", "approximate_connection_time": 18060},
                              "connection_info": {"app_id": self.fake.app_id}}))
        with self._lock:
            self._connections.append(conn)
            self.hellos += 1
        try:
            for message in conn:
                self._on_message(message if isinstance(message, str) else message.decode())
        except ConnectionClosed:
            pass
        finally:
            with self._lock:
                if conn in self._connections:
                    self._connections.remove(conn)

    def _on_message(self, raw: str) -> None:
        try:
            message = json.loads(raw)
            envelope_id = message["envelope_id"]
        except (ValueError, KeyError, TypeError):
            self.fake._violate("socket_mode", "unexpected_message", f"not an ack: {raw[:200]}")
            return
        with self._lock:
            envelope = self._envelopes.get(envelope_id)
            if envelope is None:
                self.fake._violate("socket_mode", "unknown_envelope", f"ack for {envelope_id}, never pushed")
                return
            if envelope.ack is not None:
                self.fake._violate("socket_mode", "double_ack", f"envelope {envelope_id} acked twice")
                return
            payload = message.get("payload")
            ack = Ack(envelope_id, payload, time.time(), time.monotonic() - envelope.pushed_at, raw)
            self._acks.append(ack)
        self._check_ack_payload(envelope, payload)
        with self._lock:
            envelope.ack = ack  # set last: wait_ack returns only after the checks are recorded

    def _check_ack_payload(self, envelope: Envelope, payload: Any) -> None:
        if not payload:
            return
        where = f"socket_mode ack ({envelope.type})"
        if not isinstance(payload, dict):
            self.fake._violate(where, "invalid_payload", "an ack payload must be a JSON object")
            return
        action = payload.get("response_action")
        if action is None:
            for error, detail in message_problems(payload.get("text"), payload.get("blocks"),
                                                  payload.get("attachments")):
                self.fake._violate(where, error, detail)
        elif action in ("update", "push"):
            for error, detail in view_problems(payload.get("view")):
                self.fake._violate(where, error, detail)
        elif action == "errors":
            self._check_field_errors(envelope, payload.get("errors"), where)
        elif action != "clear":
            self.fake._violate(where, "invalid_response_action", f"response_action {action!r}")

    def _check_field_errors(self, envelope: Envelope, errors: Any, where: str) -> None:
        if not isinstance(errors, dict) or not errors:
            self.fake._violate(where, "invalid_errors", "response_action errors needs {block_id: message}")
            return
        view = envelope.payload.get("view") if isinstance(envelope.payload, dict) else None
        blocks = (view or {}).get("blocks") or []
        inputs = {b.get("block_id") for b in blocks if isinstance(b, dict) and b.get("type") == "input"}
        for block_id in errors:
            if blocks and block_id not in inputs:
                self.fake._violate(where, "invalid_errors", f"errors name {block_id!r}, not an input block")


# --- pytest glue ----------------------------------------------------------------------------------


@pytest.fixture
def fake_slack() -> Iterator[FakeSlack]:
    """A started FakeSlack; the test fails at teardown if the bot broke any of Slack's rules."""
    with FakeSlack() as fake:
        yield fake
        fake.assert_no_violations()
