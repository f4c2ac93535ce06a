"""Translation between protobuf messages and the monitor's plain records, with input checks.
``_pb2`` types stop here and in the servicer."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2

from monitor_svc.records import ChildEventIn, JobFilter, NewJob
from stepflow_common.durations import check_duration
from stepflow_common.errors import InvalidArgument, ResourceExhausted
from stepflow_common.limits import (
    ID_PATTERN,
    MAX_ERROR_CHARS,
    MAX_METADATA_BYTES,
    MAX_NAME_CHARS,
    truncate_text,
)
from stepflow_common.proto_status import KIND_FROM_PB, STATUS_FROM_PB
from stepflow_common.status import Kind, Status
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m

MAX_NAME = MAX_NAME_CHARS
MAX_METADATA_DEPTH = 32
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 50
MAX_EVENTS_PER_BATCH = 10_000

EVENT_KIND_FROM_PB: dict[int, str] = {
    job_pb2.CHILD_EVENT_KIND_CREATED: "created",
    job_pb2.CHILD_EVENT_KIND_RUNNING: "running",
    job_pb2.CHILD_EVENT_KIND_COMPLETED: "completed",
    job_pb2.CHILD_EVENT_KIND_FAILED: "failed",
    job_pb2.CHILD_EVENT_KIND_CANCELLED: "cancelled",
    job_pb2.CHILD_EVENT_KIND_SEALED: "sealed",
}


# -- inbound -------------------------------------------------------------------------------
def job_id(value: str, field: str = "job_id") -> str:
    if not value:
        raise InvalidArgument(f"{field} is required")
    if not ID_PATTERN.match(value):
        raise InvalidArgument(
            f"{field} {value[:40]!r} is not a valid id (1-128 characters: letters, digits, ._:@/-)"
        )
    return value


def optional_id(value: str, field: str) -> str | None:
    return job_id(value, field) if value else None


def status(value: int, field: str = "status") -> Status:
    found = STATUS_FROM_PB.get(value)
    if found is None:
        raise InvalidArgument(
            f"{field} must be one of JOB_STATUS_PENDING..JOB_STATUS_SKIPPED, got {value}"
        )
    return found


def kind(value: int, field: str = "kind") -> Kind:
    found = KIND_FROM_PB.get(value)
    if found is None:
        raise InvalidArgument(f"{field} must be JOB_KIND_MANAGER, JOB_KIND_STEP or JOB_KIND_CHILD")
    return found


def text(value: str, field: str, limit: int = MAX_NAME) -> str:
    if len(value) > limit:
        raise InvalidArgument(f"{field} is longer than {limit} characters")
    if "\x00" in value:
        # Valid in protobuf, refused by PostgreSQL text: refuse it on every database alike.
        raise InvalidArgument(f"{field} contains a NUL character")
    return value


def error_text(value: str, field: str = "error") -> str:
    """An error written through the API: stored truncated (with a marker), never refused for
    its length; a NUL is refused (PostgreSQL text cannot hold it) so the caller can fix it."""
    if "\x00" in value:
        raise InvalidArgument(f"{field} contains a NUL character")
    return truncate_text(value, MAX_ERROR_CHARS)


def event_text(value: str, limit: int) -> str:
    """A text in a child event: truncated, and NUL replaced by U+FFFD. Never a reason to
    reject the event, because a rejected terminal event would leave its child live."""
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    return truncate_text(value, limit)


def metadata(
    value: struct_pb2.Struct, field: str = "metadata", limit: int = MAX_METADATA_BYTES
) -> dict[str, Any]:
    size = value.ByteSize()
    if size > limit:
        # The same status as a merge that would pass the limit (README, "Limits"): the request
        # is well formed, it is only too big to store.
        raise ResourceExhausted(
            f"{field} is {size} bytes; the limit is {limit} (the whole document's size)"
        )
    try:
        raw = json_format.MessageToDict(value)
    except ValueError as exc:  # NaN and Infinity have no JSON form
        raise InvalidArgument(f"{field} holds a number JSON cannot represent: {exc}") from None
    _check_depth(raw, field, 0)
    result = _whole_numbers(raw)
    assert isinstance(result, dict)
    return result


def _check_depth(value: Any, field: str, depth: int) -> None:
    if depth > MAX_METADATA_DEPTH:
        raise InvalidArgument(f"{field} is nested deeper than {MAX_METADATA_DEPTH} levels")
    if isinstance(value, dict):
        for item in value.values():
            _check_depth(item, field, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_depth(item, field, depth + 1)


def _whole_numbers(value: Any) -> Any:
    """Struct carries every number as a double; keep whole numbers whole (3, not 3.0)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    return value


def timeout(value: duration_pb2.Duration, field: str = "timeout") -> float:
    """Seconds of a positive Duration of at most MAX_DURATION_S (so every deadline computed
    from it is a representable time)."""
    if not -999_999_999 <= value.nanos <= 999_999_999 or (value.seconds < 0 < value.nanos):
        raise InvalidArgument(f"{field} is not a valid google.protobuf.Duration")
    seconds = value.seconds + value.nanos / 1e9
    if seconds <= 0:
        raise InvalidArgument(f"{field} must be positive")
    check_duration(seconds, field, f"{seconds:.0f}s")
    return seconds


def new_job(req: m.CreateJobRequest, metadata_limit: int = MAX_METADATA_BYTES) -> NewJob:
    timeout_s = timeout(req.timeout) if req.HasField("timeout") else None
    job_kind = kind(req.kind)
    definition = None
    if req.HasField("definition"):
        if job_kind is not Kind.MANAGER:
            raise InvalidArgument("definition applies to manager jobs only")
        definition = metadata(req.definition, "definition", limit=metadata_limit)
    return NewJob(
        kind=job_kind,
        parent_id=optional_id(req.parent_id, "parent_id"),
        name=text(req.name, "name"),
        type=text(req.type, "type", 128),
        metadata=metadata(req.metadata, limit=metadata_limit),
        timeout_s=timeout_s,
        request_id=optional_id(req.request_id, "request_id"),
        owner=text(req.owner, "owner", 128),
        instance=instance(req.instance),
        definition=definition,
    )


def instance(value: str) -> str:
    """An orchestrator instance id (one process); "" when the caller does not say."""
    return text(value, "instance", 128)


def owner(value: str, *, required: bool = False) -> str:
    if required and not value:
        raise InvalidArgument("owner is required")
    return text(value, "owner", 128)


def job_filter(req: m.ListJobsRequest) -> tuple[JobFilter, int]:
    if req.page_size < 0 or req.page_size > MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size must be between 0 and {MAX_PAGE_SIZE}")
    flt = JobFilter(
        parent_id=optional_id(req.parent_id, "parent_id"),
        manager_id=optional_id(req.manager_id, "manager_id"),
        kind=kind(req.kind) if req.kind else None,
        status=status(req.status) if req.status else None,
        created_after=_time(req.created_after) if req.HasField("created_after") else None,
        created_before=_time(req.created_before) if req.HasField("created_before") else None,
        owner=req.owner or None,
    )
    return flt, req.page_size or DEFAULT_PAGE_SIZE


def _time(value: timestamp_pb2.Timestamp) -> datetime:
    from datetime import UTC

    return value.ToDatetime(tzinfo=UTC)


_valid_id = ID_PATTERN.match


def child_events(
    events: Iterable[job_pb2.ChildEvent],
) -> tuple[list[ChildEventIn], list[tuple[str, str]]]:
    """A batch's events decoded, and the (event_id, reason) of each one rejected. (Hot path:
    one pass per batch; its events share a few step ids, each checked once.)"""
    decoded: list[ChildEventIn] = []
    rejected: list[tuple[str, str]] = []
    kinds = EVENT_KIND_FROM_PB
    steps_ok: set[str] = set()
    valid = _valid_id
    for event in events:
        kind_name = kinds.get(event.kind)
        if kind_name is None:
            rejected.append((event.event_id, f"unknown event kind {event.kind}"))
            continue
        step_id, child_id, event_id = event.step_id, event.child_id, event.event_id
        if step_id not in steps_ok:
            if not step_id or not valid(step_id):
                rejected.append((event_id, "step_id is missing or not a valid id"))
                continue
            steps_ok.add(step_id)
        if kind_name != "sealed" and (not child_id or not valid(child_id)):
            rejected.append((event_id, "child_id is missing or not a valid id"))
            continue
        if "\x00" in event_id:
            rejected.append((event_id, "event_id contains a NUL character"))
            continue
        error, name = event.error, event.name
        decoded.append(
            ChildEventIn(
                event_id,
                step_id,
                child_id,
                kind_name,
                event_text(error, MAX_ERROR_CHARS) if error else "",
                event.child_count,
                event.handed_to_monitor,
                event_text(name, MAX_NAME) if name else "",
                event.attempt,
                event_text(event.runner, MAX_NAME) if event.runner else "",
                event_text(event.claim_id, MAX_NAME) if event.claim_id else "",
                event.runner_lost,
            )
        )
    return decoded, rejected
