"""Translation of the job log's messages: writers' lines in, stored lines and page requests
out. Validation a person can act on, in words; the log's own rules are in ``log_lines``."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from google.protobuf import timestamp_pb2

from monitor_svc.convert import job_id as checked_job_id
from monitor_svc.log_lines import (
    DEFAULT_READ_LIMIT,
    MAX_KEY_CHARS,
    MAX_READ_LIMIT,
    SOURCES,
    LogFilter,
    StoredLine,
)
from monitor_svc.records import LogEntryIn
from stepflow_common.errors import InvalidArgument
from stepflow_common.limits import ID_PATTERN
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m

MAX_LINES_PER_CALL = 10_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ONE_SECOND = timedelta(seconds=1)
FOLLOW_CHUNK = 200  # lines per FollowJobLog message: 200 x 16 KiB stays under 4 MiB


def entries(
    lines: Iterable[job_pb2.JobLogEntry], *, need_step: bool
) -> tuple[list[LogEntryIn], list[tuple[str, str]]]:
    """Writers' lines decoded, and the (key, reason) of each refused for its ids (on the
    stream each names its step; AppendJobLog's take theirs from the job named)."""
    decoded: list[LogEntryIn] = []
    refused: list[tuple[str, str]] = []
    valid = ID_PATTERN.match
    for line in lines:
        key = line.key
        if len(key) > MAX_KEY_CHARS or "\x00" in key:
            refused.append(
                (key[:MAX_KEY_CHARS], f"key is over {MAX_KEY_CHARS} characters or has NUL")
            )
            continue
        if need_step and not (line.step_id and valid(line.step_id)):
            refused.append((key, "step_id is missing or not a valid id"))
            continue
        if line.child_id and not valid(line.child_id):
            refused.append((key, "child_id is not a valid id"))
            continue
        decoded.append(
            LogEntryIn(
                key,
                line.step_id,
                line.child_id,
                line.attempt,
                line.source,
                line.level,
                line.message,
                line.time.ToDatetime(tzinfo=UTC) if line.HasField("time") else None,
            )
        )
    return decoded, refused


def page_request(
    request: m.ReadJobLogRequest | m.FollowJobLogRequest,
) -> tuple[str, int, int, LogFilter]:
    """(job_id, after_seq, limit, filter) of a ReadJobLog or FollowJobLog request."""
    job_id = checked_job_id(request.job_id)
    if request.after_seq < 0:
        raise InvalidArgument("after_seq must be >= 0")
    if request.limit < 0:
        raise InvalidArgument("limit must be >= 0")
    limit = min(request.limit or DEFAULT_READ_LIMIT, MAX_READ_LIMIT)
    sources = tuple(request.sources)
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise InvalidArgument(
            f"unknown log source {unknown[0][:20]!r}; the sources are {', '.join(SOURCES)}"
        )
    step_id = checked_job_id(request.step_id, "step_id") if request.step_id else ""
    child_id = checked_job_id(request.child_id, "child_id") if request.child_id else ""
    return job_id, request.after_seq, limit, LogFilter(step_id, child_id, sources)


def narrowed(scope: LogFilter, asked: LogFilter) -> LogFilter:
    """The filter of a request for ``job_id`` that is a step or child: both must hold."""
    for name in ("step_id", "child_id"):
        mine, theirs = getattr(scope, name), getattr(asked, name)
        if mine and theirs and mine != theirs:
            raise InvalidArgument(f"{name} {theirs} is not within the job named")
    return LogFilter(
        scope.step_id or asked.step_id, scope.child_id or asked.child_id, asked.sources
    )


def line_pb(line: StoredLine) -> job_pb2.JobLogLine:
    stamp = line.time
    # Seconds and nanos directly: Timestamp.FromDatetime is pure Python, and runs per line.
    seconds = (stamp - EPOCH) // ONE_SECOND  # exact (a float timestamp may round up)
    return job_pb2.JobLogLine(
        seq=line.seq,
        time=timestamp_pb2.Timestamp(seconds=seconds, nanos=stamp.microsecond * 1000),
        step_id=line.step_id,
        child_id=line.child_id,
        attempt=line.attempt,
        source=line.source,
        level=line.level,
        message=line.message,
        truncated=line.truncated,
    )
