"""A job's answer as bytes: the wire-level speed code of the monitor's answers.

A serialized protobuf message is the concatenation of its serialized fields, in any order, so
an answer is spliced from bytes: the job's few scalar fields serialized per call, its metadata
``Struct`` and typed ``step_stats`` from bytes cached per key and per entry (see
``_ConvertedCache``). A handler returns these bytes as its answer (``Serialized``) and the
server sends them as they are (``wire.prebuilt.add_to_server``). What a field of ``Job`` shows
is declared once, on ``records.JobState`` (``Shown``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NewType

from google.protobuf import struct_pb2

from monitor_svc.records import JOB_FIELDS, JobState, JobView, Shown, shown
from stepflow_common import manager_document as doc
from stepflow_common.proto_status import KIND_TO_PB, STATUS_TO_PB
from stepflow_common.status import Kind, Status
from stepflow_common.step_outcome import ChildTally
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m

# Typed StepStat fields read from a metadata document written by clients: out-of-range
# numbers are clamped rather than failing every answer about the manager.
_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1


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


# The one field table: each JobState field says how the answer shows it (records.Shown).
_AS_IS = tuple(f.name for f in JOB_FIELDS if shown(f) is Shown.AS_IS)
_TIMES = tuple(f.name for f in JOB_FIELDS if shown(f) is Shown.TIME)


def _scalars_function() -> Callable[[JobState], job_pb2.Job]:
    """The ``Job`` message of a record's scalar and time fields, written out from the field
    table once at import: the constructor call a hand-written one would make (it runs once
    per answer, and a loop over the table costs a tenth of the answer more)."""
    args = ", ".join(f"{name}=j.{name}" for name in _AS_IS)
    times = "".join(
        f"    if j.{name} is not None:\n        out.{name}.FromDatetime(j.{name})\n"
        for name in _TIMES
    )
    source = (
        "def scalars(j):\n"
        f"    out = Job({args}, kind=KIND_TO_PB[j.kind], parent_id=j.parent_id or '',"
        " status=STATUS_TO_PB[j.status])\n"
        f"{times}    return out\n"
    )
    namespace: dict[str, Any] = {
        "Job": job_pb2.Job,
        "KIND_TO_PB": KIND_TO_PB,
        "STATUS_TO_PB": STATUS_TO_PB,
    }
    exec(source, namespace)
    function: Callable[[JobState], job_pb2.Job] = namespace["scalars"]
    return function


_scalars = _scalars_function()


def job_bytes(view: JobView, *, include_definition: bool = False) -> bytes:
    """The job as a serialized ``job_pb2.Job``."""
    job: JobState = view.job
    out = _scalars(job)
    if include_definition and job.definition is not None:
        out.definition.update(job.definition)
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
