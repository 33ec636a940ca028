"""The bot's Slack Web API client: slack_sdk's retries, and every call, 429 and retry counted for
/metrics (bot.metrics); and what /readyz asks of Slack (bot.ops). bot.slack_app builds on it.
"""

from __future__ import annotations

from typing import Any

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry import HttpRequest, HttpResponse, RetryState
from slack_sdk.http_retry.builtin_handlers import ConnectionErrorRetryHandler, RateLimitErrorRetryHandler
from slack_sdk.web import SlackResponse

from ombot.bot import metrics
from ombot.bot.settings import SlackSecrets
from ombot.opsweb import NotReady

RATE_LIMIT_RETRIES = 6
SLACK_FRESH_SECONDS = 60.0  # HTTP mode's readiness: Slack answered a call this recently, else auth.test asks
PROBE_SECONDS = 2  # auth.test's timeout when /readyz asks


def web_client(secrets: SlackSecrets, rate_limit_retries: int = RATE_LIMIT_RETRIES) -> WebClient:
    # Both handlers: passing any replaces slack_sdk's default connection-error retry.
    handlers = [_ConnectionRetry(), _RateLimitRetry(max_retry_count=rate_limit_retries)]
    kwargs: dict[str, Any] = {"token": secrets.bot_token, "retry_handlers": handlers}
    if secrets.api_url:
        kwargs["base_url"] = secrets.api_url.rstrip("/") + "/"
    return _CountedClient(**kwargs)


class _CountedClient(WebClient):
    """Every Web API call's outcome counted for /metrics (bot.metrics), whatever calls it (Bolt too)."""

    def api_call(self, api_method: str, **kwargs: Any) -> SlackResponse:
        try:
            response = super().api_call(api_method, **kwargs)
        except SlackApiError as exc:
            limited = exc.response.status_code == 429
            metrics.slack_call(api_method, "rate_limited" if limited else "error", str(exc.response.get("error")))
            raise
        except Exception:
            metrics.slack_call(api_method, "unreachable")
            raise
        metrics.slack_call(api_method, "ok")
        return response


class _RateLimitRetry(RateLimitErrorRetryHandler):
    """slack_sdk's 429 retries, each 429 and each retry counted."""

    def can_retry(self, *, state: RetryState, request: HttpRequest, response: HttpResponse | None = None,
                  error: Exception | None = None) -> bool:
        if response is not None and response.status_code == 429:
            metrics.slack_rate_limited(request.url.rsplit("/", 1)[-1])
        return super().can_retry(state=state, request=request, response=response, error=error)

    def prepare_for_next_attempt(self, **kwargs: Any) -> None:
        metrics.slack_retry("rate_limited")
        super().prepare_for_next_attempt(**kwargs)


class _ConnectionRetry(ConnectionErrorRetryHandler):
    """slack_sdk's retry of a broken connection, counted."""

    def prepare_for_next_attempt(self, **kwargs: Any) -> None:
        metrics.slack_retry("connection")
        super().prepare_for_next_attempt(**kwargs)


def socket_ready(connected: bool) -> str:
    """Socket Mode's readiness: the app's websocket is open."""
    if not connected:
        raise NotReady("the Socket Mode connection to Slack is not open")
    return "Socket Mode connected"


def slack_answers(probe: WebClient) -> str:
    """HTTP mode's readiness: Slack answered a call lately and took the token; else auth.test says."""
    if metrics.SLACK.answered_within(SLACK_FRESH_SECONDS) and metrics.SLACK.auth_error is None:
        return f"Slack answered within {SLACK_FRESH_SECONDS:g} s"
    probe.timeout = PROBE_SECONDS
    try:
        probe.auth_test()
    except SlackApiError as exc:
        raise NotReady(f"auth.test: {exc.response.get('error')}") from None
    return "auth.test answered ok"
