"""OrchestratorService: thin handlers over ``Orchestrator``."""

from __future__ import annotations

from grpc import aio

from orchestrator_svc import definitions
from orchestrator_svc.convert import job_to_pb
from orchestrator_svc.orchestrator import Orchestrator
from stepflow_common.errors import InvalidArgument
from stepflow_proto.v1 import orchestrator_service_pb2 as o
from stepflow_proto.v1 import orchestrator_service_pb2_grpc as o_grpc

MAX_REQUEST_ID = 128


class OrchestratorServicer(o_grpc.OrchestratorServiceServicer):
    def __init__(self, orchestrator: Orchestrator) -> None:
        self._orchestrator = orchestrator

    async def SubmitJob(
        self, request: o.SubmitJobRequest, context: aio.ServicerContext
    ) -> o.SubmitJobResponse:
        self._orchestrator.require_connected()
        if not request.HasField("definition"):
            raise InvalidArgument("definition is required")
        if len(request.request_id) > MAX_REQUEST_ID:
            raise InvalidArgument(f"request_id is longer than {MAX_REQUEST_ID} characters")
        spec = definitions.from_proto(request.definition, workers=self._orchestrator.workers)
        manager_id = await self._orchestrator.submit(spec, request.request_id)
        return o.SubmitJobResponse(manager_id=manager_id)

    async def CancelJob(
        self, request: o.CancelJobRequest, context: aio.ServicerContext
    ) -> o.CancelJobResponse:
        if not request.job_id:
            raise InvalidArgument("job_id is required")
        self._orchestrator.require_connected()
        job = await self._orchestrator.cancel(request.job_id, request.reason)
        return o.CancelJobResponse(job=job_to_pb(job))

    async def ListWorkers(
        self, request: o.ListWorkersRequest, context: aio.ServicerContext
    ) -> o.ListWorkersResponse:
        return o.ListWorkersResponse(
            workers=[
                o.WorkerInfo(
                    type=w.type, description=w.description, spawns_children=w.spawns_children
                )
                for w in sorted(self._orchestrator.workers.values(), key=lambda w: w.type)
            ]
        )
