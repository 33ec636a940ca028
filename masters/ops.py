"""The master's ops listener (`ops_listen`, docs/monitoring.md): its readiness checks, and the figures
read at each scrape from where the master keeps them (jobs under way, open connections, agents and
their last heartbeats), so none is counted twice or goes stale. The counters are in masters.metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import ombot
from ombot.masters import store
from ombot.masters.audit import AuditAgent
from ombot.masters.connections import CappedThreadedServer
from ombot.masters.core import MasterCore
from ombot.masters.metrics import MASTER
from ombot.opsweb import REGISTRY, CounterMetricFamily, GaugeMetricFamily, NotReady, OpsServer, database_check, start_ops

log = logging.getLogger("ombot.master")


class MasterState:
    """The figures read at each scrape: jobs under way, connections, agents and their heartbeats."""

    def __init__(self, core: MasterCore, server: CappedThreadedServer) -> None:
        self.core, self.server = core, server

    def describe(self) -> Iterator[Any]:
        """The families without reading anything (the registry asks once, when this registers)."""
        return iter(self._families())

    def collect(self) -> Iterator[Any]:
        jobs, connections, agents, last, queued, dropped = self._families()
        running, waiting = self.core.runner.counts()
        jobs.add_metric(["running"], running)
        jobs.add_metric(["waiting"], waiting)
        for kind, count in sorted(self.server.connection_counts().items()):
            connections.add_metric([kind], count)
        for state, count in sorted(self.core.clients.agent_counts().items()):
            agents.add_metric([state], count)
        for row in self._heartbeats():
            last.add_metric([row.host], row.last_seen / 1000)
            queued.add_metric([row.host], row.spool_depth)
            dropped.add_metric([row.host], row.dropped_total)
        return iter((jobs, connections, agents, last, queued, dropped))

    def _heartbeats(self) -> list[AuditAgent]:
        """Each agent's last heartbeat, as this master's database holds it (every master sharing it sees the
        same); none while the database does not answer (/readyz says so) or holds no audit tables."""
        if not self.core.audit.enabled():
            return []
        try:
            with store.db.connection_context():  # a scrape's thread ends with it: so does its connection
                return list(AuditAgent.select().order_by(AuditAgent.host))
        except Exception as exc:
            log.debug("no agent heartbeats for /metrics: %s", exc)
            return []

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily,
                             GaugeMetricFamily, CounterMetricFamily]:
        return (
            GaugeMetricFamily("ombot_master_jobs_active", "Jobs running now, and waiting for their hosts or a slot.",
                              labels=["state"]),
            GaugeMetricFamily("ombot_master_connections", "Open connections by the kind of key they carry "
                              "(unauthenticated: no valid request yet).", labels=["kind"]),
            GaugeMetricFamily("ombot_master_agents", "Audit agents: accepted (registered or bound), pending "
                              "(enrolled, key not bound yet), revoked.", labels=["state"]),
            GaugeMetricFamily("ombot_master_agent_last_heartbeat_timestamp_seconds", "When a master last heard "
                              "each agent's heartbeat (Unix time).", labels=["host"]),
            GaugeMetricFamily("ombot_master_agent_queued_events", "Events waiting in each agent's spool at its "
                              "last heartbeat.", labels=["host"]),
            CounterMetricFamily("ombot_master_agent_dropped_events", "Events each agent says it had to drop "
                                "(spool full), as of its last heartbeat.", labels=["host"]),
        )


def start_master_ops(core: MasterCore, server: CappedThreadedServer) -> OpsServer | None:
    """The master's ops listener (`ops_listen`), ready when its database answers and its rpyc listener is up."""
    settings = core.settings
    if settings.ops_listen is None:
        return None
    MASTER.info({"master": settings.id, "idc": settings.idc, "backend": core.backend.name,
                 "version": ombot.__version__})
    state = MasterState(core, server)
    REGISTRY.register(state)
    ops = start_ops(settings.ops_listen, f"master {settings.id}",
                    {"database": database_check(store.db), "listener": lambda: _listening(server)})
    if ops is None:
        REGISTRY.unregister(state)
    return ops


def _listening(server: CappedThreadedServer) -> str:
    if not server.active or server._closed:
        raise NotReady("the rpyc listener is not accepting connections")
    host, port = server.listener.getsockname()[:2]
    return f"accepting on {host}:{port}"
