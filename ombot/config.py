"""ombot.toml: one file of settings, validated before anything runs.

Secrets never live in the TOML file. Keys are 0600 files named by path; database URLs with a
password come from the environment or a 0600 file. A config error names the file, the key path
and what was expected.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ombot.errors import ConfigError, OmbotError
from ombot.tables import HOST_NAME, TableReader, database_url, parse_address, public_key, read_toml

CONFIG_ENV = "OMBOT_CONFIG"
DEFAULT_CONFIG = "ombot.toml"


CLIENT_MAX_IDLE_SECONDS = 60.0  # the client library reuses a pooled connection idle at most this long
LEASE_RENEWALS = 3  # a host lock's lease spans this many renewal periods at least


@dataclass(frozen=True)
class Limits:
    """A master's limits (`[masters.ID.limits]`): sizes, times and counts it will not exceed."""

    max_frame_bytes: int = 1024 * 1024
    clock_skew_seconds: int = 60
    max_validity_seconds: int = 300
    output_cap_bytes: int = 64 * 1024
    job_timeout_seconds: int = 600
    max_parallel_hosts: int = 16
    max_connections: int = 256  # strangers' and operators' (chat, console, CLI) connections
    auth_timeout_seconds: int = 5  # a connection must present a valid envelope this soon, or it is closed
    max_agent_connections: int = 1024  # audit agents' connections: a pool of their own
    max_connections_per_client: int = 128  # one chat, console or CLI key's connections: never the whole pool
    max_connections_per_agent: int = 2  # one agent key's
    idle_timeout_seconds: int = 300  # an authenticated connection with no call for this long is closed (> CLIENT_MAX_IDLE_SECONDS)
    agent_idle_seconds: int = 30  # an agent's (agents ship and close; a held one is closed sooner)
    ingest_events_per_second: int = 200  # one agent's sustained ingest; past it the rest waits on the server
    ingest_burst_events: int = 20_000  # what it may send at once (a backlog after an outage)
    ingest_bytes_per_second: int = 256 * 1024
    ingest_burst_bytes: int = 16 * 1024 * 1024
    max_jobs: int = 8  # job slots of this master
    max_jobs_per_requester: int = 4  # one requester never holds every slot
    max_waiting_per_requester: int = 32  # one requester's jobs waiting for hosts or a slot; more are refused
    lock_lease_seconds: int = 60  # a host lock lapses this long after its master last renewed it (database clock)
    lock_renew_seconds: int = 15  # how often a master renews its locks; it stops its runs one period before they lapse


@dataclass(frozen=True)
class AnsibleSettings:
    """`[masters.ID.ansible]`: how the Ansible backend runs (docs/backends.md explains each)."""

    forks: int = 50  # at most this many hosts at once (and never more than limits.max_parallel_hosts)
    python: str = "/usr/bin/python3"  # the hosts' interpreter unless the inventory sets ansible_python_interpreter
    pipelining: bool = True
    control_persist_seconds: int = 60
    connect_timeout_seconds: int = 10
    host_key_checking: bool = True
    rotate_artifacts: int = 50  # runs whose artifacts are kept under <state_dir>/ansible
    playbooks: Path | None = None  # the allow-listed directory ansible.playbook runs playbooks from
    warm_start: bool = True  # ansible-playbook forked from a server that imported Ansible once (ansible_forkserver.py)


SALT_INVENTORIES = ("file", "minions")


@dataclass(frozen=True)
class SaltSettings:
    """`[masters.ID.salt]`: the Salt backend's salt-master and limits (docs/backends.md explains each)."""

    config: Path = Path("/etc/salt/master")  # the salt-master's config file: LocalClient's c_path
    inventory: str = "file"  # "minions": the hosts are the salt-master's accepted minion keys
    python: str = "/usr/bin/python3"  # the minions' Python, for OMBot's small checks (RequireWithin, TailFile)
    states: tuple[str, ...] = ()  # the states salt.state may apply (from the salt-master's file_roots)
    answer_seconds: float = 5.0  # a minion silent this long is asked whether it runs the job; unreachable if not


@dataclass(frozen=True)
class MasterSettings:
    """One `[masters.ID]` table, validated."""

    id: str
    idc: str
    host: str
    port: int
    public_key: str
    key_file: Path | None
    inventory: Path | None
    backend: str
    accept: tuple[str, ...]
    state_dir: Path
    database_url: str
    limits: Limits
    # module glob -> approvals the master itself demands: a bot bug cannot skip approval
    approvals: dict[str, int] = field(default_factory=dict)
    retention_days: float = 30.0  # finished jobs and their events are deleted this long after they end
    audit_retention_days: float = 7.0  # audit events are deleted once the bot pulled them, or this long after
    ansible: AnsibleSettings = field(default_factory=AnsibleSettings)
    salt: SaltSettings = field(default_factory=SaltSettings)
    ops_listen: tuple[str, int] | None = None  # /metrics, /healthz, /readyz (docs/monitoring.md); None: none


CLIENT_KINDS = ("chat", "console", "cli", "agent")
CLIENT_ENV = "OMBOT_CLIENT"
_USER = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")


@dataclass(frozen=True)
class ClientRegistration:
    """A client key the masters may accept, and what the master lets it do.

    `chat` clients (the bot) attest chat identities: they may name Slack users as requesters and
    approvers. `cli` and `console` clients act as one fixed identity, `cli:USER` / `console:USER`,
    whatever their requests say. `modules` and `hosts` are globs of what the key may run at all.
    An `agent` client is the audit agent of one server (`host`): it speaks as `agent:HOST` and may
    only ship that host's audit events. An `admin` key (a `cli` one, only from ombot.toml) may add
    and revoke registrations at the masters.
    """

    id: str
    public_key: str
    kind: str
    user: str
    key_file: Path | None = None
    modules: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    host: str = ""  # the server an `agent` key belongs to; empty for every other kind
    admin: bool = False  # a `cli` key that may change the masters' registrations (the `registry` operation)

    @property
    def identity(self) -> str:
        """Who this client is when it speaks for itself."""
        return f"agent:{self.host}" if self.kind == "agent" else f"{self.kind}:{self.user}"


@dataclass(frozen=True)
class ClientSettings:
    """The registration a front end on this machine speaks as, with its private key."""

    id: str
    key_file: Path
    default_idc: str


@dataclass(frozen=True)
class Config:
    """The whole of ombot.toml, validated before anything starts."""

    path: Path
    client: ClientSettings | None
    clients: dict[str, ClientRegistration]
    idcs: dict[str, tuple[str, ...]]  # idc -> master ids, in failover order
    masters: dict[str, MasterSettings]
    module_dirs: tuple[Path, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def master(self, master_id: str | None = None) -> MasterSettings:
        if master_id is None:
            if len(self.masters) != 1:
                raise ConfigError(self.path, "masters", "exactly one master, or --id NAME to pick one")
            return next(iter(self.masters.values()))
        try:
            return self.masters[master_id]
        except KeyError:
            raise ConfigError(self.path, f"masters.{master_id}", "a [masters.NAME] table") from None

    def require_client(self) -> ClientSettings:
        """The CLI's registration: [client] id, unless --client or $OMBOT_CLIENT names another."""
        if self.client is None:
            raise ConfigError(self.path, "client", "a [client] table with id and default_idc")
        override = os.environ.get(CLIENT_ENV)
        return self.client if not override else self.speaking_as(override, self.client.default_idc)

    def speaking_as(self, client_id: str, default_idc: str | None = None) -> ClientSettings:
        """Settings for a front end that speaks as registration `client_id` (it needs its key_file)."""
        registration = self.clients.get(client_id)
        if registration is None:
            raise ConfigError(self.path, f"clients.{client_id}", "a [clients.NAME] table for this client")
        if registration.key_file is None:
            raise ConfigError(self.path, f"clients.{client_id}.key_file", "the client's private key file")
        idc = default_idc or (self.client.default_idc if self.client else next(iter(self.idcs), ""))
        return ClientSettings(client_id, registration.key_file, idc)


def config_path(explicit: str | os.PathLike[str] | None) -> Path:
    """The config file to use: --config, then $OMBOT_CONFIG, then ./ombot.toml."""
    return Path(explicit or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def load(path: str | os.PathLike[str] | None = None) -> Config:
    path = config_path(path).resolve()
    return _parse(path, read_toml(path, "an existing file (create one with `ombot init DIR`)"))


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def _check_name(path: Path, key: str, value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ConfigError(path, key, "a name of letters, digits, '.', '_' or '-'", value)
    return value


def _parse(path: Path, raw: dict[str, Any]) -> Config:
    # Top-level tables other than these belong to other components (read from Config.raw).
    top = TableReader(path, raw, "")
    clients = {_check_name(path, f"clients.{cid}", cid): _parse_clients_entry(top.sub("clients").sub(cid, True), cid)
               for cid in top.sub("clients").table}
    masters = {
        _check_name(path, f"masters.{mid}", mid): _parse_master(top.sub("masters").sub(mid, True), mid, clients)
        for mid in top.sub("masters").table
    }
    idcs = _parse_idcs(top.sub("idcs"), masters)
    client = _parse_client(top.sub("client"), idcs, clients) if "client" in raw else None
    modules = top.sub("modules")
    module_dirs = tuple(path.parent / d for d in modules.strings("dirs", ()))
    modules.done()
    return Config(path, client, clients, idcs, masters, module_dirs, raw)


def _parse_clients_entry(r: TableReader, client_id: str) -> ClientRegistration:
    kind = r.get("kind", str, what=f"one of {', '.join(CLIENT_KINDS)}")
    if kind not in CLIENT_KINDS:
        raise ConfigError(r.path, r.key("kind"), f"one of {', '.join(CLIENT_KINDS)}", kind)
    user = _user(r, kind, client_id)
    registration = ClientRegistration(
        id=client_id, public_key=public_key(r, "public_key"), kind=kind, user=user,
        key_file=r.file("key_file", None), modules=r.strings("modules", ()), hosts=r.strings("hosts", ()),
        host=_agent_host(r, kind), admin=_admin(r, kind),
    )
    r.done()
    return registration


def parse_registration(where: Path, client_id: str, table: dict[str, Any]) -> ClientRegistration:
    """One registration checked by the rules of a `[clients.ID]` table, wherever it comes from (the
    masters' `registry` operation too); `where` names the source in the ConfigError."""
    _check_name(where, f"clients.{client_id}", client_id)
    return _parse_clients_entry(TableReader(where, table, f"clients.{client_id}"), client_id)


def _user(r: TableReader, kind: str, client_id: str) -> str:
    """The USER of `cli:USER` / `console:USER`. An agent speaks as `agent:HOST`: its user, unused, is
    checked only when given (an agent id such as agent-web01.example.internal is no user name)."""
    user = r.get("user", str, client_id)
    if (kind != "agent" or "user" in r.table) and not _USER.fullmatch(user):
        raise ConfigError(r.path, r.key("user"), "a lowercase user name (letters, digits, '_', '.', '-')", user)
    return user


def _admin(r: TableReader, kind: str) -> bool:
    """Only an operator's `cli` key may be an admin (may call the masters' `registry` operation)."""
    admin = r.get("admin", bool, False)
    if admin and kind != "cli":
        raise ConfigError(r.path, r.key("admin"), "no admin: only a cli registration may be admin", admin)
    return bool(admin)


def _agent_host(r: TableReader, kind: str) -> str:
    """An agent registration names the one server whose events its key may ship; no other kind does."""
    host = r.get("host", str, "")
    if kind != "agent":
        if host:
            raise ConfigError(r.path, r.key("host"), "no host: only an agent registration names one", host)
        return ""
    if not HOST_NAME.fullmatch(host) or len(host) > 253:
        raise ConfigError(r.path, r.key("host"), "the agent's host name (letters, digits, '-', '_', dots)", host or ...)
    return host


def _parse_master(r: TableReader, master_id: str, clients: dict[str, ClientRegistration]) -> MasterSettings:
    host, port = parse_address(r, "address")
    accept = r.strings("accept", ())
    for cid in accept:
        if cid not in clients:
            raise ConfigError(r.path, r.key("accept"), f"client ids defined under [clients]; unknown {cid!r}")
    state_dir = r.file("state_dir", "state") or r.path.parent / "state"
    limits_table = r.sub("limits")
    limits = Limits(**{k: _positive(limits_table, k, v) for k, v in Limits().__dict__.items()})
    if limits.idle_timeout_seconds <= CLIENT_MAX_IDLE_SECONDS:  # else a request could meet the master's close
        raise ConfigError(r.path, limits_table.key("idle_timeout_seconds"),
                          f"more than {CLIENT_MAX_IDLE_SECONDS:g} seconds (clients reuse a connection idle that long)",
                          limits.idle_timeout_seconds)
    if limits.lock_lease_seconds < LEASE_RENEWALS * limits.lock_renew_seconds:  # it must fail twice before it stops
        raise ConfigError(r.path, limits_table.key("lock_lease_seconds"),
                          f"at least {LEASE_RENEWALS} times lock_renew_seconds ({limits.lock_renew_seconds})",
                          limits.lock_lease_seconds)
    limits_table.done()
    settings = MasterSettings(
        id=master_id,
        idc=_check_name(r.path, r.key("idc"), r.get("idc", str)),
        host=host,
        port=port,
        public_key=public_key(r, "public_key"),
        key_file=r.file("key_file", None),
        inventory=r.file("inventory", None),
        backend=r.get("backend", str, "local"),
        accept=accept,
        state_dir=state_dir,
        database_url=database_url(r, "OMBOT_MASTER_DATABASE_URL", f"sqlite:///{state_dir / master_id}.db"),
        limits=limits,
        approvals=_approvals(r.sub("approvals")),
        retention_days=_positive_number(r, "retention_days", 30.0),
        audit_retention_days=_positive_number(r, "audit_retention_days", 7.0),
        ansible=_ansible(r.sub("ansible")),
        salt=_salt(r.sub("salt")),
        ops_listen=parse_address(r, "ops_listen") if "ops_listen" in r.table else None,
    )
    if settings.salt.inventory == "minions" and settings.inventory is not None:
        raise ConfigError(r.path, r.key("inventory"), "no inventory file: [salt] inventory = \"minions\" takes the "
                                                      "targets from the salt-master's accepted keys", str(settings.inventory))
    r.done()
    return settings


def _approvals(r: TableReader) -> dict[str, int]:
    """[masters.X.approvals]: module glob -> how many approvers (never the requester) a job needs."""
    counts = {glob: r.get(glob, int, what="a number of approvals") for glob in r.table}
    for glob, count in counts.items():
        if not 1 <= count <= 10:
            raise ConfigError(r.path, r.key(glob), "from 1 to 10 approvals", count)
    return counts


def _positive_number(r: TableReader, name: str, default: float) -> float:
    value = r.get(name, (int, float), default, what="a positive number")
    if isinstance(value, bool) or not value > 0 or value == float("inf"):
        raise ConfigError(r.path, r.key(name), "a positive number", value)
    return float(value)


def _ansible(r: TableReader) -> AnsibleSettings:
    """[masters.X.ansible]: the Ansible backend's tuning (docs/backends.md)."""
    defaults = AnsibleSettings()
    python = r.get("python", str, defaults.python)
    if not re.fullmatch(r"/[A-Za-z0-9_./-]+", python):
        raise ConfigError(r.path, r.key("python"), "an absolute path to the hosts' Python", python)
    settings = AnsibleSettings(
        forks=_positive(r, "forks", defaults.forks), python=python,
        pipelining=r.get("pipelining", bool, defaults.pipelining),
        control_persist_seconds=_positive(r, "control_persist_seconds", defaults.control_persist_seconds),
        connect_timeout_seconds=_positive(r, "connect_timeout_seconds", defaults.connect_timeout_seconds),
        host_key_checking=r.get("host_key_checking", bool, defaults.host_key_checking),
        rotate_artifacts=_positive(r, "rotate_artifacts", defaults.rotate_artifacts),
        playbooks=r.file("playbooks", None), warm_start=r.get("warm_start", bool, defaults.warm_start),
    )
    r.done()
    return settings


def _salt(r: TableReader) -> SaltSettings:
    """[masters.X.salt]: the Salt backend's salt-master, inventory source and states (docs/backends.md)."""
    defaults = SaltSettings()
    python = r.get("python", str, defaults.python)
    if not re.fullmatch(r"/[A-Za-z0-9_./-]+", python):
        raise ConfigError(r.path, r.key("python"), "an absolute path to the minions' Python", python)
    inventory = r.get("inventory", str, defaults.inventory)
    if inventory not in SALT_INVENTORIES:
        raise ConfigError(r.path, r.key("inventory"), "\"file\" (the master's inventory) or \"minions\" (the "
                                                      "salt-master's accepted minion keys)", inventory)
    states = r.strings("states", ())
    for state in states:
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", state):
            raise ConfigError(r.path, r.key("states"), "state names such as nginx or web.app", state)
    settings = SaltSettings(config=r.file("config", None) or defaults.config, inventory=inventory, python=python,
                            states=states, answer_seconds=_positive_number(r, "answer_seconds", defaults.answer_seconds))
    r.done()
    return settings


def _positive(r: TableReader, name: str, default: int) -> int:
    value = r.get(name, int, default)
    if value <= 0:
        raise ConfigError(r.path, r.key(name), "a positive integer", value)
    return value


def _parse_idcs(r: TableReader, masters: dict[str, MasterSettings]) -> dict[str, tuple[str, ...]]:
    idcs: dict[str, tuple[str, ...]] = {}
    for idc in r.table:
        sub = r.sub(idc, True)
        ids = sub.strings("masters")
        sub.done()
        if not ids:
            raise ConfigError(r.path, sub.key("masters"), "at least one master id", [])
        for mid in ids:
            if mid not in masters:
                raise ConfigError(r.path, sub.key("masters"), f"master ids defined under [masters]; unknown {mid!r}")
            if masters[mid].idc != idc:
                raise ConfigError(r.path, sub.key("masters"), f"masters of IDC {idc!r}; {mid!r} is in {masters[mid].idc!r}")
        _one_backend(r.path, idc, [m for m in masters.values() if m.idc == idc])
        idcs[idc] = ids
    return idcs


def _one_backend(path: Path, idc: str, masters: list[MasterSettings]) -> None:
    """Masters of one IDC fail over to each other, so they must reach the hosts the same way: a job
    failing over must not change how (or whether) it can run."""
    backends = {m.backend for m in masters}
    if len(backends) > 1:
        named = ", ".join(f"{m.id} ({m.backend})" for m in masters)
        raise ConfigError(path, f"idcs.{idc}", f"one backend for all masters of IDC {idc!r}; they name "
                                               f"different ones: {named}")


def _parse_client(r: TableReader, idcs: dict[str, tuple[str, ...]],
                  clients: dict[str, ClientRegistration]) -> ClientSettings:
    """[client]: the IDC front ends act in by default, and the registration the CLI speaks as."""
    default_idc = r.get("default_idc", str)
    if default_idc not in idcs:
        raise ConfigError(r.path, r.key("default_idc"), f"one of the IDCs under [idcs] ({', '.join(idcs)})", default_idc)
    client_id = _check_name(r.path, r.key("id"), r.get("id", str))
    if client_id not in clients:
        raise ConfigError(r.path, r.key("id"), f"a client id defined under [clients] ({', '.join(clients) or 'none'})",
                          client_id)
    r.done()
    key_file = clients[client_id].key_file
    if key_file is None:
        raise ConfigError(r.path, f"clients.{client_id}.key_file", "the CLI client's private key file")
    return ClientSettings(client_id, key_file, default_idc)


def several_idcs(text: str | None) -> bool:
    """Whether `idc=` names several IDCs (`bj,sh`, or `*` for all): one request, one job per IDC."""
    return text is not None and ("," in text or text.strip() == "*")


def named_idcs(config: Config, text: str) -> list[str]:
    """The IDCs `bj,sh` names (each once, in the order given), or `*`: every IDC, in the config's order."""
    if text.strip() == "*":
        return list(config.idcs)
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in config.idcs]
    if unknown or not names:
        raise OmbotError(f"unknown IDC {', '.join(map(repr, unknown)) or repr(text)} "
                         f"(known: {', '.join(config.idcs) or 'none'}; `*` means all of them)")
    return names
