"""agent.toml: the one file an audit agent reads (written by `ombot audit enroll`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ombot import __version__
from ombot.audit_agent.hook import DEFAULT_SPOOL_DIR
from ombot.tables import HOST_NAME, TableReader, parse_address, public_key, read_toml
from ombot.errors import ConfigError, OmbotError

DEFAULT_CONFIG = "/etc/ombot/agent.toml"
DEFAULT_KEY = "/etc/ombot/agent.key"  # `keygen`'s default: where the rollout makes the key on the host
DEFAULT_STATE_DIR = "/var/lib/ombot-audit"
BINDING_FILE = "agent.binding"  # beside the key, unless binding_file says otherwise
AUDITD_LOG = "/var/log/audit/audit.log"  # where auditd writes; `auditd_log` names it once `install --auditd` ran


@dataclass(frozen=True)
class MasterAddress:
    """A master the agent may ship to: its id, where it listens, and its public key."""

    id: str
    host: str
    port: int
    public_key: str


@dataclass(frozen=True)
class AgentSettings:
    """Which host this is, its key, and the masters of its IDC in failover order."""

    path: Path
    host: str
    idc: str
    key_file: Path
    masters: tuple[MasterAddress, ...]
    spool_dir: Path
    state_dir: Path
    max_events: int = 100_000  # the on-disk queue's bound: past it the oldest go, and a record says so
    batch_events: int = 200
    batch_bytes: int = 256 * 1024
    scan_seconds: float = 0.5
    heartbeat_seconds: float = 60.0
    retry_min_seconds: float = 0.5
    retry_max_seconds: float = 30.0
    connect_timeout_seconds: float = 3.0
    auditd_log: Path | None = None  # the raw audit log to read `-k ombot` execve records from; None: no auditd source
    # the binding certificate of a key made on this host (the rollout writes it), sent to a master that
    # does not know the key yet; None: key_file's directory / agent.binding
    binding_file: Path | None = None

    @property
    def binding(self) -> Path:
        """Where the binding certificate is (it need not exist: a key enrolled with `--out` has none)."""
        return self.binding_file or self.key_file.parent / BINDING_FILE

    def start_line(self) -> str:
        """How the agent's start line begins (logged once its key and config loaded: it is running)."""
        return f"audit agent {__version__} for {self.host} in {self.idc}: "

    def sources(self) -> list[str]:
        """The capture layers it ships, as its heartbeat names them."""
        return ["spool", "auditd"] if self.auditd_log is not None else ["spool"]


_NUMBERS = {"max_events": int, "batch_events": int, "batch_bytes": int, "scan_seconds": float,
            "heartbeat_seconds": float, "retry_min_seconds": float, "retry_max_seconds": float,
            "connect_timeout_seconds": float}


# The top-level keys, which must come before the first [[masters]] table: TOML reads a key written
# after a table header as that table's.
TOP_KEYS = ("host", "idc", "key_file", "spool_dir", "state_dir", "auditd_log", "binding_file", *_NUMBERS)


def load(path: Path) -> AgentSettings:
    r = TableReader(path, read_toml(path, "an agent.toml (written by `ombot audit enroll`)"), "")
    host = r.get("host", str)
    if not HOST_NAME.fullmatch(host):
        raise ConfigError(path, "host", "this server's host name as enrolled", host)
    masters = tuple(_master(TableReader(path, m, f"masters[{i}]")) for i, m in enumerate(r.get("masters", list)))
    if not masters:
        raise ConfigError(path, "masters", "at least one [[masters]] table")
    numbers = {}
    for name, kind in _NUMBERS.items():
        value = r.get(name, (int, float) if kind is float else int, getattr(AgentSettings, name))
        if value <= 0:
            raise ConfigError(path, name, "a positive number", value)
        numbers[name] = kind(value)
    key_file = r.file("key_file")
    assert key_file is not None
    settings = AgentSettings(
        path=path, host=host, idc=r.get("idc", str), key_file=key_file, masters=masters,
        spool_dir=path.parent / r.get("spool_dir", str, DEFAULT_SPOOL_DIR),
        state_dir=path.parent / r.get("state_dir", str, DEFAULT_STATE_DIR),
        auditd_log=path.parent / auditd_log if (auditd_log := r.get("auditd_log", str, "")) else None,
        binding_file=r.file("binding_file", None), **numbers,
    )
    r.done()
    return settings


def agent_dirs(config_file: Path, relative_to: Path) -> tuple[str, str]:
    """(spool_dir, state_dir) that the agent.toml at `config_file` names (relative ones against the
    directory `relative_to`, as the agent resolves them); the defaults when there is no such file yet."""
    if not config_file.is_file():
        return DEFAULT_SPOOL_DIR, DEFAULT_STATE_DIR
    data = read_toml(config_file, "an agent.toml")
    found = []
    for key, default in (("spool_dir", DEFAULT_SPOOL_DIR), ("state_dir", DEFAULT_STATE_DIR)):
        value = data.get(key, default)
        if not isinstance(value, str) or not value:
            raise OmbotError(f"{config_file}: {key} must be a path")
        found.append(os.path.normpath(os.path.join(str(relative_to), value)))
    return found[0], found[1]


def _master(r: TableReader) -> MasterAddress:
    misplaced = [k for k in r.table if k in TOP_KEYS]
    if misplaced:  # appended at the end of the file, it landed in the last [[masters]] table
        raise ConfigError(r.path, r.key(misplaced[0]), f"no {misplaced[0]} here: it is a top-level key, so it "
                          "goes above the first [[masters]] table (uncomment its line there)")
    host, port = parse_address(r, "address")
    master = MasterAddress(r.get("id", str), host, port, public_key(r, "public_key"))
    r.done()
    return master


# The optional keys `render` writes as comments, with their defaults, and what each is for.
_OPTIONAL = (
    ("auditd_log", f'"{AUDITD_LOG}"', "the auditd layer, once `install --auditd` ran (unset: no auditd source)"),
    ("binding_file", f'"{BINDING_FILE}"', "the binding certificate of a key made on the host (beside key_file)"),
    *((name, repr(getattr(AgentSettings, name)), "") for name in _NUMBERS),
)


def render(host: str, idc: str, key_file: str, masters: list[tuple[str, str, int, str]],
           spool_dir: str = DEFAULT_SPOOL_DIR, state_dir: str = DEFAULT_STATE_DIR) -> str:
    """An agent.toml for `host`; masters are (id, host, port, public key) in failover order. Every
    top-level key comes first, the optional ones as comments holding their defaults (uncommenting one
    keeps it at the top level), then the [[masters]] tables."""
    lines = ["# The audit agent's settings (docs/audit.md). Relative paths are relative to this file.",
             "# Every setting goes above the first [[masters]] table: to change an optional one,",
             "# uncomment its line here rather than adding a line at the end.",
             f'host = "{host}"', f'idc = "{idc}"', f'key_file = "{key_file}"', f'spool_dir = "{spool_dir}"',
             f'state_dir = "{state_dir}"', "", "# Optional, with their defaults:"]
    width = max(len(f"# {name} = {value}") for name, value, _ in _OPTIONAL)
    for name, value, why in _OPTIONAL:
        line = f"# {name} = {value}"
        lines.append(f"{line:<{width}}  # {why}" if why else line)
    lines += ["", f"# The masters of {idc}, in failover order."]
    for mid, mhost, port, key in masters:
        address = f"[{mhost}]:{port}" if ":" in mhost else f"{mhost}:{port}"
        lines += ["[[masters]]", f'id = "{mid}"', f'address = "{address}"', f'public_key = "{key}"', ""]
    return "\n".join(lines)
