"""Translation between protobuf messages and the monitor's plain records, with input checks.
``_pb2`` types stop here and in the servicer."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from datetime import datetime
from typing import Any, NewType

from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2

from monitor_svc.records import ChildEventIn, JobFilter, JobState, JobView, NewJob
from stepflow_common import manager_document as doc
from stepflow_common.durations import check_duration
from stepflow_common.errors import InvalidArgument, ResourceExhausted
from stepflow_common.limits import ID_PATTERN, MAX_ERROR_CHARS, MAX_METADATA_BYTES, truncate_text
from stepflow_common.proto_status import KIND_FROM_PB, KIND_TO_PB, STATUS_FROM_PB, STATUS_TO_PB
from stepflow_common.status import Kind, Status
from stepflow_common.step_outcome import ChildTally
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m

MAX_NAME = 512
MAX_METADATA_DEPTH = 32
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 50
MAX_EVENTS_PER_BATCH = 10_000
# Typed StepStat fields read from a metadata document written by clients: out-of-range
# numbers are clamped rather than failing every answer about the manager.
_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1

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
            )
        )
    return decoded, rejected


# -- outbound ------------------------------------------------------------------------------
def _stamp(target: timestamp_pb2.Timestamp, value: datetime | None) -> None:
    if value is not None:
        target.FromDatetime(value)


def counts_pb(tally: ChildTally) -> job_pb2.ChildCounts:
    return job_pb2.ChildCounts(
        pending=tally.pending,
        running=tally.running,
        completed=tally.completed,
        failed=tally.failed,
        cancelled=tally.cancelled,
    )


def step_stat_pb(entry: dict[str, Any], tally: ChildTally | None) -> job_pb2.StepStat:
    stat = job_pb2.StepStat(
        step_index=_int(entry.get(doc.STEP_INDEX), _INT32_MAX),
        step_id=_str(entry.get(doc.STEP_ID)),
        step_name=_str(entry.get(doc.STEP_NAME)),
        step_type=_str(entry.get(doc.STEP_TYPE)),
        child_count=_int(entry.get(doc.CHILD_COUNT), _INT64_MAX),
        document_count=_int(entry.get(doc.DOCUMENT_COUNT), _INT64_MAX),
        status=_status_pb(entry.get(doc.STATUS)),
        error=_str(entry.get(doc.ERROR)),
    )
    if tally is not None:
        stat.children.CopyFrom(counts_pb(tally))
    return stat


def _int(value: Any, top: int) -> int:
    try:
        return max(-top - 1, min(top, int(value)))
    except (TypeError, ValueError, OverflowError):
        return 0


def _str(value: Any) -> str:
    # Only text is shown as text: another JSON value in a text field would be shown as its
    # Python repr, whose size the document limit does not bound.
    return value if isinstance(value, str) else ""


def _status_pb(value: Any) -> Any:  # a job_pb2.JobStatus value
    try:
        return STATUS_TO_PB[Status(value)]
    except ValueError:
        return job_pb2.JOB_STATUS_UNSPECIFIED


# A serialized protobuf message is the concatenation of its serialized fields, in any order,
# so an answer is spliced from bytes: the job's few scalar fields serialized per call, its
# metadata Struct and typed step_stats from bytes cached per key and per entry (see
# ``_ConvertedCache``). A handler returns these bytes as its answer (``Serialized``) and the
# server sends them as they are (``servicer.add_to_server``).
# A response message already serialized; the server sends it unchanged. (Plain bytes at run
# time: grpc sends only exact ``bytes``.)
Serialized = NewType("Serialized", bytes)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(field_number: int) -> bytes:
    return _varint(field_number << 3 | 2)  # wire type 2: length-delimited


def _length_delimited(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


_METADATA_TAG = _tag(job_pb2.Job.METADATA_FIELD_NUMBER)
# The one field of every single-job answer (CreateJob, GetJob, UpdateJobStatus, ...).
_ANSWER_JOB_TAG = _tag(1)
assert all(
    answer.JOB_FIELD_NUMBER == 1
    for answer in (
        m.CreateJobResponse,
        m.GetJobResponse,
        m.UpdateJobStatusResponse,
        m.UpdateJobMetadataResponse,
        m.WatchJobResponse,
    )
)


def job_bytes(view: JobView, *, include_definition: bool = False) -> bytes:
    """The job as a serialized ``job_pb2.Job``."""
    job: JobState = view.job
    out = job_pb2.Job(
        id=job.id,
        kind=KIND_TO_PB[job.kind],
        parent_id=job.parent_id or "",
        manager_id=job.manager_id,
        name=job.name,
        type=job.type,
        status=STATUS_TO_PB[job.status],
        error=job.error,
        end_reason=job.end_reason,
        version=job.version,
        change_seq=job.change_seq,
        owner=job.owner,
        attempt=job.attempt,
        interruptions=job.interruptions,
    )
    if include_definition and job.definition is not None:
        out.definition.update(job.definition)
    _stamp(out.created_at, job.created_at)
    _stamp(out.started_at, job.started_at)
    _stamp(out.finished_at, job.finished_at)
    _stamp(out.deadline, job.deadline)
    parts = [out.SerializeToString()]
    if job.metadata:
        struct = _CONVERTED.metadata_bytes(job.id, job.metadata)
        parts.append(_length_delimited(_METADATA_TAG, struct))
    if job.kind is Kind.MANAGER:
        entries = job.metadata.get(doc.STEP_STATS)
        if isinstance(entries, list):
            parts.append(_CONVERTED.step_stats_bytes(job.id, entries, view.step_tallies))
    return b"".join(parts)


def job_answer(view: JobView, *, include_definition: bool = False) -> Serialized:
    """A serialized single-job answer (``job`` is field 1 of each)."""
    return Serialized(
        _length_delimited(_ANSWER_JOB_TAG, job_bytes(view, include_definition=include_definition))
    )


def job_pb(view: JobView, *, include_definition: bool = False) -> job_pb2.Job:
    return job_pb2.Job.FromString(job_bytes(view, include_definition=include_definition))


def _step_stat_bytes(entry: dict[str, Any], tally: ChildTally | None) -> bytes:
    """One element of ``Job.step_stats``, its tag and length included."""
    return job_pb2.Job(step_stats=[step_stat_pb(entry, tally)]).SerializeToString()


class _ConvertedCache:
    """Serialized metadata of recently answered jobs, reused while the Python value is the
    very same object.

    The calls that one group commit answers about a hot manager share every metadata value
    their merges did not touch (a merge keeps untouched keys by reference), so 64 answers
    about one document serialize its large ``step_stats`` once instead of 64 times; a write
    that moves one entry serializes that entry again, not the others. An entry holds the
    value it was made from, so that identity cannot be reused while cached. Used on the
    event-loop thread only.
    """

    def __init__(self, max_jobs: int = 256) -> None:
        self._max_jobs = max_jobs
        self._values: OrderedDict[str, dict[str, tuple[Any, bytes]]] = OrderedDict()
        # Per job: the list and counts of the last answer, its bytes, and per entry (by
        # identity) the entry, its counts and its bytes.
        self._stats: OrderedDict[
            str,
            tuple[Any, dict[str, ChildTally], bytes, dict[int, tuple[Any, Any, bytes]]],
        ] = OrderedDict()

    def metadata_bytes(self, job_id: str, metadata: dict[str, Any]) -> bytes:
        """The serialized ``Struct`` of ``metadata``."""
        cached = self._slot(self._values, job_id, {})
        fresh: dict[str, tuple[Any, bytes]] = {}
        parts = []
        for key, value in metadata.items():
            hit = cached.get(key)
            if hit is None or hit[0] is not value:
                one = struct_pb2.Struct()
                one.update({key: value})
                hit = (value, one.SerializeToString())
            fresh[key] = hit
            parts.append(hit[1])
        self._values[job_id] = fresh
        return b"".join(parts)

    def step_stats_bytes(
        self, job_id: str, entries: list[Any], tallies: dict[str, ChildTally]
    ) -> bytes:
        """The serialized ``Job.step_stats`` field of ``entries`` with their live counts."""
        hit = self._slot(self._stats, job_id, None)
        by_entry: dict[int, tuple[Any, Any, bytes]] = {}
        if hit is not None:
            if hit[0] is entries and (hit[1] is tallies or hit[1] == tallies):
                return hit[2]  # type: ignore[no-any-return]
            by_entry = hit[3]
        fresh: dict[int, tuple[Any, Any, bytes]] = {}
        parts = []
        for entry in entries:
            if not isinstance(entry, dict):
                continue
            tally = tallies.get(str(entry.get(doc.STEP_ID)))
            known = by_entry.get(id(entry))
            if known is None or known[0] is not entry or known[1] != tally:
                known = (entry, tally, _step_stat_bytes(entry, tally))
            fresh[id(entry)] = known
            parts.append(known[2])
        joined = b"".join(parts)
        self._stats[job_id] = (entries, tallies, joined, fresh)
        return joined

    def _slot(self, table: OrderedDict[str, Any], job_id: str, default: Any) -> Any:
        found = table.get(job_id, default)
        if job_id in table:
            table.move_to_end(job_id)
        elif len(table) >= self._max_jobs:
            table.popitem(last=False)
        return found


_CONVERTED = _ConvertedCache()
