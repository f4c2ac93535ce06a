"""Prometheus metrics of both services, and the HTTP endpoint that serves them.

Each ``/metrics`` page shows the metrics of the service that serves it (``serve_only``): the
RPC metrics both have, that service's own, and the client library's process and Python
metrics, never the other service's as zeros. The metric objects belong to no registry until
a page is served; the hooks are one call each, made where the work happens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
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
CHILD_EVENTS = Counter(
    "stepflow_monitor_child_events_total",
    "Child events received on StreamChildEvents; outcome is accepted or rejected.",
    ["outcome"],
    registry=None,
)
COMMIT_DURATION = Histogram(
    "stepflow_monitor_commit_seconds",
    "Time of one group-commit write transaction in the monitor's writer.",
    buckets=LATENCY_BUCKETS_S,
    registry=None,
)
COMMIT_UNITS = Histogram(
    "stepflow_monitor_commit_units",
    "Units of work (RPC calls, event batches) committed together in one transaction.",
    buckets=COMMIT_UNITS_BUCKETS,
    registry=None,
)
WATCH_READS = Counter(
    "stepflow_monitor_watch_reads_total",
    "Reads of a watched job by the WatchJob hub: one per committed change of the job, "
    "however many watch it.",
    registry=None,
)
DEADLINES_FIRED = Counter(
    "stepflow_monitor_deadlines_fired_total",
    "Deadlines (step timeouts, grace periods, job timeouts) the monitor fired.",
    registry=None,
)
ACK_LAG = Histogram(
    "stepflow_orchestrator_ack_lag_seconds",
    "Time from sending a child-event batch to the monitor's acknowledgement (committed).",
    buckets=LATENCY_BUCKETS_S,
    registry=None,
)
REFUSED_BATCHES = Counter(
    "stepflow_orchestrator_refused_batches_total",
    "Child-event batches the monitor refused whole (the stream ended RESOURCE_EXHAUSTED or "
    "INVALID_ARGUMENT); each is split, not sent again unchanged.",
    registry=None,
)
DROPPED_EVENTS = Counter(
    "stepflow_orchestrator_dropped_events_total",
    "Child events dropped because the monitor refused them even alone (each is logged with "
    "its event, step and child id).",
    registry=None,
)
UNACKED_EVENTS = Gauge(
    "stepflow_orchestrator_unacked_events",
    "Child events emitted but not yet acknowledged by the monitor (queued or in flight).",
    registry=None,
)
JOBS_FINISHED = Counter(
    "stepflow_orchestrator_jobs_finished_total",
    "Jobs (managers) the orchestrator ran to their end, by final status.",
    ["status"],
    registry=None,
)
STEPS_FINISHED = Counter(
    "stepflow_orchestrator_steps_finished_total",
    "Steps of the orchestrator's jobs that ended, by worker type and final status.",
    ["type", "status"],
    registry=None,
)
CHILDREN_FINISHED = Counter(
    "stepflow_orchestrator_children_finished_total",
    "Child jobs the orchestrator's workers ended, by worker type and status.",
    ["type", "status"],
    registry=None,
)

SHARED: tuple[Collector, ...] = (RPC_HANDLED, RPC_DURATION)
BY_SERVICE: dict[str, tuple[Collector, ...]] = {
    "monitor": (CHILD_EVENTS, COMMIT_DURATION, COMMIT_UNITS, DEADLINES_FIRED, WATCH_READS),
    "orchestrator": (
        ACK_LAG,
        UNACKED_EVENTS,
        JOBS_FINISHED,
        STEPS_FINISHED,
        CHILDREN_FINISHED,
        REFUSED_BATCHES,
        DROPPED_EVENTS,
    ),
}
_served: list[str] = []  # empty: every service's (one process running both, as tests do)


def serve_only(service: str) -> None:
    """This process is ``service`` ("monitor" or "orchestrator"): its page shows only that
    service's metrics (and the shared ones)."""
    if service not in BY_SERVICE:
        raise ValueError(f"unknown service {service!r}")
    _served[:] = [service]


def registry() -> CollectorRegistry:
    """A registry with what this process's page shows."""
    out = CollectorRegistry(auto_describe=True)
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR, *SHARED):
        out.register(collector)
    for service in _served or BY_SERVICE:
        for collector in BY_SERVICE[service]:
            out.register(collector)
    return out


def observe_job_end(status: str) -> None:
    JOBS_FINISHED.labels(status).inc()


def observe_step_end(worker_type: str, status: str) -> None:
    STEPS_FINISHED.labels(worker_type, status).inc()


_child_ends: dict[tuple[str, str], Any] = {}


def observe_child_end(worker_type: str, status: str) -> None:
    # Once per child: the labelled counter is looked up once per (type, status), not built.
    counter = _child_ends.get((worker_type, status))
    if counter is None:
        counter = _child_ends[worker_type, status] = CHILDREN_FINISHED.labels(worker_type, status)
    counter.inc()


def observe_rpc(full_method: str, code: str, seconds: float) -> None:
    """The ``observe`` callback of ``DomainErrorInterceptor``."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    RPC_HANDLED.labels(service, method, code).inc()
    RPC_DURATION.labels(service, method, code).observe(seconds)


def observe_events(received: int, rejected: int) -> None:
    """One StreamChildEvents batch: ``received`` events, ``rejected`` of them refused."""
    CHILD_EVENTS.labels("accepted").inc(received - rejected)
    if rejected:
        CHILD_EVENTS.labels("rejected").inc(rejected)


def observe_commit(seconds: float, units: int) -> None:
    COMMIT_DURATION.observe(seconds)
    COMMIT_UNITS.observe(units)


def observe_watch_read() -> None:
    WATCH_READS.inc()


def track_unacked(depth: Callable[[], float]) -> None:
    """Read the orchestrator's unacknowledged buffer depth at scrape time."""
    UNACKED_EVENTS.set_function(depth)


def start_metrics_server(port: int, host: str = "0.0.0.0") -> Any:
    """Serve ``/metrics`` on ``host:port`` from a daemon thread; ``port`` 0 means off.

    Returns the HTTP server (``.shutdown()`` stops it), or None when off.
    """
    if not port:
        return None
    server, _thread = start_http_server(port, addr=host, registry=registry())
    log.info("metrics serving", url=f"http://{host}:{port}/metrics")
    return server
