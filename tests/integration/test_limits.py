"""Limits: no input wedges anything (design §2), against a real monitor over a real channel,
on SQLite and PostgreSQL.

Each test reproduces a way a client or a worker could leave a job stuck, unreadable or wrong:
an over-long error in a terminal event, a metadata document that grows past what a default
client can read, a timeout of ten thousand years, forged derived fields, live work under an
ended job, a step's timeout lost on a hand-off, a manager watcher that never wakes, and
SQLite's durability setting.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc import aio

from monitor_svc.cli import build_parser, config_from
from monitor_svc.lifecycle import StepTimers
from monitor_svc.server import MonitorConfig, RunningMonitor, create_server
from orchestrator_svc.definitions import from_mapping
from stepflow_common.durations import parse_duration
from stepflow_common.errors import InvalidArgument
from stepflow_common.limits import (
    DEFAULT_CLIENT_MESSAGE_BYTES,
    MAX_DURATION_S,
    MAX_ERROR_CHARS,
    MAX_METADATA_BYTES,
    MAX_STEP_STAT_ERROR_CHARS,
    MAX_STEPS_PER_MANAGER,
)
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from tests.helpers import create_manager, create_step, entry, manager_with_steps, meta, struct
from tests.jobs import get
from tests.stream_helpers import completed, created, failed, running, sealed, send_batches

pytestmark = pytest.mark.timeout(120)

S = job_pb2
C = grpc.StatusCode
Stub = m_grpc.MonitorServiceStub
MARKER = "[truncated"
WATCH_WAIT_S = 20.0


@pytest.fixture
def timers() -> StepTimers:
    # A grace period long enough that a test can look at a handed-off step before it ends.
    return StepTimers(default_wait_timeout_s=30.0, grace_period_s=2.0)


async def set_status(
    stub: Stub, job_id: str, status: int, error: str = "", end_reason: str = ""
) -> job_pb2.Job:
    req = m.UpdateJobStatusRequest(
        job_id=job_id,
        status=status,  # type: ignore[arg-type]
        error=error,
        end_reason=end_reason,
    )
    return (await stub.UpdateJobStatus(req)).job


async def merge(stub: Stub, job_id: str, patch: dict[str, Any]) -> job_pb2.Job:
    req = m.UpdateJobMetadataRequest(job_id=job_id, metadata=struct(patch))
    return (await stub.UpdateJobMetadata(req)).job


async def code_of(call: Any) -> grpc.StatusCode:
    try:
        await call
    except aio.AioRpcError as exc:
        return exc.code()
    return C.OK


def counts(stat: job_pb2.StepStat) -> tuple[int, int, int, int, int]:
    c = stat.children
    return (c.pending, c.running, c.completed, c.failed, c.cancelled)


# == over-long texts are truncated, never a reason to reject ====================================
@pytest.mark.parametrize("char", ["e", "\U0001f600"])
async def test_a_failed_event_with_a_70000_character_error_ends_its_child_and_handed_off_step(
    stub: Stub, char: str
) -> None:
    manager, (step,) = await manager_with_steps(stub, 1)
    await set_status(stub, step.id, S.JOB_STATUS_RUNNING)
    acks = await send_batches(
        stub,
        [
            [sealed(step.id, 1), created(step.id, "c1"), running(step.id, "c1")],
            [failed(step.id, "c1", error=char * 70_000)],
        ],
    )
    assert [list(a.rejected) for a in acks] == [[], []]
    child = await get(stub, "c1")
    assert child.status == S.JOB_STATUS_FAILED
    assert MAX_ERROR_CHARS - 10 < len(child.error) <= MAX_ERROR_CHARS and MARKER in child.error
    assert child.error.startswith(char * 100)
    step_row = await get(stub, step.id)
    assert (step_row.status, step_row.end_reason) == (S.JOB_STATUS_FAILED, "children_terminal")
    got = await get(stub, manager.id)
    assert counts(got.step_stats[0]) == (0, 0, 0, 1, 0)
    assert got.step_stats[0].status == S.JOB_STATUS_FAILED


async def test_an_over_long_status_error_is_stored_truncated_and_bounded_in_step_stats(
    stub: Stub,
) -> None:
    manager, (step,) = await manager_with_steps(stub, 1)
    await set_status(stub, step.id, S.JOB_STATUS_RUNNING)
    ended = await set_status(stub, step.id, S.JOB_STATUS_FAILED, error="x" * 70_000)
    assert ended.status == S.JOB_STATUS_FAILED
    assert MAX_ERROR_CHARS - 10 < len(ended.error) <= MAX_ERROR_CHARS and MARKER in ended.error
    got = await get(stub, manager.id)
    assert len(entry(got, step.id)["error"]) <= MAX_STEP_STAT_ERROR_CHARS
    assert MARKER in got.step_stats[0].error
    # A client writing an entry's error directly is bounded the same way.
    other = await create_step(stub, manager.id, 1)
    patched = await merge(
        stub, manager.id, {"step_stats": [{"step_id": other.id, "error": "y" * 100_000}]}
    )
    assert MARKER in entry(patched, other.id)["error"]
    assert len(entry(patched, other.id)["error"]) <= MAX_STEP_STAT_ERROR_CHARS


# == a metadata document has a size limit, checked before commit ================================
async def test_metadata_merges_stop_at_the_document_limit_and_the_job_stays_readable(
    monitor: RunningMonitor, stub: Stub
) -> None:
    job = await create_manager(stub)
    codes, versions = [], []
    for i in range(10):
        codes.append(await code_of(merge(stub, job.id, {f"k{i}": "x" * 990_000})))
        versions.append((await get(stub, job.id)).version)
    assert codes == [C.OK] + [C.RESOURCE_EXHAUSTED] * 9
    assert versions == [job.version + 1] * 10  # nothing of a refused merge is committed
    try:
        await merge(stub, job.id, {"more": "x" * 60_000})
    except aio.AioRpcError as exc:
        assert "limit" in (exc.details() or "") and str(MAX_METADATA_BYTES) in exc.details()
    else:
        raise AssertionError("a merge past the limit was accepted")
    # A merge that does not grow the document still passes; replacing the big key works too.
    assert (await merge(stub, job.id, {"k0": "y" * 990_000})).version == job.version + 2
    # GetJob and WatchJob with a default client (4 MiB receive limit).
    async with aio.insecure_channel(monitor.address) as plain:
        fresh = m_grpc.MonitorServiceStub(plain)
        got = await get(fresh, job.id)
        assert meta(got) == {"k0": "y" * 990_000}
        watch = fresh.WatchJob(m.WatchJobRequest(job_id=job.id, after_change_seq=0))
        first = await asyncio.wait_for(anext(aiter(watch)), WATCH_WAIT_S)
        assert first.job.version == got.version
        watch.cancel()


async def test_a_manager_at_its_limits_stays_readable_by_a_default_client(
    monitor: RunningMonitor, stub: Stub
) -> None:
    """The monitor's own writes are bounded too: the most steps a manager may have, each with
    the longest name, type and error, over a document filled to the limit by a client."""
    wide = "\U0001f600"  # 4 bytes in UTF-8
    job = await create_manager(stub)
    await merge(stub, job.id, {"fill": wide * (MAX_METADATA_BYTES // 4 - 64)})

    async def step(i: int) -> job_pb2.Job:
        req = m.CreateJobRequest(
            kind=S.JOB_KIND_STEP,
            parent_id=job.id,
            name=f"{i:03}" + wide * 509,
            type=wide * 128,
            metadata=struct({"step_index": i}),
        )
        return (await stub.CreateJob(req)).job

    steps: list[job_pb2.Job] = []
    for start in range(0, MAX_STEPS_PER_MANAGER, 50):
        steps += await asyncio.gather(
            *(step(i) for i in range(start, min(start + 50, MAX_STEPS_PER_MANAGER)))
        )
    refused = stub.CreateJob(m.CreateJobRequest(kind=S.JOB_KIND_STEP, parent_id=job.id, name="x"))
    assert await code_of(refused) == C.RESOURCE_EXHAUSTED
    for start in range(0, len(steps), 50):
        await asyncio.gather(
            *(
                set_status(stub, s.id, S.JOB_STATUS_FAILED, error=wide * 10_000)
                for s in steps[start : start + 50]
            )
        )
    async with aio.insecure_channel(monitor.address) as plain:
        fresh = m_grpc.MonitorServiceStub(plain)
        got = await get(fresh, job.id)
        assert len(got.step_stats) == MAX_STEPS_PER_MANAGER
        assert meta(got)["completed_steps"] == MAX_STEPS_PER_MANAGER
        assert got.ByteSize() < DEFAULT_CLIENT_MESSAGE_BYTES
        watch = fresh.WatchJob(m.WatchJobRequest(job_id=job.id, after_change_seq=0))
        first = await asyncio.wait_for(anext(aiter(watch)), WATCH_WAIT_S)
        assert first.job.change_seq == got.change_seq
        watch.cancel()
        # A small write answers with the whole job, which fits too.
        ok = await fresh.UpdateJobMetadata(
            m.UpdateJobMetadataRequest(job_id=job.id, metadata=struct({"fill": "small"}))
        )
        assert ok.job.version > got.version


async def test_list_pages_end_early_rather_than_pass_a_default_clients_limit(
    monitor: RunningMonitor, stub: Stub
) -> None:
    ids = set()
    for _ in range(5):
        job = await create_manager(stub)
        await merge(stub, job.id, {"big": "b" * 1_000_000})
        ids.add(job.id)
    seen: list[str] = []
    token = ""
    async with aio.insecure_channel(monitor.address) as plain:
        fresh = m_grpc.MonitorServiceStub(plain)
        while True:
            page = await fresh.ListJobs(m.ListJobsRequest(page_size=1000, page_token=token))
            assert 0 < len(page.jobs) < 5
            seen += [j.id for j in page.jobs]
            token = page.next_page_token
            if not token:
                break
    assert sorted(seen) == sorted(ids)


# == durations are bounded ======================================================================
@pytest.mark.parametrize("kind", ["manager", "step", "child"])
async def test_a_timeout_over_a_year_is_invalid_argument_for_every_kind(
    stub: Stub, kind: str
) -> None:
    manager, (step,) = await manager_with_steps(stub, 1)
    parent = {"manager": "", "step": manager.id, "child": step.id}[kind]
    kind_pb = getattr(S, f"JOB_KIND_{kind.upper()}")

    def create(seconds: int) -> Any:
        return stub.CreateJob(
            m.CreateJobRequest(
                kind=kind_pb,
                parent_id=parent,
                name="t",
                timeout=duration_pb2.Duration(seconds=seconds),
            )
        )

    try:
        await create(10_000 * 365 * 86400)
    except aio.AioRpcError as exc:
        assert exc.code() == C.INVALID_ARGUMENT
        assert "timeout" in (exc.details() or "")
    else:
        raise AssertionError("a 10,000-year timeout was accepted")
    assert await code_of(create(int(MAX_DURATION_S) + 1)) == C.INVALID_ARGUMENT
    # At the limit it is accepted, and the job can start: its deadline is a real time.
    job = (await create(int(MAX_DURATION_S))).job
    started = await set_status(stub, job.id, S.JOB_STATUS_RUNNING)
    assert started.status == S.JOB_STATUS_RUNNING
    assert started.deadline.ToDatetime(tzinfo=UTC) > datetime.now(UTC) + timedelta(days=365)


def test_job_file_durations_over_a_year_name_their_field() -> None:
    with pytest.raises(InvalidArgument, match=r"steps\[0\]\.timeout.*366 days"):
        from_mapping(
            {
                "name": "j",
                "steps": [{"name": "s", "type": "command", "timeout": "87840h"}],
            }
        )
    with pytest.raises(InvalidArgument, match="--grace-period"):
        parse_duration("9000h", "--grace-period")
    assert parse_duration("8784h", "timeout") == MAX_DURATION_S


# == derived fields cannot be forged ============================================================
async def test_completed_steps_written_by_a_client_is_ignored(stub: Stub) -> None:
    manager, steps = await manager_with_steps(stub, 2)
    await set_status(stub, steps[0].id, S.JOB_STATUS_RUNNING)
    await set_status(stub, steps[0].id, S.JOB_STATUS_COMPLETED)
    before = await get(stub, manager.id)
    assert meta(before)["completed_steps"] == 1
    for forged in (-7, 99, None, "many"):
        after = await merge(stub, manager.id, {"completed_steps": forged})
        assert meta(after)["completed_steps"] == 1
        assert after.version == before.version
    mixed = await merge(stub, manager.id, {"completed_steps": 5, "note": "kept"})
    assert meta(mixed)["completed_steps"] == 1 and meta(mixed)["note"] == "kept"
    created_job = await create_manager(stub, completed_steps=-7)
    assert "completed_steps" not in meta(created_job)


@pytest.mark.parametrize(
    "reason", ["timeout", "no_children", "grace_period", "children_terminal", "whatever"]
)
async def test_an_end_reason_only_the_monitor_gives_is_invalid_argument(
    stub: Stub, reason: str
) -> None:
    _manager, (step,) = await manager_with_steps(stub, 1)
    before = await get(stub, step.id)
    call = set_status(stub, step.id, S.JOB_STATUS_FAILED, end_reason=reason)
    assert await code_of(call) == C.INVALID_ARGUMENT
    assert await get(stub, step.id) == before


# orchestrator_lost too, from the job's owner only: tests/integration/test_lease_api.py.
@pytest.mark.parametrize("reason", ["", "api", "orchestrator", "cancelled"])
async def test_the_end_reasons_a_client_may_give_are_recorded(stub: Stub, reason: str) -> None:
    _manager, (step,) = await manager_with_steps(stub, 1)
    ended = await set_status(stub, step.id, S.JOB_STATUS_FAILED, end_reason=reason)
    assert ended.end_reason == (reason or "api")


# == nothing live under an ended job ============================================================
async def test_a_step_ended_completed_ends_its_live_children(stub: Stub) -> None:
    manager, (step,) = await manager_with_steps(stub, 1)
    await set_status(stub, step.id, S.JOB_STATUS_RUNNING)
    await send_batches(
        stub,
        [[created(step.id, "a"), running(step.id, "a"), created(step.id, "b")]],
    )
    before = await get(stub, "a")
    await set_status(stub, step.id, S.JOB_STATUS_COMPLETED)
    for child_id in ("a", "b"):
        child = await get(stub, child_id)
        assert (child.status, child.end_reason) == (S.JOB_STATUS_CANCELLED, "cancelled")
    assert (await get(stub, "a")).version == before.version + 1
    got = await get(stub, manager.id)
    assert counts(got.step_stats[0]) == (0, 0, 0, 0, 2)
    assert entry(got, step.id)["children"] == {
        "pending": 0,
        "running": 0,
        "completed": 0,
        "failed": 0,
        "cancelled": 2,
    }


@pytest.mark.parametrize("ending", ["failed", "cancelled", "completed"])
async def test_a_manager_that_ends_ends_every_live_step_and_child(stub: Stub, ending: str) -> None:
    manager, steps = await manager_with_steps(stub, 3)
    done, busy, _never = steps
    await set_status(stub, done.id, S.JOB_STATUS_RUNNING)
    await send_batches(stub, [[created(done.id, "d1"), running(done.id, "d1")]])
    # The orchestrator ends a step: a child still running under it must not outlive the job.
    await set_status(stub, done.id, S.JOB_STATUS_COMPLETED)
    await set_status(stub, busy.id, S.JOB_STATUS_RUNNING)
    await send_batches(
        stub, [[created(busy.id, "b1"), running(busy.id, "b1"), created(busy.id, "b2")]]
    )
    ended = await set_status(stub, manager.id, getattr(S, f"JOB_STATUS_{ending.upper()}"))
    status = {
        j.id: S.JobStatus.Name(j.status)
        for j in (await stub.ListJobs(m.ListJobsRequest(manager_id=manager.id))).jobs
    }
    assert status == {
        manager.id: f"JOB_STATUS_{ending.upper()}",
        done.id: "JOB_STATUS_COMPLETED",
        busy.id: "JOB_STATUS_CANCELLED",
        steps[2].id: "JOB_STATUS_SKIPPED",
        "d1": "JOB_STATUS_CANCELLED",
        "b1": "JOB_STATUS_CANCELLED",
        "b2": "JOB_STATUS_CANCELLED",
    }
    assert [e["status"] for e in meta(ended)["step_stats"]] == ["completed", "cancelled", "skipped"]
    assert meta(ended)["completed_steps"] == 3
    assert [counts(s) for s in ended.step_stats] == [
        (0, 0, 0, 0, 1),
        (0, 0, 0, 0, 2),
        (0, 0, 0, 0, 0),
    ]
    assert ended == await get(stub, manager.id)


# == a step's own timeout holds; every row change raises version ================================
async def test_a_hand_off_seal_on_a_pending_step_keeps_its_own_timeout(stub: Stub) -> None:
    manager = await create_manager(stub)
    req = m.CreateJobRequest(
        kind=S.JOB_KIND_STEP,
        parent_id=manager.id,
        name="s",
        timeout=duration_pb2.Duration(seconds=3600),
    )
    step = (await stub.CreateJob(req)).job
    await send_batches(stub, [[sealed(step.id, 2), created(step.id, "k")]])
    got = await get(stub, step.id)
    assert got.status == S.JOB_STATUS_SPAWNED
    assert got.version == step.version + 1  # one write, one version
    left = got.deadline.ToDatetime(tzinfo=UTC) - datetime.now(UTC)
    assert timedelta(minutes=55) < left <= timedelta(hours=1)
    assert got.HasField("started_at")


async def test_a_hand_off_seal_on_a_pending_step_fires_its_own_timeout(stub: Stub) -> None:
    manager = await create_manager(stub)
    req = m.CreateJobRequest(kind=S.JOB_KIND_STEP, parent_id=manager.id, name="s")
    req.timeout.FromMilliseconds(300)
    step = (await stub.CreateJob(req)).job
    await send_batches(stub, [[sealed(step.id, 1), created(step.id, "k")]])
    watch = stub.WatchJob(m.WatchJobRequest(job_id=step.id))
    last = None
    async with asyncio.timeout(WATCH_WAIT_S):  # the default wait timeout is 30 s
        async for message in watch:
            last = message.job
    assert last is not None
    assert (last.status, last.end_reason) == (S.JOB_STATUS_FAILED, "timeout")
    assert (await get(stub, "k")).status == S.JOB_STATUS_CANCELLED


async def test_a_seal_that_sets_a_deadline_raises_the_version(stub: Stub) -> None:
    _manager, (step,) = await manager_with_steps(stub, 1)
    started = await set_status(stub, step.id, S.JOB_STATUS_RUNNING)
    assert not started.HasField("deadline")
    await send_batches(stub, [[sealed(step.id, 3, handed=False)]])
    got = await get(stub, step.id)
    assert got.HasField("deadline")
    assert got.version == started.version + 1


# == a handed-off step ending always wakes its manager's watchers ===============================
@pytest.mark.parametrize("ending", ["grace_period", "deadline", "cancel"])
async def test_a_handed_off_step_ending_wakes_the_manager_watch_after_a_client_marked_it(
    stub: Stub, ending: str
) -> None:
    manager = await create_manager(stub)
    req = m.CreateJobRequest(
        kind=S.JOB_KIND_STEP,
        parent_id=manager.id,
        name="s",
        metadata=struct({"step_index": 0}),
    )
    if ending == "deadline":
        req.timeout.FromMilliseconds(3000)
    step = (await stub.CreateJob(req)).job
    await set_status(stub, step.id, S.JOB_STATUS_RUNNING)
    if ending == "grace_period":
        await set_status(stub, step.id, S.JOB_STATUS_SPAWNED)  # no seal, no child yet
    else:
        # Sealed for two children, one seen and done: no live child, the step waits on.
        await send_batches(
            stub, [[sealed(step.id, 2), created(step.id, "k"), completed(step.id, "k")]]
        )
    await stub.UpdateStepStatInManager(
        m.UpdateStepStatInManagerRequest(
            manager_id=manager.id, step_id=step.id, status=S.JOB_STATUS_COMPLETED
        )
    )
    seen = await get(stub, manager.id)
    assert (await get(stub, step.id)).status == S.JOB_STATUS_SPAWNED  # not ended yet
    watch = stub.WatchJob(m.WatchJobRequest(job_id=manager.id, after_change_seq=seen.change_seq))
    if ending == "cancel":
        await set_status(stub, step.id, S.JOB_STATUS_CANCELLED)
    woke = await asyncio.wait_for(anext(aiter(watch)), WATCH_WAIT_S)
    watch.cancel()
    assert woke.job.change_seq > seen.change_seq
    ended = await get(stub, step.id)
    expected = {
        "grace_period": (S.JOB_STATUS_COMPLETED, "grace_period"),
        "deadline": (S.JOB_STATUS_FAILED, "timeout"),
        "cancel": (S.JOB_STATUS_CANCELLED, "cancelled"),
    }[ending]
    assert (ended.status, ended.end_reason) == expected
    assert ended.change_seq <= woke.job.change_seq


# == a write to a job past its deadline finds it timed out ======================================
async def test_a_status_write_after_the_deadline_finds_the_step_timed_out(
    database_url: str,
) -> None:
    # A deadline timer that cannot fire on its own during the test: only the write sees it.
    running = await create_server(
        MonitorConfig(database_url=database_url, port=0, shutdown_grace_s=1.0)
    )
    await running.timer.stop()
    try:
        async with aio.insecure_channel(running.address) as channel:
            stub = m_grpc.MonitorServiceStub(channel)
            manager = await create_manager(stub)
            req = m.CreateJobRequest(kind=S.JOB_KIND_STEP, parent_id=manager.id, name="s")
            req.timeout.FromMilliseconds(50)
            step = (await stub.CreateJob(req)).job
            await set_status(stub, step.id, S.JOB_STATUS_RUNNING)
            await asyncio.sleep(0.2)
            same = await set_status(stub, step.id, S.JOB_STATUS_FAILED, error="slow")
            assert (same.status, same.end_reason) == (S.JOB_STATUS_FAILED, "timeout")
            assert same.error == "timed out waiting for child jobs"
            other = await create_step(stub, manager.id, 1)
            req2 = m.CreateJobRequest(kind=S.JOB_KIND_STEP, parent_id=manager.id, name="t")
            req2.timeout.FromMilliseconds(50)
            late = (await stub.CreateJob(req2)).job
            await set_status(stub, late.id, S.JOB_STATUS_RUNNING)
            await asyncio.sleep(0.2)
            call = set_status(stub, late.id, S.JOB_STATUS_COMPLETED)
            assert await code_of(call) == C.FAILED_PRECONDITION
            # Refused, but the timeout it found is committed.
            assert (await get(stub, late.id)).end_reason == "timeout"
            assert (await get(stub, other.id)).status == S.JOB_STATUS_PENDING
    finally:
        await running.stop(grace=0.5)


# == SQLite durability ==========================================================================
@pytest.mark.parametrize("mode, pragma", [(None, 2), ("full", 2), ("normal", 1)])
async def test_sqlite_synchronous_is_full_by_default_and_can_be_traded(
    tmp_path: Any, mode: str | None, pragma: int
) -> None:
    url = f"sqlite:///{tmp_path / 'sync.db'}"
    extra = {} if mode is None else {"sqlite_synchronous": mode}
    running = await create_server(MonitorConfig(database_url=url, port=0, **extra))  # type: ignore[arg-type]
    try:
        got = await running.store.reader.run(
            lambda conn: conn.exec_driver_sql("PRAGMA synchronous").scalar()
        )
        assert got == pragma
        async with aio.insecure_channel(running.address) as channel:
            await create_manager(m_grpc.MonitorServiceStub(channel))  # the writer works too
    finally:
        await running.stop(grace=0.5)


def test_the_limit_flags_read_their_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = config_from(build_parser().parse_args(["serve"]))
    assert defaults.sqlite_synchronous == "full"
    assert defaults.limits.max_metadata_bytes == MAX_METADATA_BYTES
    monkeypatch.setenv("STEPFLOW_MONITOR_SQLITE_SYNCHRONOUS", "normal")
    monkeypatch.setenv("STEPFLOW_MONITOR_MAX_METADATA_BYTES", "2097152")
    config = config_from(build_parser().parse_args(["serve"]))
    assert config.sqlite_synchronous == "normal"
    assert config.limits.max_metadata_bytes == 2 * 1024 * 1024
    with pytest.raises(InvalidArgument, match="--sqlite-synchronous"):
        config_from(build_parser().parse_args(["serve", "--sqlite-synchronous", "off"]))
