"""The bot's metrics (docs/monitoring.md), counted where the thing happens: Slack calls in
bot.slack_app (its WebClient and retry handlers), approvals in bot.approval_flow, submits in
bot.dispatcher and bot.multi. Also what the Slack check of /readyz needs: whether Slack answered
lately, and whether it took the token. Labels stay bounded: Slack methods the bot calls, modules,
outcomes.
"""

from __future__ import annotations

import threading
import time

from ombot.opsweb import Counter, Histogram, Info

# An approval is decided in seconds when someone watches the channel, in hours when not; it expires in days.
WAIT_BUCKETS = (10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400, 259200)
# Slack's answers that mean the token itself is refused: the bot cannot work until someone fixes it.
RESPONSE_URL = "response_url"  # the `method` of a post to a command's response_url
AUTH_ERRORS = frozenset({"invalid_auth", "not_authed", "account_inactive", "token_revoked", "token_expired"})

SLACK_CALLS = Counter("ombot_bot_slack_api_calls_total", "Slack Web API calls (response_url posts as method "
                      "\"response_url\") by outcome: ok; error (Slack refused it); rate_limited (still 429 after "
                      "the retries); unreachable (no answer).", ["method", "outcome"])
SLACK_RATE_LIMITED = Counter("ombot_bot_slack_rate_limited_total", "Every HTTP 429 answer from Slack, retried or not.",
                             ["method"])
SLACK_RETRIES = Counter("ombot_bot_slack_retries_total", "Slack calls sent again: after a 429 (rate_limited) or a "
                        "broken connection (connection).", ["reason"])
APPROVAL_WAIT = Histogram("ombot_bot_approval_wait_seconds", "From an approval request to its decision: "
                          "approved (enough approvals), denied, expired.", ["decision"], buckets=WAIT_BUCKETS)
JOBS_SUBMITTED = Counter("ombot_bot_jobs_submitted_total", "Jobs the bot sent to a master: accepted; refused (by "
                         "the master, or no master reachable: nothing ran); lost (sent, then the link broke: "
                         "followed where it went).", ["module", "outcome"])
BOT = Info("ombot_bot", "This bot: its Slack mode and OMBot version.")


class SlackSeen:
    """When Slack last answered a call (any answer: it is there), and whether it took the token."""

    def __init__(self) -> None:
        self.answered_at: float | None = None  # time.monotonic()
        self.auth_error: str | None = None
        self._lock = threading.Lock()

    def answered(self, error: str | None) -> None:
        with self._lock:
            self.answered_at = time.monotonic()
            if error is None or error in AUTH_ERRORS:
                self.auth_error = error

    def answered_within(self, seconds: float) -> bool:
        with self._lock:
            return self.answered_at is not None and time.monotonic() - self.answered_at <= seconds


SLACK = SlackSeen()


def slack_call(method: str, outcome: str, error: str | None = None) -> None:
    """One call's end: ok, error (with Slack's error code), rate_limited, unreachable. A response_url
    post says nothing of the token (it needs none): it is counted, not taken as Slack's word on it."""
    SLACK_CALLS.labels(method, outcome).inc()
    if outcome != "unreachable" and method != RESPONSE_URL:
        SLACK.answered(error)


def slack_rate_limited(method: str) -> None:
    SLACK_RATE_LIMITED.labels(method).inc()


def slack_retry(reason: str) -> None:
    SLACK_RETRIES.labels(reason).inc()


def approval_decided(decision: str, created_at_ms: int, decided_at_ms: int | None) -> None:
    waited = ((decided_at_ms or int(time.time() * 1000)) - created_at_ms) / 1000
    APPROVAL_WAIT.labels(decision).observe(max(0.0, waited))


def job_submitted(module: str, outcome: str) -> None:
    JOBS_SUBMITTED.labels(module, outcome).inc()
