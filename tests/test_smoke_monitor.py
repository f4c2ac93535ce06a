from __future__ import annotations

from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from tests.helpers import entry, manager_with_steps, meta


async def test_step_status_reaches_step_stats(stub) -> None:
    manager, steps = await manager_with_steps(stub, 2)
    await stub.UpdateJobStatus(
        m.UpdateJobStatusRequest(job_id=steps[0].id, status=job_pb2.JOB_STATUS_RUNNING)
    )
    await stub.UpdateJobStatus(
        m.UpdateJobStatusRequest(job_id=steps[0].id, status=job_pb2.JOB_STATUS_COMPLETED)
    )
    got = (await stub.GetJob(m.GetJobRequest(job_id=manager.id))).job
    assert entry(got, steps[0].id)["status"] == "completed"
    assert meta(got)["current_step_status"] == "completed"
    assert meta(got)["completed_steps"] == 1
    assert got.step_stats[0].status == job_pb2.JOB_STATUS_COMPLETED
