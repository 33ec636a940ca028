"""The ops listener of a bot or a master (`ops_listen`): /metrics, /healthz and /readyz over HTTP.

One small threaded WSGI server (the standard library's) per process, on loopback unless the config
says otherwise. /metrics is prometheus_client's own exposition of the process's registry (OpenMetrics
when the scraper's Accept asks for it); /healthz answers 200 `ok` while the process lives; /readyz
runs the checks the process registered, each bounded in time, and answers 200 when all pass, else 503,
with a JSON body naming each check and its result. docs/monitoring.md lists the metrics and checks.

This is the one file that imports prometheus_client: the metrics' modules (masters.metrics,
bot.metrics, audit.metrics) take their types from here, so created-series stay off everywhere.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import peewee
import prometheus_client
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ombot.logs import redact

# `x_created` beside every counter and histogram doubles the series for a figure nobody alerts on.
prometheus_client.disable_created_metrics()

__all__ = ["REGISTRY", "Check", "Collector", "Counter", "CounterMetricFamily", "Gauge", "GaugeMetricFamily",
           "Histogram", "Info", "NotReady", "OpsServer", "database_check", "start_ops"]

log = logging.getLogger("ombot.ops")

CHECK_SECONDS = 3.0  # /readyz answers within about this long: a check still running by then has failed
REQUEST_SECONDS = 10.0  # a client that sends no request for this long is hung up on (a thread each)
CHECK_WORKERS = 4  # a hung check holds one; more probes meanwhile wait and fail, they never pile up threads

# A readiness check: what it found when ready (a short text); raises NotReady (or anything) when not.
Check = Callable[[], str]


class NotReady(Exception):
    """A readiness check's finding that the process cannot serve now; its text says why."""


class OpsServer:
    """The HTTP listener: the registry's metrics, liveness, and the registered readiness checks."""

    def __init__(self, host: str, port: int, registry: Collector = REGISTRY) -> None:
        self.checks: dict[str, Check] = {}
        self._pool = ThreadPoolExecutor(CHECK_WORKERS, thread_name_prefix="om-ready")
        self._metrics = make_wsgi_app(registry)
        server_class = _Server6 if ":" in host else _Server
        self.server = make_server(host, port, self._app, server_class=server_class, handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self.server.serve_forever, name="om-ops", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def check(self, name: str, check: Check) -> None:
        """Add a readiness check (/readyz runs every one on each request)."""
        self.checks[name] = check

    def start(self) -> OpsServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def readiness(self) -> tuple[bool, dict[str, dict[str, Any]]]:
        """Every check, run at once and given CHECK_SECONDS in all: whether all passed, and each one's result."""
        started = time.monotonic()
        futures = {name: self._pool.submit(_timed, check) for name, check in self.checks.items()}
        wait(futures.values(), timeout=CHECK_SECONDS)
        for future in futures.values():  # one still queued behind a hung check never runs late
            future.cancel()
        results = {name: _result(future, time.monotonic() - started) for name, future in futures.items()}
        return all(r["ok"] for r in results.values()), results

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return self._metrics(environ, start_response)
        if environ.get("REQUEST_METHOD") != "GET":
            return _answer(start_response, "405 Method Not Allowed", b"GET only\n", [("Allow", "GET")])
        if path == "/healthz":
            return _answer(start_response, "200 OK", b"ok\n")
        if path == "/readyz":
            ready, results = self.readiness()
            body = json.dumps({"ready": ready, "checks": results}, indent=1).encode() + b"\n"
            return _answer(start_response, "200 OK" if ready else "503 Service Unavailable", body,
                           [("Content-Type", "application/json")])
        return _answer(start_response, "404 Not Found", b"not found: /metrics, /healthz and /readyz are served\n")


def _timed(check: Check) -> tuple[str, float]:
    started = time.monotonic()
    return check(), time.monotonic() - started


def _result(future: Future[tuple[str, float]], elapsed: float) -> dict[str, Any]:
    """One check's entry in /readyz: ok or not, what it said (never a secret), how long it took (a
    failed one: as long as the probe had waited)."""
    if not future.done() or future.cancelled():
        return {"ok": False, "detail": f"no answer within {CHECK_SECONDS:g} s", "seconds": round(elapsed, 3)}
    try:
        (detail, elapsed), ok = future.result(), True
    except NotReady as exc:
        detail, ok = str(exc), False
    except Exception as exc:  # a database driver's error, a broken socket: said, not raised
        detail, ok = f"{type(exc).__name__}: {' '.join(str(exc).split())}", False
    return {"ok": ok, "detail": redact(detail)[:500], "seconds": round(elapsed, 3)}


def _answer(start_response: Callable[..., Any], status: str, body: bytes,
            headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    start_response(status, (headers or [("Content-Type", "text/plain; charset=utf-8")])
                   + [("Content-Length", str(len(body))), ("Cache-Control", "no-store")])
    return [body]


def database_check(db: peewee.Database | peewee.DatabaseProxy) -> Check:
    """A check that the database answers: a fresh connection (a pooled one could outlive the file or the
    server) reading the schema table every OMBot database has, closed again."""
    def check() -> str:
        started = time.monotonic()
        if not db.is_closed():  # this worker's connection from an earlier probe: start afresh
            db.close()
        try:
            db.connect()
            db.execute_sql("SELECT COUNT(*) FROM ombot_schema_version").fetchone()
        finally:
            if not db.is_closed():
                db.close()
        return f"answered in {(time.monotonic() - started) * 1000:.0f} ms"

    return check


def start_ops(address: tuple[str, int] | None, what: str, checks: dict[str, Check]) -> OpsServer | None:
    """The listener on `address` (None: not configured, nothing starts) with these readiness checks.
    A port it cannot take is logged, not fatal: jobs and chat go on, the scraper sees the target down."""
    if address is None:
        return None
    try:
        server = OpsServer(*address)
    except OSError as exc:
        log.error("%s: cannot serve /metrics, /healthz and /readyz on %s:%s (%s); running without them",
                  what, address[0], address[1], exc.strerror or exc)
        return None
    for name, check in checks.items():
        server.check(name, check)
    host, port = server.start().address
    log.info("%s: /metrics, /healthz and /readyz on http://%s:%s", what, f"[{host}]" if ":" in host else host, port)
    return server


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape under way never holds the process at exit
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    """No access line per scrape on stderr; a silent client is hung up on."""

    timeout = REQUEST_SECONDS

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)
