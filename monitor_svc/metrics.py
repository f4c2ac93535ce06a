"""The monitor's own Prometheus metrics (its page also shows the RPC metrics of
``stepflow_common.metrics``), and the hooks its code calls where the work happens."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from stepflow_common.metrics import COMMIT_UNITS_BUCKETS, LATENCY_BUCKETS_S, register_service

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
LOG_READS = Counter(
    "stepflow_monitor_log_reads_total",
    "Reads of a followed job log by the FollowJobLog hub: one per commit that grew it, "
    "however many follow it (a follower catching up reads the stored lines itself).",
    registry=None,
)
LOG_LINES = Counter(
    "stepflow_monitor_log_lines_total",
    "Job-log lines received on StreamChildEvents; outcome is accepted or rejected.",
    ["outcome"],
    registry=None,
)
DEADLINES_FIRED = Counter(
    "stepflow_monitor_deadlines_fired_total",
    "Deadlines (step timeouts, grace periods, job timeouts) the monitor fired.",
    registry=None,
)

register_service(
    "monitor",
    (
        CHILD_EVENTS,
        COMMIT_DURATION,
        COMMIT_UNITS,
        DEADLINES_FIRED,
        LOG_LINES,
        LOG_READS,
        WATCH_READS,
    ),
)


def observe_events(received: int, rejected: int) -> None:
    """One StreamChildEvents batch: ``received`` events, ``rejected`` of them refused."""
    CHILD_EVENTS.labels("accepted").inc(received - rejected)
    if rejected:
        CHILD_EVENTS.labels("rejected").inc(rejected)


def observe_log_lines(received: int, rejected: int) -> None:
    LOG_LINES.labels("accepted").inc(received - rejected)
    if rejected:
        LOG_LINES.labels("rejected").inc(rejected)


def observe_commit(seconds: float, units: int) -> None:
    COMMIT_DURATION.observe(seconds)
    COMMIT_UNITS.observe(units)


def observe_watch_read() -> None:
    WATCH_READS.inc()


def observe_log_read() -> None:
    LOG_READS.inc()
