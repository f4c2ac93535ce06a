"""The asyncio clients (``stepflow_client.aio``): the channel and defaults every client shares,
and ``MonitorClient`` (its log and lease calls are mixed in from ``_aio_log``, ``_aio_lease``;
``OrchestratorClient`` is in ``_aio_orchestrator``). The blocking ones in ``_sync*`` are
generated from these files (``scripts/gen_sync_client.py``); both build requests with
``_requests``."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import datetime, timedelta
from typing import Any, TypeVar, Unpack

from grpc import aio

from stepflow_client import _requests as r
from stepflow_client._aio_lease import LeaseCalls
from stepflow_client._aio_log import LogCalls
from stepflow_client._channel import (
    ChannelSettings,
    ClientSettings,
    Keepalive,
    RetryPolicy,
    aio_channel,
)
from stepflow_client._errors import decode
from stepflow_client._events import ChildEventEmitter
from stepflow_common.errors import VersionConflict
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc

T = TypeVar("T")
DEFAULT_RETRY = RetryPolicy()


class _Client:
    """A channel (made from ``target`` and the TLS/token settings, or given ready-made and then
    not closed here) and every call's defaults: its deadline and wait_for_ready."""

    def __init__(self, target: str | aio.Channel, **settings: Unpack[ClientSettings]) -> None:
        timeout = settings.get("timeout", r.DEFAULT_TIMEOUT_S)
        self._settings: ChannelSettings | None = None
        if isinstance(target, str):
            self._settings = ChannelSettings(
                target=target,
                tls=settings.get("tls", False),
                tls_ca=settings.get("tls_ca", ""),
                tls_cert=settings.get("tls_cert", ""),
                tls_key=settings.get("tls_key", ""),
                tls_server_name=settings.get("tls_server_name", ""),
                token=settings.get("token", ""),
                keepalive=settings.get("keepalive") or Keepalive(),
                retry=settings.get("retry", DEFAULT_RETRY),
                extra_options=settings.get("options", ()),
            )
            self.channel = aio_channel(self._settings)
            self._owns_channel = True
        else:
            self.channel = target
            self._owns_channel = False
        self.timeout = timeout
        self.wait_for_ready = settings.get("wait_for_ready", False)

    async def close(self) -> None:
        """Close the channel, if this client made it."""
        if self._owns_channel:
            await self.channel.close()

    async def __aenter__(self: _C) -> _C:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _unary(
        self,
        method: Callable[..., Awaitable[T]],
        request: Any,
        timeout: float | None,
        wait_for_ready: bool | None,
    ) -> T:
        try:
            return await method(
                request,
                timeout=self.timeout if timeout is None else timeout,
                wait_for_ready=self.wait_for_ready if wait_for_ready is None else wait_for_ready,
            )
        except aio.AioRpcError as exc:
            raise decode(exc) from exc


_C = TypeVar("_C", bound=_Client)


class MonitorClient(_Client, LogCalls, LeaseCalls):
    """Every MonitorService call, returning the protobuf messages; failures raise the typed
    errors of ``stepflow_client`` (``NotFound``, ``StatusConflict``, ``VersionConflict``…).
    ``timeout`` (seconds) is each call's default deadline; every method takes its own too."""

    def __init__(self, target: str | aio.Channel, **settings: Unpack[ClientSettings]) -> None:
        super().__init__(target, **settings)
        self.stub = m_grpc.MonitorServiceStub(self.channel)

    async def create_job(
        self,
        *,
        kind: r.KindLike,
        name: str,
        parent_id: str = "",
        type: str = "",
        metadata: Mapping[str, Any] | None = None,
        job_timeout: float | str | timedelta | None = None,
        request_id: str = "",
        owner: str = "",
        definition: Mapping[str, Any] | None = None,
        instance: str = "",
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
    ) -> job_pb2.Job:
        """Create a manager, step or child (idempotent by ``request_id``); ``job_timeout`` is
        the job's own deadline from now, ``timeout`` the call's. Without a ``request_id`` one
        is made for the call, so the client's retry after a lost answer returns the job the
        first attempt created, never a second one."""
        request = r.create_job(
            kind=kind,
            name=name,
            parent_id=parent_id,
            type=type,
            metadata=metadata,
            timeout=job_timeout,
            request_id=request_id or r.new_request_id(),
            owner=owner,
            definition=definition,
            instance=instance,
        )
        resp: m.CreateJobResponse = await self._unary(
            self.stub.CreateJob, request, timeout, wait_for_ready
        )
        return resp.job

    async def get_job(
        self,
        job_id: str,
        *,
        include_definition: bool = False,
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
    ) -> job_pb2.Job:
        request = m.GetJobRequest(job_id=job_id, include_definition=include_definition)
        resp: m.GetJobResponse = await self._unary(
            self.stub.GetJob, request, timeout, wait_for_ready
        )
        return resp.job

    async def list_jobs(
        self,
        *,
        parent_id: str = "",
        manager_id: str = "",
        kind: r.KindLike | None = None,
        status: r.StatusLike | None = None,
        owner: str = "",
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
    ) -> m.ListJobsResponse:
        """One page (newest first); ``iter_jobs`` walks them all."""
        request = r.list_jobs(
            parent_id=parent_id,
            manager_id=manager_id,
            kind=kind,
            status=status,
            owner=owner,
            created_after=created_after,
            created_before=created_before,
            page_size=page_size,
            page_token=page_token,
        )
        resp: m.ListJobsResponse = await self._unary(
            self.stub.ListJobs, request, timeout, wait_for_ready
        )
        return resp

    async def iter_jobs(self, **filters: Any) -> AsyncIterator[job_pb2.Job]:
        """Every job ``list_jobs(**filters)`` matches, page after page."""
        token = ""
        while True:
            page = await self.list_jobs(**filters, page_token=token)
            for job in page.jobs:
                yield job
            token = page.next_page_token
            if not token:
                return

    async def update_job_status(
        self,
        job_id: str,
        status: r.StatusLike,
        *,
        error: str = "",
        end_reason: str = "",
        owner: str = "",
        instance: str = "",
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
    ) -> job_pb2.Job:
        """Move a job forward (a status it already has is a no-op; backwards or out of a
        terminal status raises StatusConflict). ``cancelled`` cancels everything under it.
        ``owner`` and ``instance`` fence the write (an orchestrator's)."""
        request = r.update_job_status(
            job_id, status, error=error, end_reason=end_reason, owner=owner, instance=instance
        )
        resp: m.UpdateJobStatusResponse = await self._unary(
            self.stub.UpdateJobStatus, request, timeout, wait_for_ready
        )
        return resp.job

    async def cancel_job(
        self, job_id: str, *, reason: str = "", timeout: float | None = None
    ) -> job_pb2.Job:
        """Cancel a job and everything under it (UpdateJobStatus ``cancelled``)."""
        return await self.update_job_status(job_id, "cancelled", error=reason, timeout=timeout)

    async def update_job_metadata(
        self,
        job_id: str,
        metadata: Mapping[str, Any],
        *,
        expected_version: int | None = None,
        owner: str = "",
        instance: str = "",
        request_id: str = "",
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
    ) -> job_pb2.Job:
        """Shallow-merge ``metadata`` (None deletes a key); with ``expected_version``, raises
        VersionConflict if the job moved on since that version. The write is keyed by
        ``request_id`` (one is made when none is given): a retry after a lost answer is not
        applied twice, and an ``expected_version`` write it finds applied is answered as
        written."""
        request = r.update_job_metadata(
            job_id,
            metadata,
            expected_version=expected_version,
            owner=owner,
            instance=instance,
            request_id=request_id,
        )
        resp: m.UpdateJobMetadataResponse = await self._unary(
            self.stub.UpdateJobMetadata, request, timeout, wait_for_ready
        )
        return resp.job

    async def update_step_stat_in_manager(
        self,
        manager_id: str,
        step_id: str,
        status: r.StatusLike,
        *,
        owner: str = "",
        instance: str = "",
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
    ) -> m.UpdateStepStatInManagerResponse:
        """One step's status in the manager's ``step_stats``; ``owner`` (and ``instance``)
        fence it: refused unless that orchestrator still owns the manager."""
        request = m.UpdateStepStatInManagerRequest(
            manager_id=manager_id,
            step_id=step_id,
            status=r.status_pb(status),
            owner=owner,
            instance=instance,
        )
        resp: m.UpdateStepStatInManagerResponse = await self._unary(
            self.stub.UpdateStepStatInManager, request, timeout, wait_for_ready
        )
        return resp

    async def update_metadata(
        self,
        job_id: str,
        fn: r.MetadataFn,
        *,
        attempts: int = r.UPDATE_METADATA_ATTEMPTS,
        owner: str = "",
        timeout: float | None = None,
    ) -> job_pb2.Job:
        """Read-modify-write of a job's metadata without losing anyone's update: ``fn`` gets
        a copy of the metadata (a plain dict) and returns the new one (or changes it in place
        and returns None); the changed keys are written with ``expected_version``, and on a
        version conflict the job is read and ``fn`` applied again, up to ``attempts`` times
        (then VersionConflict). Returns the job as written (as read, if ``fn`` changed
        nothing). ``fn`` may run more than once: it must only compute. A write whose answer
        was lost with its connection is retried under the same key, so it is applied once."""
        for attempt in range(attempts):
            job = await self.get_job(job_id, timeout=timeout)
            before = r.metadata_of(job)
            patch = r.metadata_patch(before, r.apply(fn, copy.deepcopy(before)))
            if not patch:
                return job
            try:
                return await self.update_job_metadata(
                    job_id, patch, expected_version=job.version, owner=owner, timeout=timeout
                )
            except VersionConflict:
                if attempt + 1 >= attempts:
                    raise
                await asyncio.sleep(r.backoff(attempt))
        raise ValueError("attempts must be at least 1")

    async def watch_job(
        self, job_id: str, *, after_change_seq: int = 0, wait_for_ready: bool | None = None
    ) -> AsyncIterator[job_pb2.Job]:
        """One WatchJob stream as it comes: it breaks when the connection does (``watch``
        resumes instead)."""
        call = self.stub.WatchJob(
            m.WatchJobRequest(job_id=job_id, after_change_seq=after_change_seq),
            wait_for_ready=self.wait_for_ready if wait_for_ready is None else wait_for_ready,
        )
        try:
            async for resp in call:
                yield resp.job
        except aio.AioRpcError as exc:
            raise decode(exc) from exc
        finally:
            call.cancel()

    async def watch(
        self,
        job_id: str,
        *,
        after_change_seq: int = 0,
        reconnect_for: float | None = None,
    ) -> AsyncIterator[job_pb2.Job]:
        """The job's states until it is terminal (that state included). A broken stream (the
        monitor restarting, the network) is resumed from the last ``change_seq`` seen, with
        backoff, so no state is shown twice and the latest one always arrives. Gives up after
        ``reconnect_for`` seconds without the monitor (None: never)."""
        seen = after_change_seq
        outage = r.Outage(reconnect_for)
        while True:
            call = self.stub.WatchJob(
                m.WatchJobRequest(job_id=job_id, after_change_seq=seen), wait_for_ready=True
            )
            try:
                async for resp in call:
                    outage.delivered()
                    seen = resp.job.change_seq
                    yield resp.job
                    if r.is_terminal(resp.job):
                        return
                # The stream ended without a terminal state: the job may have ended at a
                # change_seq already seen, else subscribe again.
                job = await self.get_job(job_id)
                if r.is_terminal(job):
                    if job.change_seq > seen:
                        yield job
                    return
            except aio.AioRpcError as exc:
                if outage.gives_up(exc.code()):
                    raise decode(exc) from exc
            finally:
                call.cancel()
            await asyncio.sleep(outage.next_delay())

    def events(self, **options: Any) -> ChildEventEmitter:
        """A batched, acknowledged, resending child-event stream (StreamChildEvents) on this
        client's channel; ``options`` are :class:`ChildEventEmitter`'s."""
        return ChildEventEmitter(self.channel, **options)
