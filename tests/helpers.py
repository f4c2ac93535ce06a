"""Small builders shared by the integration tests (requests only; no rules live here)."""

from __future__ import annotations

from typing import Any

from google.protobuf import struct_pb2

from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(value)
    return s


async def create_manager(
    stub: m_grpc.MonitorServiceStub, name: str = "job", **meta: Any
) -> job_pb2.Job:
    resp = await stub.CreateJob(
        m.CreateJobRequest(kind=job_pb2.JOB_KIND_MANAGER, name=name, metadata=struct(meta))
    )
    return resp.job


async def create_step(
    stub: m_grpc.MonitorServiceStub,
    manager_id: str,
    index: int,
    name: str | None = None,
    type_: str = "simulate",
) -> job_pb2.Job:
    resp = await stub.CreateJob(
        m.CreateJobRequest(
            kind=job_pb2.JOB_KIND_STEP,
            parent_id=manager_id,
            name=name or f"step-{index}",
            type=type_,
            metadata=struct({"step_index": index}),
        )
    )
    return resp.job


async def manager_with_steps(
    stub: m_grpc.MonitorServiceStub, n: int, *, with_stats: bool = True
) -> tuple[job_pb2.Job, list[job_pb2.Job]]:
    """A manager, n steps, and (optionally) step_stats entries for each, as the orchestrator
    writes them, with the first step current."""
    manager = await create_manager(stub)
    steps = [await create_step(stub, manager.id, i) for i in range(n)]
    if with_stats:
        entries = [
            {
                "step_index": i,
                "step_id": s.id,
                "step_name": s.name,
                "step_type": s.type,
                "child_count": 0,
                "document_count": 0,
                "status": "pending",
                "error": "",
            }
            for i, s in enumerate(steps)
        ]
        await stub.UpdateJobMetadata(
            m.UpdateJobMetadataRequest(
                job_id=manager.id,
                metadata=struct(
                    {
                        "step_stats": entries,
                        "current_step": 1,
                        "current_step_id": steps[0].id,
                        "current_step_name": steps[0].name,
                        "current_step_type": steps[0].type,
                        "current_step_status": "pending",
                        "total_steps": n,
                    }
                ),
            )
        )
    got = await stub.GetJob(m.GetJobRequest(job_id=manager.id))
    return got.job, steps


def meta(job: job_pb2.Job) -> dict[str, Any]:
    from google.protobuf import json_format

    return json_format.MessageToDict(job.metadata)


def entry(job: job_pb2.Job, step_id: str) -> dict[str, Any]:
    return next(e for e in meta(job)["step_stats"] if e["step_id"] == step_id)
