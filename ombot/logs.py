"""Logging in UTC, with secrets redacted from every record before it is written."""

from __future__ import annotations

import logging
import re
import time

_PATTERNS = [
    (re.compile(r"(://[^:/@\s]*:)\S*@"), r"\1***@"),  # passwords in URLs, even ones holding '@'

    (re.compile(r"\bxox[abposr]-[A-Za-z0-9-]+"), "xox?-***"),  # Slack bot/user tokens
    (re.compile(r"\bxapp-[A-Za-z0-9-]+"), "xapp-***"),  # Slack app-level tokens
]


def redact(text: str) -> str:
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFormatter(logging.Formatter):
    """Log lines in UTC with passwords in URLs and Slack tokens hidden."""

    # UTC everywhere; staticmethod so the type says what logging calls: converter(seconds)
    converter = staticmethod(time.gmtime)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(RedactingFormatter("%(asctime)sZ %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("ombot.master.rpyc", "rpyc", "apscheduler"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
