"""The agent's link to the masters of its IDC: one `ingest` call at a time, failing over in order.

Unlike a job, a batch may be re-sent anywhere: every event has a stable id and the masters insert
with insert-ignore, so a batch whose reply was lost is simply sent again (to the same master or
the next one) and acknowledged there.

A key made on the host is known at first only to the master that bound it (the rollout's). A master
that answers `unknown_sender` is passed over while the agent has no certificate; once a master takes
a batch, the agent asks it for the certificate of its key (`binding`) and keeps it in its state
directory. A master that does not know the key is then sent that certificate (or the one in
`binding_file`) with the `bind` operation, once, and the batch again.
"""

from __future__ import annotations

import json
import logging
import socket
from typing import Any

import rpyc
from rpyc.core.stream import SocketStream

from ombot.audit_agent.settings import AgentSettings, MasterAddress
from ombot.envelope import Peer, Refused, new_request
from ombot.keys import Identity, decode_public

log = logging.getLogger("ombot.audit_agent")
MAX_BINDING_BYTES = 16 * 1024  # a certificate is about 500 bytes
FETCHED_BINDING = "agent.binding"  # in the state directory: the certificate asked of the master that bound the key

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
        self.fetched = False  # asked a master for this key's certificate (once per start)
        self.fetched_path = settings.state_dir / FETCHED_BINDING

    def ingest(self, events: list[dict[str, Any]], status: dict[str, int]) -> tuple[str, dict[str, Any]]:
        """(master id, its reply). Refused is raised as the master said it; Unreachable if none answered."""
        errors = []
        for step in range(len(self.masters)):
            index = (self.current + step) % len(self.masters)
            master = self.masters[index]
            try:
                reply = self._ship(master, {"host": self.settings.host, "events": events, "status": status})
            except (OSError, EOFError, TimeoutError, rpyc.AsyncResultTimeout) as exc:
                self.close()
                errors.append(f"{master.id}: {type(exc).__name__}: {exc}")
                continue
            except Refused as exc:
                if exc.code != "unknown_sender" or step == len(self.masters) - 1:
                    raise
                errors.append(f"{master.id}: does not know this key yet")  # the next may: it bound it
                continue
            self.current = index
            self._fetch_certificate(master)
            return master.id, reply
        raise Unreachable("; ".join(errors))

    def _ship(self, master: MasterAddress, args: dict[str, Any]) -> dict[str, Any]:
        """`ingest`; a master that does not know this key yet is sent its binding certificate, if the
        host has one, and then the batch again (once: a second refusal is the master's answer)."""
        try:
            return self._call(master, "ingest", args)
        except Refused as exc:
            certificate = self._certificate() if exc.code == "unknown_sender" else None
            if certificate is None:
                raise
        try:
            reply = self._call(master, "bind", {"certificate": certificate})
        except Refused as exc:  # this master will not take the key: the next one may know it already
            log.warning("master %s refused this key's binding certificate: %s", master.id, exc)
            raise Refused("unknown_sender", f"this key is unknown there, and its certificate was refused: {exc}") from None
        log.info("master %s %s this host's key (the binding certificate in %s)", master.id,
                 "had bound" if reply.get("result") == "already" else "bound", self.settings.binding)
        return self._call(master, "ingest", args)

    def _fetch_certificate(self, master: MasterAddress) -> None:
        """Once per start, from the master that took a batch: the certificate of this key, if that
        master bound it (a rollout's), kept for the IDC's other masters. A key enrolled with `--out`
        has none (`no_binding`), and one IDC of a single master needs none."""
        if self.fetched or len(self.masters) < 2 or self._certificate() is not None:
            return
        self.fetched = True
        try:
            certificate = self._call(master, "binding", {})["certificate"]
        except Refused as exc:
            if exc.code != "no_binding":
                log.warning("master %s did not give this key's binding certificate: %s", master.id, exc)
            return
        except (OSError, EOFError, TimeoutError, rpyc.AsyncResultTimeout, KeyError, TypeError) as exc:
            log.warning("could not fetch this key's binding certificate from %s: %s", master.id, exc)
            return
        path = self.fetched_path
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(certificate))
        partial.replace(path)
        log.info("kept the binding certificate master %s signed for this key in %s", master.id, path)

    def _certificate(self) -> dict[str, Any] | None:
        """The binding certificate the rollout wrote (`binding_file`), else the one fetched from the master
        that bound the key, or None (a key enrolled with `--out` needs none); one that cannot be read
        is said, then treated as none."""
        path = self.settings.binding if self.settings.binding.exists() else self.fetched_path
        try:
            with open(path, "rb") as f:
                certificate = json.loads(f.read(MAX_BINDING_BYTES))  # a longer file is cut: not JSON
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("cannot read the binding certificate %s: %s", path, exc)
            return None
        if not isinstance(certificate, dict):
            log.warning("the binding certificate %s is not a JSON object", path)
            return None
        return certificate

    def _call(self, master: MasterAddress, op: str, args: dict[str, Any]) -> dict[str, Any]:
        if self.conn is None or self.conn.closed or self.connected_to != master.id:
            self.close()
            self.conn = self._connect(master)
            self.connected_to = master.id
        request = new_request(op, master.id, f"agent:{self.settings.host}", "agent", args)
        peer = self.peers[master.id]
        frame = getattr(self.conn.root, op)(peer.seal_request(request))
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
