"""The metrics both services share (RPCs), the page each serves, and its HTTP endpoint.

Each ``/metrics`` page shows the metrics of the service that serves it (``serve_only``): the
RPC metrics both have, that service's own (``monitor_svc.metrics``,
``orchestrator_svc.metrics``), and the client library's process and Python metrics, never the
other service's as zeros. The metric objects belong to no registry until a page is served; the
hooks are one call each, made where the work happens.
"""

from __future__ import annotations

from typing import Any

import structlog
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    start_http_server,
)
from prometheus_client.registry import Collector

log = structlog.get_logger(__name__)

# Seconds: from a sub-millisecond unary call to a long-lived stream.
LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    60.0,
)
# Units of work (RPC calls, event batches) committed in one group transaction.
COMMIT_UNITS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

RPC_HANDLED = Counter(
    "stepflow_rpc_handled_total",
    "RPCs completed, by service, method and status code.",
    ["service", "method", "code"],
    registry=None,
)
RPC_DURATION = Histogram(
    "stepflow_rpc_duration_seconds",
    "RPC handling time (a stream's whole lifetime), by service, method and status code.",
    ["service", "method", "code"],
    buckets=LATENCY_BUCKETS_S,
    registry=None,
)
SHARED: tuple[Collector, ...] = (RPC_HANDLED, RPC_DURATION)
SERVICES = ("monitor", "orchestrator")
# Each service's own metrics, registered by its metrics module when it is imported.
BY_SERVICE: dict[str, tuple[Collector, ...]] = {}
_served: list[str] = []  # empty: every service's (one process running both, as tests do)


def register_service(service: str, collectors: tuple[Collector, ...]) -> None:
    """``service``'s own metrics, shown on its page (and on a page serving every service)."""
    BY_SERVICE[service] = collectors


def serve_only(service: str) -> None:
    """This process is ``service`` ("monitor" or "orchestrator"): its page shows only that
    service's metrics (and the shared ones)."""
    if service not in SERVICES:
        raise ValueError(f"unknown service {service!r}")
    _served[:] = [service]


def registry() -> CollectorRegistry:
    """A registry with what this process's page shows."""
    out = CollectorRegistry(auto_describe=True)
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR, *SHARED):
        out.register(collector)
    for service in _served or BY_SERVICE:
        for collector in BY_SERVICE.get(service, ()):
            out.register(collector)
    return out


def observe_rpc(full_method: str, code: str, seconds: float) -> None:
    """The ``observe`` callback of ``DomainErrorInterceptor``."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    RPC_HANDLED.labels(service, method, code).inc()
    RPC_DURATION.labels(service, method, code).observe(seconds)


def start_metrics_server(port: int, host: str = "0.0.0.0") -> Any:
    """Serve ``/metrics`` on ``host:port`` from a daemon thread; ``port`` 0 means off.

    Returns the HTTP server (``.shutdown()`` stops it), or None when off.
    """
    if not port:
        return None
    server, _thread = start_http_server(port, addr=host, registry=registry())
    log.info("metrics serving", url=f"http://{host}:{port}/metrics")
    return server
