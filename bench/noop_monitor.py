"""A no-op MonitorService for the baselines: the cost of gRPC and Python without storage.

``StreamChildEvents`` only parses each batch (grpc deserialises it) and acknowledges it at
once, storing nothing. The job RPCs the orchestrator needs (CreateJob, GetJob, ListJobs,
UpdateJobStatus, UpdateJobMetadata, WatchJob, Heartbeat) keep jobs in memory, minimally: no
rules, no step_stats bookkeeping, a shallow metadata merge. It runs as its own process, like
the real monitor, so a baseline and a real figure share the same process layout.

    python bench/noop_monitor.py --port 50061
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import sys
import uuid
from collections.abc import AsyncIterator

from common import CHANNEL_OPTIONS
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from stepflow_common.proto_status import TERMINAL_PB as TERMINAL
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc


class NoopMonitor(m_grpc.MonitorServiceServicer):
    def __init__(self) -> None:
        self.jobs: dict[str, job_pb2.Job] = {}
        self.by_request: dict[str, str] = {}
        self.changed: dict[str, asyncio.Event] = {}
        self.seq = itertools.count(1)
        self.events = 0
        self.batches = 0

    def _touch(self, job: job_pb2.Job, *, version: bool = True) -> None:
        if version:
            job.version += 1
        job.change_seq = next(self.seq)
        event = self.changed.pop(job.id, None)
        if event is not None:
            event.set()

    async def _job(self, job_id: str, context: aio.ServicerContext) -> job_pb2.Job:
        job = self.jobs.get(job_id)
        if job is None:
            from grpc import StatusCode

            await context.abort(StatusCode.NOT_FOUND, f"job {job_id} not found")
        assert job is not None
        return job

    async def CreateJob(self, request, context):  # type: ignore[no-untyped-def]
        if request.request_id and request.request_id in self.by_request:
            return m.CreateJobResponse(job=self.jobs[self.by_request[request.request_id]])
        job_id = uuid.uuid4().hex
        parent = self.jobs.get(request.parent_id) if request.parent_id else None
        job = job_pb2.Job(
            id=job_id,
            kind=request.kind,
            parent_id=request.parent_id,
            manager_id=parent.manager_id if parent is not None else job_id,
            name=request.name,
            type=request.type,
            status=job_pb2.JOB_STATUS_PENDING,
            version=1,
            change_seq=next(self.seq),
            owner=request.owner if parent is None else parent.owner,
        )
        job.metadata.CopyFrom(request.metadata)
        job.created_at.GetCurrentTime()
        self.jobs[job_id] = job
        if request.request_id:
            self.by_request[request.request_id] = job_id
        return m.CreateJobResponse(job=job)

    async def GetJob(self, request, context):  # type: ignore[no-untyped-def]
        return m.GetJobResponse(job=await self._job(request.job_id, context))

    async def ListJobs(self, request, context):  # type: ignore[no-untyped-def]
        # The orchestrator lists its unfinished jobs on start; this monitor starts empty.
        return m.ListJobsResponse()

    async def UpdateJobStatus(self, request, context):  # type: ignore[no-untyped-def]
        job = await self._job(request.job_id, context)
        if job.status != request.status and job.status not in TERMINAL:
            job.status = request.status
            if request.error:
                job.error = request.error
            if request.end_reason:
                job.end_reason = request.end_reason
            self._touch(job)
        return m.UpdateJobStatusResponse(job=job)

    async def UpdateJobMetadata(self, request, context):  # type: ignore[no-untyped-def]
        job = await self._job(request.job_id, context)
        for key, value in request.metadata.fields.items():
            if value.WhichOneof("kind") == "null_value":
                job.metadata.fields.pop(key, None)
            else:
                job.metadata.fields[key].CopyFrom(value)
        self._touch(job)
        return m.UpdateJobMetadataResponse(job=job)

    async def Heartbeat(self, request, context):  # type: ignore[no-untyped-def]
        # No other orchestrator and no lease expiry here: the caller owns what it created.
        resp = m.HeartbeatResponse(
            owned_job_ids=[
                job.id
                for job in self.jobs.values()
                if job.kind == job_pb2.JOB_KIND_MANAGER
                and job.owner == request.owner
                and job.status not in TERMINAL
            ]
        )
        resp.lease_expires_at.GetCurrentTime()
        return resp

    async def ReleaseLease(self, request, context):  # type: ignore[no-untyped-def]
        return m.ReleaseLeaseResponse()

    async def UpdateStepStatInManager(self, request, context):  # type: ignore[no-untyped-def]
        job = await self._job(request.manager_id, context)
        return m.UpdateStepStatInManagerResponse(version=job.version)

    async def WatchJob(self, request, context):  # type: ignore[no-untyped-def]
        job = await self._job(request.job_id, context)
        last = request.after_change_seq
        while True:
            if job.change_seq > last:
                last = job.change_seq
                yield m.WatchJobResponse(job=job)
                if job.status in TERMINAL:
                    return
            event = self.changed.setdefault(job.id, asyncio.Event())
            await event.wait()

    async def StreamChildEvents(
        self, request_iterator: AsyncIterator[m.StreamChildEventsRequest], context
    ) -> AsyncIterator[m.StreamChildEventsResponse]:  # type: ignore[no-untyped-def]
        async for request in request_iterator:
            self.events += len(request.events)
            self.batches += 1
            yield m.StreamChildEventsResponse(batch_id=request.batch_id)


async def serve(port: int) -> None:
    server = aio.server(options=CHANNEL_OPTIONS)
    m_grpc.add_MonitorServiceServicer_to_server(NoopMonitor(), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(serve(parser.parse_args().port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
