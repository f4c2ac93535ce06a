"""Job kinds, statuses and the one status-order rule both services obey.

Order: pending < running < spawned < any terminal status. A terminal status is final.
"""

from __future__ import annotations

import enum

from stepflow_common.errors import InvalidArgument, StatusConflict


class Kind(enum.StrEnum):
    MANAGER = "manager"
    STEP = "step"
    CHILD = "child"


class Status(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SPAWNED = "spawned"  # steps only: children handed to the monitor
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"  # steps only

    @property
    def rank(self) -> int:
        return _RANK[self]

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


# The two sets every other module uses (for SQL filters too): defined here only.
TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED, Status.SKIPPED})
LIVE = frozenset(Status) - TERMINAL
_RANK = {
    Status.PENDING: 0,
    Status.RUNNING: 1,
    Status.SPAWNED: 2,
    Status.COMPLETED: 3,
    Status.FAILED: 3,
    Status.CANCELLED: 3,
    Status.SKIPPED: 3,
}
STEP_ONLY = frozenset({Status.SPAWNED, Status.SKIPPED})


class EndReason(enum.StrEnum):
    """How a job ended (``Job.end_reason``): one vocabulary for both services."""

    CANCELLED = "cancelled"  # CancelJob, or UpdateJobStatus `cancelled` and its cascade
    TIMEOUT = "timeout"  # its deadline passed
    API = "api"  # a client set the status
    NO_CHILDREN = "no_children"  # sealed with zero children
    GRACE_PERIOD = "grace_period"  # handed off, no seal and no child within the grace period
    CHILDREN_TERMINAL = "children_terminal"  # sealed, and every child ended
    ORCHESTRATOR = "orchestrator"  # ended by the orchestrator that ran it
    ORCHESTRATOR_LOST = "orchestrator_lost"  # its orchestrator died or went away meanwhile
    RUNNER = "runner"  # ended by the runner whose attempt was current (executor celery)
    RUNNER_LOST = "runner_lost"  # its runners were lost three times while it ran


# What a client may record as the reason a job ended (orchestrator_lost only as the job's
# owner); the monitor's own reasons (timeout, no_children, grace_period, children_terminal)
# state facts only the monitor establishes.
CLIENT_END_REASONS = (
    EndReason.API,
    EndReason.ORCHESTRATOR,
    EndReason.CANCELLED,
    EndReason.ORCHESTRATOR_LOST,
)


class Transition(enum.Enum):
    """What a requested status change amounts to."""

    NOOP = "noop"  # the job already has that status
    FORWARD = "forward"


def parse_status(value: object) -> Status:
    """A status from its lower-case name; anything else is InvalidArgument."""
    try:
        return Status(str(value))
    except ValueError:
        raise InvalidArgument(f"unknown status {value!r}; expected one of {_names()}") from None


def check_status_for_kind(kind: Kind, status: Status) -> None:
    if status in STEP_ONLY and kind is not Kind.STEP:
        raise InvalidArgument(f"status {status} applies to steps only, not to a {kind} job")


def check_transition(current: Status, requested: Status, *, what: str = "job") -> Transition:
    """Decide a status change: no-op, forward, or StatusConflict (terminal or backwards)."""
    if requested == current:
        return Transition.NOOP
    if current.terminal:
        raise StatusConflict(
            current,
            requested,
            f"{what} is already {current} (final); cannot change it to {requested}",
        )
    if requested.rank <= current.rank:
        raise StatusConflict(
            current, requested, f"{what} is {current}; moving back to {requested} is not allowed"
        )
    return Transition.FORWARD


def is_forward(current: Status, requested: Status) -> bool:
    """True when ``requested`` may replace ``current`` (metadata merges ignore the rest)."""
    return (current, requested) in _FORWARD


# Every allowed forward move, precomputed: the child-event path asks this once per event.
_FORWARD = frozenset(
    (a, b) for a in Status for b in Status if a not in TERMINAL and _RANK[b] > _RANK[a]
)


def _names() -> str:
    return ", ".join(s.value for s in Status)
