"""The master's rpyc face: six methods taking and returning bytes, and nothing else reachable."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import threading
import zlib
from pathlib import Path
from typing import Any

import rpyc
from rpyc.core.channel import Channel
from rpyc.utils.server import ThreadedServer

from masters import store
from masters.backends import backend_named
from masters.core import MasterCore
from masters.envelope import OPS
from masters.inventory import Inventory
from masters.keys import Identity, decode_public
from modules import load_modules
from ombot.config import Config, MasterSettings
from ombot.errors import ConfigError, OmbotError

log = logging.getLogger("ombot.master")

EXPOSED = OPS  # the six request kinds of the envelope, and nothing else

# Nothing but the six methods: no public or "safe" attributes, no pickling, no tracebacks sent back.
SERVER_CONFIG: dict[str, Any] = {
    "allow_safe_attrs": False,
    "allow_exposed_attrs": False,
    "allow_public_attrs": False,
    "allow_all_attrs": False,
    "allow_getattr": True,  # routed through MasterService._rpyc_getattr below
    "allow_setattr": False,
    "allow_delattr": False,
    "allow_pickle": False,
    "include_local_traceback": False,
    "include_local_version": False,
    "instantiate_custom_exceptions": False,
    "import_custom_exceptions": False,
    "propagate_SystemExit_locally": False,
    "log_exceptions": False,
    "sync_request_timeout": 30,
}
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
        log.warning("closing the connection from %s: %s", _peer_name(self.stream), reason)
        # Close first: rpyc answers an EOFError with a polite close request and waits for the reply,
        # which would mean reading on from the middle of the refused message.
        self.stream.close()
        raise OversizedMessage(reason)


def _peer_name(stream: Any) -> str:
    try:
        return "%s:%s" % stream.sock.getpeername()[:2]
    except (AttributeError, OSError):
        return "an unknown peer"


class MasterService(rpyc.Service):
    def __init__(self, core: MasterCore) -> None:
        self._core = core
        self._max_message = core.settings.limits.max_frame_bytes + RPYC_OVERHEAD_BYTES

    def _connect(self, channel: Channel, config: dict[str, Any]) -> rpyc.Connection:
        """Every connection the server accepts goes through here: swap in the bounded channel."""
        return super()._connect(BoundedChannel(channel.stream, self._max_message), config)

    def _rpyc_getattr(self, name: str) -> Any:
        if name in EXPOSED:
            return getattr(self, "exposed_" + name)
        raise AttributeError(f"cannot access {name!r}")

    def _rpyc_setattr(self, name: str, value: Any) -> None:
        raise AttributeError("read-only")

    def _rpyc_delattr(self, name: str) -> None:
        raise AttributeError("read-only")

    def exposed_catalog(self, frame: bytes) -> bytes:
        return self._core.handle("catalog", frame)

    def exposed_expand(self, frame: bytes) -> bytes:
        return self._core.handle("expand", frame)

    def exposed_submit(self, frame: bytes) -> bytes:
        return self._core.handle("submit", frame)

    def exposed_events(self, frame: bytes) -> bytes:
        return self._core.handle("events", frame)

    def exposed_cancel(self, frame: bytes) -> bytes:
        return self._core.handle("cancel", frame)

    def exposed_health(self, frame: bytes) -> bytes:
        return self._core.handle("health", frame)


def build_core(config: Config, settings: MasterSettings) -> MasterCore:
    """Everything a master needs, validated before it listens: keys, modules, inventory, store."""
    if settings.key_file is None:
        raise ConfigError(config.path, f"masters.{settings.id}.key_file", "the master's private key file")
    identity = Identity.load(settings.key_file)
    if identity.public != settings.public_key:
        raise ConfigError(config.path, f"masters.{settings.id}.public_key", f"the public key of {settings.key_file}")
    accepted = {cid: decode_public(config.clients[cid]) for cid in settings.accept}
    modules = load_modules(config.module_dirs)
    inventory = Inventory(settings.inventory) if settings.inventory else None
    store.open_store(settings.database_url)
    return MasterCore(settings, identity, accepted, modules, inventory, backend_named(settings.backend))


class CappedThreadedServer(ThreadedServer):
    """A thread per connection, up to a cap: past it, new connections are closed at once instead of
    letting a flood of idle sockets exhaust the master's threads and memory."""

    def __init__(self, *args: Any, max_connections: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)

    def _accept_method(self, sock: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.warning("refusing a connection: %d connections already open", self.max_connections)
            sock.close()
            return
        threading.Thread(target=self._serve_then_release, args=(sock,), daemon=True).start()

    def _serve_then_release(self, sock: Any) -> None:
        try:
            self._authenticate_and_serve_client(sock)
        finally:
            self._slots.release()


def _claim_state(settings: MasterSettings) -> int:
    """Make the state directory private and lock it: a second copy of this master must not touch
    the running one's jobs (its start-up would mark them unknown)."""
    os.umask(0o077)  # job output, parameters and signed requests are for the master's eyes only
    settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(settings.state_dir / f"{settings.id}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OmbotError(f"master {settings.id} is already running on this state directory "
                         f"({settings.state_dir})") from None
    return fd  # held open, so locked, for the life of the process


def serve(config: Config, settings: MasterSettings, ready_file: Path | None = None) -> None:
    _claim_state(settings)
    core = build_core(config, settings)
    try:
        server = _server(core, settings)
    except OSError as exc:
        core.close()
        raise OmbotError(f"master {settings.id} cannot listen on {settings.host}:{settings.port}: "
                         f"{exc.strerror or exc}") from None
    _announce(core, settings, server, ready_file)

    def shutdown(signum: int, frame: Any) -> None:
        server.close()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    try:
        server.start()
    finally:
        core.close()


def _server(core: MasterCore, settings: MasterSettings) -> CappedThreadedServer:
    server = CappedThreadedServer(
        MasterService(core), hostname=settings.host, port=settings.port, reuse_addr=True,
        protocol_config=SERVER_CONFIG, logger=logging.getLogger("ombot.master.rpyc"),
        max_connections=settings.limits.max_connections,
    )
    server._listen()  # rpyc only binds in __init__: without listen() now, "ready" clients would be refused
    return server


def _announce(core: MasterCore, settings: MasterSettings, server: CappedThreadedServer,
              ready_file: Path | None) -> None:
    host, port = server.listener.getsockname()[:2]
    log.info("master %s (IDC %s) listening on %s:%s with %d modules", settings.id, settings.idc, host, port,
             len(core.modules))
    if ready_file is not None:  # written whole, then renamed: a watcher never reads it half-written
        partial = ready_file.with_name(ready_file.name + ".partial")
        partial.write_text(f"{host}:{port}\n")
        partial.replace(ready_file)
