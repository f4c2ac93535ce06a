"""What the sync and asyncio clients share: building requests from keywords, the metadata
diff of ``update_metadata``, the backoff of retries and reconnects. No I/O here."""

from __future__ import annotations

import math
import random
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, cast

import grpc
from google.protobuf import duration_pb2, json_format, struct_pb2

from stepflow_common.durations import parse_duration
from stepflow_common.job_keys import JOB_KEYS, STEP_KEYS, TOLERANCE_KEYS, reject_unknown_keys
from stepflow_common.proto_status import KIND_TO_PB, STATUS_FROM_PB, STATUS_TO_PB, TERMINAL_PB
from stepflow_common.status import Kind, Status
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import orchestrator_service_pb2 as o

DEFAULT_TIMEOUT_S = 30.0
"""Every unary call's deadline unless the client or the call says otherwise: a call never
hangs for ever on a service that accepted the connection and went silent."""
UPDATE_METADATA_ATTEMPTS = 20
"""How often ``update_metadata`` reads and writes again after a version conflict."""
BACKOFF_INITIAL_S = 0.05
BACKOFF_MAX_S = 2.0

# A watch's stream broke but the job goes on: subscribe again from the last change_seq. A
# stopped or restarting monitor answers UNAVAILABLE; a stream cut mid-message surfaces as
# INTERNAL; a server shutting down cancels its streams.
RECONNECT_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED}
)

KindLike = Kind | str | int
StatusLike = Status | str | int
Metadata = dict[str, Any]
MetadataFn = Callable[[Metadata], "Metadata | None"]


def kind_pb(kind: KindLike) -> job_pb2.JobKind:
    """A job kind given as the proto enum, ``Kind`` or its name ("manager")."""
    if isinstance(kind, int) and not isinstance(kind, str):
        return cast(job_pb2.JobKind, kind)
    try:
        return KIND_TO_PB[Kind(str(kind))]
    except ValueError:
        raise ValueError(
            f"kind {kind!r} is not a job kind; use one of {', '.join(k.value for k in Kind)}"
        ) from None


def status_pb(status: StatusLike) -> job_pb2.JobStatus:
    """A status given as the proto enum, ``Status`` or its name ("completed")."""
    if isinstance(status, int) and not isinstance(status, str):
        return cast(job_pb2.JobStatus, status)
    try:
        return STATUS_TO_PB[Status(str(status))]
    except ValueError:
        raise ValueError(
            f"status {status!r} is not a job status; use one of "
            f"{', '.join(s.value for s in Status)}"
        ) from None


def status_of(job: job_pb2.Job) -> str:
    """A job's status by its lower-case name ("running", "completed"…), as metadata spells it."""
    status = STATUS_FROM_PB.get(job.status)
    return "unspecified" if status is None else status.value


def is_terminal(job: job_pb2.Job) -> bool:
    return job.status in TERMINAL_PB


def to_struct(mapping: Mapping[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(dict(mapping))
    return struct


def metadata_of(job: job_pb2.Job) -> Metadata:
    """A job's metadata as a plain dict (Struct numbers are floats: 3 reads back as 3.0)."""
    return json_format.MessageToDict(job.metadata)


def duration_pb(value: float | str | timedelta) -> duration_pb2.Duration:
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, str):
        seconds = parse_duration(value)
    else:
        seconds = float(value)
    duration = duration_pb2.Duration()
    duration.FromTimedelta(timedelta(seconds=seconds))
    return duration


def create_job(
    *,
    kind: KindLike,
    name: str,
    parent_id: str,
    type: str,
    metadata: Mapping[str, Any] | None,
    timeout: float | str | timedelta | None,
    request_id: str,
    owner: str,
    definition: Mapping[str, Any] | None,
    instance: str = "",
) -> m.CreateJobRequest:
    request = m.CreateJobRequest(
        kind=kind_pb(kind),
        name=name,
        parent_id=parent_id,
        type=type,
        request_id=request_id,
        owner=owner,
        instance=instance,
    )
    if metadata:
        request.metadata.CopyFrom(to_struct(metadata))
    if definition is not None:
        request.definition.CopyFrom(to_struct(definition))
    if timeout is not None:
        request.timeout.CopyFrom(duration_pb(timeout))
    return request


def list_jobs(
    *,
    parent_id: str,
    manager_id: str,
    kind: KindLike | None,
    status: StatusLike | None,
    owner: str,
    created_after: datetime | None,
    created_before: datetime | None,
    page_size: int,
    page_token: str,
) -> m.ListJobsRequest:
    request = m.ListJobsRequest(
        parent_id=parent_id,
        manager_id=manager_id,
        owner=owner,
        page_size=page_size,
        page_token=page_token,
    )
    if kind is not None:
        request.kind = kind_pb(kind)
    if status is not None:
        request.status = status_pb(status)
    if created_after is not None:
        request.created_after.FromDatetime(created_after)
    if created_before is not None:
        request.created_before.FromDatetime(created_before)
    return request


def update_job_status(
    job_id: str,
    status: StatusLike,
    *,
    error: str,
    end_reason: str,
    owner: str,
    instance: str = "",
) -> m.UpdateJobStatusRequest:
    return m.UpdateJobStatusRequest(
        job_id=job_id,
        status=status_pb(status),
        error=error,
        end_reason=end_reason,
        owner=owner,
        instance=instance,
    )


def update_job_metadata(
    job_id: str,
    metadata: Mapping[str, Any],
    *,
    expected_version: int | None,
    owner: str,
    instance: str = "",
    request_id: str = "",
) -> m.UpdateJobMetadataRequest:
    request = m.UpdateJobMetadataRequest(
        job_id=job_id,
        metadata=to_struct(metadata),
        owner=owner,
        instance=instance,
        request_id=request_id or new_request_id(),
    )
    if expected_version is not None:
        request.expected_version = expected_version
    return request


def heartbeat(
    *,
    owner: str,
    instance: str,
    lease: float | str | timedelta,
    max_adopt: int,
    worker_types: Sequence[str] = (),
    running_job_ids: Sequence[str] = (),
) -> m.HeartbeatRequest:
    request = m.HeartbeatRequest(
        owner=owner,
        instance=instance,
        max_adopt=max_adopt,
        worker_types=list(worker_types),
        running_job_ids=list(running_job_ids),
    )
    request.lease.CopyFrom(duration_pb(lease))
    return request


def metadata_patch(before: Metadata, after: Metadata) -> Metadata:
    """The shallow merge that turns ``before`` into ``after``: every top-level key whose value
    changed, and ``None`` (delete) for every key ``after`` dropped."""
    patch: Metadata = {k: v for k, v in after.items() if k not in before or before[k] != v}
    patch.update({k: None for k in before if k not in after})
    return patch


def apply(fn: MetadataFn, metadata: Metadata) -> Metadata:
    """``fn`` applied to ``metadata`` (a copy the caller may lose): its result, or the dict it
    changed in place when it returns None."""
    result = fn(metadata)
    return metadata if result is None else result


def backoff(attempt: int, *, initial_s: float = BACKOFF_INITIAL_S) -> float:
    """Exponential backoff with full jitter, so competing writers spread out."""
    ceiling = min(BACKOFF_MAX_S, initial_s * math.pow(2, min(attempt, 16)))
    return random.uniform(ceiling / 2, ceiling)


class Outage:
    """A resumable stream's reconnecting (``watch``, ``follow_log``): the backoff since it
    last delivered, and whether the service has been away longer than ``reconnect_for``
    seconds (None: never give up)."""

    def __init__(self, reconnect_for: float | None) -> None:
        self.reconnect_for = reconnect_for
        self.attempt = 0
        self.since: float | None = None

    def delivered(self) -> None:
        self.attempt, self.since = 0, None

    def gives_up(self, code: grpc.StatusCode) -> bool:
        """After a failed stream: whether to raise (a code no reconnect helps, or too long
        away) rather than connect again."""
        if code not in RECONNECT_CODES:
            return True
        now = time.monotonic()
        self.since = now if self.since is None else self.since
        return self.reconnect_for is not None and now - self.since >= self.reconnect_for

    def next_delay(self) -> float:
        delay = backoff(self.attempt)
        self.attempt += 1
        return delay


# -- the orchestrator ------------------------------------------------------------------------
_ON_ERROR = {
    "continue": o.ON_ERROR_CONTINUE,
    "fail": o.ON_ERROR_FAIL,
    "fatal": o.ON_ERROR_FATAL,
}
_ACTION = {"fail": o.ERROR_TOLERANCE_ACTION_FAIL, "continue": o.ERROR_TOLERANCE_ACTION_CONTINUE}
_ON_INTERRUPT = {"rerun": o.ON_INTERRUPT_RERUN, "fail": o.ON_INTERRUPT_FAIL}


def job_definition(definition: o.JobDefinition | Mapping[str, Any]) -> o.JobDefinition:
    """SubmitJob's JobDefinition from the job file's structure (what a TOML or JSON job file
    holds: durations as "30s" or seconds, enums by their lower-case names). The orchestrator
    checks everything else and answers INVALID_ARGUMENT naming the field."""
    if isinstance(definition, o.JobDefinition):
        return definition
    data = dict(definition)
    # Refused as a job file refuses it: a typo (``depend_on``) must not be dropped silently.
    reject_unknown_keys(data, JOB_KEYS, "")
    for index, raw_step in enumerate(data.get("steps") or ()):
        if isinstance(raw_step, Mapping):
            reject_unknown_keys(raw_step, STEP_KEYS, f"steps[{index}]")
    if isinstance(data.get("error_tolerance"), Mapping):
        reject_unknown_keys(data["error_tolerance"], TOLERANCE_KEYS, "error_tolerance")
    out = o.JobDefinition(name=str(data.get("name", "")))
    if data.get("timeout") is not None:
        out.timeout.CopyFrom(duration_pb(data["timeout"]))
    tolerance = data.get("error_tolerance")
    if tolerance:
        out.error_tolerance.max_child_failures = int(tolerance.get("max_child_failures", 0))
        out.error_tolerance.action = _choice(_ACTION, tolerance.get("action"), "action")
    if data.get("config"):
        out.config.CopyFrom(to_struct(data["config"]))
    for raw in data.get("steps") or ():
        step = out.steps.add(name=str(raw.get("name", "")), type=str(raw.get("type", "")))
        if raw.get("config"):
            step.config.CopyFrom(to_struct(raw["config"]))
        step.on_error = _choice(_ON_ERROR, raw.get("on_error"), "on_error")
        step.depends_on.extend(_names(raw.get("depends_on")))
        if "wait" in raw:
            step.wait = bool(raw["wait"])
        if raw.get("timeout") is not None:
            step.timeout.CopyFrom(duration_pb(raw["timeout"]))
        step.retries = int(raw.get("retries", 0))
        if raw.get("retry_backoff") is not None:
            step.retry_backoff.CopyFrom(duration_pb(raw["retry_backoff"]))
        step.on_interrupt = _choice(_ON_INTERRUPT, raw.get("on_interrupt"), "on_interrupt")
    return out


def _choice(table: Mapping[str, int], value: object, field: str) -> Any:
    if value is None:
        return 0  # UNSPECIFIED: the orchestrator's default
    try:
        return table[str(value)]
    except KeyError:
        raise ValueError(f"{field}: {value!r} is not one of {', '.join(table)}") from None


def _names(value: object) -> Sequence[str]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return [str(v) for v in value]  # type: ignore[attr-defined]


def new_request_id() -> str:
    """An idempotency key, so a retried submit returns the same job instead of a second one."""
    return uuid.uuid4().hex
