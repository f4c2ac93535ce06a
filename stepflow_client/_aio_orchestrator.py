"""The asyncio ``OrchestratorClient``. The blocking twin in ``_sync_orchestrator`` is generated
from this file (``scripts/gen_sync_client.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, Unpack

from grpc import aio

from stepflow_client import _requests as r
from stepflow_client._aio import MonitorClient, _Client
from stepflow_client._channel import ClientSettings
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import orchestrator_service_pb2 as o
from stepflow_proto.v1 import orchestrator_service_pb2_grpc as o_grpc


class OrchestratorClient(_Client):
    """OrchestratorService calls: submit a job, cancel one, list the step types; ``follow``
    shows a job's states through ``monitor`` (a MonitorClient)."""

    def __init__(
        self,
        target: str | aio.Channel,
        *,
        monitor: MonitorClient | None = None,
        **settings: Unpack[ClientSettings],
    ) -> None:
        super().__init__(target, **settings)
        self.stub = o_grpc.OrchestratorServiceStub(self.channel)
        self.monitor = monitor

    async def submit(
        self,
        definition: o.JobDefinition | Mapping[str, Any],
        *,
        request_id: str = "",
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
    ) -> str:
        """Start a job; returns its manager id. ``definition`` is a JobDefinition or the job
        file's structure (a dict as TOML or JSON gives it). A ``request_id`` (one is made when
        none is given) makes a retried submit return the same job."""
        request = o.SubmitJobRequest(
            definition=r.job_definition(definition), request_id=request_id or r.new_request_id()
        )
        resp: o.SubmitJobResponse = await self._unary(
            self.stub.SubmitJob, request, timeout, wait_for_ready
        )
        return resp.manager_id

    async def cancel(
        self,
        job_id: str,
        *,
        reason: str = "",
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
    ) -> job_pb2.Job:
        """Cancel a job (manager, step or child) and everything under it; returns the job."""
        resp: o.CancelJobResponse = await self._unary(
            self.stub.CancelJob,
            o.CancelJobRequest(job_id=job_id, reason=reason),
            timeout,
            wait_for_ready,
        )
        return resp.job

    async def list_workers(
        self, *, timeout: float | None = None, wait_for_ready: bool | None = None
    ) -> list[o.WorkerInfo]:
        resp: o.ListWorkersResponse = await self._unary(
            self.stub.ListWorkers, o.ListWorkersRequest(), timeout, wait_for_ready
        )
        return list(resp.workers)

    async def follow(self, job_id: str, *, after_change_seq: int = 0) -> AsyncIterator[job_pb2.Job]:
        """The job's states until it ends, from the monitor (``MonitorClient.watch``)."""
        if self.monitor is None:
            raise ValueError("follow needs the monitor: OrchestratorClient(..., monitor=...)")
        async for job in self.monitor.watch(job_id, after_change_seq=after_change_seq):
            yield job
