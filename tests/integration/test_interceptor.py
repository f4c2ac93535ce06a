"""The server interceptor, through a real monitor: every call shape binds ``rpc`` and the job
its request names to the log lines written while it runs, and every call is counted in the
RPC metric with the code it ended with (a stream's abort and a client's cancel included)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
import structlog
from structlog.testing import capture_logs

from monitor_svc.convert import MAX_EVENTS_PER_BATCH
from stepflow_common import metrics
from stepflow_common.grpc_errors import job_named_by
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from tests.helpers import create_manager, manager_with_steps
from tests.stream_helpers import created, send_batches

pytestmark = pytest.mark.timeout(60)

SERVICE = "stepflow.v1.MonitorService"
MISSING = "no-such-job"
POLL_S = 0.02
POLLS = 1000  # at most 20 s for the server to see a cancelled call end


def handled(method: str, code: str) -> float:
    """The RPC counter's value for one method and code (0 before its first call)."""
    for family in metrics.RPC_HANDLED.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels == {
                "service": SERVICE,
                "method": method,
                "code": code,
            }:
                return sample.value
    return 0.0


def refusals(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "rpc refused"]


async def _update_status(stub: m_grpc.MonitorServiceStub) -> None:
    await stub.UpdateJobStatus(
        m.UpdateJobStatusRequest(job_id=MISSING, status=job_pb2.JOB_STATUS_RUNNING)
    )


async def _create_step(stub: m_grpc.MonitorServiceStub) -> None:
    await stub.CreateJob(
        m.CreateJobRequest(kind=job_pb2.JOB_KIND_STEP, parent_id=MISSING, name="s")
    )


async def _step_stat(stub: m_grpc.MonitorServiceStub) -> None:
    await stub.UpdateStepStatInManager(
        m.UpdateStepStatInManagerRequest(
            manager_id=MISSING, step_id="s", status=job_pb2.JOB_STATUS_RUNNING
        )
    )


async def _watch(stub: m_grpc.MonitorServiceStub) -> None:
    async for _ in stub.WatchJob(m.WatchJobRequest(job_id=MISSING)):
        pass


@pytest.mark.parametrize(
    ("method", "call"),
    [
        ("UpdateJobStatus", _update_status),  # job_id
        ("CreateJob", _create_step),  # parent_id
        ("UpdateStepStatInManager", _step_stat),  # manager_id
        ("WatchJob", _watch),  # a server stream
    ],
)
async def test_a_failing_call_logs_its_rpc_and_job_and_is_counted(
    stub: m_grpc.MonitorServiceStub, method: str, call: Any
) -> None:
    before = handled(method, "NOT_FOUND")
    with (
        capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs,
        pytest.raises(grpc.aio.AioRpcError) as refused,
    ):
        await call(stub)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    (line,) = refusals(logs)
    assert line["rpc"] == f"/{SERVICE}/{method}"
    assert line["job_id"] == MISSING
    assert line["code"] == "NOT_FOUND"
    assert handled(method, "NOT_FOUND") == before + 1
    # The binding ends with the call: nothing leaks into the caller's (the test's) context.
    assert "rpc" not in structlog.contextvars.get_contextvars()


async def test_a_request_naming_no_well_formed_job_binds_none(
    stub: m_grpc.MonitorServiceStub,
) -> None:
    with (
        capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs,
        pytest.raises(grpc.aio.AioRpcError),
    ):
        await stub.GetJob(m.GetJobRequest(job_id="\n" + "x" * 10_000))
    (line,) = refusals(logs)
    assert line["rpc"] == f"/{SERVICE}/GetJob"
    assert "job_id" not in line
    assert job_named_by(m.ListJobsRequest(manager_id="m-1", parent_id="p-1")) == "m-1"
    assert job_named_by(m.StreamChildEventsRequest()) == ""


async def test_a_stream_the_handler_aborts_is_counted_with_its_code(
    stub: m_grpc.MonitorServiceStub,
) -> None:
    _manager, (step,) = await manager_with_steps(stub, 1)
    before = handled("StreamChildEvents", "RESOURCE_EXHAUSTED")
    events = [created(step.id, f"o{i}") for i in range(MAX_EVENTS_PER_BATCH + 1)]

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await send_batches(stub, [events])

    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert handled("StreamChildEvents", "RESOURCE_EXHAUSTED") == before + 1


async def test_a_watch_the_client_cancels_is_counted_cancelled(
    stub: m_grpc.MonitorServiceStub,
) -> None:
    manager = await create_manager(stub)
    before = handled("WatchJob", "CANCELLED")
    watch = stub.WatchJob(m.WatchJobRequest(job_id=manager.id))
    assert (await watch.read()).job.id == manager.id

    watch.cancel()

    for _ in range(POLLS):  # the server learns of the cancel asynchronously
        if handled("WatchJob", "CANCELLED") > before:
            break
        await asyncio.sleep(POLL_S)
    assert handled("WatchJob", "CANCELLED") == before + 1
