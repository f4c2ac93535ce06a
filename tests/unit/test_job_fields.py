"""Every field of ``stepflow.v1.Job`` is carried by both services' field tables: a job with
every field set survives the orchestrator's round trip, and the monitor's answer sets every
field from a record with every field set. A proto field added without its mapping fails here."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf import struct_pb2, timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from monitor_svc.records import JOB_FIELDS, JobState, JobView
from monitor_svc.wire.answers import job_pb
from orchestrator_svc.convert import job_from_pb, job_to_pb
from stepflow_common import manager_document as doc
from stepflow_common.status import Kind, Status
from stepflow_common.step_outcome import ChildTally
from stepflow_proto.v1 import job_pb2

WHEN = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
_WHOLE = (
    FieldDescriptor.CPPTYPE_INT32,
    FieldDescriptor.CPPTYPE_INT64,
    FieldDescriptor.CPPTYPE_UINT32,
    FieldDescriptor.CPPTYPE_UINT64,
)


def _fill(message: Message) -> None:
    """Set every field of ``message`` to a value that is not its default."""
    descriptor: Descriptor = message.DESCRIPTOR
    for f in descriptor.fields:
        repeated = f.is_repeated
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            target = getattr(message, f.name).add() if repeated else getattr(message, f.name)
            if isinstance(target, timestamp_pb2.Timestamp):
                target.FromDatetime(WHEN)
            elif isinstance(target, struct_pb2.Struct):
                target.update({"key": "value"})
            else:
                _fill(target)
            continue
        if f.type == FieldDescriptor.TYPE_STRING:
            value: object = f"{f.name}-value"
        elif f.type == FieldDescriptor.TYPE_BOOL:
            value = True
        elif f.type == FieldDescriptor.TYPE_ENUM:
            value = f.enum_type.values[-1].number
        elif f.cpp_type in _WHOLE:
            value = 7
        else:
            raise AssertionError(f"no filler for {descriptor.name}.{f.name} (type {f.type})")
        if repeated:
            getattr(message, f.name).append(value)
        else:
            setattr(message, f.name, value)


def test_the_orchestrator_carries_every_field_of_a_job() -> None:
    full = job_pb2.Job()
    _fill(full)
    full.status = job_pb2.JOB_STATUS_RUNNING  # statuses the orchestrator knows
    for stat in full.step_stats:
        stat.status = job_pb2.JOB_STATUS_RUNNING
    assert job_to_pb(job_from_pb(full)) == full


def _is_set(message: Message, f: FieldDescriptor) -> bool:
    if f.is_repeated:
        return len(getattr(message, f.name)) > 0
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        return message.HasField(f.name)
    return bool(getattr(message, f.name))


def test_the_monitor_answer_shows_every_field_of_a_job() -> None:
    values: dict[str, object] = {
        "kind": Kind.MANAGER,
        "parent_id": "parent-value",
        "status": Status.RUNNING,
        "metadata": {doc.STEP_STATS: [{doc.STEP_ID: "s", doc.STATUS: "running"}]},
        "definition": {"name": "job"},
    }
    for f in JOB_FIELDS:
        if f.name in values:
            continue
        if f.type in ("int", "int | None"):
            values[f.name] = 7
        elif f.type == "float | None":
            values[f.name] = 1.5
        elif f.type in ("datetime", "datetime | None"):
            values[f.name] = WHEN + timedelta(seconds=len(f.name))
        elif f.type in ("str", "str | None"):
            values[f.name] = f"{f.name}-value"
        else:
            raise AssertionError(f"no value for JobState.{f.name} ({f.type})")
    state = JobState(**values)  # type: ignore[arg-type]
    answer = job_pb(JobView(state, {"s": ChildTally(running=1)}), include_definition=True)
    missing = [f.name for f in job_pb2.Job.DESCRIPTOR.fields if not _is_set(answer, f)]
    assert not missing, f"fields of Job the monitor's answer does not set: {missing}"
