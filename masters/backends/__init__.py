"""Backends carry out a module's plan on hosts. `backend_named` is the one way to get one."""

from masters.backends.base import Backend, CappedText, HostResult, HostStatus, RunContext
from ombot.errors import OmbotError

__all__ = ["Backend", "CappedText", "HostResult", "HostStatus", "RunContext", "backend_named"]


def backend_named(name: str) -> Backend:
    if name == "local":
        from masters.backends.local import LocalBackend

        return LocalBackend()
    raise OmbotError(f"unknown backend {name!r} (available: local)")
