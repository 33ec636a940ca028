"""The agent's link to the masters of its IDC: one `ingest` call at a time, failing over in order.

Unlike a job, a batch may be re-sent anywhere: every event has a stable id and the masters insert
with insert-ignore, so a batch whose reply was lost is simply sent again (to the same master or
the next one) and acknowledged there.
"""

from __future__ import annotations

import socket
from typing import Any

import rpyc
from rpyc.core.stream import SocketStream

from ombot.audit_agent.settings import AgentSettings, MasterAddress
from ombot.envelope import Peer, Refused, new_request
from ombot.keys import Identity, decode_public

_CONFIG: dict[str, Any] = {
    "allow_safe_attrs": False, "allow_public_attrs": False, "allow_all_attrs": False, "allow_pickle": False,
    "include_local_traceback": False, "include_local_version": False, "instantiate_custom_exceptions": False,
}


class Unreachable(Exception):
    """No master of the IDC took the batch (none reachable, or each link broke)."""


class MasterLinks:
    """The agent's link to its IDC's masters: one connection at a time, failing over in order,
    the master that answered last tried first."""

    def __init__(self, settings: AgentSettings, identity: Identity) -> None:
        self.settings, self.identity = settings, identity
        self.masters = list(settings.masters)
        self.peers = {m.id: Peer(identity, decode_public(m.public_key)) for m in self.masters}
        self.current = 0  # the master that answered last is tried first
        self.conn: Any = None
        self.connected_to: str | None = None

    def ingest(self, events: list[dict[str, Any]], status: dict[str, int]) -> tuple[str, dict[str, Any]]:
        """(master id, its reply). Refused is raised as the master said it; Unreachable if none answered."""
        errors = []
        for step in range(len(self.masters)):
            index = (self.current + step) % len(self.masters)
            master = self.masters[index]
            try:
                reply = self._call(master, {"host": self.settings.host, "events": events, "status": status})
            except (OSError, EOFError, TimeoutError, rpyc.AsyncResultTimeout) as exc:
                self.close()
                errors.append(f"{master.id}: {type(exc).__name__}: {exc}")
                continue
            self.current = index
            return master.id, reply
        raise Unreachable("; ".join(errors))

    def _call(self, master: MasterAddress, args: dict[str, Any]) -> dict[str, Any]:
        if self.conn is None or self.conn.closed or self.connected_to != master.id:
            self.close()
            self.conn = self._connect(master)
            self.connected_to = master.id
        request = new_request("ingest", master.id, f"agent:{self.settings.host}", "agent", args)
        peer = self.peers[master.id]
        frame = self.conn.root.ingest(peer.seal_request(request))
        if type(frame) is not bytes:
            raise Refused("bad_reply", "the master's reply is not bytes")
        return peer.open_reply(frame, request)

    def _connect(self, master: MasterAddress) -> Any:
        timeout = self.settings.connect_timeout_seconds
        try:
            stream = SocketStream.connect(master.host, master.port, timeout=timeout)
            conn = rpyc.connect_stream(stream, config={**_CONFIG, "sync_request_timeout": timeout})
            conn.root  # under the short timeout: a hung master counts as unreachable
            conn._config["sync_request_timeout"] = 30
            return conn
        except socket.timeout as exc:
            raise TimeoutError(str(exc)) from None

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:  # closing a broken link: nothing to save
                pass
            self.conn = None
