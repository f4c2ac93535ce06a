"""Plain records the store hands out and the rules work on (no SQL, no gRPC)."""

from __future__ import annotations

import enum
import sys
from collections.abc import Callable
from dataclasses import Field, dataclass, field, fields
from datetime import UTC, datetime
from operator import attrgetter
from typing import Any, NamedTuple

from stepflow_common.limits import MAX_LOG_BYTES, MAX_METADATA_BYTES, MAX_STEPS_PER_MANAGER
from stepflow_common.status import Kind, Status
from stepflow_common.step_outcome import ChildTally


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything stored is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


class LogEntryIn(NamedTuple):
    """One decoded log line from a writer (the stream's or AppendJobLog's)."""

    key: str
    step_id: str
    child_id: str
    attempt: int
    source: str
    level: str
    message: str
    time: datetime | None


@dataclass(frozen=True, slots=True)
class DocumentLimits:
    """Bounds on what a client can make the monitor store (flags; defaults in limits.py)."""

    max_metadata_bytes: int = MAX_METADATA_BYTES
    max_steps_per_manager: int = MAX_STEPS_PER_MANAGER
    max_log_bytes: int = MAX_LOG_BYTES  # a job's log; past it output lines are dropped


# The job record is declared once, below: the storage derives its columns, its row mapping
# and its UPDATE statements from these fields, and ``clone`` copies them all. A field's
# ``metadata`` says how the storage writes it (``Stored``); the column is the field's name
# unless ``column`` says otherwise; ``Shown`` says how the answer shows it. A new field is one
# line here (with a default, so the places that build jobs need not change) plus the
# migration that adds its column.
@dataclass(frozen=True, slots=True)
class Stored:
    """How a job field is stored: written by every update of the row (``updated``), also by
    the child-event path's narrower update (``by_child_event``), under which column."""

    updated: bool = False
    by_child_event: bool = False
    column: str = ""
    # Not read with the row (``JOB_SELECT``): a large value only one call asks for. Such
    # fields come last, so a row builds a ``JobState`` with their defaults.
    selected: bool = True


class Shown(enum.Enum):
    """How a job field appears in the ``stepflow.v1.Job`` answer (``monitor_svc/wire/answers``):
    copied as it is into the field of the same name, as a timestamp of that name, or converted
    there by hand (kind, status, parent_id, metadata, definition). A field without it is not
    shown."""

    AS_IS = "as_is"
    TIME = "time"
    CONVERTED = "converted"


STORED = "stored"
SHOWN = "shown"
_FIXED = {STORED: Stored()}
_UPDATED = {STORED: Stored(updated=True)}
_CHILD = {STORED: Stored(updated=True, by_child_event=True)}
_AS_IS = {SHOWN: Shown.AS_IS}
_TIME = {SHOWN: Shown.TIME}
_CONVERTED = {SHOWN: Shown.CONVERTED}


@dataclass(slots=True)
class JobState:
    """One job's row as a unit of work sees it. Units replace it, never mutate it in place."""

    id: str = field(metadata=_FIXED | _AS_IS)
    kind: Kind = field(metadata=_FIXED | _CONVERTED)
    parent_id: str | None = field(metadata=_FIXED | _CONVERTED)
    manager_id: str = field(metadata=_FIXED | _AS_IS)
    name: str = field(metadata=_FIXED | _AS_IS)
    type: str = field(metadata=_FIXED | _AS_IS)
    status: Status = field(metadata=_CHILD | _CONVERTED)
    error: str = field(metadata=_CHILD | _AS_IS)
    end_reason: str = field(metadata=_CHILD | _AS_IS)
    metadata: dict[str, Any] = field(
        metadata={STORED: Stored(updated=True, column="metadata_json")} | _CONVERTED
    )
    version: int = field(metadata=_CHILD | _AS_IS)
    change_seq: int = field(metadata=_CHILD | _AS_IS)
    step_index: int | None = field(metadata=_FIXED)
    timeout_s: float | None = field(metadata=_FIXED)
    deadline: datetime | None = field(metadata=_UPDATED | _TIME)
    created_at: datetime = field(metadata=_FIXED | _TIME)
    started_at: datetime | None = field(metadata=_CHILD | _TIME)
    finished_at: datetime | None = field(metadata=_CHILD | _TIME)
    request_id: str | None = field(metadata=_FIXED)
    owner: str = field(metadata=_UPDATED | _AS_IS)
    # Runs started: children by their RUNNING events, steps by their RUNNING status.
    attempt: int = field(default=0, metadata=_CHILD | _AS_IS)
    # Steps and children: how often their orchestrator was lost while they ran.
    interruptions: int = field(default=0, metadata=_UPDATED | _AS_IS)
    # Children of executor-celery steps: the runner whose claim on the current attempt was
    # accepted, and the broker message it claimed it from (see ``lifecycle/claims``).
    runner: str = field(default="", metadata=_CHILD | _AS_IS)
    claim_id: str = field(default="", metadata=_CHILD)
    # Managers without an owner: when the job fails orchestrator_lost unless adopted first.
    orphan_deadline: datetime | None = field(default=None, metadata=_UPDATED)
    # Managers: the job definition they were submitted with (read on request only).
    definition: dict[str, Any] | None = field(
        default=None, metadata={STORED: Stored(selected=False)} | _CONVERTED
    )

    def clone(self) -> JobState:
        """A copy to change and ``put`` (hot path: cheaper than ``dataclasses.replace``)."""
        return _clone(self)


JOB_FIELDS: tuple[Field[Any], ...] = fields(JobState)


def _clone_function() -> Callable[[JobState], JobState]:
    # Written out from the fields once: the constructor call a hand-written copy would make.
    args = ", ".join(f"s.{f.name}" for f in JOB_FIELDS)
    namespace: dict[str, Any] = {"JobState": JobState}
    exec(f"def clone(s):\n    return JobState({args})\n", namespace)
    function: Callable[[JobState], JobState] = namespace["clone"]
    return function


_clone = _clone_function()


def stored(f: Field[Any]) -> Stored:
    found: Stored = f.metadata[STORED]
    return found


def shown(f: Field[Any]) -> Shown | None:
    found: Shown | None = f.metadata.get(SHOWN)
    return found


def column_of(f: Field[Any]) -> str:
    return stored(f).column or f.name


@dataclass(slots=True)
class Progress:
    """A step's live child counts and seal (one row per step; columns named as the fields)."""

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
        # A Status names the counter's attribute (as a plain interned str: the fast lookup).
        name = _COUNTER_NAME[status]
        setattr(self, name, getattr(self, name) + delta)

    def copy(self) -> Progress:
        return Progress(*PROGRESS_VALUES(self))


_COUNTER_NAME = {s: sys.intern(s.value) for s in Status}
PROGRESS_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Progress))
PROGRESS_VALUES = attrgetter(*PROGRESS_FIELDS)


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
    definition: dict[str, Any] | None = None
    instance: str = ""


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
    attempt: int = 0
    runner: str = ""
    claim_id: str = ""
    runner_lost: bool = False


@dataclass(frozen=True, slots=True)
class Lease:
    """An orchestrator's lease: its jobs are its own until ``expires_at``."""

    owner: str
    instance: str
    expires_at: datetime
    worker_types: tuple[str, ...] = ()
    """The worker types its holder runs (empty: it did not say, so it may run any job)."""

    def can_run(self, step_types: frozenset[str] | None) -> bool:
        """Whether the holder runs every worker type of a job (``None``: the job has no
        definition to read them from, so no orchestrator that says what it runs can)."""
        if not self.worker_types:
            return True  # it did not say (an older orchestrator): as before, any job
        return step_types is not None and step_types <= set(self.worker_types)


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """One orchestrator process that has held ``owner``'s lease; ``superseded_by`` names the
    newer instance that replaced it ("" while it is the newest)."""

    instance: str
    owner: str
    superseded_by: str = ""
