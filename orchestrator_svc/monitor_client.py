"""The orchestrator's view of the monitor, built on the Python client
(``stepflow_client.aio.MonitorClient``: its channel, calls and error decoding). What is the
orchestrator's own stays here: plain records in and out (``convert``), fencing (a refused write
for a job another orchestrator owns is ``JobFenced``), and a long retry: every call here is
idempotent on the monitor (CreateJob carries a request_id, a status already reached is a no-op,
a metadata merge applied twice gives the same document), so a monitor or database that is down
is waited for (``RETRY_FOR_S``) instead of failing the job.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import structlog
from grpc import aio

from orchestrator_svc.convert import job_from_pb
from orchestrator_svc.records import Job, LeaseAnswer
from stepflow_client import aio as client
from stepflow_common.errors import DeadlineExceeded, Fenced, StepflowError, Unavailable
from stepflow_common.limits import truncate_text
from stepflow_common.status import Kind, Status

log = structlog.get_logger(__name__)

T = TypeVar("T")
# What is worth waiting out: the monitor (or its database) down, or a call that took too long.
RETRYABLE = (Unavailable, DeadlineExceeded)
CALL_TIMEOUT_S = 10.0
RETRY_INITIAL_S = 0.05
RETRY_MAX_S = 2.0
RETRY_FOR_S = 120.0  # give a restarting monitor (or database) this long before giving up


class JobFenced(StepflowError):
    """A write for a job this orchestrator no longer owns was refused.

    Deliberately not a ``FailedPrecondition``: the handlers that treat a refused write as "the
    monitor ended it first" and carry on must not swallow it.
    """


class MonitorClient:
    def __init__(self, channel: aio.Channel, *, retry_for_s: float = RETRY_FOR_S) -> None:
        self.client = client.MonitorClient(channel, timeout=CALL_TIMEOUT_S, wait_for_ready=True)
        self._retry_for_s = retry_for_s
        # This orchestrator process's instance: every write naming an owner names it too, so
        # the monitor fences this process once a newer one under the same owner takes over.
        self.instance = ""

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._retry_for_s
        delay = RETRY_INITIAL_S
        while True:
            try:
                return await fn()
            except Fenced as exc:
                raise JobFenced(str(exc)) from exc
            except RETRYABLE as exc:
                if loop.time() + delay > give_up:
                    raise
                log.info(
                    "monitor call retried", call=what, code=type(exc).__name__, retry_in_s=delay
                )
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
        job = await self._call(
            "CreateJob",
            lambda: self.client.create_job(
                kind=kind,
                name=name,
                parent_id=parent_id,
                type=type_,
                metadata=metadata,
                job_timeout=timeout_s,
                request_id=request_id,
                owner=owner,
                definition=definition,
                instance=self.instance if owner else "",
            ),
        )
        return job_from_pb(job)

    async def get_job(self, job_id: str, *, include_definition: bool = False) -> Job:
        job = await self._call(
            "GetJob",
            lambda: self.client.get_job(job_id, include_definition=include_definition),
        )
        return job_from_pb(job)

    async def list_jobs(self, *, parent_id: str, status: Status | None = None) -> list[Job]:
        """Every child of ``parent_id`` (with ``status``, if given), page by page."""
        jobs: list[Job] = []
        token = ""
        while True:
            page = await self._call(
                "ListJobs",
                lambda token=token: self.client.list_jobs(  # type: ignore[misc]
                    parent_id=parent_id, status=status, page_size=500, page_token=token
                ),
            )
            jobs.extend(job_from_pb(job) for job in page.jobs)
            token = page.next_page_token
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
        job = await self._call(
            "UpdateJobStatus",
            lambda: self.client.update_job_status(
                job_id,
                status,
                error=truncate_text(error),
                end_reason=end_reason,
                owner=owner,
                instance=self.instance if owner else "",
            ),
        )
        return job_from_pb(job)

    async def update_metadata(
        self,
        job_id: str,
        metadata: dict[str, Any],
        expected_version: int | None = None,
        *,
        owner: str = "",
    ) -> Job:
        job = await self._call(
            "UpdateJobMetadata",
            lambda: self.client.update_job_metadata(
                job_id,
                metadata,
                expected_version=expected_version,
                owner=owner,
                instance=self.instance if owner else "",
            ),
        )
        return job_from_pb(job)

    async def heartbeat(
        self,
        *,
        owner: str,
        instance: str,
        lease_s: float,
        max_adopt: int,
        timeout_s: float,
        worker_types: Sequence[str] = (),
        running_job_ids: Sequence[str] = (),
    ) -> LeaseAnswer:
        """Renew this orchestrator's lease; one attempt, bounded by ``timeout_s`` (the lease
        loop itself tries again on its next beat). Raises JobFenced when a newer instance
        under the same owner has superseded this one."""
        try:
            resp = await self.client.heartbeat(
                owner=owner,
                instance=instance,
                lease=lease_s,
                max_adopt=max_adopt,
                worker_types=worker_types,
                running_job_ids=running_job_ids,
                timeout=timeout_s,
                wait_for_ready=False,
            )
        except Fenced as exc:
            raise JobFenced(str(exc)) from exc
        remaining = resp.superseded_lease_remaining
        return LeaseAnswer(
            owned=tuple(resp.owned_job_ids),
            adopted=tuple(resp.adopted_job_ids),
            resumed=tuple(resp.resumed_job_ids),
            fenced=tuple(resp.fenced_job_ids),
            superseded_remaining_s=remaining.seconds + remaining.nanos / 1e9,
            superseded_instance=resp.superseded_instance,
        )

    async def release_lease(
        self, owner: str, *, timeout_s: float, job_ids: Sequence[str] = (), reason: str = ""
    ) -> list[str]:
        """Give the lease up (shutdown), or only ``job_ids`` (jobs this orchestrator cannot
        run); the ids of the unfinished jobs it orphaned."""
        resp = await self.client.release_lease(
            owner,
            instance=self.instance,
            job_ids=job_ids,
            reason=reason,
            timeout=timeout_s,
            wait_for_ready=False,
        )
        return list(resp.orphaned_job_ids)

    async def watch(self, job_id: str, after_change_seq: int = 0) -> AsyncIterator[Job]:
        """The job's states until it is terminal; resumes after a broken stream from the last
        change_seq seen (latest state wins)."""
        async for job in self.client.watch(job_id, after_change_seq=after_change_seq):
            yield job_from_pb(job)
