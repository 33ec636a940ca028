"""The master's connections: who may hold one, for how long, and how much a peer may send on it.

rpyc gives a thread per connection and believes what a peer says about its messages; this module
bounds both. Two pools (operators: bot, console, CLI and strangers not yet authenticated; agents), a
connection bound to the key that first authenticated on it, per-key caps, idle and authentication
deadlines, and a channel that refuses oversized or over-inflating messages. masters.server puts the
envelope's service behind it.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Protocol

from rpyc.core.channel import Channel
from rpyc.core.stream import SocketStream
from rpyc.utils.server import ThreadedServer

from ombot.masters.core import MasterCore
from ombot.envelope import Refused
from ombot.masters.lograte import LogBudget
from ombot.config import Limits
from ombot.timers import Timers

log = logging.getLogger("ombot.master")
# Closed and refused connections of peers that never sent a valid envelope: one line each, rate-limited.
strangers_log = LogBudget(log, burst=10, per_second=0.2)

# An rpyc message carries one frame plus a little brine framing; anything much larger is not ours.
RPYC_OVERHEAD_BYTES = 64 * 1024


class OversizedMessage(EOFError):
    """Raised inside rpyc's receive loop; an EOFError, so rpyc just closes that one connection."""


class BoundedChannel(Channel):
    """rpyc's Channel believes the peer's 4-byte length and inflates compressed messages without
    limit, so an unauthenticated peer could make the master read or allocate gigabytes before the
    envelope's own size check runs. This one refuses both above `max_message` bytes."""

    __slots__ = ["max_message"]

    def __init__(self, stream: Any, max_message: int) -> None:
        super().__init__(stream)
        self.max_message = max_message

    def recv(self) -> bytes:
        length, compressed = self.FRAME_HEADER.unpack(self.stream.read(self.FRAME_HEADER.size))
        if length > self.max_message:
            self._refuse(f"an rpyc message of {length} bytes is over the cap of {self.max_message}")
        data = self.stream.read(length + len(self.FLUSHER))[: -len(self.FLUSHER)]
        if compressed:
            inflater = zlib.decompressobj()
            try:
                data = inflater.decompress(data, self.max_message + 1)
            except zlib.error:
                self._refuse("a compressed rpyc message is corrupt")
            if len(data) > self.max_message or inflater.unconsumed_tail:
                self._refuse(f"a compressed rpyc message inflates past the cap of {self.max_message} bytes")
            if not inflater.eof:
                self._refuse("a compressed rpyc message is truncated")
        return data

    def _refuse(self, reason: str) -> None:
        # The server logs it: it knows whether the peer authenticated. Close first: rpyc answers an
        # EOFError with a polite close request and waits for the reply, which would mean reading on
        # from the middle of the refused message.
        self.stream.close()
        raise OversizedMessage(reason)


def _peer_of(sock: socket.socket) -> str:
    try:
        return "%s:%s" % sock.getpeername()[:2]
    except OSError:
        return "an unknown peer"


def _reset_on_close(sock: socket.socket) -> None:
    """A stranger's socket closes with a reset, not a FIN: a flood of them leaves no TIME_WAIT
    sockets behind on the master, whose ports a new client could collide with."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


def _hang_up(sock: socket.socket, reset: bool) -> None:
    """Shut down first: a thread blocked reading this socket wakes up at once."""
    if reset:
        _reset_on_close(sock)
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class ConnectionGate(Protocol):
    """What a connection's service tells the server about it (CappedThreadedServer's `_Gate`)."""

    def authenticated(self, client_id: str, kind: str) -> None:
        """A frame on this connection opened as `client_id`'s; raises Refused if the connection may not
        carry it (bound to another key, or that key or kind holds all the connections it may)."""

    def calls(self, delta: int) -> None:
        """A call starts (+1) or ends (-1): a connection in a call is never idle."""


SWEEP_SECONDS = 5.0  # how often suppressed stranger lines are reported and idle connections closed
SWEEP_JOB, DEADLINE_JOB = "connections", "stranger-deadline"
THREAD_HEADROOM = 2  # threads of just-closed connections may still be finishing: cap all at 2x the cap
RETRY_AFTER_SECONDS = 5  # what a refused connection's client is told to wait


@dataclass(eq=False)  # hashed by identity: one Link per accepted socket
class Link:
    """One accepted connection, as the server tracks it."""

    sock: socket.socket
    peer: str
    deadline: float  # time.monotonic() by which a frame on it must authenticate
    client: str | None = None  # the key whose frame first opened on it: it carries that key's frames only
    kind: str | None = None  # that key's kind: agents have their own pool
    last_active: float = field(default_factory=time.monotonic)
    calls: int = 0  # calls under way: a connection in a call is never idle
    hang_up: str | None = None  # close it once the reply under way is sent, for this reason
    closed_because: str | None = None  # set when the master closes it on purpose
    quiet: bool = False  # an ordinary close (idle): logged at info, not as a warning

    @property
    def authenticated(self) -> bool:
        """A frame on it passed Opener.open; it stays so."""
        return self.client is not None


class CappedThreadedServer(ThreadedServer):
    """A thread per connection, in two pools. Until a frame on it authenticates, a connection is a
    stranger's and counts in the operators' pool (`max_connections`, with the bot, console and CLI
    connections): it is closed `auth_timeout_seconds` after it was accepted, and at the cap the
    oldest stranger is closed to admit a newcomer (else idle sockets would lock every client out).
    A connection whose first valid frame is an agent's moves to the agents' pool
    (`max_agent_connections`): a thousand servers' agents never take the slots chat and CLI need.

    Each connection is bound to the key of its first valid frame (another key's frame on it is
    refused and the connection closed), and each key holds at most `max_connections_per_client`
    connections (`max_connections_per_agent` for an agent key). Authenticated connections are never
    closed for strangers, but are closed when idle: `idle_timeout_seconds` (`agent_idle_seconds` for
    agents, which connect, ship and go).

    Its timers are jobs on the master's scheduler (ombot.timers, the core's): a one-shot job at the
    oldest stranger's deadline, and a sweep every SWEEP_SECONDS that closes idle connections and
    reports suppressed log lines."""

    def __init__(self, *args: Any, limits: Limits, timers: Timers, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits, self.timers = limits, timers
        self.max_connections, self.auth_timeout = limits.max_connections, limits.auth_timeout_seconds
        self._lock = threading.RLock()  # _close, under it, forgets the link under it too
        self._open: dict[Link, None] = {}  # every open connection, as an ordered set
        self._strangers: dict[Link, None] = {}  # those not yet authenticated, oldest (earliest deadline) first
        self._per_client: dict[str, int] = {}  # open connections per client key
        self._agents = 0  # open connections bound to agent keys (their own pool)
        self._threads = 0  # serving threads still running, closed connections' included
        timers.interval(SWEEP_JOB, SWEEP_SECONDS, self._sweep)

    def close(self) -> None:
        super().close()
        self.timers.cancel(SWEEP_JOB)
        self.timers.cancel(DEADLINE_JOB)

    # -- admission -------------------------------------------------------------------------------

    def _accept_method(self, sock: Any) -> None:
        link = self._admit(sock)
        if isinstance(link, str):
            strangers_log.warning("refusing a connection from %s: %s", _peer_of(sock), link)
            self._discard(sock)
            return
        try:
            threading.Thread(target=self._serve_link, args=(link,), daemon=True).start()
        except RuntimeError:  # no thread to be had: this connection cannot be served
            self._forget(link)
            self._discard(sock)
            log.warning("refusing a connection from %s: cannot start a thread", link.peer)

    def _admit(self, sock: socket.socket) -> Link | str:
        """The newcomer's Link, making room if a stranger holds a slot; else why it is refused."""
        with self._lock:
            if self._threads >= THREAD_HEADROOM * (self.max_connections + self.limits.max_agent_connections):
                return f"{self._threads} connection threads are still running"
            if len(self._open) - self._agents >= self.max_connections:
                oldest = next(iter(self._strangers), None)
                if oldest is None:
                    return f"{self.max_connections} connections already open, all authenticated"
                self._close(oldest, f"the oldest unauthenticated connection, closed to admit a new one "
                                    f"({self.max_connections} open)")
            link = Link(sock, _peer_of(sock), time.monotonic() + self.auth_timeout)
            self._open[link] = self._strangers[link] = None
            self._threads += 1
            if len(self._strangers) == 1:  # else the reaping is already due at an earlier deadline
                self.timers.at(DEADLINE_JOB, link.deadline, self._reap)
            return link

    def _bind(self, link: Link, client_id: str, kind: str) -> None:
        """A frame on `link` opened as `client_id`'s: bind the connection to that key on its first one."""
        with self._lock:
            link.last_active = time.monotonic()
            if link.client == client_id:
                return
            if link.client is not None:
                raise self._hang_up(link, Refused("wrong_connection", f"this connection carries {link.client}'s "
                                                  "requests: connect again for another key"))
            if kind == "agent" and self._agents >= self.limits.max_agent_connections:
                raise self._hang_up(link, Refused("busy", f"{self._agents} agent connections are open, the most "
                                                  "this master takes", retry_after=RETRY_AFTER_SECONDS))
            cap = self.limits.max_connections_per_agent if kind == "agent" else self.limits.max_connections_per_client
            if self._per_client.get(client_id, 0) >= cap:
                raise self._hang_up(link, Refused("too_many_connections", f"client {client_id} already holds {cap} "
                                                  "connections to this master", retry_after=RETRY_AFTER_SECONDS))
            link.client, link.kind = client_id, kind
            self._strangers.pop(link, None)
            self._per_client[client_id] = self._per_client.get(client_id, 0) + 1
            self._agents += kind == "agent"

    @staticmethod
    def _hang_up(link: Link, refused: Refused) -> Refused:
        link.hang_up = refused.message  # the refusal is the last reply on this connection
        return refused

    def _calls(self, link: Link, delta: int) -> None:
        with self._lock:
            link.calls += delta
            link.last_active = time.monotonic()

    def connection_counts(self) -> dict[str, int]:
        """Open connections by the kind of key bound to each ("unauthenticated" for a stranger's), for /metrics."""
        with self._lock:
            counts = {kind: 0 for kind in ("chat", "console", "cli", "agent", "unauthenticated")}
            for link in self._open:
                kind = link.kind or "unauthenticated"
                counts[kind] = counts.get(kind, 0) + 1
            return counts

    def close_clients(self, client_ids: set[str]) -> None:
        """Close every connection bound to one of these keys (revoked: its next frame would be refused)."""
        with self._lock:
            for link in [link for link in self._open if link.client in client_ids]:
                self._close(link, f"client {link.client} was revoked")

    def _close(self, link: Link, reason: str, quiet: bool = False) -> None:
        """Close an open connection from another thread (hold the lock); its own thread logs why."""
        if link not in self._open:
            return
        self._forget(link)
        link.closed_because, link.quiet = reason, quiet
        if not link.authenticated:
            _reset_on_close(link.sock)
        try:
            link.sock.shutdown(socket.SHUT_RDWR)  # its thread's blocking read returns
        except OSError:
            pass

    def _forget(self, link: Link) -> None:
        with self._lock:
            if self._open.pop(link, False) is False:
                return  # forgotten already
            self._strangers.pop(link, None)
            if link.client is not None:
                left = self._per_client.get(link.client, 1) - 1
                if left:
                    self._per_client[link.client] = left
                else:
                    self._per_client.pop(link.client, None)
                self._agents -= link.kind == "agent"

    def _discard(self, sock: socket.socket, stranger: bool = True) -> None:
        _hang_up(sock, reset=stranger)  # an authenticated client's last reply must not be cut off
        self.clients.discard(sock)

    # -- timers ----------------------------------------------------------------------------------

    def _reap(self) -> None:
        """Close strangers past their deadline, and come back at the next one's."""
        with self._lock:
            if self._closed:
                return
            now = time.monotonic()
            while self._strangers and (overdue := next(iter(self._strangers))).deadline <= now:
                self._close(overdue, f"no valid request within {self.auth_timeout:g} s")
            oldest = next(iter(self._strangers), None)  # the earliest deadline: every stranger gets the same time
            if oldest is not None:
                self.timers.at(DEADLINE_JOB, oldest.deadline, self._reap)

    def _close_idle(self) -> None:
        """Close authenticated connections that carried no call for their kind's idle time."""
        now = time.monotonic()
        with self._lock:
            for link in [link for link in self._open if link.authenticated and not link.calls]:
                idle = self.limits.agent_idle_seconds if link.kind == "agent" else self.limits.idle_timeout_seconds
                if now - link.last_active > idle:
                    self._close(link, f"idle for {idle:g} s", quiet=True)

    def _sweep(self) -> None:
        """Close idle connections, and overdue strangers should the wall clock (which the deadline job
        runs by) have stepped back; say how many stranger lines were dropped."""
        self._reap()
        self._close_idle()
        strangers_log.flush()
        MasterCore.strangers_log.flush()

    # -- serving ---------------------------------------------------------------------------------

    def _serve_link(self, link: Link) -> None:
        try:
            reason = self._serve(link)
        except Exception as exc:  # never a thread's traceback on stderr, which a stranger could repeat
            if link.authenticated:
                log.exception("the connection from %s failed", link.peer)
                reason = None
            else:
                reason = f"the connection failed ({type(exc).__name__})"
        finally:
            self._forget(link)
            self._discard(link.sock, stranger=not link.authenticated)
            with self._lock:
                self._threads -= 1
        reason = link.closed_because or reason
        if reason is not None:
            say = log.info if link.quiet else log.warning if link.authenticated else strangers_log.warning
            say("closing the connection from %s%s: %s", link.peer, f" ({link.client})" if link.client else "", reason)

    def _serve(self, link: Link) -> str | None:
        """Serve one connection until it ends; why the master ended it, if it did."""
        service = self.service.for_connection(_Gate(self, link))
        config = dict(self.protocol_config, endpoints=(None, link.peer), logger=self.logger)
        conn = service._connect(Channel(SocketStream(link.sock)), config)
        try:
            while not conn.closed and link.hang_up is None:
                conn.serve(None)
        except OversizedMessage as exc:
            return str(exc)
        except EOFError:  # the peer hung up, or the master shut the socket down (closed_because says why)
            return None
        except Exception as exc:  # brine could not decode it (e.g. RecursionError), an unknown message type...
            if link.authenticated:  # a client with a key: its problem is worth the whole story
                log.exception("closing the connection from %s: a malformed rpyc message", link.peer)
                return None
            return f"a malformed rpyc message ({type(exc).__name__})"
        finally:
            # Shut down before rpyc's close: it must not wait for the reply of a peer that broke the protocol.
            try:
                link.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        return link.hang_up


@dataclass
class _Gate:
    """One connection's view of the server, for its service (ConnectionGate)."""

    server: CappedThreadedServer
    link: Link

    def authenticated(self, client_id: str, kind: str) -> None:
        self.server._bind(self.link, client_id, kind)

    def calls(self, delta: int) -> None:
        self.server._calls(self.link, delta)
