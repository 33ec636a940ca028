"""What a chat transport (Slack, console) must do for the dispatcher. Transports are thin adapters:
they turn native events into a ChatRequest, and implement these few output methods."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ombot.message import Message


@dataclass(frozen=True)
class ChatRequest:
    """Who asked, where, and what they typed: one chat input, whatever the transport."""

    user: str
    channel: str
    text: str = ""
    origin: str = "slack"  # slack | console
    team: str | None = None
    trigger_id: str | None = None
    response_url: str | None = None


class Transport(Protocol):
    """What a chat transport (Slack, console) does for the dispatcher."""

    def respond(self, req: ChatRequest, message: Message) -> None:
        """Answer only the person who asked (ephemeral)."""

    def post(self, channel: str, message: Message, thread_ts: str | None = None,
             req: ChatRequest | None = None) -> str | None:
        """Post to a channel (in a thread when thread_ts); returns the message ts if it can be updated."""

    def update(self, channel: str, ts: str, message: Message) -> None:
        """Replace a posted message in place."""

    def open_form(self, req: ChatRequest, view: dict[str, Any]) -> bool:
        """Open a modal; False when this transport has none (the console)."""
