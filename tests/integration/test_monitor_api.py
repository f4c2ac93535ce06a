"""The monitor's unary API against a real server and a real channel (design §2 and §4).

Every rule of design §2 that a unary RPC exposes has a test here; the child-event stream, step
deadlines and WatchJob are tested elsewhere. Each test gets a fresh database (SQLite and
PostgreSQL through the ``database_url`` fixture).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from grpc import aio

from stepflow_common.errors import StatusConflict
from stepflow_common.grpc_errors import from_rpc_error
from stepflow_common.proto_status import STATUS_TO_PB, TERMINAL_PB
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from tests.helpers import create_manager, create_step, entry, manager_with_steps, meta, struct
from tests.jobs import get

pytestmark = pytest.mark.timeout(30)

S = job_pb2
C = grpc.StatusCode
Stub = m_grpc.MonitorServiceStub
RPC_TIMEOUT_S = 10.0
TERMINAL = sorted(TERMINAL_PB)
STATUS_NAME = {pb: status.value for status, pb in STATUS_TO_PB.items()}


# -- small call wrappers ----------------------------------------------------------------------


async def set_status(stub: Stub, job_id: str, status: int, error: str = "") -> job_pb2.Job:
    req = m.UpdateJobStatusRequest(job_id=job_id, status=status, error=error)
    return (await stub.UpdateJobStatus(req, timeout=RPC_TIMEOUT_S)).job


async def update_meta(
    stub: Stub, job_id: str, patch: dict[str, Any], expected_version: int | None = None
) -> job_pb2.Job:
    req = m.UpdateJobMetadataRequest(job_id=job_id, metadata=struct(patch))
    if expected_version is not None:
        req.expected_version = expected_version
    return (await stub.UpdateJobMetadata(req, timeout=RPC_TIMEOUT_S)).job


async def step_stat(
    stub: Stub, manager_id: str, step_id: str, status: int
) -> m.UpdateStepStatInManagerResponse:
    req = m.UpdateStepStatInManagerRequest(manager_id=manager_id, step_id=step_id, status=status)
    return await stub.UpdateStepStatInManager(req, timeout=RPC_TIMEOUT_S)


async def create(stub: Stub, **fields: Any) -> job_pb2.Job:
    if "metadata" in fields:
        fields["metadata"] = struct(fields["metadata"])
    req = m.CreateJobRequest(**fields)
    return (await stub.CreateJob(req, timeout=RPC_TIMEOUT_S)).job


async def create_child(stub: Stub, step_id: str, name: str = "child") -> job_pb2.Job:
    return await create(stub, kind=S.JOB_KIND_CHILD, parent_id=step_id, name=name, type="t")


async def list_jobs(stub: Stub, **fields: Any) -> m.ListJobsResponse:
    return await stub.ListJobs(m.ListJobsRequest(**fields), timeout=RPC_TIMEOUT_S)


async def refused(call: Awaitable[Any]) -> grpc.StatusCode:
    """The status code a call fails with (it must fail)."""
    with pytest.raises(aio.AioRpcError) as info:
        await call
    return info.value.code()


async def all_jobs(stub: Stub) -> list[job_pb2.Job]:
    return list((await list_jobs(stub, page_size=1000)).jobs)


def snapshot(job: job_pb2.Job) -> tuple[Any, ...]:
    """What must not move when a call is refused (change_seq included)."""
    return (job.status, job.error, job.version, job.change_seq, meta(job))


def deep(levels: int, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(levels):
        value = [value]
    return value


# == CreateJob =================================================================================
async def test_create_manager_step_and_child_derive_parent_and_manager(stub: Stub) -> None:
    manager = await create(
        stub, kind=S.JOB_KIND_MANAGER, name="nightly", type="job", metadata={"a": "b"}
    )
    assert manager.kind == S.JOB_KIND_MANAGER
    assert manager.parent_id == ""
    assert manager.manager_id == manager.id
    assert manager.status == S.JOB_STATUS_PENDING
    assert (manager.name, manager.type, meta(manager)) == ("nightly", "job", {"a": "b"})
    assert manager.version == 1
    assert manager.HasField("created_at")
    assert not manager.HasField("finished_at")
    assert not manager.HasField("deadline")

    step = await create_step(stub, manager.id, 0, name="crawl", type_="simulate")
    assert (step.kind, step.parent_id, step.manager_id) == (S.JOB_KIND_STEP, manager.id, manager.id)
    assert (step.name, step.type) == ("crawl", "simulate")
    assert len(step.step_stats) == 0

    child = await create_child(stub, step.id)
    assert (child.kind, child.parent_id, child.manager_id) == (
        S.JOB_KIND_CHILD,
        step.id,
        manager.id,
    )
    assert child.status == S.JOB_STATUS_PENDING
    assert {j.id for j in await all_jobs(stub)} == {manager.id, step.id, child.id}
    assert (await get(stub, child.id)) == child


async def test_create_with_timeout_stores_an_absolute_deadline(stub: Stub) -> None:
    job = await create(
        stub, kind=S.JOB_KIND_MANAGER, name="j", timeout=duration_pb2.Duration(seconds=3600)
    )
    created = job.created_at.ToDatetime(tzinfo=UTC)
    deadline = job.deadline.ToDatetime(tzinfo=UTC)
    assert abs((deadline - created) - timedelta(seconds=3600)) < timedelta(seconds=1)


@pytest.mark.parametrize("seconds", [0, -5])
async def test_create_with_a_non_positive_timeout_is_invalid(stub: Stub, seconds: int) -> None:
    call = create(
        stub, kind=S.JOB_KIND_MANAGER, name="j", timeout=duration_pb2.Duration(seconds=seconds)
    )
    assert await refused(call) == C.INVALID_ARGUMENT
    assert await all_jobs(stub) == []


@pytest.mark.parametrize("kind", [S.JOB_KIND_UNSPECIFIED, 42])
async def test_create_without_a_valid_kind_is_invalid(stub: Stub, kind: int) -> None:
    assert await refused(create(stub, kind=kind, name="j")) == C.INVALID_ARGUMENT
    assert await all_jobs(stub) == []


async def test_create_is_idempotent_by_request_id(stub: Stub) -> None:
    first = await create(stub, kind=S.JOB_KIND_MANAGER, name="j", request_id="req-1")
    again = await create(stub, kind=S.JOB_KIND_MANAGER, name="j", request_id="req-1")
    assert again.id == first.id
    assert again.version == first.version
    step = await create(
        stub, kind=S.JOB_KIND_STEP, parent_id=first.id, name="s", request_id="req-2"
    )
    step_again = await create(
        stub, kind=S.JOB_KIND_STEP, parent_id=first.id, name="s", request_id="req-2"
    )
    assert step_again.id == step.id
    assert sorted(j.id for j in await all_jobs(stub)) == sorted([first.id, step.id])
    # Without a request_id there is no idempotency: two calls, two jobs.
    a = await create(stub, kind=S.JOB_KIND_MANAGER, name="same")
    b = await create(stub, kind=S.JOB_KIND_MANAGER, name="same")
    assert a.id != b.id


async def test_concurrent_retries_with_one_request_id_create_one_job(stub: Stub) -> None:
    jobs = await asyncio.gather(
        *(create(stub, kind=S.JOB_KIND_MANAGER, name="j", request_id="retried") for _ in range(12))
    )
    assert len({j.id for j in jobs}) == 1
    assert len(await all_jobs(stub)) == 1


async def test_request_id_reused_for_another_job_is_already_exists(stub: Stub) -> None:
    m1 = await create(stub, kind=S.JOB_KIND_MANAGER, name="a", request_id="r")
    m2 = await create_manager(stub, "b")
    await create(stub, kind=S.JOB_KIND_STEP, parent_id=m1.id, name="s", request_id="rs")
    assert await refused(create(stub, kind=S.JOB_KIND_STEP, parent_id=m1.id, request_id="r")) == (
        C.ALREADY_EXISTS
    )
    other_parent = create(stub, kind=S.JOB_KIND_STEP, parent_id=m2.id, name="s", request_id="rs")
    assert await refused(other_parent) == C.ALREADY_EXISTS
    assert len(await all_jobs(stub)) == 3


@pytest.mark.parametrize(
    "case, code",
    [
        ("manager_with_parent", C.INVALID_ARGUMENT),
        ("step_without_parent", C.INVALID_ARGUMENT),
        ("child_without_parent", C.INVALID_ARGUMENT),
        ("step_with_unknown_parent", C.NOT_FOUND),
        ("child_with_unknown_parent", C.NOT_FOUND),
        ("step_under_step", C.FAILED_PRECONDITION),
        ("step_under_child", C.FAILED_PRECONDITION),
        ("child_under_manager", C.FAILED_PRECONDITION),
        ("child_under_child", C.FAILED_PRECONDITION),
        ("step_under_terminal_manager", C.FAILED_PRECONDITION),
        ("child_under_terminal_step", C.FAILED_PRECONDITION),
    ],
)
async def test_create_checks_the_parent(stub: Stub, case: str, code: grpc.StatusCode) -> None:
    manager = await create_manager(stub)
    step = await create_step(stub, manager.id, 0)
    child = await create_child(stub, step.id)
    done_manager = await create_manager(stub, "done")
    done_step = await create_step(stub, done_manager.id, 0)
    await set_status(stub, done_step.id, S.JOB_STATUS_COMPLETED)
    await set_status(stub, done_manager.id, S.JOB_STATUS_COMPLETED)
    kind, parent = {
        "manager_with_parent": (S.JOB_KIND_MANAGER, manager.id),
        "step_without_parent": (S.JOB_KIND_STEP, ""),
        "child_without_parent": (S.JOB_KIND_CHILD, ""),
        "step_with_unknown_parent": (S.JOB_KIND_STEP, "no-such-job"),
        "child_with_unknown_parent": (S.JOB_KIND_CHILD, "no-such-job"),
        "step_under_step": (S.JOB_KIND_STEP, step.id),
        "step_under_child": (S.JOB_KIND_STEP, child.id),
        "child_under_manager": (S.JOB_KIND_CHILD, manager.id),
        "child_under_child": (S.JOB_KIND_CHILD, child.id),
        "step_under_terminal_manager": (S.JOB_KIND_STEP, done_manager.id),
        "child_under_terminal_step": (S.JOB_KIND_CHILD, done_step.id),
    }[case]
    before = {j.id: snapshot(j) for j in await all_jobs(stub)}
    assert await refused(create(stub, kind=kind, parent_id=parent, name="x")) == code
    assert {j.id: snapshot(j) for j in await all_jobs(stub)} == before


# == GetJob ====================================================================================
async def test_get_unknown_job_is_not_found(stub: Stub) -> None:
    assert await refused(stub.GetJob(m.GetJobRequest(job_id="nope"))) == C.NOT_FOUND


async def test_get_returns_typed_step_stats_matching_the_metadata(stub: Stub) -> None:
    manager, steps = await manager_with_steps(stub, 3)
    await update_meta(
        stub,
        manager.id,
        {"step_stats": [{"step_id": steps[1].id, "document_count": 42, "child_count": 7}]},
    )
    await set_status(stub, steps[0].id, S.JOB_STATUS_RUNNING)
    await set_status(stub, steps[0].id, S.JOB_STATUS_FAILED, error="disk full")
    got = await get(stub, manager.id)
    assert [s.step_id for s in got.step_stats] == [s.id for s in steps]
    for i, (typed, raw) in enumerate(zip(got.step_stats, meta(got)["step_stats"], strict=True)):
        assert typed.step_index == i == raw["step_index"]
        assert typed.step_name == raw["step_name"] == steps[i].name
        assert typed.step_type == raw["step_type"] == "simulate"
        assert typed.status == S.JobStatus.Value(f"JOB_STATUS_{raw['status'].upper()}")
        assert typed.child_count == raw["child_count"]
        assert typed.document_count == raw["document_count"]
        assert typed.error == raw["error"]
    assert got.step_stats[0].status == S.JOB_STATUS_FAILED
    assert got.step_stats[0].error == "disk full"
    assert (got.step_stats[1].document_count, got.step_stats[1].child_count) == (42, 7)
    assert got.step_stats[2].status == S.JOB_STATUS_PENDING


async def test_get_step_stats_carry_live_child_counts(stub: Stub) -> None:
    manager, (step, _other) = await manager_with_steps(stub, 2)
    await set_status(stub, step.id, S.JOB_STATUS_RUNNING)
    children = [await create_child(stub, step.id, f"c{i}") for i in range(5)]
    await set_status(stub, children[0].id, S.JOB_STATUS_RUNNING)
    await set_status(stub, children[1].id, S.JOB_STATUS_COMPLETED)
    await set_status(stub, children[2].id, S.JOB_STATUS_FAILED, error="x")
    await set_status(stub, children[3].id, S.JOB_STATUS_CANCELLED)
    got = await get(stub, manager.id)
    c = got.step_stats[0].children
    assert (c.pending, c.running, c.completed, c.failed, c.cancelled) == (1, 1, 1, 1, 1)
    o = got.step_stats[1].children
    assert (o.pending, o.running, o.completed, o.failed, o.cancelled) == (0, 0, 0, 0, 0)


async def test_non_managers_have_no_typed_step_stats(stub: Stub) -> None:
    manager, (step,) = await manager_with_steps(stub, 1)
    copied = meta(manager)["step_stats"]
    got = await update_meta(stub, step.id, {"step_stats": copied})
    assert meta(got)["step_stats"]  # the document is stored as given...
    assert len(got.step_stats) == 0  # ...but only a manager has the typed view
    assert len((await get(stub, step.id)).step_stats) == 0


async def test_child_changes_move_change_seq_not_version(stub: Stub) -> None:
    manager, (step,) = await manager_with_steps(stub, 1)
    await set_status(stub, step.id, S.JOB_STATUS_RUNNING)
    before = await get(stub, manager.id)
    child = await create_child(stub, step.id)
    after_create = await get(stub, manager.id)
    assert after_create.version == before.version
    assert after_create.change_seq > before.change_seq
    await set_status(stub, child.id, S.JOB_STATUS_RUNNING)
    after_run = await get(stub, manager.id)
    assert after_run.version == before.version
    assert after_run.change_seq > after_create.change_seq
    assert after_run.step_stats[0].children.running == 1


# == ListJobs ==================================================================================
async def test_list_filters(stub: Stub) -> None:
    a = await create(stub, kind=S.JOB_KIND_MANAGER, name="a", owner="orch-1")
    b = await create(stub, kind=S.JOB_KIND_MANAGER, name="b", owner="orch-2")
    a_steps = [await create_step(stub, a.id, i) for i in range(2)]
    b_step = await create_step(stub, b.id, 0)
    a_child = await create_child(stub, a_steps[0].id)
    b_child = await create_child(stub, b_step.id)
    await set_status(stub, a_steps[1].id, S.JOB_STATUS_RUNNING)
    await set_status(stub, b_child.id, S.JOB_STATUS_RUNNING)

    async def ids(**flt: Any) -> set[str]:
        return {j.id for j in (await list_jobs(stub, **flt)).jobs}

    assert await ids(parent_id=a.id) == {s.id for s in a_steps}
    assert await ids(parent_id=a_steps[0].id) == {a_child.id}
    assert await ids(manager_id=a.id) == {a.id, *(s.id for s in a_steps), a_child.id}
    assert await ids(kind=S.JOB_KIND_MANAGER) == {a.id, b.id}
    assert await ids(kind=S.JOB_KIND_STEP) == {*(s.id for s in a_steps), b_step.id}
    assert await ids(kind=S.JOB_KIND_CHILD) == {a_child.id, b_child.id}
    assert await ids(status=S.JOB_STATUS_RUNNING) == {a_steps[1].id, b_child.id}
    assert await ids(manager_id=b.id, status=S.JOB_STATUS_RUNNING) == {b_child.id}
    assert await ids(manager_id=a.id, kind=S.JOB_KIND_STEP, status=S.JOB_STATUS_PENDING) == {
        a_steps[0].id
    }
    assert await ids(owner="orch-2", kind=S.JOB_KIND_MANAGER) == {b.id}
    assert await ids(parent_id="no-such-job") == set()


async def test_list_returns_typed_step_stats_for_managers(stub: Stub) -> None:
    manager, steps = await manager_with_steps(stub, 2)
    listed = (await list_jobs(stub, kind=S.JOB_KIND_MANAGER)).jobs
    assert [s.step_id for s in listed[0].step_stats] == [s.id for s in steps]
    assert listed[0] == await get(stub, manager.id)


async def test_list_by_created_time(stub: Stub) -> None:
    early = await create_manager(stub, "early")
    await asyncio.sleep(0.05)
    late = await create_manager(stub, "late")
    cut = timestamp_pb2.Timestamp()
    cut.CopyFrom(late.created_at)

    async def ids(**flt: Any) -> list[str]:
        return [j.id for j in (await list_jobs(stub, **flt)).jobs]

    assert await ids(created_after=cut) == [late.id]  # at or after
    assert await ids(created_before=cut) == [early.id]  # strictly before
    assert await ids(created_after=early.created_at, created_before=cut) == [early.id]
    future = timestamp_pb2.Timestamp()
    future.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    assert await ids(created_after=future) == []


async def test_list_is_newest_first_and_pages_cover_every_job_once(stub: Stub) -> None:
    sequential = [await create_manager(stub, f"seq-{i}") for i in range(4)]
    # Created concurrently: several may share one commit and one created_at.
    together = await asyncio.gather(*(create_manager(stub, f"burst-{i}") for i in range(9)))
    everything = (await list_jobs(stub, page_size=100)).jobs
    assert len(everything) == 13
    assert (await list_jobs(stub, page_size=100)).next_page_token == ""
    stamps = [(j.created_at.ToDatetime(), j.id) for j in everything]
    assert stamps == sorted(stamps, reverse=True)
    seq_ids = [j.id for j in everything if j.id in {s.id for s in sequential}]
    assert seq_ids == [s.id for s in reversed(sequential)]

    for page_size in (1, 2, 5):
        seen: list[str] = []
        token = ""
        pages = 0
        while True:
            page = await list_jobs(stub, page_size=page_size, page_token=token)
            assert len(page.jobs) <= page_size
            seen.extend(j.id for j in page.jobs)
            pages += 1
            token = page.next_page_token
            if not token:
                break
        assert seen == [j.id for j in everything], page_size
        assert pages == -(-13 // page_size)
    assert {j.id for j in together} <= set(seen)


async def test_list_pages_keep_their_filters(stub: Stub) -> None:
    manager = await create_manager(stub)
    steps = [await create_step(stub, manager.id, i) for i in range(5)]
    first = await list_jobs(stub, parent_id=manager.id, page_size=3)
    second = await list_jobs(
        stub, parent_id=manager.id, page_size=3, page_token=first.next_page_token
    )
    assert second.next_page_token == ""
    assert {j.id for j in [*first.jobs, *second.jobs]} == {s.id for s in steps}


@pytest.mark.parametrize(
    "fields",
    [
        {"page_size": -1},
        {"page_size": 1001},
        {"page_token": "not-a-token"},
        {"page_token": "eyJ4IjogMX0="},  # valid base64, not ours
        {"parent_id": "bad id"},
        {"manager_id": "x" * 129},
        {"kind": 42},
        {"status": 42},
    ],
)
async def test_list_rejects_bad_arguments(stub: Stub, fields: dict[str, Any]) -> None:
    await create_manager(stub)
    assert await refused(list_jobs(stub, **fields)) == C.INVALID_ARGUMENT


async def test_list_default_and_max_page_size(stub: Stub) -> None:
    await asyncio.gather(*(create_manager(stub, f"m{i}") for i in range(55)))
    default = await list_jobs(stub)
    assert len(default.jobs) == 50 and default.next_page_token
    assert len((await list_jobs(stub, page_size=1000)).jobs) == 55


# == UpdateJobStatus ===========================================================================
async def test_status_moves_forward_with_timestamps_error_and_end_reason(stub: Stub) -> None:
    manager = await create_manager(stub)
    running = await set_status(stub, manager.id, S.JOB_STATUS_RUNNING)
    assert running.status == S.JOB_STATUS_RUNNING
    assert running.version == manager.version + 1
    assert running.change_seq > manager.change_seq
    assert running.HasField("started_at") and not running.HasField("finished_at")
    failed = await set_status(stub, manager.id, S.JOB_STATUS_FAILED, error="out of disk")
    assert (failed.status, failed.error, failed.end_reason) == (
        S.JOB_STATUS_FAILED,
        "out of disk",
        "api",
    )
    assert failed.version == running.version + 1
    assert failed.HasField("finished_at")
    assert failed.started_at == running.started_at
    assert await get(stub, manager.id) == failed


async def test_cancelled_records_its_end_reason(stub: Stub) -> None:
    manager = await create_manager(stub)
    got = await set_status(stub, manager.id, S.JOB_STATUS_CANCELLED)
    assert (got.status, got.end_reason) == (S.JOB_STATUS_CANCELLED, "cancelled")


async def test_explicit_end_reason_is_recorded(stub: Stub) -> None:
    manager = await create_manager(stub)
    req = m.UpdateJobStatusRequest(
        job_id=manager.id, status=S.JOB_STATUS_COMPLETED, end_reason="orchestrator"
    )
    got = (await stub.UpdateJobStatus(req)).job
    assert got.end_reason == "orchestrator"


@pytest.mark.parametrize(
    "kind, terminal",
    [
        (kind, terminal)
        for kind in ("manager", "step", "child")
        for terminal in TERMINAL
        if kind == "step" or terminal != S.JOB_STATUS_SKIPPED  # skipped: steps only
    ],
)
async def test_terminal_status_is_final(stub: Stub, kind: str, terminal: int) -> None:
    manager, (step,) = await manager_with_steps(stub, 1)
    child = await create_child(stub, step.id)
    job_id = {"manager": manager.id, "step": step.id, "child": child.id}[kind]
    ended = await set_status(stub, job_id, terminal, error="first")
    before_all = {j.id: snapshot(j) for j in await all_jobs(stub)}
    for other in [s for s in STATUS_NAME if s != terminal]:
        if kind != "step" and other in (S.JOB_STATUS_SPAWNED, S.JOB_STATUS_SKIPPED):
            continue
        assert await refused(set_status(stub, job_id, other, error="late")) == (
            C.FAILED_PRECONDITION
        ), STATUS_NAME[other]
    # Asking for the status it already has is a no-op success: nothing moves.
    again = await set_status(stub, job_id, terminal, error="ignored")
    assert (again.version, again.change_seq, again.error) == (
        ended.version,
        ended.change_seq,
        "first",
    )
    assert {j.id: snapshot(j) for j in await all_jobs(stub)} == before_all


@pytest.mark.parametrize(
    "path, back",
    [
        ([S.JOB_STATUS_RUNNING], S.JOB_STATUS_PENDING),
        ([S.JOB_STATUS_RUNNING, S.JOB_STATUS_SPAWNED], S.JOB_STATUS_RUNNING),
        ([S.JOB_STATUS_SPAWNED], S.JOB_STATUS_PENDING),
    ],
)
async def test_backwards_status_is_failed_precondition(
    stub: Stub, path: list[int], back: int
) -> None:
    _manager, (step,) = await manager_with_steps(stub, 1)
    await create_child(stub, step.id)  # a spawned step with a child is not ended by the grace
    for status in path:
        await set_status(stub, step.id, status)
    before = {j.id: snapshot(j) for j in await all_jobs(stub)}
    assert await refused(set_status(stub, step.id, back)) == C.FAILED_PRECONDITION
    assert {j.id: snapshot(j) for j in await all_jobs(stub)} == before


@pytest.mark.parametrize("kind", ["manager", "child"])
async def test_backwards_status_of_managers_and_children_is_failed_precondition(
    stub: Stub, kind: str
) -> None:
    manager, (step,) = await manager_with_steps(stub, 1)
    child = await create_child(stub, step.id)
    job_id = manager.id if kind == "manager" else child.id
    await set_status(stub, job_id, S.JOB_STATUS_RUNNING)
    before = {j.id: snapshot(j) for j in await all_jobs(stub)}
    assert await refused(set_status(stub, job_id, S.JOB_STATUS_PENDING)) == C.FAILED_PRECONDITION
    assert {j.id: snapshot(j) for j in await all_jobs(stub)} == before


@pytest.mark.parametrize(
    ("path", "requested", "current"),
    [
        ([S.JOB_STATUS_COMPLETED], S.JOB_STATUS_FAILED, "completed"),
        ([S.JOB_STATUS_RUNNING], S.JOB_STATUS_PENDING, "running"),
    ],
)
async def test_a_status_conflict_reaches_the_client_with_its_data(
    stub: Stub, path: list[int], requested: int, current: str
) -> None:
    """Final and backwards moves alike decode to StatusConflict from the status's details."""
    _manager, (step,) = await manager_with_steps(stub, 1)
    for status in path:
        await set_status(stub, step.id, status)
    with pytest.raises(aio.AioRpcError) as caught:
        await set_status(stub, step.id, requested)
    error = from_rpc_error(caught.value)
    assert isinstance(error, StatusConflict)
    assert (error.current, error.requested) == (current, STATUS_NAME[requested])


async def test_same_live_status_is_a_noop(stub: Stub) -> None:
    manager, (step,) = await manager_with_steps(stub, 1)
    running = await set_status(stub, step.id, S.JOB_STATUS_RUNNING)
    manager_before = await get(stub, manager.id)
    again = await set_status(stub, step.id, S.JOB_STATUS_RUNNING)
    assert (again.version, again.change_seq) == (running.version, running.change_seq)
    assert await get(stub, manager.id) == manager_before
    pending = await create_manager(stub)
    assert (await set_status(stub, pending.id, S.JOB_STATUS_PENDING)).version == pending.version


@pytest.mark.parametrize("kind", ["manager", "child"])
@pytest.mark.parametrize("status", [S.JOB_STATUS_SPAWNED, S.JOB_STATUS_SKIPPED])
async def test_step_only_statuses_on_managers_and_children_are_invalid(
    stub: Stub, kind: str, status: int
) -> None:
    manager, (step,) = await manager_with_steps(stub, 1)
    child = await create_child(stub, step.id)
    job_id = manager.id if kind == "manager" else child.id
    before = {j.id: snapshot(j) for j in await all_jobs(stub)}
    assert await refused(set_status(stub, job_id, status)) == C.INVALID_ARGUMENT
    assert {j.id: snapshot(j) for j in await all_jobs(stub)} == before


@pytest.mark.parametrize("status", [S.JOB_STATUS_UNSPECIFIED, 8, 99])
async def test_unspecified_or_unknown_status_is_invalid(stub: Stub, status: int) -> None:
    _manager, (step,) = await manager_with_steps(stub, 1)
    before = await get(stub, step.id)
    assert await refused(set_status(stub, step.id, status)) == C.INVALID_ARGUMENT
    assert await get(stub, step.id) == before


async def test_status_of_unknown_job_is_not_found(stub: Stub) -> None:
    assert await refused(set_status(stub, "nope", S.JOB_STATUS_RUNNING)) == C.NOT_FOUND


@pytest.mark.parametrize("status", [S.JOB_STATUS_SPAWNED, S.JOB_STATUS_SKIPPED])
async def test_step_only_statuses_are_accepted_on_steps(stub: Stub, status: int) -> None:
    manager, (step,) = await manager_with_steps(stub, 1)
    await create_child(stub, step.id)  # keeps a spawned step from ending by the grace period
    got = await set_status(stub, step.id, status)
    assert got.status == status
    assert entry(await get(stub, manager.id), step.id)["status"] == STATUS_NAME[status]


async def test_step_start_reaches_the_manager_in_the_same_call(stub: Stub) -> None:
    manager, steps = await manager_with_steps(stub, 2)
    await set_status(stub, steps[0].id, S.JOB_STATUS_RUNNING)
    got = await get(stub, manager.id)
    assert entry(got, steps[0].id)["status"] == "running"
    assert meta(got)["current_step_status"] == "running"
    assert meta(got)["completed_steps"] == 0
    assert got.version == manager.version + 1


@pytest.mark.parametrize("terminal", TERMINAL)
async def test_step_end_reaches_step_stats_current_step_status_and_completed_steps(
    stub: Stub, terminal: int
) -> None:
    """design §1 bug 1: whatever ends a step, the manager's view follows in the same call."""
    manager, steps = await manager_with_steps(stub, 3)
    await set_status(stub, steps[0].id, S.JOB_STATUS_RUNNING)
    before = await get(stub, manager.id)
    error = "" if terminal == S.JOB_STATUS_COMPLETED else "it broke"
    step = await set_status(stub, steps[0].id, terminal, error=error)
    assert step.status == terminal
    got = await get(stub, manager.id)
    assert entry(got, steps[0].id)["status"] == STATUS_NAME[terminal]
    assert entry(got, steps[0].id)["error"] == error
    assert meta(got)["current_step_status"] == STATUS_NAME[terminal]
    assert meta(got)["completed_steps"] == 1
    assert got.step_stats[0].status == terminal
    assert got.version == before.version + 1
    assert [e["status"] for e in meta(got)["step_stats"][1:]] == ["pending", "pending"]


async def test_ending_a_step_that_is_not_current_keeps_current_step_status(stub: Stub) -> None:
    manager, steps = await manager_with_steps(stub, 3)
    await set_status(stub, steps[0].id, S.JOB_STATUS_RUNNING)
    await set_status(stub, steps[2].id, S.JOB_STATUS_SKIPPED)
    got = await get(stub, manager.id)
    assert entry(got, steps[2].id)["status"] == "skipped"
    assert meta(got)["current_step_status"] == "running"
    assert meta(got)["current_step_id"] == steps[0].id
    assert meta(got)["completed_steps"] == 1


async def test_a_step_without_an_entry_gets_one_in_step_order(stub: Stub) -> None:
    manager, steps = await manager_with_steps(stub, 2)
    late = await create_step(stub, manager.id, 2, name="late", type_="command")
    middle = await create_step(stub, manager.id, 5, name="far", type_="command")
    await set_status(stub, middle.id, S.JOB_STATUS_SKIPPED)
    await set_status(stub, late.id, S.JOB_STATUS_RUNNING)
    got = await get(stub, manager.id)
    assert [e["step_id"] for e in meta(got)["step_stats"]] == [
        steps[0].id,
        steps[1].id,
        late.id,
        middle.id,
    ]
    added = entry(got, late.id)
    assert (added["step_index"], added["step_name"], added["step_type"], added["status"]) == (
        2,
        "late",
        "command",
        "running",
    )
    assert entry(got, middle.id)["status"] == "skipped"
    assert meta(got)["completed_steps"] == 1


async def test_step_end_on_a_manager_without_step_stats_creates_them(stub: Stub) -> None:
    manager = await create_manager(stub)
    step = await create_step(stub, manager.id, 0, name="only")
    await set_status(stub, step.id, S.JOB_STATUS_COMPLETED)
    got = await get(stub, manager.id)
    assert [(e["step_id"], e["status"]) for e in meta(got)["step_stats"]] == [
        (step.id, "completed")
    ]
    assert meta(got)["completed_steps"] == 1
    assert got.step_stats[0].status == S.JOB_STATUS_COMPLETED


async def test_an_entry_further_on_stays_when_the_step_row_catches_up(stub: Stub) -> None:
    manager, steps = await manager_with_steps(stub, 2)
    await step_stat(stub, manager.id, steps[0].id, S.JOB_STATUS_COMPLETED)
    await set_status(stub, steps[0].id, S.JOB_STATUS_RUNNING)
    got = await get(stub, manager.id)
    assert entry(got, steps[0].id)["status"] == "completed"
    assert meta(got)["current_step_status"] == "completed"
    await set_status(stub, steps[0].id, S.JOB_STATUS_FAILED, error="late")
    got = await get(stub, manager.id)
    assert entry(got, steps[0].id)["status"] == "completed"
    assert meta(got)["completed_steps"] == 1
    assert (await get(stub, steps[0].id)).status == S.JOB_STATUS_FAILED


async def test_cancelling_a_manager_cascades_to_every_live_descendant(stub: Stub) -> None:
    manager, steps = await manager_with_steps(stub, 4)
    await set_status(stub, steps[0].id, S.JOB_STATUS_RUNNING)
    await set_status(stub, steps[0].id, S.JOB_STATUS_COMPLETED)
    await set_status(stub, steps[1].id, S.JOB_STATUS_RUNNING)
    kids = [await create_child(stub, steps[1].id, f"k{i}") for i in range(3)]
    await set_status(stub, kids[0].id, S.JOB_STATUS_RUNNING)
    await set_status(stub, kids[1].id, S.JOB_STATUS_COMPLETED)
    await update_meta(
        stub,
        manager.id,
        {
            "current_step": 2,
            "current_step_id": steps[1].id,
            "current_step_status": "running",
        },
    )
    cancelled = await set_status(stub, manager.id, S.JOB_STATUS_CANCELLED)
    assert (cancelled.status, cancelled.end_reason) == (S.JOB_STATUS_CANCELLED, "cancelled")
    status = {j.id: j.status for j in await all_jobs(stub)}
    assert status[steps[0].id] == S.JOB_STATUS_COMPLETED  # terminal stays as it was
    assert status[steps[1].id] == S.JOB_STATUS_CANCELLED
    # Never started: skipped (the job stopped first).
    assert status[steps[2].id] == S.JOB_STATUS_SKIPPED
    assert status[steps[3].id] == S.JOB_STATUS_SKIPPED
    assert status[kids[0].id] == S.JOB_STATUS_CANCELLED
    assert status[kids[1].id] == S.JOB_STATUS_COMPLETED
    assert status[kids[2].id] == S.JOB_STATUS_CANCELLED
    got = await get(stub, manager.id)
    assert [e["status"] for e in meta(got)["step_stats"]] == [
        "completed",
        "cancelled",
        "skipped",
        "skipped",
    ]
    assert meta(got)["current_step_status"] == "cancelled"
    assert meta(got)["completed_steps"] == 4
    c = got.step_stats[1].children
    assert (c.pending, c.running, c.completed, c.failed, c.cancelled) == (0, 0, 1, 0, 2)
    assert got == cancelled


async def test_cancelling_a_manager_cancels_a_spawned_step(stub: Stub) -> None:
    """`spawned` is not terminal, so the cascade must reach a handed-off step too."""
    manager, steps = await manager_with_steps(stub, 2)
    await set_status(stub, steps[0].id, S.JOB_STATUS_RUNNING)
    kid = await create_child(stub, steps[0].id)
    await set_status(stub, steps[0].id, S.JOB_STATUS_SPAWNED)
    await set_status(stub, manager.id, S.JOB_STATUS_CANCELLED)
    assert (await get(stub, steps[0].id)).status == S.JOB_STATUS_CANCELLED
    assert (await get(stub, kid.id)).status == S.JOB_STATUS_CANCELLED
    got = await get(stub, manager.id)
    assert entry(got, steps[0].id)["status"] == "cancelled"
    assert meta(got)["current_step_status"] == "cancelled"
    assert meta(got)["completed_steps"] == 2


async def test_cancelling_a_step_cascades_to_its_children_and_reaches_the_manager(
    stub: Stub,
) -> None:
    manager, steps = await manager_with_steps(stub, 2)
    await set_status(stub, steps[0].id, S.JOB_STATUS_RUNNING)
    kids = [await create_child(stub, steps[0].id, f"k{i}") for i in range(3)]
    await set_status(stub, kids[0].id, S.JOB_STATUS_RUNNING)
    await set_status(stub, kids[1].id, S.JOB_STATUS_FAILED, error="x")
    step = await set_status(stub, steps[0].id, S.JOB_STATUS_CANCELLED)
    assert (step.status, step.end_reason) == (S.JOB_STATUS_CANCELLED, "cancelled")
    assert [(await get(stub, k.id)).status for k in kids] == [
        S.JOB_STATUS_CANCELLED,
        S.JOB_STATUS_FAILED,
        S.JOB_STATUS_CANCELLED,
    ]
    got = await get(stub, manager.id)
    assert got.status == S.JOB_STATUS_PENDING  # a cascade goes down, never up
    assert entry(got, steps[0].id)["status"] == "cancelled"
    assert meta(got)["current_step_status"] == "cancelled"
    assert meta(got)["completed_steps"] == 1
    c = got.step_stats[0].children
    assert (c.pending, c.running, c.completed, c.failed, c.cancelled) == (0, 0, 0, 1, 2)
    assert (await get(stub, steps[1].id)).status == S.JOB_STATUS_PENDING


# == UpdateJobMetadata =========================================================================
async def test_metadata_is_merged_shallowly_and_null_deletes(stub: Stub) -> None:
    job = await create_manager(stub, keep="me", nested={"a": 1, "b": 2}, gone="soon")
    got = await update_meta(stub, job.id, {"nested": {"c": 3}, "gone": None, "new": [1, "x"]})
    assert meta(got) == {"keep": "me", "nested": {"c": 3}, "new": [1, "x"]}
    assert got.version == job.version + 1
    assert got.change_seq > job.change_seq
    assert got.id == job.id and got.kind == job.kind and got.name == job.name
    assert await get(stub, job.id) == got


async def test_metadata_version_rises_by_one_per_change_and_not_on_a_noop(stub: Stub) -> None:
    job = await create_manager(stub, a=1)
    versions = [job.version]
    for patch in ({"a": 2}, {"b": True}, {"a": None}):
        versions.append((await update_meta(stub, job.id, patch)).version)
    assert versions == [1, 2, 3, 4]
    current = await get(stub, job.id)
    for noop in ({"b": True}, {"a": None}, {}, {"never-there": None}):
        got = await update_meta(stub, job.id, noop)
        assert (got.version, got.change_seq) == (current.version, current.change_seq), noop
    assert meta(await get(stub, job.id)) == {"b": True}


async def test_metadata_of_unknown_job_is_not_found(stub: Stub) -> None:
    assert await refused(update_meta(stub, "nope", {"a": 1})) == C.NOT_FOUND


async def test_step_stats_are_merged_by_step_id_in_step_index_order(stub: Stub) -> None:
    manager, steps = await manager_with_steps(stub, 3)
    got = await update_meta(
        stub,
        manager.id,
        {
            "step_stats": [
                {"step_id": steps[2].id, "document_count": 5},
                {"step_id": steps[0].id, "status": "running", "child_count": 2},
            ]
        },
    )
    assert [e["step_id"] for e in meta(got)["step_stats"]] == [s.id for s in steps]
    assert entry(got, steps[0].id)["status"] == "running"
    assert entry(got, steps[0].id)["child_count"] == 2
    assert entry(got, steps[0].id)["step_name"] == steps[0].name  # fields not named are kept
    assert entry(got, steps[1].id) == entry(manager, steps[1].id)  # entries not named are kept
    assert entry(got, steps[2].id)["document_count"] == 5
    assert got.version == manager.version + 1
    # A new entry with a lower index lands in its place.
    extra = {"step_index": 1, "step_id": "inserted", "step_name": "x", "status": "pending"}
    got = await update_meta(stub, manager.id, {"step_stats": [extra]})
    ids = [e["step_id"] for e in meta(got)["step_stats"]]
    assert set(ids) == {*(s.id for s in steps), "inserted"}
    assert [e["step_index"] for e in meta(got)["step_stats"]] == [0, 1, 1, 2]
    assert ids[0] == steps[0].id and ids[3] == steps[2].id


@pytest.mark.parametrize(
    "path, back",
    [
        (["running"], "pending"),
        (["spawned"], "running"),
        (["completed"], "spawned"),  # design §1 bug 2
        (["completed"], "failed"),
        (["skipped"], "completed"),
    ],
)
async def test_step_stats_status_never_moves_backwards(
    stub: Stub, path: list[str], back: str
) -> None:
    manager, steps = await manager_with_steps(stub, 2)
    for status in path:
        await update_meta(
            stub, manager.id, {"step_stats": [{"step_id": steps[0].id, "status": status}]}
        )
    before = await get(stub, manager.id)
    got = await update_meta(
        stub, manager.id, {"step_stats": [{"step_id": steps[0].id, "status": back}]}
    )
    assert entry(got, steps[0].id)["status"] == path[-1]
    assert (got.version, meta(got)) == (before.version, meta(before))  # ignored: a no-op
    # The same write with another field: the field merges, the status stays.
    got = await update_meta(
        stub,
        manager.id,
        {"step_stats": [{"step_id": steps[0].id, "status": back, "document_count": 3}]},
    )
    assert entry(got, steps[0].id)["status"] == path[-1]
    assert entry(got, steps[0].id)["document_count"] == 3
    assert got.version == before.version + 1


async def test_late_spawned_write_does_not_undo_a_completed_step(stub: Stub) -> None:
    """design §1 bug 2, end to end: the monitor completed the step, then the orchestrator's
    stale metadata write says `spawned` for it (and for current_step_status)."""
    manager, steps = await manager_with_steps(stub, 2)
    await set_status(stub, steps[0].id, S.JOB_STATUS_RUNNING)
    await set_status(stub, steps[0].id, S.JOB_STATUS_COMPLETED)
    stale = entry(manager, steps[0].id) | {"status": "spawned"}
    got = await update_meta(
        stub,
        manager.id,
        {"step_stats": [stale], "current_step_id": steps[0].id, "current_step_status": "spawned"},
    )
    assert entry(got, steps[0].id)["status"] == "completed"
    assert meta(got)["current_step_status"] == "completed"
    assert meta(got)["completed_steps"] == 1
    assert got.step_stats[0].status == S.JOB_STATUS_COMPLETED


STEP0 = "<id of the first step>"


@pytest.mark.parametrize(
    "patch",
    [
        {"step_stats": None},
        {"step_stats": [None]},
        {"step_stats": "gone"},
        {"step_stats": [{"status": "running"}]},
        {"step_stats": [{"step_id": STEP0, "status": None}]},
        {"step_stats": [{"step_id": STEP0, "status": "finished"}]},
        {"step_stats": [{"step_id": STEP0, "step_index": -2}]},
        {"current_step_status": "finished"},
        {"keep": "changed", "step_stats": None},  # the valid part is not applied either
    ],
)
async def test_invalid_step_stats_writes_are_invalid_argument_and_change_nothing(
    stub: Stub, patch: dict[str, Any]
) -> None:
    manager, steps = await manager_with_steps(stub, 2)
    manager = await update_meta(stub, manager.id, {"keep": "me"})
    patch = json.loads(json.dumps(patch).replace(STEP0, steps[0].id))
    assert await refused(update_meta(stub, manager.id, patch)) == C.INVALID_ARGUMENT
    assert snapshot(await get(stub, manager.id)) == snapshot(manager)


@pytest.mark.parametrize("back", ["pending", "running"])
async def test_current_step_status_is_guarded_while_the_current_step_stays(
    stub: Stub, back: str
) -> None:
    manager, steps = await manager_with_steps(stub, 2)
    await update_meta(stub, manager.id, {"current_step_status": "spawned"})
    before = await get(stub, manager.id)
    got = await update_meta(stub, manager.id, {"current_step_status": back})
    assert meta(got)["current_step_status"] == "spawned"
    assert got.version == before.version
    got = await update_meta(
        stub, manager.id, {"current_step_id": steps[0].id, "current_step_status": back}
    )
    assert meta(got)["current_step_status"] == "spawned"
    got = await update_meta(stub, manager.id, {"current_step_status": "completed"})
    assert meta(got)["current_step_status"] == "completed"
    got = await update_meta(stub, manager.id, {"current_step_status": "failed"})
    assert meta(got)["current_step_status"] == "completed"  # terminal is final here too


async def test_moving_to_another_step_sets_current_step_fields_freely(stub: Stub) -> None:
    manager, steps = await manager_with_steps(stub, 2)
    await set_status(stub, steps[0].id, S.JOB_STATUS_COMPLETED)
    got = await update_meta(
        stub,
        manager.id,
        {
            "current_step": 2,
            "current_step_id": steps[1].id,
            "current_step_name": steps[1].name,
            "current_step_status": "pending",
        },
    )
    assert meta(got)["current_step_id"] == steps[1].id
    assert meta(got)["current_step_status"] == "pending"
    await set_status(stub, steps[1].id, S.JOB_STATUS_RUNNING)
    assert meta(await get(stub, manager.id))["current_step_status"] == "running"


async def test_expected_version(stub: Stub) -> None:
    job = await create_manager(stub, a=1)
    got = await update_meta(stub, job.id, {"a": 2}, expected_version=job.version)
    assert got.version == job.version + 1
    # The old token is stale now: ABORTED, and nothing changes.
    stale = update_meta(stub, job.id, {"a": 3, "b": 1}, expected_version=job.version)
    assert await refused(stale) == C.ABORTED
    assert snapshot(await get(stub, job.id)) == snapshot(got)
    for bad in (got.version - 1, got.version + 1):
        assert await refused(update_meta(stub, job.id, {"a": 9}, expected_version=bad)) == (
            C.ABORTED
        )
    # Versions start at 1: 0 or less is no token at all.
    for bad in (0, -5):
        assert await refused(update_meta(stub, job.id, {"a": 9}, expected_version=bad)) == (
            C.INVALID_ARGUMENT
        )
    assert snapshot(await get(stub, job.id)) == snapshot(got)
    # A no-op with the current token succeeds and keeps the version.
    same = await update_meta(stub, job.id, {"a": 2}, expected_version=got.version)
    assert same.version == got.version
    # Another writer's change (a step status reaching the manager) makes the token stale.
    manager, (step,) = await manager_with_steps(stub, 1)
    await set_status(stub, step.id, S.JOB_STATUS_RUNNING)
    call = update_meta(stub, manager.id, {"x": 1}, expected_version=manager.version)
    assert await refused(call) == C.ABORTED


async def test_expected_version_is_checked_before_anything_else_changes(stub: Stub) -> None:
    manager, (step,) = await manager_with_steps(stub, 1)
    await update_meta(stub, manager.id, {"bump": 1})
    patch = {"step_stats": [{"step_id": step.id, "status": "running"}], "x": 1}
    assert await refused(update_meta(stub, manager.id, patch, expected_version=1)) == C.ABORTED
    got = await get(stub, manager.id)
    assert entry(got, step.id)["status"] == "pending"
    assert "x" not in meta(got)


# == UpdateStepStatInManager ===================================================================
async def test_step_stat_update_response_and_stored_state(stub: Stub) -> None:
    manager, steps = await manager_with_steps(stub, 2)
    await update_meta(
        stub, manager.id, {"step_stats": [{"step_id": steps[0].id, "document_count": 11}]}
    )
    kid = await create_child(stub, steps[0].id)
    await set_status(stub, kid.id, S.JOB_STATUS_RUNNING)
    manager = await get(stub, manager.id)
    step_before = await get(stub, steps[0].id)

    resp = await step_stat(stub, manager.id, steps[0].id, S.JOB_STATUS_RUNNING)
    stat = resp.step_stat
    assert (stat.step_index, stat.step_id, stat.step_name, stat.step_type) == (
        0,
        steps[0].id,
        steps[0].name,
        steps[0].type,
    )
    assert (stat.status, stat.document_count, stat.error) == (S.JOB_STATUS_RUNNING, 11, "")
    assert stat.children.running == 1
    assert resp.current_step_status_changed
    assert resp.version == manager.version + 1

    got = await get(stub, manager.id)
    assert got.version == resp.version
    assert entry(got, steps[0].id)["status"] == "running"
    assert meta(got)["current_step_status"] == "running"
    assert got.step_stats[0] == stat
    # The step's own row is not touched by this RPC.
    assert snapshot(await get(stub, steps[0].id)) == snapshot(step_before)


async def test_step_stat_update_of_a_step_that_is_not_current(stub: Stub) -> None:
    manager, steps = await manager_with_steps(stub, 3)
    resp = await step_stat(stub, manager.id, steps[2].id, S.JOB_STATUS_FAILED)
    assert resp.step_stat.status == S.JOB_STATUS_FAILED
    assert not resp.current_step_status_changed
    got = await get(stub, manager.id)
    assert meta(got)["current_step_status"] == "pending"
    assert meta(got)["completed_steps"] == 1
    assert resp.version == got.version == manager.version + 1


async def test_step_stat_update_to_the_same_status_is_a_noop(stub: Stub) -> None:
    manager, steps = await manager_with_steps(stub, 2)
    first = await step_stat(stub, manager.id, steps[0].id, S.JOB_STATUS_COMPLETED)
    before = await get(stub, manager.id)
    again = await step_stat(stub, manager.id, steps[0].id, S.JOB_STATUS_COMPLETED)
    assert again.version == first.version == before.version
    assert not again.current_step_status_changed
    assert again.step_stat == first.step_stat
    assert snapshot(await get(stub, manager.id)) == snapshot(before)


@pytest.mark.parametrize("call", ["same_status", "empty_step_stats_patch"])
async def test_noop_on_a_manager_created_with_step_stats_keeps_the_version(
    stub: Stub, call: str
) -> None:
    """A manager whose step_stats came with CreateJob (no completed_steps key): a same-status
    request, or an UpdateJobMetadata that names no change, is a no-op and keeps the version."""
    holder = await create_manager(stub, "holder")
    step = await create_step(stub, holder.id, 0)
    stats = [{"step_index": 0, "step_id": step.id, "status": "running"}]
    manager = await create(
        stub,
        kind=S.JOB_KIND_MANAGER,
        name="m",
        metadata={
            "step_stats": stats,
            "current_step_id": step.id,
            "current_step_status": "running",
        },
    )
    if call == "same_status":
        resp = await step_stat(stub, manager.id, step.id, S.JOB_STATUS_RUNNING)
        assert resp.version == manager.version
    else:
        got = await update_meta(stub, manager.id, {"step_stats": []})
        assert got.version == manager.version
    assert snapshot(await get(stub, manager.id)) == snapshot(manager)


async def test_step_stat_update_keeps_completed_steps(stub: Stub) -> None:
    manager, steps = await manager_with_steps(stub, 3)
    for step, status in zip(
        steps, [S.JOB_STATUS_COMPLETED, S.JOB_STATUS_CANCELLED, S.JOB_STATUS_SPAWNED], strict=True
    ):
        await step_stat(stub, manager.id, step.id, status)
    assert meta(await get(stub, manager.id))["completed_steps"] == 2


@pytest.mark.parametrize(
    "case, code",
    [
        ("unknown_manager", C.NOT_FOUND),
        ("step_as_manager", C.FAILED_PRECONDITION),
        ("child_as_manager", C.FAILED_PRECONDITION),
        ("manager_without_step_stats", C.FAILED_PRECONDITION),
        ("step_not_in_step_stats", C.NOT_FOUND),
        ("unspecified_status", C.INVALID_ARGUMENT),
        ("unknown_status", C.INVALID_ARGUMENT),
        ("backwards", C.FAILED_PRECONDITION),
        ("spawned_to_running", C.FAILED_PRECONDITION),
        ("terminal_to_other_terminal", C.FAILED_PRECONDITION),
        ("terminal_to_live", C.FAILED_PRECONDITION),
        ("bad_manager_id", C.INVALID_ARGUMENT),
        ("empty_manager_id", C.INVALID_ARGUMENT),
        ("bad_step_id", C.INVALID_ARGUMENT),
        ("empty_step_id", C.INVALID_ARGUMENT),
    ],
)
async def test_step_stat_update_errors(stub: Stub, case: str, code: grpc.StatusCode) -> None:
    manager, steps = await manager_with_steps(stub, 2)
    bare = await create_manager(stub, "bare")
    bare_step = await create_step(stub, bare.id, 0)
    kid = await create_child(stub, steps[1].id)
    await step_stat(stub, manager.id, steps[0].id, S.JOB_STATUS_SPAWNED)
    await step_stat(stub, manager.id, steps[1].id, S.JOB_STATUS_COMPLETED)
    other = await create_manager(stub, "other")
    other_step = await create_step(stub, other.id, 0)
    mgr, step, status = {
        "unknown_manager": ("nope", steps[0].id, S.JOB_STATUS_COMPLETED),
        "step_as_manager": (steps[0].id, steps[0].id, S.JOB_STATUS_COMPLETED),
        "child_as_manager": (kid.id, steps[0].id, S.JOB_STATUS_COMPLETED),
        "manager_without_step_stats": (bare.id, bare_step.id, S.JOB_STATUS_RUNNING),
        "step_not_in_step_stats": (manager.id, other_step.id, S.JOB_STATUS_RUNNING),
        "unspecified_status": (manager.id, steps[0].id, S.JOB_STATUS_UNSPECIFIED),
        "unknown_status": (manager.id, steps[0].id, 77),
        "backwards": (manager.id, steps[0].id, S.JOB_STATUS_PENDING),
        "spawned_to_running": (manager.id, steps[0].id, S.JOB_STATUS_RUNNING),
        "terminal_to_other_terminal": (manager.id, steps[1].id, S.JOB_STATUS_FAILED),
        "terminal_to_live": (manager.id, steps[1].id, S.JOB_STATUS_SPAWNED),
        "bad_manager_id": ("not valid!", steps[0].id, S.JOB_STATUS_COMPLETED),
        "empty_manager_id": ("", steps[0].id, S.JOB_STATUS_COMPLETED),
        "bad_step_id": (manager.id, "x" * 129, S.JOB_STATUS_COMPLETED),
        "empty_step_id": (manager.id, "", S.JOB_STATUS_COMPLETED),
    }[case]
    before = {j.id: snapshot(j) for j in await all_jobs(stub)}
    assert await refused(step_stat(stub, mgr, step, status)) == code
    assert {j.id: snapshot(j) for j in await all_jobs(stub)} == before


# == input validation ==========================================================================
BAD_IDS = ["has space", "x" * 129, "-leading-dash", "tab\there", "ünïcode", "a;drop"]


@pytest.mark.parametrize("bad", BAD_IDS)
async def test_bad_ids_are_invalid_argument_everywhere(stub: Stub, bad: str) -> None:
    manager, (step,) = await manager_with_steps(stub, 1)
    before = {j.id: snapshot(j) for j in await all_jobs(stub)}
    calls = [
        stub.GetJob(m.GetJobRequest(job_id=bad)),
        set_status(stub, bad, S.JOB_STATUS_RUNNING),
        update_meta(stub, bad, {"a": 1}),
        step_stat(stub, bad, step.id, S.JOB_STATUS_RUNNING),
        step_stat(stub, manager.id, bad, S.JOB_STATUS_RUNNING),
        create(stub, kind=S.JOB_KIND_STEP, parent_id=bad, name="s"),
        create(stub, kind=S.JOB_KIND_MANAGER, request_id=bad, name="m"),
        list_jobs(stub, parent_id=bad),
        list_jobs(stub, manager_id=bad),
    ]
    for call in calls:
        assert await refused(call) == C.INVALID_ARGUMENT
    assert {j.id: snapshot(j) for j in await all_jobs(stub)} == before


async def test_empty_ids_are_invalid_argument(stub: Stub) -> None:
    assert await refused(stub.GetJob(m.GetJobRequest())) == C.INVALID_ARGUMENT
    assert await refused(set_status(stub, "", S.JOB_STATUS_RUNNING)) == C.INVALID_ARGUMENT
    assert await refused(update_meta(stub, "", {"a": 1})) == C.INVALID_ARGUMENT


async def test_a_long_valid_id_is_accepted_as_an_id(stub: Stub) -> None:
    assert await refused(stub.GetJob(m.GetJobRequest(job_id="a" * 128))) == C.NOT_FOUND
    job = await create(stub, kind=S.JOB_KIND_MANAGER, request_id="r" * 128, name="n" * 512)
    assert job.name == "n" * 512


@pytest.mark.parametrize(
    "fields",
    [
        {"name": "n" * 513},
        {"type": "t" * 129},
        {"owner": "o" * 129},
    ],
)
async def test_over_long_create_fields_are_invalid_argument(
    stub: Stub, fields: dict[str, Any]
) -> None:
    assert await refused(create(stub, kind=S.JOB_KIND_MANAGER, **fields)) == C.INVALID_ARGUMENT
    assert await all_jobs(stub) == []


async def test_an_over_long_end_reason_is_invalid_argument(stub: Stub) -> None:
    _manager, (step,) = await manager_with_steps(stub, 1)
    before = {j.id: snapshot(j) for j in await all_jobs(stub)}
    req = m.UpdateJobStatusRequest(job_id=step.id, status=S.JOB_STATUS_FAILED, end_reason="r" * 33)
    assert await refused(stub.UpdateJobStatus(req)) == C.INVALID_ARGUMENT
    assert {j.id: snapshot(j) for j in await all_jobs(stub)} == before


def _oversized() -> dict[str, Any]:
    return {"blob": "x" * (1024 * 1024 + 16)}


async def test_oversized_metadata_is_resource_exhausted_and_changes_nothing(stub: Stub) -> None:
    assert (
        await refused(create(stub, kind=S.JOB_KIND_MANAGER, name="big", metadata=_oversized()))
        == C.RESOURCE_EXHAUSTED
    )
    assert await all_jobs(stub) == []
    job = await create_manager(stub, keep=1)
    assert await refused(update_meta(stub, job.id, _oversized())) == C.RESOURCE_EXHAUSTED
    assert snapshot(await get(stub, job.id)) == snapshot(job)
    # Just under the limit is fine.
    fine = await update_meta(stub, job.id, {"blob": "x" * (1024 * 1024 - 64)})
    assert fine.version == job.version + 1


@pytest.mark.parametrize("as_dicts", [False, True])
async def test_too_deep_metadata_is_invalid_argument_and_changes_nothing(
    stub: Stub, as_dicts: bool
) -> None:
    def nested(levels: int) -> Any:
        if not as_dicts:
            return deep(levels)
        value: Any = 1
        for _ in range(levels):
            value = {"k": value}
        return value

    # The document itself is level 0; the limit is 32 levels below it.
    assert (
        await refused(
            create(stub, kind=S.JOB_KIND_MANAGER, name="deep", metadata={"d": nested(32)})
        )
        == C.INVALID_ARGUMENT
    )
    assert await all_jobs(stub) == []
    job = await create_manager(stub, keep=1)
    assert await refused(update_meta(stub, job.id, {"d": nested(32)})) == C.INVALID_ARGUMENT
    assert snapshot(await get(stub, job.id)) == snapshot(job)
    ok = await update_meta(stub, job.id, {"d": nested(31)})
    assert ok.version == job.version + 1


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(tag: int, payload: bytes) -> bytes:
    return bytes([tag]) + _varint(len(payload)) + payload


def _deep_metadata_request(job_id: str, levels: int) -> bytes:
    """UpdateJobMetadataRequest{job_id, metadata={"d": [[[...0.0...]]]}} encoded by hand:
    deeper than protobuf-python lets a client build, as a Go client or grpcurl can send."""
    value = b"\x11" + bytes(8)  # Value.number_value = 0.0
    for _ in range(levels):
        value = _field(0x32, _field(0x0A, value))  # Value.list_value = ListValue{values=[value]}
    struct_bytes = _field(0x0A, _field(0x0A, b"d") + _field(0x12, value))  # Struct.fields["d"]
    return _field(0x0A, job_id.encode()) + _field(0x12, struct_bytes)


async def test_hand_encoded_metadata_at_the_limit_is_checked_by_the_server(
    stub: Stub, channel: aio.Channel
) -> None:
    job = await create_manager(stub, keep=1)
    raw = channel.unary_unary(
        "/stepflow.v1.MonitorService/UpdateJobMetadata",
        request_serializer=lambda b: b,
        response_deserializer=m.UpdateJobMetadataResponse.FromString,
    )
    assert await refused(raw(_deep_metadata_request(job.id, 32))) == C.INVALID_ARGUMENT
    ok = await raw(_deep_metadata_request(job.id, 31))
    assert ok.job.version == job.version + 1


async def test_metadata_too_deep_to_decode_is_invalid_argument(
    stub: Stub, channel: aio.Channel
) -> None:
    job = await create_manager(stub, keep=1)
    raw = channel.unary_unary(
        "/stepflow.v1.MonitorService/UpdateJobMetadata",
        request_serializer=lambda b: b,
        response_deserializer=m.UpdateJobMetadataResponse.FromString,
    )
    assert await refused(raw(_deep_metadata_request(job.id, 60))) == C.INVALID_ARGUMENT
    assert snapshot(await get(stub, job.id)) == snapshot(job)
