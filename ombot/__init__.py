"""Cross-cutting pieces shared by the bot, the masters and the CLI: config, storage, errors."""

__version__ = "0.1.0"
