"""Logging in UTC to stderr (journald under systemd), as text or as one JSON object per line
(docs/logging.md), with the context ids of ombot.context on each line and secrets redacted from
every field before it is written. Stdlib only, and Python 3.9 safe: the agent uses it too."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Optional

from ombot import context

FORMATS = ("text", "json")
FORMAT_ENV = "OMBOT_LOG_FORMAT"  # the format when --log-format is not given; children OMBot starts inherit it
TEXT_FORMAT = "%(asctime)sZ %(levelname)s %(name)s: %(message)s"
MIN_HIDDEN = 8  # a shorter literal would be hidden inside unrelated words; patterns still cover it

_PATTERNS = [
    (re.compile(r"(://[^:/@\s]*:)\S*@"), r"\1***@"),  # passwords in URLs, even ones holding '@'

    (re.compile(r"\bxox[abposr]-[A-Za-z0-9-]+"), "xox?-***"),  # Slack bot/user tokens
    (re.compile(r"\bxapp-[A-Za-z0-9-]+"), "xapp-***"),  # Slack app-level tokens
]
_hidden: tuple[str, ...] = ()  # secrets known by value (a signing secret matches no pattern)
_hiding = threading.Lock()
# What every LogRecord has: anything else on a record came as `extra` (or from ombot.context).
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


def hide(*secrets: Optional[str]) -> None:
    """Redact these values wherever they appear, from now on (the Slack secrets, a database password)."""
    global _hidden
    with _hiding:
        _hidden = tuple(sorted({*_hidden, *(s for s in secrets if s and len(s) >= MIN_HIDDEN)}, key=len, reverse=True))


def redact(text: str) -> str:
    for secret in _hidden:
        text = text.replace(secret, "***")
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _ids_of(record: logging.LogRecord, skip: Iterable[str] = ()) -> list[tuple[str, Any]]:
    return [(name, getattr(record, name)) for name in context.FIELDS
            if getattr(record, name, None) not in (None, "") and name not in skip]


class ContextFilter(logging.Filter):
    """Puts the ids of ombot.context on each record, unless the call gave its own as `extra`; notes
    which came from the process as a whole (`_process_ids`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        process = context.process_ids()
        for name, value in context.ids().items():
            if getattr(record, name, None) in (None, ""):
                setattr(record, name, value)
                if process.get(name) == value:
                    record.__dict__.setdefault("_process_ids", set()).add(name)
        return True


class RedactingFormatter(logging.Formatter):
    """Text lines in UTC, the ids of the work appended (`[rid=... job=...]`; not the process's own,
    which its log file says already), passwords in URLs, Slack tokens and hidden secrets replaced."""

    # UTC everywhere; staticmethod so the type says what logging calls: converter(seconds)
    converter = staticmethod(time.gmtime)

    def formatMessage(self, record: logging.LogRecord) -> str:
        ids = " ".join(f"{name}={value}" for name, value in _ids_of(record, getattr(record, "_process_ids", ())))
        return super().formatMessage(record) + (f" [{ids}]" if ids else "")

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ms, Z), level, logger, message, the context ids, any
    `extra` fields, and exc (the traceback). Every string in it is redacted, keys too."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "message": record.getMessage(), **dict(_ids_of(record)),
        }
        for name, value in record.__dict__.items():
            if name not in _STANDARD and name not in line and not name.startswith("_"):
                line[name] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(_redacted(line), ensure_ascii=False)


def _redacted(value: Any) -> Any:
    """Strings redacted, containers walked, anything else JSON cannot hold made a (redacted) string."""
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, dict):
        return {redact(str(key)): _redacted(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_redacted(item) for item in value]
    return redact(str(value))


def setup_logging(level: int = logging.INFO, log_format: Optional[str] = None,
                  quiet: Iterable[str] = ("ombot.master.rpyc", "rpyc", "apscheduler")) -> None:
    """Log to stderr in `log_format` (default: $OMBOT_LOG_FORMAT, else text); `quiet` loggers from WARNING."""
    log_format = log_format or os.environ.get(FORMAT_ENV) or "text"
    if log_format not in FORMATS:
        raise ValueError(f"log format {log_format!r} is not one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else RedactingFormatter(TEXT_FORMAT))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in quiet:
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    if log_format == "json":  # nothing else may write to stderr: warnings and crashes become lines too
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_thread_crash


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: Optional[TracebackType]) -> None:
    logging.getLogger("ombot").critical("uncaught %s", kind.__name__, exc_info=(kind, exc, tb))


def _log_thread_crash(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("ombot").error("thread %s died", name,
                                     exc_info=(args.exc_type, args.exc_value, args.exc_traceback))  # type: ignore[arg-type]
