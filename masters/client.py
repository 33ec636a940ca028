"""The client library the CLI and the bot use to talk to masters.

Routing: each IDC has masters in failover order. A request moves on to the next master only when
connecting failed, so nothing was sent. Once a submit was sent, the job belongs to that master:
if the link breaks we keep polling that master and finally report the job `unknown`, never
re-sending it elsewhere, where it could run twice.
"""

from __future__ import annotations

import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import rpyc
from rpyc.core.stream import SocketStream

from ombot import context
from ombot.envelope import Peer, Refused, new_request
from ombot.keys import Identity, decode_public
from ombot.masters.states import JobState
from ombot.modules import Catalog
from ombot.clock import now_ms
from ombot.config import CLIENT_MAX_IDLE_SECONDS, Config, MasterSettings
from ombot.errors import OmbotError

CLIENT_CONFIG: dict[str, Any] = {
    "allow_safe_attrs": False,
    "allow_public_attrs": False,
    "allow_all_attrs": False,
    "allow_pickle": False,
    "include_local_traceback": False,
    "include_local_version": False,
    "instantiate_custom_exceptions": False,
    "sync_request_timeout": 30,  # above the master's 20 s long-poll
}
POLL_WAIT_SECONDS = 15.0
SUBMIT_WAIT_SECONDS = 0.05
LOST_RETRY_SECONDS = 10.0


class ConnectFailed(OmbotError):
    """Could not reach a master; nothing was sent, so another master may be tried."""


class MasterLost(OmbotError):
    """The link broke after a request was sent: its outcome is unknown. For a submit, `ref` says
    where the job may be: follow it there, never re-send it elsewhere."""

    def __init__(self, message: str, ref: JobRef | None = None) -> None:
        super().__init__(message)
        self.ref = ref


class NoMasterAvailable(OmbotError):
    """No master of the IDC could be reached; nothing was sent to any of them."""

    def __init__(self, idc: str, reasons: list[str]) -> None:
        super().__init__(f"no master of IDC {idc!r} could be reached: " + "; ".join(reasons))


@dataclass(frozen=True)
class JobRef:
    """A job and the master that owns it: status and cancel go there and nowhere else."""

    job_id: str
    idc: str
    master_id: str


@dataclass
class JobLookup:
    """What the masters asked know of one job of the asking client (`Router.lookup`)."""

    master_id: str | None = None  # the first master that has it; None if none of those that answered does
    state: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)  # every event so far, in order
    errors: dict[str, OmbotError] = field(default_factory=dict)  # masters that could not be asked


class _Connection:
    """One rpyc connection with its remote methods looked up once (saves a round trip per call)."""

    def __init__(self, conn: rpyc.Connection) -> None:
        self.conn = conn
        self.methods: dict[str, Callable[[bytes], Any]] = {}
        self.idle_since = time.monotonic()

    def method(self, op: str) -> Callable[[bytes], Any]:
        if op not in self.methods:
            self.methods[op] = getattr(self.conn.root, op)
        return self.methods[op]

    def usable(self) -> bool:
        """An idle connection with something to read was closed by the master (e.g. it restarted):
        using it would turn a clean failover into an 'unknown' outcome. One idle for CLIENT_MAX_IDLE_SECONDS
        is not used either: the master closes idle connections (`idle_timeout_seconds`), and one it
        closes just as a request goes out would make that request's outcome unknown."""
        if self.conn.closed or time.monotonic() - self.idle_since > CLIENT_MAX_IDLE_SECONDS:
            return False
        try:
            readable, _, _ = select.select([self.conn.fileno()], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:
            pass


class MasterLink:
    """Requests to one master over a small pool of connections, so long-polls do not block others."""

    def __init__(self, master: MasterSettings, identity: Identity, requester: str, origin: str,
                 connect_timeout: float = 3.0, max_idle: int = 8) -> None:
        self.master, self.requester, self.origin = master, requester, origin
        self.connect_timeout, self.max_idle = connect_timeout, max_idle
        self.peer = Peer(identity, decode_public(master.public_key))
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        # time.monotonic() of the last reply and of the last failure to connect or to get one (readiness)
        self.answered_at: float | None = None
        self.failed_at: float | None = None

    def call(self, op: str, args: dict[str, Any], request_id: str | None = None,
             requester: str | None = None) -> dict[str, Any]:
        """One request; `requester` overrides the link's default (the bot acts for many users)."""
        conn = self._checkout()
        request = new_request(op, self.master.id, requester or self.requester, self.origin, args, request_id,
                              rid=context.rid())  # the master logs it with what the request does
        try:
            reply = conn.method(op)(self.peer.seal_request(request))
        except (EOFError, OSError, TimeoutError, rpyc.AsyncResultTimeout) as exc:
            conn.close()
            self.failed_at = time.monotonic()
            raise MasterLost(f"lost master {self.master.id} during {op}: {type(exc).__name__}") from None
        self.answered_at = time.monotonic()
        self._checkin(conn)
        if type(reply) is not bytes:
            raise Refused("bad_reply", "the master's reply is not bytes")
        return self.peer.open_reply(reply, request)

    def _checkout(self) -> _Connection:
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if conn.usable():
                    return conn
                conn.close()
        return _Connection(self._connect())

    def _checkin(self, conn: _Connection) -> None:
        conn.idle_since = time.monotonic()
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def _connect(self) -> rpyc.Connection:
        try:
            stream = SocketStream.connect(self.master.host, self.master.port, timeout=self.connect_timeout)
            conn = rpyc.connect_stream(stream, config={**CLIENT_CONFIG, "sync_request_timeout": self.connect_timeout})
            conn.root  # fetch the root now, under the short timeout: a hung master counts as unreachable
            conn._config["sync_request_timeout"] = CLIENT_CONFIG["sync_request_timeout"]
            return conn
        except (OSError, EOFError, socket.timeout, rpyc.AsyncResultTimeout) as exc:
            self.failed_at = time.monotonic()
            raise ConnectFailed(f"{self.master.id} at {self.master.host}:{self.master.port}: "
                                f"{type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class Router:
    """Routes requests to the masters of each IDC: reads and new jobs fail over, a sent job stays put."""

    def __init__(self, config: Config, identity: Identity, requester: str, origin: str,
                 connect_timeout: float = 3.0, lost_retry: float = LOST_RETRY_SECONDS) -> None:
        self.config, self.lost_retry = config, lost_retry
        self.links = {mid: MasterLink(m, identity, requester, origin, connect_timeout)
                      for mid, m in config.masters.items()}

    def masters_of(self, idc: str) -> tuple[str, ...]:
        if idc not in self.config.idcs:
            raise OmbotError(f"unknown IDC {idc!r} (known: {', '.join(self.config.idcs) or 'none'})")
        return self.config.idcs[idc]

    def _read(self, idc: str, op: str, args: dict[str, Any], requester: str | None = None) -> dict[str, Any]:
        """A read-only request: safe to re-send, so any failure moves on to the next master."""
        reasons: list[str] = []
        for master_id in self.masters_of(idc):
            try:
                return self.links[master_id].call(op, args, requester=requester)
            except (ConnectFailed, MasterLost) as exc:
                reasons.append(str(exc))
        raise NoMasterAvailable(idc, reasons)

    def catalog(self, idc: str) -> Catalog:
        return Catalog.from_schema(self._read(idc, "catalog", {})["catalog"])

    def expand(self, idc: str, targets: str, requester: str | None = None) -> list[str]:
        return list(self._read(idc, "expand", {"targets": targets}, requester)["hosts"])

    def preview(self, idc: str, module: str, params: dict[str, Any], targets: str, check: bool = False,
                requester: str | None = None) -> dict[str, Any]:
        """A dry run, read-only: the hosts `targets` expands to and what the master's backend would run
        there (`steps` as text; `playbook`, the generated YAML, from an Ansible master)."""
        return self._read(idc, "preview", {"module": module, "params": params, "targets": targets, "check": check},
                          requester)

    def submit(self, idc: str, module: str, params: dict[str, Any], hosts: list[str],
               approvers: Iterable[str] = (), timeout: int | None = None,
               request_id: str | None = None, requester: str | None = None,
               wait: float = SUBMIT_WAIT_SECONDS, check: bool = False) -> tuple[JobRef, dict[str, Any]]:
        """Send a job to the first reachable master of the IDC. MasterLost means: sent, outcome unknown.

        The master holds the reply up to `wait` seconds for the job to end, so a quick job comes back
        whole (its events in the reply, for `follow(first=...)`) in a single round trip. A `check` run
        reports what would change and changes nothing (docs/backends.md)."""
        request_id = request_id or str(uuid.uuid4())
        args = {"module": module, "params": params, "hosts": hosts, "idc": idc,
                "approvers": list(approvers), "timeout": timeout, "wait": wait, "check": check}
        reasons: list[str] = []
        for master_id in self.masters_of(idc):
            try:
                result = self.links[master_id].call("submit", args, request_id, requester)
                return JobRef(request_id, idc, master_id), result
            except ConnectFailed as exc:
                reasons.append(str(exc))
            except MasterLost as exc:
                raise MasterLost(f"{exc}; job {request_id} may or may not have started there",
                                 JobRef(request_id, idc, master_id)) from None
        raise NoMasterAvailable(idc, reasons)

    def events(self, ref: JobRef, after: int = 0, wait: float = 0.0) -> dict[str, Any]:
        return self.links[ref.master_id].call("events", {"job": ref.job_id, "after": after, "wait": wait})

    def job_state(self, ref: JobRef) -> str:
        """The job's state alone, from the master that owns it: no waiting, no events read."""
        return str(self.links[ref.master_id].call("events", {"job": ref.job_id, "state_only": True})["state"])

    def lookup(self, job_id: str, master_ids: Sequence[str]) -> JobLookup:
        """Ask each master in turn for the asking client's job and all its events so far (read-only,
        nothing waits); stops at the first that has it. A master that says it has no such job answered."""
        found = JobLookup()
        for master_id in master_ids:
            try:
                reply = self.links[master_id].call("events", {"job": job_id, "after": 0})
                while reply["events"]:  # a long job's events come a page at a time
                    found.events += reply["events"]
                    reply = self.links[master_id].call("events", {"job": job_id, "after": found.events[-1]["seq"]})
            except Refused as exc:
                if exc.code != "unknown_job":
                    raise
                continue
            except (ConnectFailed, MasterLost) as exc:
                found.errors[master_id], found.events = exc, []
                continue
            found.master_id, found.state = master_id, str(reply["state"])
            return found
        return found

    def jobs(self, idc: str, limit: int = 20) -> tuple[list[dict[str, Any]], dict[str, OmbotError]]:
        """The asking client's newest jobs at the masters of the IDC, newest first, and the error of each
        master that could not answer. Every master is asked: a job stays with the master that took it."""
        found: dict[str, dict[str, Any]] = {}
        errors: dict[str, OmbotError] = {}
        for master_id in self.masters_of(idc):
            try:
                reply = self.links[master_id].call("jobs", {"limit": limit})
            except (ConnectFailed, MasterLost, Refused) as exc:
                errors[master_id] = exc
                continue
            for job in reply["jobs"]:  # masters sharing a database list the same jobs: each once
                found.setdefault(job["id"], {**job, "master_id": job.get("master_id") or master_id})
        return sorted(found.values(), key=lambda job: job["created_at"], reverse=True)[:limit], errors

    def cancel(self, ref: JobRef, requester: str | None = None) -> dict[str, Any]:
        return self.links[ref.master_id].call("cancel", {"job": ref.job_id}, requester=requester)

    def follow(self, ref: JobRef, on_event: Callable[[dict[str, Any]], None],
               next_wait: Callable[[], float] = lambda: POLL_WAIT_SECONDS,
               on_poll: Callable[[], None] = lambda: None, first: Sequence[dict[str, Any]] = ()) -> str:
        """Stream a job's events to `on_event` until it ends; returns the final state.

        `first` are events already in hand (a submit reply carries those of a quick job).
        `next_wait` says how long the next long-poll may wait and `on_poll` runs after each poll,
        so a caller can flush throttled work (the bot's card updates) while no events arrive.
        If the master stops answering for `lost_retry` seconds, the state is `unknown`.
        """
        after, lost_since = 0, None
        for event in first:
            after = event["seq"]
            on_event(event)
            if event["kind"] == "finished":
                return str(event["data"]["state"])
        while True:
            try:
                reply = self.events(ref, after, next_wait())
                lost_since = None
            except Refused as exc:
                if exc.code != "unknown_job":
                    raise
                # The submit never arrived (its link broke before the master read it): nothing ran.
                on_event({"seq": after + 1, "kind": "finished", "at": now_ms(), "data": {
                    "state": JobState.UNKNOWN, "counts": {}, "reason": f"master {ref.master_id} has no such job"}})
                return JobState.UNKNOWN
            except (MasterLost, ConnectFailed):
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > self.lost_retry:
                    on_event({"seq": after + 1, "kind": "finished", "at": now_ms(), "data": {
                        "state": JobState.UNKNOWN, "counts": {},
                        "reason": f"lost contact with master {ref.master_id}; the job was not re-sent elsewhere"}})
                    return JobState.UNKNOWN
                time.sleep(0.5)
                continue
            for event in reply["events"]:
                after = event["seq"]
                on_event(event)
                if event["kind"] == "finished":
                    return str(event["data"]["state"])
            on_poll()
            if reply["done"] and not reply["events"]:
                return str(reply["state"])

    def audit_read(self, idc: str, pages: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any] | OmbotError]:
        """One `audit_read` page from each master of the IDC named in `pages` (master id -> its args).

        EVERY master, not the first that answers: an agent fails over, so a server's events are spread
        over its IDC's masters. Per master its page, or the error that kept it from answering."""
        found: dict[str, dict[str, Any] | OmbotError] = {}
        for master_id in self.masters_of(idc):
            if master_id in pages:
                try:
                    found[master_id] = self.links[master_id].call("audit_read", pages[master_id])
                except (ConnectFailed, MasterLost, Refused) as exc:
                    found[master_id] = exc
        return found

    def registry(self, master_id: str, args: dict[str, Any]) -> dict[str, Any]:
        """The `registry` operation (admin keys: add, revoke, list registrations) at one named master.
        Never failed over: each master keeps its own registrations, so each must be told. `add` and
        `revoke` are idempotent: after a lost reply (MasterLost), sending them again is safe."""
        if master_id not in self.links:
            raise OmbotError(f"unknown master {master_id!r} (known: {', '.join(self.links) or 'none'})")
        return self.links[master_id].call("registry", args)

    def answering(self, idc: str, within: float) -> bool:
        """Whether a master of the IDC replied in the last `within` seconds and nothing failed with it
        since: what this router's own traffic says, without a request of its own (a bot's readiness)."""
        now = time.monotonic()
        links = [self.links[master_id] for master_id in self.masters_of(idc)]
        return any(link.answered_at is not None and now - link.answered_at <= within
                   and (link.failed_at is None or link.failed_at <= link.answered_at) for link in links)

    def probe(self, idc: str) -> str | None:
        """The first master of the IDC that answers `health` now (on an idle pooled connection if one
        is there), or None when none does."""
        for master_id in self.masters_of(idc):
            try:
                self.links[master_id].call("health", {})
                return master_id
            except (ConnectFailed, MasterLost, Refused):
                continue
        return None

    def health(self) -> list[dict[str, Any]]:
        """Every configured master, reachable or not, with its round-trip time."""
        report = []
        for master_id, link in self.links.items():
            started = time.perf_counter()
            try:
                info = link.call("health", {})
                report.append({"master": master_id, "idc": link.master.idc, "ok": True,
                               "rtt_ms": round((time.perf_counter() - started) * 1000, 1), **info})
            except (ConnectFailed, MasterLost, Refused) as exc:
                report.append({"master": master_id, "idc": link.master.idc, "ok": False, "error": str(exc)})
        return report

    def close(self) -> None:
        for link in self.links.values():
            link.close()
