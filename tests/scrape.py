"""Reading the ops listeners (ombot/opsweb.py) as Prometheus and a probe do: GET a path, parse
/metrics with prometheus_client's own parser; and giving a test master an `ops_listen`."""

from __future__ import annotations

import urllib.error
import urllib.request

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from tests.support import Cluster

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def get(port: int, path: str, accept: str | None = None) -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, dict(reply.headers), reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


def families(port: int) -> list[Metric]:
    status, _, text = get(port, "/metrics")
    assert status == 200, text
    return list(text_string_to_metric_families(text))


def samples(port: int) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value for f in families(port) for s in f.samples}


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def with_host(found: Samples, name: str) -> dict[str, float]:
    return {dict(labels)["host"]: v for (n, labels), v in found.items() if n == name}


def master_ops(cluster: Cluster, master: str, port: int) -> None:
    """`ops_listen` in the master's own table (extra TOML cannot reopen it)."""
    text = cluster.config_path.read_text()
    cluster.config_path.write_text(text.replace(f"[masters.{master}]\n", f'[masters.{master}]\nops_listen = '
                                                                          f'"127.0.0.1:{port}"\n', 1))
