"""What OMBot says, whatever the surface: the message model and its markup's text helpers.

One message model, rendered per surface. A message is written once, in OMBot's markup: Slack mrkdwn
in which every piece of user-controlled text (parameters, targets, module output, reasons, the
words of an error) went through `escape` or `code`, and only OMBot's own words carry markup
(`<@U…>` mentions, `<!date…>` dates, `*bold*`, `` `code` ``). Each surface renders that text:
Slack takes it as it is (`for_slack` also disarms any `<!channel>`-like broadcast a builder let
through), a terminal takes `plain(text)`, and a web view would turn `plain(text)` into HTML. An
exception's message is plain text unless raised as `Markup` (`error_message`).

Every builder keeps within Slack's documented limits: a section's text at most 3,000 characters,
at most 50 blocks, and far below the ~13k characters where Slack starts refusing a message
(tests/fakeslack.py checks every message against them). In the base because the chat face (bot)
and the central audit (audit) both speak it; the cards of jobs and approvals are bot.messages.
"""

from __future__ import annotations

import html
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

from ombot.clock import MS_PER_SECOND

log = logging.getLogger("ombot.bot")  # the name it logged under in bot.messages: operators' filters keep working

SECTION_LIMIT = 3000
TEXT_LIMIT = 3500  # the plain-text twin: what notifications and the console show


@dataclass(frozen=True)
class Message:
    """What OMBot says once: Slack blocks, their plain-text twin, and files to attach."""

    text: str
    blocks: list[dict[str, Any]] | None = None
    files: list[tuple[str, str]] = field(default_factory=list)  # (filename, content) to attach


def clip(text: str, limit: int) -> str:
    """The text cut to `limit` characters, an ellipsis marking the cut."""
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def section(text: str) -> dict[str, Any]:
    """A Slack section block of mrkdwn, clipped to the 3,000 characters Slack takes."""
    return {"type": "section", "text": {"type": "mrkdwn", "text": clip(text, SECTION_LIMIT)}}


FENCE = "```"
_BROKEN_FENCE = "``\u200b`"  # a fence in user text, split by a zero-width space: neither markup nor lost
_DATE = re.compile(r"<!date\^\d+\^[^|>]*\|([^>]*)>")
_MENTION = re.compile(r"<@([^>|]+)(?:\|[^>]*)?>")
_LOOSE_FENCE = re.compile(r"[ \t]*\n?```\n?")  # a fence becomes a line break
_BROADCAST = re.compile(r"<!(?!date\^)")  # <!channel>, <!here>, <!everyone>, <!subteam^…>: OMBot sends none


class Markup(str):
    """A tag only: text already in OMBot's markup (user words escaped, mentions meant). An exception
    raised with one (`PolicyRefusal(Markup(f"... <@{user}> ..."))`) is shown as written in chat."""


def escape(text: str) -> str:
    """User-supplied text in mrkdwn: `<!channel>` or `<@U1>` typed by someone must not ping anyone,
    and a typed ``` must not open a code block (nor vanish from the terminal's `plain` text)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace(FENCE, _BROKEN_FENCE)


def code(text: str, limit: int = SECTION_LIMIT - 8) -> str:
    # escape() splits the triple backticks inside the text, which would end the block early.
    return FENCE + clip(escape(text), limit) + FENCE


def plain(text: str) -> str:
    """OMBot's markup as a terminal shows it: dates in UTC, mentions as @user, no ``` fences, and
    every escaped character as typed (`plain(escape(x)) == x`)."""
    text = _LOOSE_FENCE.sub("\n", _MENTION.sub(r"@\1", _DATE.sub(r"\1", text)))
    return html.unescape(text.replace(_BROKEN_FENCE, FENCE))


def error_message(exc: BaseException, lead: str = "") -> Message:
    """An error's message for chat: plain text, escaped (it often echoes what the user typed, which
    the grammar had unescaped), unless it was raised as `Markup`."""
    said = exc.args[0] if len(exc.args) == 1 else None
    return text_message(lead + (said if isinstance(said, Markup) else escape(str(exc))))


def for_slack(message: Message) -> Message:
    """The message as Slack gets it: as written, with any broadcast (`<!channel>`, `<!here>`, ...) in
    its text or its blocks' mrkdwn disarmed. Builders escape user text; this is the boundary's net."""
    text, blocks = _disarm(message.text), _disarm_blocks(message.blocks)
    if text == message.text and blocks == message.blocks:
        return message
    log.warning("disarmed a broadcast mention in a message (its builder did not escape user text): %.200r",
                message.text)
    return Message(text, blocks, message.files)


def _disarm(text: str) -> str:
    return _BROADCAST.sub("&lt;!", text)


def _disarm_blocks(value: Any) -> Any:
    """Every mrkdwn text object, at any depth of the blocks (sections, fields, context, confirm dialogs)."""
    if isinstance(value, list):
        return [_disarm_blocks(v) for v in value]
    if not isinstance(value, dict):
        return value
    if value.get("type") == "mrkdwn" and isinstance(value.get("text"), str):
        return {**value, "text": _disarm(value["text"])}
    return {k: _disarm_blocks(v) for k, v in value.items()}


def slack_date(epoch_ms: int, fallback_format: str = "%Y-%m-%d %H:%M UTC") -> str:
    """A stored time (epoch ms) each reader sees in their own time zone (Slack date formatting), UTC as fallback."""
    epoch = int(epoch_ms // MS_PER_SECOND)  # Slack's <!date^...> takes whole epoch seconds
    fallback = time.strftime(fallback_format, time.gmtime(epoch))
    return f"<!date^{epoch}^{{date_short_pretty}} {{time}}|{fallback}>"


def text_message(text: str) -> Message:
    """A message of one section of markup, its plain-text twin clipped for notifications."""
    return Message(clip(text, TEXT_LIMIT), [section(text)])
