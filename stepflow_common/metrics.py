"""Prometheus metrics of both services, and the HTTP endpoint that serves them.

The metric objects live in the default registry, so one ``/metrics`` page per process shows
them (plus the client's process and Python metrics). Each service touches only its own:
the monitor's ingest, commit and deadline metrics stay at zero in the orchestrator's process
and the other way round. The hooks are one call each, made where the work happens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog
from prometheus_client import Counter, Gauge, Histogram, start_http_server

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
)
RPC_DURATION = Histogram(
    "stepflow_rpc_duration_seconds",
    "RPC handling time (a stream's whole lifetime), by service, method and status code.",
    ["service", "method", "code"],
    buckets=LATENCY_BUCKETS_S,
)
CHILD_EVENTS = Counter(
    "stepflow_monitor_child_events_total",
    "Child events received on StreamChildEvents; outcome is accepted or rejected.",
    ["outcome"],
)
COMMIT_DURATION = Histogram(
    "stepflow_monitor_commit_seconds",
    "Time of one group-commit write transaction in the monitor's writer.",
    buckets=LATENCY_BUCKETS_S,
)
COMMIT_UNITS = Histogram(
    "stepflow_monitor_commit_units",
    "Units of work (RPC calls, event batches) committed together in one transaction.",
    buckets=COMMIT_UNITS_BUCKETS,
)
DEADLINES_FIRED = Counter(
    "stepflow_monitor_deadlines_fired_total",
    "Deadlines (step timeouts, grace periods, job timeouts) the monitor fired.",
)
ACK_LAG = Histogram(
    "stepflow_orchestrator_ack_lag_seconds",
    "Time from sending a child-event batch to the monitor's acknowledgement (committed).",
    buckets=LATENCY_BUCKETS_S,
)
REFUSED_BATCHES = Counter(
    "stepflow_orchestrator_refused_batches_total",
    "Child-event batches the monitor refused whole (the stream ended RESOURCE_EXHAUSTED or "
    "INVALID_ARGUMENT); each is split, not sent again unchanged.",
)
DROPPED_EVENTS = Counter(
    "stepflow_orchestrator_dropped_events_total",
    "Child events dropped because the monitor refused them even alone (each is logged with "
    "its event, step and child id).",
)
UNACKED_EVENTS = Gauge(
    "stepflow_orchestrator_unacked_events",
    "Child events emitted but not yet acknowledged by the monitor (queued or in flight).",
)


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


def track_unacked(depth: Callable[[], float]) -> None:
    """Read the orchestrator's unacknowledged buffer depth at scrape time."""
    UNACKED_EVENTS.set_function(depth)


def start_metrics_server(port: int, host: str = "0.0.0.0") -> Any:
    """Serve ``/metrics`` on ``host:port`` from a daemon thread; ``port`` 0 means off.

    Returns the HTTP server (``.shutdown()`` stops it), or None when off.
    """
    if not port:
        return None
    server, _thread = start_http_server(port, addr=host)
    log.info("metrics serving", url=f"http://{host}:{port}/metrics")
    return server
