"""The orchestrator's own Prometheus metrics (its page also shows the RPC metrics of
``stepflow_common.metrics``), and the hooks its code calls where the work happens."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from stepflow_common.metrics import LATENCY_BUCKETS_S, register_service

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

register_service(
    "orchestrator",
    (
        ACK_LAG,
        UNACKED_EVENTS,
        JOBS_FINISHED,
        STEPS_FINISHED,
        CHILDREN_FINISHED,
        REFUSED_BATCHES,
        DROPPED_EVENTS,
    ),
)


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


def track_unacked(depth: Callable[[], float]) -> None:
    """Read the orchestrator's unacknowledged buffer depth at scrape time."""
    UNACKED_EVENTS.set_function(depth)
