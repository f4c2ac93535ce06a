"""MonitorService: thin handlers. Each translates the request (``convert``), calls one store
verb, and translates the answer back. Domain errors map to status codes in the interceptor."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import grpc
import structlog
from grpc import aio

from monitor_svc import convert, convert_log, metrics
from monitor_svc.log_follow import LogHub
from monitor_svc.records import JobView, LogEntryIn
from monitor_svc.store.store import MonitorStore
from monitor_svc.watch import WatchHub
from monitor_svc.wire import answers
from stepflow_common import tracing
from stepflow_common.errors import InvalidArgument
from stepflow_common.limits import DEFAULT_CLIENT_MESSAGE_BYTES
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc

log = structlog.get_logger(__name__)

# Batches of one stream committed ahead of their acknowledgement: enough to keep the writer
# busy while the next batch is parsed, few enough to bound memory per stream.
STREAM_PIPELINE_DEPTH = 8
# A ListJobs page holds fewer jobs than asked when more would not fit a default client.
LIST_PAGE_BYTES = DEFAULT_CLIENT_MESSAGE_BYTES - 64 * 1024


def _observe(future: asyncio.Future[Any]) -> None:
    """Retrieve the outcome of a task nobody awaits any more, logging its failure as an
    event (asyncio would otherwise print "Task exception was never retrieved")."""
    if not future.cancelled() and (error := future.exception()) is not None:
        log.info("stream batch abandoned", error=f"{type(error).__name__}: {error}")


class MonitorServicer(m_grpc.MonitorServiceServicer):
    def __init__(self, store: MonitorStore, hub: WatchHub, logs: LogHub) -> None:
        self._store = store
        self._hub = hub
        self._logs = logs
        # The latest WatchJob message per watched job, shared by its watchers.
        self._rendered: dict[str, tuple[JobView, answers.Serialized]] = {}

    async def CreateJob(  # type: ignore[override]
        self, request: m.CreateJobRequest, context: aio.ServicerContext
    ) -> answers.Serialized:
        limit = self._store.limits.max_metadata_bytes
        view = await self._store.create_job(convert.new_job(request, limit))
        return answers.job_answer(view)

    async def GetJob(  # type: ignore[override]
        self, request: m.GetJobRequest, context: aio.ServicerContext
    ) -> answers.Serialized:
        include = request.include_definition
        view = await self._store.get_job(convert.job_id(request.job_id), include_definition=include)
        return answers.job_answer(view, include_definition=include)

    async def ListJobs(
        self, request: m.ListJobsRequest, context: aio.ServicerContext
    ) -> m.ListJobsResponse:
        flt, page_size = convert.job_filter(request)
        views, token = await self._store.list_jobs(flt, page_size, request.page_token)
        jobs: list[job_pb2.Job] = []
        budget = LIST_PAGE_BYTES
        for view in views:
            job = answers.job_pb(view)
            budget -= job.ByteSize() + 8  # + the field's tag and length
            if jobs and budget < 0:
                # The page ends early so that it fits a default client; the token resumes
                # after the last job it holds.
                token = self._store.page_token_after(views[len(jobs) - 1])
                break
            jobs.append(job)
        return m.ListJobsResponse(jobs=jobs, next_page_token=token)

    async def UpdateJobStatus(  # type: ignore[override]
        self, request: m.UpdateJobStatusRequest, context: aio.ServicerContext
    ) -> answers.Serialized:
        view = await self._store.update_status(
            convert.job_id(request.job_id),
            convert.status(request.status),
            convert.error_text(request.error),
            request.end_reason,
            convert.owner(request.owner),
            convert.instance(request.instance),
        )
        return answers.job_answer(view)

    async def UpdateJobMetadata(  # type: ignore[override]
        self, request: m.UpdateJobMetadataRequest, context: aio.ServicerContext
    ) -> answers.Serialized:
        expected = request.expected_version if request.HasField("expected_version") else None
        if expected is not None and expected < 1:
            raise InvalidArgument("expected_version must be >= 1 (versions start at 1)")
        limit = self._store.limits.max_metadata_bytes
        view = await self._store.update_metadata(
            convert.job_id(request.job_id),
            convert.metadata(request.metadata, limit=limit),
            expected,
            convert.owner(request.owner),
            convert.instance(request.instance),
            convert.optional_id(request.request_id, "request_id") or "",
        )
        return answers.job_answer(view)

    async def UpdateStepStatInManager(
        self, request: m.UpdateStepStatInManagerRequest, context: aio.ServicerContext
    ) -> m.UpdateStepStatInManagerResponse:
        result = await self._store.update_step_stat(
            convert.job_id(request.manager_id, "manager_id"),
            convert.job_id(request.step_id, "step_id"),
            convert.status(request.status),
            convert.owner(request.owner),
            convert.instance(request.instance),
        )
        return m.UpdateStepStatInManagerResponse(
            step_stat=answers.step_stat_pb(result.entry, result.tally),
            current_step_status_changed=result.current_step_status_changed,
            version=result.version,
        )

    async def StreamChildEvents(
        self,
        request_iterator: AsyncIterator[m.StreamChildEventsRequest],
        context: aio.ServicerContext,
    ) -> AsyncIterator[m.StreamChildEventsResponse]:
        """Batches are committed in arrival order and acknowledged in that order; up to
        STREAM_PIPELINE_DEPTH of them are in the writer at once."""
        pending: asyncio.Queue[asyncio.Future[m.StreamChildEventsResponse] | None] = asyncio.Queue(
            STREAM_PIPELINE_DEPTH
        )
        too_big: list[str] = []

        async def pump() -> None:
            try:
                async for request in request_iterator:
                    if len(request.events) > convert.MAX_EVENTS_PER_BATCH:
                        too_big.append(
                            f"batch {request.batch_id} has {len(request.events)} events; "
                            f"the limit is {convert.MAX_EVENTS_PER_BATCH}"
                        )
                        break
                    future = asyncio.ensure_future(
                        tracing.event_batch(
                            self._ingest(request),
                            request.traceparents,
                            request.batch_id,
                            len(request.events),
                        )
                    )
                    try:
                        await pending.put(future)
                    except asyncio.CancelledError:
                        future.add_done_callback(_observe)
                        raise
            finally:
                await pending.put(None)

        pump_task = asyncio.create_task(pump())
        try:
            while True:
                future = await pending.get()
                if future is None:
                    break
                yield await future
            await pump_task
            if too_big:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, too_big[0])
        finally:
            # The stream ended early (the client left, a commit failed): the pump and the
            # batches still queued end on their own, and what they raise has no one to answer.
            pump_task.cancel()
            pump_task.add_done_callback(_observe)
            while not pending.empty():
                queued = pending.get_nowait()
                if queued is not None:
                    queued.add_done_callback(_observe)

    async def _ingest(self, request: m.StreamChildEventsRequest) -> m.StreamChildEventsResponse:
        decoded, refused = convert.child_events(request.events)
        lines: list[LogEntryIn] = []
        refused_lines: list[tuple[str, str]] = []
        if request.log_lines:
            lines, refused_lines = convert_log.entries(request.log_lines, need_step=True)
        if decoded or lines:
            owner = convert.owner(request.owner)
            instance = convert.instance(request.instance)
            events_out, lines_out = await self._store.apply_events(decoded, owner, instance, lines)
            refused.extend(events_out)
            refused_lines.extend(lines_out)
        rejected = [m.RejectedEvent(event_id=e, reason=reason) for e, reason in refused]
        rejected.extend(m.RejectedEvent(event_id=k, reason=reason) for k, reason in refused_lines)
        if rejected:
            log.info("events rejected", batch_id=request.batch_id, count=len(rejected))
        metrics.observe_events(len(request.events), len(refused))
        if request.log_lines:
            metrics.observe_log_lines(len(request.log_lines), len(refused_lines))
        return m.StreamChildEventsResponse(batch_id=request.batch_id, rejected=rejected)

    async def WatchJob(  # type: ignore[override]
        self, request: m.WatchJobRequest, context: aio.ServicerContext
    ) -> AsyncIterator[answers.Serialized]:
        job_id = convert.job_id(request.job_id)
        if request.after_change_seq < 0:
            raise InvalidArgument("after_change_seq must be >= 0")
        await self._store.get_job(job_id)  # NOT_FOUND before the stream starts
        states = self._hub.watch(job_id, request.after_change_seq)
        try:
            async for view in states:
                yield self._watch_message(job_id, view)
        finally:
            await states.aclose()  # now, not when collected: the hub drops an unwatched feed
            if not self._hub.watching(job_id):
                self._rendered.pop(job_id, None)

    def _watch_message(self, job_id: str, view: JobView) -> answers.Serialized:
        """The message for a state the hub read once: built once for all of its watchers
        (the hub hands them the same view)."""
        rendered = self._rendered.get(job_id)
        if rendered is not None and rendered[0] is view:
            return rendered[1]
        message = answers.job_answer(view)
        self._rendered[job_id] = (view, message)
        return message

    # -- the job log ---------------------------------------------------------------------------
    async def ReadJobLog(
        self, request: m.ReadJobLogRequest, context: aio.ServicerContext
    ) -> m.ReadJobLogResponse:
        job_id, after_seq, limit, asked = convert_log.page_request(request)
        manager_id, scope = await self._store.log_scope(job_id)
        page = await self._store.read_log(
            manager_id, after_seq, limit, convert_log.narrowed(scope, asked)
        )
        return m.ReadJobLogResponse(
            lines=[convert_log.line_pb(line) for line in page.lines],
            next_seq=page.next_seq,
            complete=page.complete,
            last_seq=page.last_seq,
        )

    async def FollowJobLog(
        self, request: m.FollowJobLogRequest, context: aio.ServicerContext
    ) -> AsyncIterator[m.FollowJobLogResponse]:
        job_id, after_seq, _, asked = convert_log.page_request(request)
        manager_id, scope = await self._store.log_scope(job_id)  # NOT_FOUND before the stream
        where = convert_log.narrowed(scope, asked)
        pages = self._logs.follow(manager_id, after_seq, where.matches)
        try:
            async for page in pages:
                for start in range(0, max(len(page.lines), 1), convert_log.FOLLOW_CHUNK):
                    chunk = page.lines[start : start + convert_log.FOLLOW_CHUNK]
                    last = start + convert_log.FOLLOW_CHUNK >= len(page.lines)
                    yield m.FollowJobLogResponse(
                        lines=[convert_log.line_pb(line) for line in chunk],
                        next_seq=page.next_seq if last else chunk[-1].seq,
                        complete=page.complete and last,
                    )
        finally:
            await pages.aclose()

    async def AppendJobLog(
        self, request: m.AppendJobLogRequest, context: aio.ServicerContext
    ) -> m.AppendJobLogResponse:
        job_id = convert.job_id(request.job_id)
        if len(request.lines) > convert_log.MAX_LINES_PER_CALL:
            raise InvalidArgument(
                f"{len(request.lines)} lines in one call; the limit is "
                f"{convert_log.MAX_LINES_PER_CALL}"
            )
        entries, refused = convert_log.entries(request.lines, need_step=False)
        if refused:
            raise InvalidArgument(f"log line {refused[0][0]!r}: {refused[0][1]}")
        appended, last_seq = await self._store.append_log(job_id, entries)
        return m.AppendJobLogResponse(appended=appended, last_seq=last_seq)

    async def Heartbeat(
        self, request: m.HeartbeatRequest, context: aio.ServicerContext
    ) -> m.HeartbeatResponse:
        result = await self._store.heartbeat(
            convert.owner(request.owner, required=True),
            convert.instance(request.instance),
            convert.timeout(request.lease, "lease"),
            request.max_adopt,
            [convert.text(t, "worker_types", 128) for t in request.worker_types],
            [convert.job_id(j, "running_job_ids") for j in request.running_job_ids],
        )
        response = m.HeartbeatResponse(
            owned_job_ids=result.owned_job_ids,
            adopted_job_ids=result.adopted_job_ids,
            resumed_job_ids=result.resumed_job_ids,
            fenced_job_ids=result.fenced_job_ids,
            superseded_instance=result.superseded_instance,
        )
        response.lease_expires_at.FromDatetime(result.lease_expires_at)
        if result.superseded_lease_remaining_s > 0:
            response.superseded_lease_remaining.FromTimedelta(
                timedelta(seconds=result.superseded_lease_remaining_s)
            )
        return response

    async def ReleaseLease(
        self, request: m.ReleaseLeaseRequest, context: aio.ServicerContext
    ) -> m.ReleaseLeaseResponse:
        orphaned = await self._store.release_lease(
            convert.owner(request.owner, required=True),
            convert.instance(request.instance),
            [convert.job_id(j, "job_ids") for j in request.job_ids],
            convert.error_text(request.reason),
        )
        return m.ReleaseLeaseResponse(orphaned_job_ids=orphaned)
