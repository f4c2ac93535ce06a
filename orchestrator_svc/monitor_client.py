"""The orchestrator's view of the monitor: typed calls that retry only what is safe.

Every call here is idempotent on the monitor (CreateJob carries a request_id, a status already
reached is a no-op, a metadata merge applied twice gives the same document), so UNAVAILABLE and
DEADLINE_EXCEEDED are retried with backoff; other codes become the domain errors they map to.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

import grpc
import structlog
from google.protobuf import duration_pb2
from grpc import aio

from orchestrator_svc.convert import job_from_pb, to_struct
from orchestrator_svc.records import Job, LeaseAnswer
from stepflow_common.errors import Fenced, StepflowError
from stepflow_common.grpc_errors import from_rpc_error
from stepflow_common.limits import truncate_text
from stepflow_common.proto_status import KIND_TO_PB, STATUS_TO_PB
from stepflow_common.status import Kind, Status
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc

log = structlog.get_logger(__name__)

T = TypeVar("T")
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
CALL_TIMEOUT_S = 10.0
RETRY_INITIAL_S = 0.05
RETRY_MAX_S = 2.0
RETRY_FOR_S = 120.0  # give a restarting monitor (or database) this long before giving up


# How an event stream's ack words the rejection of an event for a job another orchestrator
# owns now (or no one does); a refused write says so by its error's reason instead (Fenced).
FENCED_PREFIX = "fenced: "


class JobFenced(StepflowError):
    """A write for a job this orchestrator no longer owns was refused.

    Deliberately not a ``FailedPrecondition``: the handlers that treat a refused write as "the
    monitor ended it first" and carry on must not swallow it.
    """


def is_fenced(reason: str) -> bool:
    """Whether an ack's rejection reason says the job is fenced."""
    return reason.startswith(FENCED_PREFIX)


class MonitorClient:
    def __init__(self, channel: aio.Channel, *, retry_for_s: float = RETRY_FOR_S) -> None:
        self.stub = m_grpc.MonitorServiceStub(channel)
        self._retry_for_s = retry_for_s

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._retry_for_s
        delay = RETRY_INITIAL_S
        while True:
            try:
                return await fn()
            except aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE or loop.time() + delay > give_up:
                    error = from_rpc_error(exc)
                    if isinstance(error, Fenced):
                        raise JobFenced(str(error)) from exc
                    raise error from exc
                log.info("monitor call retried", call=what, code=exc.code().name, retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    async def create_job(
        self,
        *,
        kind: Kind,
        name: str,
        parent_id: str = "",
        type_: str = "",
        metadata: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        request_id: str = "",
        owner: str = "",
        definition: dict[str, Any] | None = None,
    ) -> Job:
        request = m.CreateJobRequest(
            kind=KIND_TO_PB[kind],
            name=name,
            parent_id=parent_id,
            type=type_,
            metadata=to_struct(metadata or {}),
            request_id=request_id,
            owner=owner,
        )
        if definition is not None:
            request.definition.CopyFrom(to_struct(definition))
        if timeout_s is not None:
            duration = duration_pb2.Duration()
            duration.FromTimedelta(timedelta(seconds=timeout_s))
            request.timeout.CopyFrom(duration)
        resp: m.CreateJobResponse = await self._call(
            "CreateJob",
            lambda: self.stub.CreateJob(request, timeout=CALL_TIMEOUT_S, wait_for_ready=True),
        )
        return job_from_pb(resp.job)

    async def get_job(self, job_id: str, *, include_definition: bool = False) -> Job:
        request = m.GetJobRequest(job_id=job_id, include_definition=include_definition)
        resp: m.GetJobResponse = await self._call(
            "GetJob",
            lambda: self.stub.GetJob(request, timeout=CALL_TIMEOUT_S, wait_for_ready=True),
        )
        return job_from_pb(resp.job)

    async def list_jobs(self, *, parent_id: str, status: Status | None = None) -> list[Job]:
        """Every child of ``parent_id`` (with ``status``, if given), page by page."""
        jobs: list[Job] = []
        token = ""
        while True:
            request = m.ListJobsRequest(page_size=500, page_token=token, parent_id=parent_id)
            if status is not None:
                request.status = STATUS_TO_PB[status]
            resp: m.ListJobsResponse = await self._call(
                "ListJobs",
                lambda request=request: self.stub.ListJobs(  # type: ignore[misc]
                    request, timeout=CALL_TIMEOUT_S, wait_for_ready=True
                ),
            )
            jobs.extend(job_from_pb(job) for job in resp.jobs)
            token = resp.next_page_token
            if not token:
                return jobs

    async def update_status(
        self,
        job_id: str,
        status: Status,
        error: str = "",
        end_reason: str = "",
        *,
        owner: str = "",
    ) -> Job:
        """``owner`` fences the write: refused (JobFenced) unless it still owns the job."""
        request = m.UpdateJobStatusRequest(
            job_id=job_id,
            status=STATUS_TO_PB[status],
            error=truncate_text(error),
            end_reason=end_reason,
            owner=owner,
        )
        resp: m.UpdateJobStatusResponse = await self._call(
            "UpdateJobStatus",
            lambda: self.stub.UpdateJobStatus(request, timeout=CALL_TIMEOUT_S, wait_for_ready=True),
        )
        return job_from_pb(resp.job)

    async def update_metadata(
        self,
        job_id: str,
        metadata: dict[str, Any],
        expected_version: int | None = None,
        *,
        owner: str = "",
    ) -> Job:
        request = m.UpdateJobMetadataRequest(
            job_id=job_id, metadata=to_struct(metadata), owner=owner
        )
        if expected_version is not None:
            request.expected_version = expected_version
        resp: m.UpdateJobMetadataResponse = await self._call(
            "UpdateJobMetadata",
            lambda: self.stub.UpdateJobMetadata(
                request, timeout=CALL_TIMEOUT_S, wait_for_ready=True
            ),
        )
        return job_from_pb(resp.job)

    async def heartbeat(
        self, *, owner: str, instance: str, lease_s: float, max_adopt: int, timeout_s: float
    ) -> LeaseAnswer:
        """Renew this orchestrator's lease; one attempt, bounded by ``timeout_s`` (the lease
        loop itself tries again on its next beat)."""
        request = m.HeartbeatRequest(owner=owner, instance=instance, max_adopt=max_adopt)
        request.lease.FromTimedelta(timedelta(seconds=lease_s))
        try:
            resp: m.HeartbeatResponse = await self.stub.Heartbeat(request, timeout=timeout_s)
        except aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc
        return LeaseAnswer(
            owned=tuple(resp.owned_job_ids),
            adopted=tuple(resp.adopted_job_ids),
            resumed=tuple(resp.resumed_job_ids),
        )

    async def release_lease(self, owner: str, *, timeout_s: float) -> list[str]:
        """Give the lease up (shutdown); the ids of the unfinished jobs it orphaned."""
        try:
            resp: m.ReleaseLeaseResponse = await self.stub.ReleaseLease(
                m.ReleaseLeaseRequest(owner=owner), timeout=timeout_s
            )
        except aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc
        return list(resp.orphaned_job_ids)

    async def watch(self, job_id: str, after_change_seq: int = 0) -> AsyncIterator[Job]:
        """The job's states until it is terminal; resumes after a broken stream from the last
        change_seq seen (latest state wins)."""
        seen = after_change_seq
        delay = RETRY_INITIAL_S
        while True:
            try:
                call = self.stub.WatchJob(
                    m.WatchJobRequest(job_id=job_id, after_change_seq=seen), wait_for_ready=True
                )
                async for resp in call:
                    delay = RETRY_INITIAL_S
                    seen = resp.job.change_seq
                    yield job_from_pb(resp.job)
                return
            except aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise from_rpc_error(exc) from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
