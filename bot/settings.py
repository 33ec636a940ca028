"""The [bot] table of ombot.toml, and the Slack secrets from the environment."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ombot.audit import ExportSettings
from ombot.config import Config
from ombot.logs import hide
from ombot.tables import TableReader, database_url, parse_address
from ombot.errors import ConfigError

SLACK_API_ENV = "OMBOT_SLACK_API_URL"
CHANNEL_ID = re.compile(r"^[CG][A-Z0-9]{2,}$")
TEAM_ID = re.compile(r"^T[A-Z0-9]{2,}$")


@dataclass(frozen=True)
class SlackSecrets:
    """Slack's tokens and signing secret, read from the environment only."""

    bot_token: str | None
    app_token: str | None
    signing_secret: str | None
    api_url: str | None

    @classmethod
    def from_env(cls) -> SlackSecrets:
        get = lambda name: os.environ.get(name) or None  # noqa: E731
        found = cls(get("SLACK_BOT_TOKEN"), get("SLACK_APP_TOKEN"), get("SLACK_SIGNING_SECRET"), get(SLACK_API_ENV))
        hide(found.bot_token, found.app_token, found.signing_secret)  # read, so kept out of every log line
        return found

    @property
    def configured(self) -> bool:
        return bool(self.bot_token and (self.app_token or self.signing_secret))


@dataclass(frozen=True)
class BotSettings:
    """The `[bot]` table of ombot.toml, validated."""

    team_id: str | None  # the one workspace `ombot bot` serves; it refuses to start without (the console needs none)
    listen_host: str
    listen_port: int
    workers: int
    database_url: str
    client: str  # the registration `ombot bot` speaks as
    console_client: str  # the registration `ombot console` speaks as
    console_user: str | None  # a chat user the console acts as; only a chat-kind console may
    console_allow_as: bool
    state_dir: Path
    policy: Path | None
    schedule_approval_days: int = 30  # how long one approval covers a schedule
    misfire_grace_seconds: int = 300  # missed runs younger than this coalesce into one; older are skipped
    schedule_min_interval_seconds: int = 60  # the shortest `every N`; tests lower it to 1
    retention_days: float = 90.0  # bot jobs and trail rows older than this are deleted
    audit_rules: Path | None = None  # the shell audit's rules file (docs/audit.md, "Rules")
    audit_poll_seconds: float = 1.0  # how often the audit feed reads every master
    audit_silent_after_seconds: int = 300  # an agent without a heartbeat this long is reported silent
    audit_alert_channel: str | None = None  # silent agents, and rules without a channel; else the rules' default
    ops_listen: tuple[str, int] | None = None  # `ombot bot`'s /metrics, /healthz, /readyz (docs/monitoring.md)
    audit_export: ExportSettings | None = None  # `[bot.audit_export]`: events and alerts to the SIEM (docs/audit.md)

    @classmethod
    def from_config(cls, config: Config) -> BotSettings:
        r = TableReader(config.path, config.raw, "").sub("bot")
        state_dir = r.file("state_dir", "state") or config.base_dir / "state"
        host, port = parse_address(r, "listen") if "listen" in r.table else ("127.0.0.1", 3000)
        settings = cls(
            team_id=_team_id(r),
            listen_host=host,
            listen_port=port,
            workers=r.get("workers", int, 8),
            database_url=database_url(r, "OMBOT_BOT_DATABASE_URL", f"sqlite:///{state_dir / 'bot.db'}"),
            client=r.get("client", str, "bot"),
            console_client=r.get("console_client", str, "console"),
            console_user=r.get("console_user", str, None),
            console_allow_as=r.get("console_allow_as", bool, False),
            state_dir=state_dir,
            policy=r.file("policy", None),
            retention_days=_retention_days(r),
            schedule_approval_days=_positive(r, "schedule_approval_days", 30),
            misfire_grace_seconds=_positive(r, "misfire_grace_seconds", 300),
            schedule_min_interval_seconds=_positive(r, "schedule_min_interval_seconds", 60),
            audit_rules=r.file("audit_rules", None),
            audit_poll_seconds=_seconds(r, "audit_poll_seconds", 1.0),
            audit_silent_after_seconds=_positive(r, "audit_silent_after_seconds", 300),
            audit_alert_channel=_channel_id(r, "audit_alert_channel"),
            ops_listen=parse_address(r, "ops_listen") if "ops_listen" in r.table else None,
            audit_export=ExportSettings.read(r.sub("audit_export")),
        )
        r.done()
        return settings


def _retention_days(r: TableReader) -> float:
    days = r.get("retention_days", (int, float), 90, what="a number of days above 0")
    if isinstance(days, bool) or not days > 0:
        raise ConfigError(r.path, r.key("retention_days"), "a number of days above 0", days)
    return float(days)


def _seconds(r: TableReader, key: str, default: float) -> float:
    value = r.get(key, (int, float), default, what="a number of seconds, at least 0.1")
    if isinstance(value, bool) or not value >= 0.1:
        raise ConfigError(r.path, r.key(key), "a number of seconds, at least 0.1", value)
    return float(value)


def _team_id(r: TableReader) -> str | None:
    value: str | None = r.get("team_id", str, None)
    if value is not None and not TEAM_ID.match(value):  # a misspelt id would refuse every request, silently
        raise ConfigError(r.path, r.key("team_id"), "a Slack workspace id (T...), not its name or domain", value)
    return value


def _channel_id(r: TableReader, key: str) -> str | None:
    value: str | None = r.get(key, str, None)
    if value is not None and not CHANNEL_ID.match(value):  # names change and can be reused: ids only
        raise ConfigError(r.path, r.key(key), "a Slack channel id (C..., G...), not a channel name", value)
    return value


def _positive(r: TableReader, key: str, default: int) -> int:
    value: int = r.get(key, int, default)
    if isinstance(value, bool) or value < 1:
        raise ConfigError(r.path, r.key(key), "a whole number of at least 1", value)
    return value
