"""The master's rpyc face: the envelope's methods taking and returning bytes, and nothing else reachable."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
from pathlib import Path
from typing import Any

import rpyc
from rpyc.core.channel import Channel

from ombot import sdnotify
from ombot.masters import store
from ombot.masters.backends import backend_named
from ombot.masters.connections import RPYC_OVERHEAD_BYTES, BoundedChannel, CappedThreadedServer, ConnectionGate
from ombot.masters.core import MasterCore
from ombot.envelope import OPS
from ombot.masters.inventory import open_inventory
from ombot.masters.ops import start_master_ops
from ombot.masters.rollout import IdcMaster
from ombot.keys import Identity
from ombot.modules import load_modules
from ombot import context
from ombot.config import Config, MasterSettings
from ombot.errors import ConfigError, OmbotError

log = logging.getLogger("ombot.master")

EXPOSED = OPS  # the request kinds of the envelope, and nothing else

# Nothing but those methods: no public or "safe" attributes, no pickling, no tracebacks sent back.
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


class MasterService(rpyc.Service):
    """The rpyc service: the envelope methods, bytes in and bytes out, each handed to MasterCore."""

    def __init__(self, core: MasterCore, gate: ConnectionGate | None = None) -> None:
        self._core = core
        self._gate = gate
        self._max_message = core.settings.limits.max_frame_bytes + RPYC_OVERHEAD_BYTES

    def for_connection(self, gate: ConnectionGate) -> MasterService:
        """The service for one connection: it reports its calls and whose key each frame carries."""
        return MasterService(self._core, gate)

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

    def _call(self, op: str, frame: bytes) -> bytes:
        if self._gate is None:
            return self._core.handle(op, frame)
        self._gate.calls(+1)
        try:
            return self._core.handle(op, frame, self._gate.authenticated)
        finally:
            self._gate.calls(-1)

    def exposed_catalog(self, frame: bytes) -> bytes:
        return self._call("catalog", frame)

    def exposed_expand(self, frame: bytes) -> bytes:
        return self._call("expand", frame)

    def exposed_submit(self, frame: bytes) -> bytes:
        return self._call("submit", frame)

    def exposed_events(self, frame: bytes) -> bytes:
        return self._call("events", frame)

    def exposed_cancel(self, frame: bytes) -> bytes:
        return self._call("cancel", frame)

    def exposed_health(self, frame: bytes) -> bytes:
        return self._call("health", frame)

    def exposed_ingest(self, frame: bytes) -> bytes:
        return self._call("ingest", frame)

    def exposed_audit_read(self, frame: bytes) -> bytes:
        return self._call("audit_read", frame)

    def exposed_preview(self, frame: bytes) -> bytes:
        return self._call("preview", frame)

    def exposed_registry(self, frame: bytes) -> bytes:
        return self._call("registry", frame)

    def exposed_jobs(self, frame: bytes) -> bytes:
        return self._call("jobs", frame)

    def exposed_bind(self, frame: bytes) -> bytes:
        return self._call("bind", frame)

    def exposed_binding(self, frame: bytes) -> bytes:
        return self._call("binding", frame)


def build_core(config: Config, settings: MasterSettings) -> MasterCore:
    """Everything a master needs, validated before it listens: keys, modules, inventory, store."""
    if settings.key_file is None:
        raise ConfigError(config.path, f"masters.{settings.id}.key_file", "the master's private key file")
    identity = Identity.load(settings.key_file)
    if identity.public != settings.public_key:
        raise ConfigError(config.path, f"masters.{settings.id}.public_key", f"the public key of {settings.key_file}")
    accepted = {cid: config.clients[cid] for cid in settings.accept}
    modules = load_modules(config.module_dirs)
    inventory = open_inventory(settings)
    store.open_store(settings.database_url)
    # The IDC's masters in failover order: whose certificates count, and what a rolled-out agent.toml names.
    peers = [IdcMaster(m.id, m.host, m.port, m.public_key) for m in (config.masters[mid] for mid in config.idcs[settings.idc])]
    return MasterCore(settings, identity, accepted, modules, inventory, backend_named(settings.backend, settings),
                      peers)


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
    sdnotify.claim()  # before any child starts: no job may speak to systemd for the master
    context.for_process(master=settings.id, idc=settings.idc)  # on every line: masters' logs are shipped together
    _claim_state(settings)
    core = build_core(config, settings)
    try:
        server = _server(core, settings)
    except OSError as exc:
        core.close()
        raise OmbotError(f"master {settings.id} cannot listen on {settings.host}:{settings.port}: "
                         f"{exc.strerror or exc}") from None
    ops = start_master_ops(core, server)  # /metrics, /healthz, /readyz when `ops_listen` is set
    _announce(core, settings, server, ready_file)

    def shutdown(signum: int, frame: Any) -> None:
        sdnotify.stopping(f"master {settings.id} stopping")
        server.close()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    try:
        server.start()
    finally:
        if ops is not None:
            ops.close()
        core.close()


def _server(core: MasterCore, settings: MasterSettings) -> CappedThreadedServer:
    server = CappedThreadedServer(
        MasterService(core), hostname=settings.host, port=settings.port, reuse_addr=True,
        protocol_config=SERVER_CONFIG, logger=logging.getLogger("ombot.master.rpyc"),
        limits=settings.limits, timers=core.timers,
    )
    core.clients.on_revoke(server.close_clients)  # a revoked key's open connections close at once
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
    sdnotify.ready(f"master {settings.id} (IDC {settings.idc}) serving on {host}:{port}", core.timers)
