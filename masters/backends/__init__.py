"""Backends carry out a module's plan on hosts. `backend_named` is the one way to get one."""

from typing import Any

from ombot.masters.backends.base import Backend, CappedText, HostResult, HostStatus, RunContext
from ombot.config import MasterSettings
from ombot.errors import OmbotError

__all__ = ["Backend", "CappedText", "HostResult", "HostStatus", "RunContext", "backend_named"]


def backend_named(name: str, settings: MasterSettings | None = None) -> Backend:
    """The backend `name`, set up for the master `settings` describe (Ansible needs them)."""
    if name == "local":
        from ombot.masters.backends.local import LocalBackend

        return LocalBackend()
    if name == "ansible":
        if settings is None:
            raise OmbotError("the ansible backend needs the master's settings")
        from ombot.masters.backends.ansible import AnsibleBackend  # ansible-runner loads only when used

        return AnsibleBackend(settings)
    if name == "salt":
        if settings is None:
            raise OmbotError("the salt backend needs the master's settings")
        return salt_module().SaltBackend(settings)
    raise OmbotError(f"unknown backend {name!r} (available: local, ansible, salt)")


SALT_UNAVAILABLE = "the Salt backend is unavailable: install the salt extra (pip install 'ombot[salt]')"


def salt_module() -> Any:
    """masters.backends.salt, which imports Salt (the optional `salt` extra) only when a master uses it."""
    try:
        from ombot.masters.backends import salt
    except ImportError as exc:
        if not (exc.name or "").startswith("salt"):
            raise
        raise OmbotError(SALT_UNAVAILABLE) from None
    return salt
