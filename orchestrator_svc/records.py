"""The orchestrator's plain view of what the monitor records: a job, a step's entry, a child
event, a lease answer. The monitor client and the event stream translate protobuf to and from
these (``orchestrator_svc.convert``); everything below them works on these alone."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from stepflow_common.status import Kind, Status
from stepflow_common.step_outcome import ChildTally


class EventKind(enum.StrEnum):
    """What happened to a child (``sealed``: its step finished spawning)."""

    CREATED = "created"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SEALED = "sealed"


@dataclass(frozen=True, slots=True)
class ChildEvent:
    kind: EventKind
    step_id: str
    child_id: str = ""  # empty for ``sealed``
    error: str = ""
    name: str = ""  # ``created`` only
    attempt: int = 0  # ``created``/``running``: 0 means 1, the first
    child_count: int = 0  # ``sealed`` only
    handed_to_monitor: bool = False  # ``sealed`` only
    event_id: str = ""  # assigned by the event stream


@dataclass(frozen=True, slots=True)
class StepStat:
    """One entry of a manager's ``step_stats``, with the monitor's live child counts."""

    step_index: int
    step_id: str
    step_name: str
    step_type: str
    child_count: int
    document_count: int
    status: Status | None  # None: the entry names no status
    error: str
    children: ChildTally


@dataclass(frozen=True, slots=True)
class Job:
    """A manager, step or child job as the monitor records it."""

    id: str
    kind: Kind
    parent_id: str
    manager_id: str
    name: str
    type: str
    status: Status
    error: str
    end_reason: str
    metadata: Mapping[str, Any]
    version: int
    change_seq: int
    step_stats: tuple[StepStat, ...]
    owner: str
    attempt: int
    interruptions: int
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    deadline: datetime | None = None
    definition: Mapping[str, Any] | None = None  # managers, when asked for
    runner: str = ""  # children of executor-celery steps: the runner of the current attempt


@dataclass(frozen=True, slots=True)
class LeaseAnswer:
    """A heartbeat's answer: the unfinished managers the caller owns now, those adopted in
    this call, and (after a restart) its own it must resume."""

    owned: tuple[str, ...]
    adopted: tuple[str, ...]
    resumed: tuple[str, ...]
    fenced: tuple[str, ...] = ()
    """Jobs this instance said it runs that it no longer owns."""
    superseded_remaining_s: float = 0.0
    """With ``resumed``: how long the superseded instance's lease still had to run."""
    superseded_instance: str = ""
