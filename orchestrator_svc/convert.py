"""Translation between the monitor's protobuf messages and the orchestrator's plain records
(``orchestrator_svc.records``): ``_pb2`` types stop here, in the clients and in the servicer."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from operator import attrgetter
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from orchestrator_svc.records import ChildEvent, EventKind, Job, StepStat
from stepflow_common.proto_status import KIND_FROM_PB, KIND_TO_PB, STATUS_FROM_PB, STATUS_TO_PB
from stepflow_common.step_outcome import ChildTally
from stepflow_proto.v1 import job_pb2

EVENT_KIND_TO_PB: dict[EventKind, job_pb2.ChildEventKind] = {
    EventKind.CREATED: job_pb2.CHILD_EVENT_KIND_CREATED,
    EventKind.RUNNING: job_pb2.CHILD_EVENT_KIND_RUNNING,
    EventKind.COMPLETED: job_pb2.CHILD_EVENT_KIND_COMPLETED,
    EventKind.FAILED: job_pb2.CHILD_EVENT_KIND_FAILED,
    EventKind.CANCELLED: job_pb2.CHILD_EVENT_KIND_CANCELLED,
    EventKind.SEALED: job_pb2.CHILD_EVENT_KIND_SEALED,
}
EVENT_KIND_FROM_PB: dict[int, EventKind] = {v: k for k, v in EVENT_KIND_TO_PB.items()}
# The field table of ``records.Job``: the fields copied as they are under the same name, and
# the timestamps; the others (kind, status, metadata, step_stats, definition) are converted
# below. A new plain field of ``Job`` is one name here.
PLAIN_FIELDS = (
    "id",
    "parent_id",
    "manager_id",
    "name",
    "type",
    "error",
    "end_reason",
    "version",
    "change_seq",
    "owner",
    "attempt",
    "interruptions",
    "runner",
)
TIME_FIELDS = ("created_at", "started_at", "finished_at", "deadline")
_plain_values = attrgetter(*PLAIN_FIELDS)


def job_from_pb(job: job_pb2.Job) -> Job:
    times: dict[str, Any] = {
        name: _time(getattr(job, name)) if job.HasField(name) else None for name in TIME_FIELDS
    }
    return Job(
        **dict(zip(PLAIN_FIELDS, _plain_values(job), strict=True)),
        **times,
        kind=KIND_FROM_PB[job.kind],
        status=STATUS_FROM_PB[job.status],
        metadata=json_format.MessageToDict(job.metadata),
        step_stats=tuple(step_stat_from_pb(stat) for stat in job.step_stats),
        definition=(
            json_format.MessageToDict(job.definition) if job.HasField("definition") else None
        ),
    )


def step_stat_from_pb(stat: job_pb2.StepStat) -> StepStat:
    c = stat.children
    return StepStat(
        step_index=stat.step_index,
        step_id=stat.step_id,
        step_name=stat.step_name,
        step_type=stat.step_type,
        child_count=stat.child_count,
        document_count=stat.document_count,
        status=STATUS_FROM_PB.get(stat.status),
        error=stat.error,
        children=ChildTally(c.pending, c.running, c.completed, c.failed, c.cancelled),
    )


def job_to_pb(job: Job) -> job_pb2.Job:
    """The record as the monitor sent it (CancelJob answers with the job)."""
    out = job_pb2.Job(
        **dict(zip(PLAIN_FIELDS, _plain_values(job), strict=True)),
        kind=KIND_TO_PB[job.kind],
        status=STATUS_TO_PB[job.status],
        metadata=to_struct(job.metadata),
    )
    for stat in job.step_stats:
        c = stat.children
        entry = out.step_stats.add(
            step_index=stat.step_index,
            step_id=stat.step_id,
            step_name=stat.step_name,
            step_type=stat.step_type,
            child_count=stat.child_count,
            document_count=stat.document_count,
            error=stat.error,
        )
        if stat.status is not None:
            entry.status = STATUS_TO_PB[stat.status]
        entry.children.CopyFrom(
            job_pb2.ChildCounts(
                pending=c.pending,
                running=c.running,
                completed=c.completed,
                failed=c.failed,
                cancelled=c.cancelled,
            )
        )
    for name in TIME_FIELDS:
        value: datetime | None = getattr(job, name)
        if value is not None:
            getattr(out, name).CopyFrom(_timestamp(value))
    if job.definition is not None:
        out.definition.CopyFrom(to_struct(job.definition))
    return out


def event_to_pb(event: ChildEvent) -> job_pb2.ChildEvent:
    return job_pb2.ChildEvent(
        kind=EVENT_KIND_TO_PB[event.kind],
        event_id=event.event_id,
        step_id=event.step_id,
        child_id=event.child_id,
        error=event.error,
        name=event.name,
        attempt=event.attempt,
        child_count=event.child_count,
        handed_to_monitor=event.handed_to_monitor,
    )


def child_event_pb(
    kind: str, step_id: str, child_id: str, *, error: str = "", name: str = "", attempt: int = 0
) -> job_pb2.ChildEvent:
    """A child's event built straight into its message, without the ``ChildEvent`` record:
    the runner sends three per child, and the record plus ``event_to_pb`` cost several times
    the message alone. ``kind`` is an ``EventKind`` value (a plain ``str`` works too). Only
    the fields that are set are passed: the constructor's cost grows with its arguments."""
    pb_kind = EVENT_KIND_TO_PB[kind]  # type: ignore[index]  # EventKind is a StrEnum
    if error or name or attempt:
        return job_pb2.ChildEvent(
            kind=pb_kind,
            step_id=step_id,
            child_id=child_id,
            error=error,
            name=name,
            attempt=attempt,
        )
    return job_pb2.ChildEvent(kind=pb_kind, step_id=step_id, child_id=child_id)


def event_from_pb(event: job_pb2.ChildEvent) -> ChildEvent:
    return ChildEvent(
        kind=EVENT_KIND_FROM_PB[event.kind],
        event_id=event.event_id,
        step_id=event.step_id,
        child_id=event.child_id,
        error=event.error,
        name=event.name,
        attempt=event.attempt,
        child_count=event.child_count,
        handed_to_monitor=event.handed_to_monitor,
    )


def to_struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(dict(value))
    return out


def _time(stamp: timestamp_pb2.Timestamp) -> datetime:
    return stamp.ToDatetime(tzinfo=UTC)


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value)
    return out
