"""The Slack transport: a thin Bolt adapter over the dispatcher. The only module importing slack_bolt.

Listeners only ack and hand the work to OMBot's pool, so Bolt runs them inline
(`process_before_response=True`): the ack leaves as soon as the listener returns, without Bolt's
10 ms ack-polling loop or its five-thread listener pool.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from typing import Any
from wsgiref.simple_server import WSGIServer

import peewee
from slack_bolt import App, BoltRequest, BoltResponse
from slack_bolt.adapter.wsgi import SlackRequestHandler
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.webhook import WebhookClient

from ombot import sdnotify
from ombot.bot import forms, http_front, metrics, replay, store
from ombot.bot.messages import APPROVE_ACTION, CANCEL_ACTION, DENY_ACTION, DENY_CALLBACK
from ombot.bot.ops import start_bot_ops
from ombot.bot.slack_client import socket_ready, slack_answers, web_client
from ombot.bot.service import BotService
from ombot.bot.settings import BotSettings, SlackSecrets
from ombot.bot.transport import ChatRequest
from ombot.config import Config
from ombot.errors import OmbotError
from ombot.proc import exit_cleanly_on
from ombot.message import Message, for_slack

log = logging.getLogger("ombot.bot.slack")

COMMAND = "/om"
RESPONSE_URL_USES = 5  # Slack accepts at most five posts to one response_url
SEND_ATTEMPTS = 20  # after the client's own retries: a result is never dropped for a 429 storm
SCOPES = ["commands", "chat:write", "chat:write.public", "files:write", "usergroups:read", "users:read"]


class ChannelQueues:
    """Slack calls run in order per channel, one channel's 429s never stall another's."""

    def __init__(self) -> None:
        self._queues: dict[str, queue.Queue[tuple[Callable[[], Any], Future[Any]]]] = {}
        self._lock = threading.Lock()

    def run(self, channel: str, call: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            if channel not in self._queues:
                self._queues[channel] = queue.Queue()
                threading.Thread(target=self._drain, args=(self._queues[channel],), daemon=True,
                                 name=f"slack-{channel}").start()
            self._queues[channel].put((call, future))
        return future

    @staticmethod
    def _drain(calls: queue.Queue[tuple[Callable[[], Any], Future[Any]]]) -> None:
        while True:
            call, future = calls.get()
            try:
                future.set_result(_persist(call))
            except BaseException as exc:
                future.set_exception(exc)


def _persist(call: Callable[[], Any]) -> Any:
    """Retry a call that is still rate limited after the client's own retries."""
    for attempt in range(SEND_ATTEMPTS):
        try:
            return call()
        except SlackApiError as exc:
            if exc.response.status_code != 429 or attempt == SEND_ATTEMPTS - 1:
                raise
            metrics.slack_retry("rate_limited")
            time.sleep(float(exc.response.headers.get("Retry-After", "1") or 1))
    raise AssertionError("unreachable")


DELIVERY_ERRORS = (SlackApiError, OSError)  # API refusals, and network failures after the client's retries


def _reason(exc: Exception) -> str:
    return str(exc.response.get("error")) if isinstance(exc, SlackApiError) else f"{type(exc).__name__}: {exc}"


class SlackTransport:
    """The Slack side of the Transport: Web API calls queued per channel, with response_url fallbacks."""

    def __init__(self, client: WebClient) -> None:
        self.client = client
        self.queues = ChannelQueues()
        self._url_uses: dict[str, int] = {}
        self._lock = threading.Lock()

    def _take_response_url(self, url: str | None) -> bool:
        if not url:
            return False
        with self._lock:
            used = self._url_uses.get(url, 0)
            if used >= RESPONSE_URL_USES:
                return False
            self._url_uses[url] = used + 1
            return True

    def _webhook(self, url: str | None, message: Message, response_type: str) -> bool:
        """Post to a response_url (at most five uses); False when that did not reach Slack."""
        if url is None or not self._take_response_url(url):
            return False
        try:
            reply = WebhookClient(url).send(text=message.text, blocks=message.blocks, response_type=response_type)
        except OSError as exc:
            metrics.slack_call(metrics.RESPONSE_URL, "unreachable")
            log.warning("response_url post failed: %s", exc)
            return False
        metrics.slack_call(metrics.RESPONSE_URL, {200: "ok", 429: "rate_limited"}.get(reply.status_code, "error"))
        if reply.status_code != 200:
            log.warning("response_url answered %s: %s", reply.status_code, reply.body[:200])
            return False
        return True

    def respond(self, req: ChatRequest, message: Message) -> None:
        message = for_slack(message)
        if self._webhook(req.response_url, message, "ephemeral"):
            return
        try:
            self.queues.run(req.channel, lambda: self.client.chat_postEphemeral(
                channel=req.channel, user=req.user, text=message.text, blocks=message.blocks)).result()
        except DELIVERY_ERRORS as exc:
            log.warning("could not answer %s in %s: %s", req.user, req.channel, _reason(exc))

    def post(self, channel: str, message: Message, thread_ts: str | None = None,
             req: ChatRequest | None = None) -> str | None:
        message = for_slack(message)
        try:
            reply = self.queues.run(channel, lambda: self.client.chat_postMessage(
                channel=channel, text=message.text, blocks=message.blocks, thread_ts=thread_ts)).result()
        except DELIVERY_ERRORS as exc:
            # Not in a private channel: the command's response_url still reaches that channel, once per use.
            if req is not None and channel == req.channel and self._webhook(req.response_url, message, "in_channel"):
                return None
            log.warning("could not post to %s: %s", channel, _reason(exc))
            return None
        ts = str(reply["ts"])
        for filename, content in message.files:  # each upload on its own: a failed one never re-posts the message
            try:
                self.queues.run(channel, lambda: self.client.files_upload_v2(
                    channel=reply["channel"], thread_ts=thread_ts or ts, content=content, filename=filename,
                    title=filename)).result()
            except DELIVERY_ERRORS as exc:
                log.warning("could not attach %s in %s: %s", filename, channel, _reason(exc))
        return ts

    def update(self, channel: str, ts: str, message: Message) -> None:
        message = for_slack(message)
        try:
            self.queues.run(channel, lambda: self.client.chat_update(
                channel=channel, ts=ts, text=message.text, blocks=message.blocks)).result()
        except DELIVERY_ERRORS as exc:
            log.warning("could not update %s/%s: %s", channel, ts, _reason(exc))

    def open_form(self, req: ChatRequest, view: dict[str, Any]) -> bool:
        try:
            self.client.views_open(trigger_id=req.trigger_id, view=view)
            return True
        except DELIVERY_ERRORS as exc:
            log.info("could not open a form for %s: %s", req.user, _reason(exc))
            return False


def build_app(service: BotService, secrets: SlackSecrets, client: WebClient, socket_mode: bool) -> tuple[App, SlackTransport]:
    transport = SlackTransport(client)
    app = App(client=client, signing_secret=secrets.signing_secret, process_before_response=True,
              request_verification_enabled=not socket_mode, token_verification_enabled=False,
              ignoring_self_events_enabled=False)
    team_id = required_team_id(service.settings)
    dispatcher = service.dispatcher
    if not socket_mode:  # Socket Mode requests come over the app's own authenticated connection
        app.middleware(_drop_replays)

    @app.middleware
    def only_our_workspace(body: dict[str, Any], next: Callable[[], BoltResponse]) -> BoltResponse | None:
        team = _team_of(body)
        if team != team_id:
            log.warning("refused a request from workspace %r", team)
            return BoltResponse(status=403, body="This OMBot serves another Slack workspace.")
        return next()

    def after_ack(action: str, req: ChatRequest, detail: str, work: Callable[[], None]) -> None:
        """Every listener acks first; its work runs on OMBot's pool, answered and recorded in the trail."""
        service.commands.submit(dispatcher.answering, req, transport, action, detail, work)

    @app.command(COMMAND)
    def on_command(ack: Callable[..., None], body: dict[str, Any]) -> None:
        ack()  # nothing touches a master before this
        req = ChatRequest(user=body["user_id"], channel=body["channel_id"], text=body.get("text", ""),
                          team=body.get("team_id"), trigger_id=body.get("trigger_id"),
                          response_url=body.get("response_url"))
        service.commands.submit(dispatcher.command, req, transport)  # answered and recorded by the dispatcher

    clicks: dict[str, tuple[str, Callable[[ChatRequest, str], None]]] = {
        CANCEL_ACTION: ("cancel click", lambda req, job: dispatcher.cancel_clicked(req, job, transport)),
        APPROVE_ACTION: ("approve click", lambda req, ref: dispatcher.approvals.approve(ref, req, transport)),
        # the reason form opens right after the ack, within the trigger's 3 s
        DENY_ACTION: ("deny click", lambda req, ref: dispatcher.approvals.deny_clicked(req, ref, transport)),
    }
    for action_id, (action, handle) in clicks.items():
        app.action(action_id)(_click_listener(action, handle, after_ack))

    @app.view(DENY_CALLBACK)
    def on_deny_reason(ack: Callable[..., None], body: dict[str, Any], view: dict[str, Any]) -> None:
        req = ChatRequest(user=body["user"]["id"], channel="", team=_team_of(body))
        reason = str(((view.get("state", {}).get("values", {}).get("reason") or {}).get("v") or {}).get("value") or "")
        errors = dispatcher.approvals.deny_submitted(req, view.get("private_metadata", ""), reason, transport)
        ack(response_action="errors", errors=errors) if errors else ack()

    @app.view(forms.CALLBACK_ID)
    def on_form(ack: Callable[..., None], body: dict[str, Any], view: dict[str, Any]) -> None:
        req = ChatRequest(user=body["user"]["id"], channel="", team=_team_of(body))
        try:
            errors = dispatcher.form_submitted(req, view.get("private_metadata", "{}"),
                                               view.get("state", {}).get("values", {}), transport)
        except (OmbotError, KeyError, ValueError) as exc:
            errors = {forms.TARGETS_BLOCK: str(exc)[:150]}
        if errors:
            ack(response_action="errors", errors=errors)
        else:
            ack()

    return app, transport


def _click_listener(name: str, handle: Callable[[ChatRequest, str], None],
                    after_ack: Callable[[str, ChatRequest, str, Callable[[], None]], None]) -> Callable[..., None]:
    """A Bolt listener for a button (Bolt fills in `ack`, `body` and `action` by name)."""
    def on_click(ack: Callable[..., None], body: dict[str, Any], action: dict[str, Any]) -> None:
        ack()
        req, value = _click(body), str(action.get("value", ""))
        after_ack(name, req, value, lambda: handle(req, value))

    return on_click


def _click(body: dict[str, Any]) -> ChatRequest:
    return ChatRequest(user=body["user"]["id"], channel=(body.get("channel") or {}).get("id", ""),
                       team=_team_of(body), trigger_id=body.get("trigger_id"), response_url=body.get("response_url"))


def required_team_id(settings: BotSettings) -> str:
    """The one workspace the Slack app serves: without `[bot] team_id` it would serve any workspace
    whose request carries a valid signature (the console needs none)."""
    if not settings.team_id:
        raise OmbotError("[bot] team_id is not set: the Slack app serves one workspace and refuses to start "
                         "without its id (T..., from the workspace's URL or `auth.test`); the console needs none")
    return settings.team_id


def _team_of(body: dict[str, Any]) -> str | None:
    return body.get("team_id") or (body.get("team") or {}).get("id") or (body.get("user") or {}).get("team_id")


def _drop_replays(req: BoltRequest, next: Callable[[], BoltResponse]) -> BoltResponse | None:
    """Runs after Bolt verified the signature: the first use of a signed request is served, a repeat
    of the same bytes (same timestamp and signature) is acked and dropped."""
    timestamp = (req.headers.get("x-slack-request-timestamp") or [""])[0]
    signature = (req.headers.get("x-slack-signature") or [""])[0]
    try:
        try:
            first = replay.first_use(timestamp, signature)
        except peewee.PeeweeException as exc:
            log.warning("cannot check a Slack request for replay, refusing it: %s", exc)
            return BoltResponse(status=503, body="OMBot cannot reach its database; try again.")
        if not first:
            log.warning("dropped a replayed Slack request (signed at %s, digest %s)", timestamp,
                        replay.digest_of(timestamp, signature)[:12])
            return BoltResponse(status=200, body="")
        return next()
    finally:
        _close_connection()


def _close_connection() -> None:
    """Each HTTP request has its own thread: close the database connection it opened (peewee keeps one
    per thread), or every request would leave one behind until the thread object is collected."""
    try:
        store.db.close()
    except peewee.PeeweeException as exc:
        log.warning("could not close a request's database connection: %s", exc)


def slack_group_members(client: WebClient, group: str) -> frozenset[str]:
    """Members of a Slack user group (S...). Errors propagate: the gate then fails closed."""
    return frozenset(client.usergroups_users_list(usergroup=group)["users"])


def http_server(app: App, host: str, port: int) -> WSGIServer:
    """Bolt's WSGI adapter at /slack/events, behind the guarded threaded server (bot/http_front.py)."""
    handler = SlackRequestHandler(app)

    def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO") != "/slack/events":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found"]
        return handler(environ, start_response)

    return http_front.serve(wsgi, host, port)


def serve_slack(config: Config) -> None:
    sdnotify.claim()  # before any child starts: nothing else may speak to systemd for the bot
    secrets = SlackSecrets.from_env()
    if not secrets.bot_token:
        raise OmbotError("SLACK_BOT_TOKEN is not set (see the README: creating the Slack app)")
    if not (secrets.app_token or secrets.signing_secret):
        raise OmbotError("set SLACK_APP_TOKEN for Socket Mode, or SLACK_SIGNING_SECRET for HTTP mode")
    required_team_id(BotSettings.from_config(config))  # before anything starts
    client = web_client(secrets)
    # A command waits on its group lookups: a rate-limited one fails at once (the group has no members
    # until the failure's short cache expires) instead of holding every command for the Retry-After.
    lookups = web_client(secrets, rate_limit_retries=0)
    service = BotService(config, origin="slack", group_members=lambda group: slack_group_members(lookups, group))
    socket_mode = bool(secrets.app_token)
    app, transport = build_app(service, secrets, client, socket_mode)
    service.start(transport)
    exit_cleanly_on(signal.SIGTERM)  # the service closes, letting go of its job leases at once
    team = service.settings.team_id
    ops = None
    ready = partial(start_bot_ops, service.settings, service.router, list(service.config.idcs))
    try:
        if socket_mode:
            from slack_bolt.adapter.socket_mode import SocketModeHandler

            log.info("connecting to Slack in Socket Mode, serving workspace %s", team)
            handler = SocketModeHandler(app, secrets.app_token, web_client=client)
            ops = ready("socket", lambda: socket_ready(handler.client.is_connected()))
            handler.connect()  # returns once the WebSocket is open: only then is the bot ready
            sdnotify.ready(f"serving workspace {team} over Socket Mode", service.timers)
            threading.Event().wait()  # what SocketModeHandler.start() does after connect()
        else:
            server = http_server(app, service.settings.listen_host, service.settings.listen_port)
            ops = ready("http", partial(slack_answers, web_client(secrets, rate_limit_retries=0)))
            host, port = server.socket.getsockname()[:2]
            log.info("serving Slack requests of workspace %s on http://%s:%s/slack/events", team, host, port)
            sdnotify.ready(f"serving workspace {team} on http://{host}:{port}/slack/events", service.timers)
            server.serve_forever()
    finally:
        sdnotify.stopping("bot stopping")
        if ops is not None:
            ops.close()
        service.close()


def manifest(http_url: str | None = None) -> dict[str, Any]:
    """The app manifest: /om, interactivity, the scopes OMBot uses; Socket Mode unless a URL is given."""
    command: dict[str, Any] = {"command": COMMAND, "description": "Run and audit operations with OMBot",
                               "usage_hint": "run MODULE TARGETS key=value ...", "should_escape": False}
    interactivity: dict[str, Any] = {"is_enabled": True}
    if http_url:
        url = http_url.rstrip("/") + "/slack/events"
        command["url"] = url
        interactivity["request_url"] = url
    return {
        "display_information": {"name": "OMBot", "description": "ChatOps for Linux clusters"},
        "features": {"bot_user": {"display_name": "ombot", "always_online": True}, "slash_commands": [command]},
        "oauth_config": {"scopes": {"bot": SCOPES}},
        "settings": {"interactivity": interactivity, "socket_mode_enabled": http_url is None,
                     "org_deploy_enabled": False, "token_rotation_enabled": False},
    }
