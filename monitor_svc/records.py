"""Plain records the store hands out and the rules work on (no SQL, no gRPC)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from stepflow_common.limits import MAX_METADATA_BYTES, MAX_STEPS_PER_MANAGER
from stepflow_common.status import Kind, Status
from stepflow_common.step_outcome import ChildTally


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything stored is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class DocumentLimits:
    """Bounds on what a client can make the monitor store (flags; defaults in limits.py)."""

    max_metadata_bytes: int = MAX_METADATA_BYTES
    max_steps_per_manager: int = MAX_STEPS_PER_MANAGER


@dataclass(slots=True)
class JobState:
    """One job's row as a unit of work sees it. Units replace it, never mutate it in place."""

    id: str
    kind: Kind
    parent_id: str | None
    manager_id: str
    name: str
    type: str
    status: Status
    error: str
    end_reason: str
    metadata: dict[str, Any]
    version: int
    change_seq: int
    step_index: int | None
    timeout_s: float | None
    deadline: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    request_id: str | None
    owner: str

    def clone(self) -> JobState:
        """A copy to change and ``put`` (hot path: cheaper than ``dataclasses.replace``)."""
        return JobState(
            self.id,
            self.kind,
            self.parent_id,
            self.manager_id,
            self.name,
            self.type,
            self.status,
            self.error,
            self.end_reason,
            self.metadata,
            self.version,
            self.change_seq,
            self.step_index,
            self.timeout_s,
            self.deadline,
            self.created_at,
            self.started_at,
            self.finished_at,
            self.request_id,
            self.owner,
        )


@dataclass(slots=True)
class Progress:
    """A step's live child counts and seal (one row per step)."""

    step_id: str
    manager_id: str
    pending: int = 0
    running: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    sealed_count: int | None = None
    handed: bool = False
    grace_deadline: datetime | None = None

    def tally(self) -> ChildTally:
        return ChildTally(self.pending, self.running, self.completed, self.failed, self.cancelled)

    def add(self, status: Status, delta: int) -> None:
        # A Status is a str: its name is the counter's attribute name.
        setattr(self, status, getattr(self, status) + delta)

    def copy(self) -> Progress:
        return Progress(
            self.step_id,
            self.manager_id,
            self.pending,
            self.running,
            self.completed,
            self.failed,
            self.cancelled,
            self.sealed_count,
            self.handed,
            self.grace_deadline,
        )


@dataclass(slots=True)
class JobView:
    """What GetJob/WatchJob show: the row plus, for a manager, its steps' live counts."""

    job: JobState
    step_tallies: dict[str, ChildTally] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class NewJob:
    """A validated CreateJob request."""

    kind: Kind
    parent_id: str | None
    name: str
    type: str
    metadata: dict[str, Any]
    timeout_s: float | None
    request_id: str | None
    owner: str


@dataclass(frozen=True, slots=True)
class JobFilter:
    parent_id: str | None = None
    manager_id: str | None = None
    kind: Kind | None = None
    status: Status | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    owner: str | None = None


class ChildEventIn(NamedTuple):
    """One decoded stream event (kind as a status name, or ``sealed``). A NamedTuple: one is
    built per event on the hot path."""

    event_id: str
    step_id: str
    child_id: str
    kind: str
    error: str
    child_count: int
    handed_to_monitor: bool
    name: str = ""
