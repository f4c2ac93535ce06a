"""The blocking clients (``stepflow_client``): ``_aio_orchestrator``'s, method for method.

Generated from ``_aio_orchestrator.py`` by ``scripts/gen_sync_client.py``: never edit; change
``_aio_orchestrator.py`` and run ``make gen``."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Unpack

import grpc

from stepflow_client import _requests as r
from stepflow_client._channel import ClientSettings
from stepflow_client._sync import MonitorClient, _Client
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import orchestrator_service_pb2 as o
from stepflow_proto.v1 import orchestrator_service_pb2_grpc as o_grpc


class OrchestratorClient(_Client):
    """OrchestratorService calls: submit a job, cancel one, list the step types; ``follow``
    shows a job's states through ``monitor`` (a MonitorClient)."""

    def __init__(
        self,
        target: str | grpc.Channel,
        *,
        monitor: MonitorClient | None = None,
        **settings: Unpack[ClientSettings],
    ) -> None:
        super().__init__(target, **settings)
        self.stub = o_grpc.OrchestratorServiceStub(self.channel)
        self.monitor = monitor

    def submit(
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
        resp: o.SubmitJobResponse = self._unary(
            self.stub.SubmitJob, request, timeout, wait_for_ready
        )
        return resp.manager_id

    def cancel(
        self,
        job_id: str,
        *,
        reason: str = "",
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
    ) -> job_pb2.Job:
        """Cancel a job (manager, step or child) and everything under it; returns the job."""
        resp: o.CancelJobResponse = self._unary(
            self.stub.CancelJob,
            o.CancelJobRequest(job_id=job_id, reason=reason),
            timeout,
            wait_for_ready,
        )
        return resp.job

    def list_workers(
        self, *, timeout: float | None = None, wait_for_ready: bool | None = None
    ) -> list[o.WorkerInfo]:
        resp: o.ListWorkersResponse = self._unary(
            self.stub.ListWorkers, o.ListWorkersRequest(), timeout, wait_for_ready
        )
        return list(resp.workers)

    def follow(self, job_id: str, *, after_change_seq: int = 0) -> Iterator[job_pb2.Job]:
        """The job's states until it ends, from the monitor (``MonitorClient.watch``)."""
        if self.monitor is None:
            raise ValueError("follow needs the monitor: OrchestratorClient(..., monitor=...)")
        yield from self.monitor.watch(job_id, after_change_seq=after_change_seq)
