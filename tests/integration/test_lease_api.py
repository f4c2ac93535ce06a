"""Heartbeat, ReleaseLease, the owner fences and the stored definition through a real
MonitorService (gRPC, SQLite and PostgreSQL); the lease and orphan deadlines fired by the
monitor's own timer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from monitor_svc.lifecycle import StepTimers
from stepflow_common.errors import Fenced
from stepflow_common.grpc_errors import from_rpc_error
from stepflow_proto.v1 import job_pb2 as S
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from tests.conftest import code_of
from tests.helpers import struct
from tests.jobs import get
from tests.process_helpers import TERMINAL, wait_job

pytestmark = pytest.mark.timeout(60)

Stub = m_grpc.MonitorServiceStub
ORPHAN_TIMEOUT_S = 1.5
WAIT_S = 30.0
DEFINITION = {
    "name": "nightly",
    "steps": [{"name": "fetch", "type": "simulate", "retries": 2, "on_interrupt": "fail"}],
}


@pytest.fixture
def timers() -> StepTimers:
    return StepTimers(default_wait_timeout_s=30.0, grace_period_s=0.5, orphan_timeout_s=60.0)


async def heartbeat(
    stub: Stub, owner: str, *, instance: str = "i1", lease_s: float = 30.0, max_adopt: int = 0
) -> m.HeartbeatResponse:
    request = m.HeartbeatRequest(owner=owner, instance=instance, max_adopt=max_adopt)
    request.lease.FromTimedelta(timedelta(seconds=lease_s))
    return await stub.Heartbeat(request)


async def create_manager(stub: Stub, owner: str, **more: object) -> S.Job:
    request = m.CreateJobRequest(kind=S.JOB_KIND_MANAGER, name="job", owner=owner, **more)  # type: ignore[arg-type]
    return (await stub.CreateJob(request)).job


async def running_step(stub: Stub, manager_id: str, owner: str) -> S.Job:
    step = (
        await stub.CreateJob(
            m.CreateJobRequest(
                kind=S.JOB_KIND_STEP,
                parent_id=manager_id,
                name="fetch",
                metadata=struct({"step_index": 0}),
                owner=owner,
            )
        )
    ).job
    return (
        await stub.UpdateJobStatus(
            m.UpdateJobStatusRequest(job_id=step.id, status=S.JOB_STATUS_RUNNING, owner=owner)
        )
    ).job


async def send(stub: Stub, events: list[S.ChildEvent], owner: str = "") -> list[m.RejectedEvent]:
    async def one() -> AsyncIterator[m.StreamChildEventsRequest]:
        yield m.StreamChildEventsRequest(batch_id=1, events=events, owner=owner)

    acks = [ack async for ack in stub.StreamChildEvents(one())]
    assert [a.batch_id for a in acks] == [1]
    return list(acks[0].rejected)


def event(step_id: str, child_id: str, kind: int, attempt: int = 0) -> S.ChildEvent:
    return S.ChildEvent(
        event_id=f"{child_id}-{kind}-{attempt}",
        step_id=step_id,
        child_id=child_id,
        kind=kind,
        attempt=attempt,
    )


async def test_heartbeat_answers_the_lease_and_the_owned_jobs(stub: Stub) -> None:
    jobs = [(await create_manager(stub, "orch-a")).id for _ in range(2)]
    before = datetime.now(UTC)
    first = await heartbeat(stub, "orch-a", lease_s=30)
    expires = first.lease_expires_at.ToDatetime(tzinfo=UTC)
    assert before + timedelta(seconds=29) < expires < datetime.now(UTC) + timedelta(seconds=31)
    assert list(first.owned_job_ids) == jobs
    assert (list(first.adopted_job_ids), list(first.resumed_job_ids)) == ([], [])

    restarted = await heartbeat(stub, "orch-a", instance="i2")
    assert list(restarted.resumed_job_ids) == jobs


@pytest.mark.parametrize(
    "request_",
    [
        m.HeartbeatRequest(instance="i1"),  # no owner
        m.HeartbeatRequest(owner="orch-a"),  # no lease
        m.HeartbeatRequest(owner="x" * 129),
    ],
)
async def test_heartbeat_refuses_bad_requests(stub: Stub, request_: m.HeartbeatRequest) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Heartbeat(request_)
    assert code_of(caught.value) == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_short_lease_is_refused(stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await heartbeat(stub, "orch-a", lease_s=0.2)
    assert code_of(caught.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert "lease must be between" in (caught.value.details() or "")


async def test_release_orphans_and_another_orchestrator_adopts(stub: Stub) -> None:
    await heartbeat(stub, "orch-a")
    job = await create_manager(stub, "orch-a")
    step = await running_step(stub, job.id, "orch-a")
    assert await send(stub, [event(step.id, "kid", S.CHILD_EVENT_KIND_RUNNING)], "orch-a") == []

    released = await stub.ReleaseLease(m.ReleaseLeaseRequest(owner="orch-a"))
    assert list(released.orphaned_job_ids) == [job.id]
    assert (await get(stub, job.id)).owner == ""
    unknown = await stub.ReleaseLease(m.ReleaseLeaseRequest(owner="nobody"))
    assert list(unknown.orphaned_job_ids) == []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ReleaseLease(m.ReleaseLeaseRequest())
    assert code_of(caught.value) == grpc.StatusCode.INVALID_ARGUMENT

    adopted = await heartbeat(stub, "orch-b", max_adopt=4)
    assert (list(adopted.adopted_job_ids), list(adopted.owned_job_ids)) == ([job.id], [job.id])
    assert (await get(stub, job.id)).owner == "orch-b"
    assert (await get(stub, step.id)).interruptions == 1
    kid = await get(stub, "kid")
    assert (kid.interruptions, kid.status) == (1, S.JOB_STATUS_RUNNING)


async def test_a_previous_owner_is_fenced(stub: Stub) -> None:
    await heartbeat(stub, "orch-a")
    job = await create_manager(stub, "orch-a")
    step = await running_step(stub, job.id, "orch-a")
    assert await send(stub, [event(step.id, "kid", S.CHILD_EVENT_KIND_RUNNING)], "orch-a") == []
    await stub.ReleaseLease(m.ReleaseLeaseRequest(owner="orch-a"))
    await heartbeat(stub, "orch-b", max_adopt=1)

    fenced = f"fenced: job {job.id} is owned by orch-b"
    writes = [
        stub.UpdateJobStatus(
            m.UpdateJobStatusRequest(job_id=step.id, status=S.JOB_STATUS_FAILED, owner="orch-a")
        ),
        stub.UpdateJobMetadata(
            m.UpdateJobMetadataRequest(job_id=job.id, metadata=struct({"x": 1}), owner="orch-a")
        ),
        stub.CreateJob(
            m.CreateJobRequest(kind=S.JOB_KIND_STEP, parent_id=job.id, name="s", owner="orch-a")
        ),
    ]
    for write in writes:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await write
        assert code_of(caught.value) == grpc.StatusCode.FAILED_PRECONDITION
        assert caught.value.details() == fenced
        # A client tells a fence from other refusals by the error's reason, not its text.
        assert isinstance(from_rpc_error(caught.value), Fenced)

    rejected = await send(stub, [event(step.id, "kid", S.CHILD_EVENT_KIND_COMPLETED)], "orch-a")
    assert [r.reason for r in rejected] == [f"fenced: job {job.id} was adopted by orch-b"]
    assert (await get(stub, "kid")).status == S.JOB_STATUS_RUNNING

    # The new owner, and writers that name no owner, are not fenced.
    assert await send(stub, [event(step.id, "kid", S.CHILD_EVENT_KIND_COMPLETED)], "orch-b") == []
    await stub.UpdateJobMetadata(
        m.UpdateJobMetadataRequest(job_id=job.id, metadata=struct({"x": 1}))
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.UpdateJobStatus(
            m.UpdateJobStatusRequest(
                job_id=step.id, status=S.JOB_STATUS_FAILED, end_reason="orchestrator_lost"
            )
        )
    assert code_of(caught.value) == grpc.StatusCode.INVALID_ARGUMENT
    ended = await stub.UpdateJobStatus(
        m.UpdateJobStatusRequest(
            job_id=step.id,
            status=S.JOB_STATUS_FAILED,
            end_reason="orchestrator_lost",
            owner="orch-b",
        )
    )
    assert ended.job.end_reason == "orchestrator_lost"


async def test_the_definition_is_returned_only_when_asked_for(stub: Stub) -> None:
    job = await create_manager(stub, "orch-a", definition=struct(DEFINITION))
    assert not job.HasField("definition")
    assert not (await get(stub, job.id)).HasField("definition")
    shown = await get(stub, job.id, include_definition=True)
    assert dict(shown.definition) == {
        "name": "nightly",
        "steps": [{"name": "fetch", "type": "simulate", "retries": 2.0, "on_interrupt": "fail"}],
    }
    listed = await stub.ListJobs(m.ListJobsRequest(owner="orch-a"))
    assert [j.id for j in listed.jobs] == [job.id]
    assert not listed.jobs[0].HasField("definition")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateJob(
            m.CreateJobRequest(
                kind=S.JOB_KIND_STEP, parent_id=job.id, name="s", definition=struct(DEFINITION)
            )
        )
    assert code_of(caught.value) == grpc.StatusCode.INVALID_ARGUMENT


async def test_attempts_show_on_the_child_and_the_step(stub: Stub) -> None:
    job = await create_manager(stub, "orch-a")
    step = await running_step(stub, job.id, "orch-a")
    assert step.attempt == 1
    events = [
        event(step.id, "kid", S.CHILD_EVENT_KIND_RUNNING),
        event(step.id, "kid", S.CHILD_EVENT_KIND_RUNNING, attempt=2),
        event(step.id, "kid", S.CHILD_EVENT_KIND_RUNNING, attempt=3),
        event(step.id, "kid", S.CHILD_EVENT_KIND_COMPLETED, attempt=3),
    ]
    assert await send(stub, events, "orch-a") == []
    kid = await get(stub, "kid")
    assert (kid.attempt, kid.status) == (3, S.JOB_STATUS_COMPLETED)
    assert (await get(stub, step.id)).attempt == 1  # the step ran once


class TestTimers:
    """The monitor's own timer expires the lease and fails the orphan."""

    @pytest.fixture
    def timers(self) -> StepTimers:
        return StepTimers(
            default_wait_timeout_s=30.0, grace_period_s=0.5, orphan_timeout_s=ORPHAN_TIMEOUT_S
        )

    async def test_an_expired_lease_orphans_then_the_orphan_fails(self, stub: Stub) -> None:
        await heartbeat(stub, "orch-a", lease_s=1.0)
        job = await create_manager(stub, "orch-a")
        step = await running_step(stub, job.id, "orch-a")

        orphaned = await wait_job(stub, job.id, lambda j: j.owner == "", WAIT_S)
        assert orphaned.status == S.JOB_STATUS_PENDING
        lost = await wait_job(stub, job.id, lambda j: j.status in TERMINAL, WAIT_S)
        assert (lost.status, lost.end_reason) == (S.JOB_STATUS_FAILED, "orchestrator_lost")
        assert lost.error == f"no orchestrator took the job over within {ORPHAN_TIMEOUT_S:g}s"
        assert (await get(stub, step.id)).status == S.JOB_STATUS_CANCELLED
