"""The bot's HTTP front: a threaded WSGI server that refuses a body before anything reads it.

Anyone can send a request to the listening port, and Bolt reads a whole body into memory to check its
signature: the size and the framing are checked first, here, and a refused body is drained for a
moment and dropped, never kept.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

log = logging.getLogger("ombot.bot.slack")  # its name from before this file: operators' filters keep working

# Slack's largest request is a modal's view_submission: the whole view (at most 250 kB of JSON) plus
# its state, form-encoded; the largest modal bot/forms.py generates comes to about 430 kB.
MAX_BODY_BYTES = 1024 * 1024
LINGER_SECONDS = 2.0  # after refusing a body: drain what is in flight, so the refusal is not reset away
CONNECTION_NOTES = "ombot.connection"  # WSGI environ key: a dict the app leaves notes in for the handler
UNREAD_BODY = "unread_body"  # such a note: the body was refused, not read


def serve(app: Callable[..., Any], host: str, port: int) -> WSGIServer:
    """A threaded server bound to host:port running the WSGI `app` for every request whose body may be read."""

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        refusal = _body_refusal(environ)
        if refusal is None:
            return app(environ, start_response)
        status, reason = refusal
        environ.get(CONNECTION_NOTES, {})[UNREAD_BODY] = True
        log.info("refused a request from %s: %s (Content-Length %r)", environ.get("REMOTE_ADDR"), status,
                 str(environ.get("CONTENT_LENGTH", ""))[:20])
        start_response(status, [("Content-Type", "text/plain")])  # wsgiref closes after one request
        return [reason.encode()]

    return make_server(host, port, guarded, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler)


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    request_queue_size = 128


class _QuietHandler(WSGIRequestHandler):
    notes: dict[str, Any]

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def get_environ(self) -> dict[str, Any]:
        environ = super().get_environ()
        environ[CONNECTION_NOTES] = self.notes  # the app sees a copy of the environ, but this same dict
        return environ

    def handle(self) -> None:
        self.notes = {}
        super().handle()
        if self.notes.get(UNREAD_BODY):
            _discard_rest(self.connection)


def _discard_rest(sock: socket.socket) -> None:
    """Half-close, then read and drop what the client still sends, for a moment only.

    Closing with unread bytes makes the kernel reset the connection, and a client still sending may
    then lose the answer before reading it. The drain reuses one buffer: nothing accumulates.
    """
    buffer = bytearray(64 * 1024)
    deadline = time.monotonic() + LINGER_SECONDS
    try:
        sock.shutdown(socket.SHUT_WR)
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv_into(buffer):
                return
    except OSError:
        return


def _body_refusal(environ: dict[str, Any]) -> tuple[str, str] | None:
    """(status, reason) when the body must not be read: chunked, of undeclared or bad length, or too long.

    Checked before Bolt reads anything, and so before the signature: Bolt reads the whole body into
    memory to verify it, and anyone can send one.
    """
    length = str(environ.get("CONTENT_LENGTH") or "").strip()
    if environ.get("HTTP_TRANSFER_ENCODING") or (not length and environ.get("REQUEST_METHOD") == "POST"):
        return "411 Length Required", "Send the body with a Content-Length (not chunked)."
    if not length:
        return None
    if not (length.isascii() and length.isdigit()):
        return "400 Bad Request", "Content-Length must be a number of bytes."
    if int(length) > MAX_BODY_BYTES:
        return "413 Content Too Large", f"A request body may be at most {MAX_BODY_BYTES} bytes."
    return None
