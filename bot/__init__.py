"""The chat face of OMBot: the Slack app and the console, one dispatcher behind both.

The door for the composition root: `BotService` (one per process), `run_console`, `serve_slack`,
`slack_manifest`, and the `[bot]` settings. Importing it declares every chat command.
"""

from __future__ import annotations

from typing import Any

from ombot.bot.console import run_console
from ombot.bot.service import BotService
from ombot.bot.settings import BotSettings, SlackSecrets
from ombot.config import Config

__all__ = ["BotService", "BotSettings", "SlackSecrets", "list_schedules", "run_console", "serve_slack", "slack_manifest"]


def serve_slack(config: Config) -> None:
    """Serve the Slack app (Socket Mode or HTTP); Slack's libraries load only here."""
    from ombot.bot.slack_app import serve_slack as serve

    serve(config)


def list_schedules(config: Config) -> list[str]:
    """One plain line per schedule in the bot's database that the CLI's key may see (`ombot
    schedules`): every one for an admin key, else what the policy lets its `cli:USER` see."""
    from ombot.approvals import load_policy, operator_viewer
    from ombot.bot import schedules, store

    settings = BotSettings.from_config(config)
    registration = config.speaking_as(config.require_client().id)  # checks the registration exists
    client = config.clients[registration.id]
    policy = load_policy(settings.policy) if settings.policy is not None else None
    store.open_store(settings.database_url)
    schedules.prepare()
    return schedules.schedule_rows(mention=False, viewer=operator_viewer(policy, client.identity, client.admin))


def slack_manifest(http_url: str | None = None) -> dict[str, Any]:
    from ombot.bot.slack_app import manifest

    return manifest(http_url)
