"""The master's rpyc face: six methods taking and returning bytes, and nothing else reachable."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import rpyc
from rpyc.utils.server import ThreadedServer

from masters import store
from masters.backends import backend_named
from masters.core import MasterCore
from masters.inventory import Inventory
from masters.keys import Identity, decode_public
from modules import load_modules
from ombot.config import Config, MasterSettings
from ombot.errors import ConfigError

log = logging.getLogger("ombot.master")

EXPOSED = ("catalog", "expand", "submit", "events", "cancel", "health")

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


class MasterService(rpyc.Service):
    def __init__(self, core: MasterCore) -> None:
        self._core = core

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


def serve(config: Config, settings: MasterSettings, ready_file: Path | None = None) -> None:
    core = build_core(config, settings)
    server = ThreadedServer(
        MasterService(core), hostname=settings.host, port=settings.port, reuse_addr=True,
        protocol_config=SERVER_CONFIG, logger=logging.getLogger("ombot.master.rpyc"),
    )
    host, port = server.listener.getsockname()[:2]
    log.info("master %s (IDC %s) listening on %s:%s with %d modules", settings.id, settings.idc, host, port,
             len(core.modules))
    if ready_file is not None:
        ready_file.write_text(f"{host}:{port}\n")
    stop = threading.Event()

    def shutdown(signum: int, frame: Any) -> None:
        stop.set()
        server.close()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    try:
        server.start()
    finally:
        core.close()
