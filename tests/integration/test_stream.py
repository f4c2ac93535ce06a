"""StreamChildEvents and the step monitor: every way a step ends reaches step_stats."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import duration_pb2

from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from tests.helpers import entry, manager_with_steps, meta, struct
from tests.jobs import get
from tests.stream_helpers import (
    cancelled,
    completed,
    created,
    failed,
    running,
    sealed,
    send_batches,
    wait_for,
)

S = job_pb2


async def start(stub, step_id: str) -> None:
    await stub.UpdateJobStatus(
        m.UpdateJobStatusRequest(job_id=step_id, status=S.JOB_STATUS_RUNNING)
    )


def counts(job: job_pb2.Job, index: int = 0) -> tuple[int, int, int, int, int]:
    c = job.step_stats[index].children
    return (c.pending, c.running, c.completed, c.failed, c.cancelled)


async def test_events_count_exactly_and_replays_change_nothing(stub) -> None:
    manager, (step,) = await manager_with_steps(stub, 1)
    await start(stub, step.id)
    batch1 = [created(step.id, f"c{i}") for i in range(10)]
    batch2 = [running(step.id, f"c{i}") for i in range(5)] + [
        completed(step.id, "c0"),
        failed(step.id, "c1"),
    ]
    acks = await send_batches(stub, [batch1, batch2])
    assert [a.batch_id for a in acks] == [1, 2]
    assert all(not a.rejected for a in acks)
    assert counts(await get(stub, manager.id)) == (5, 3, 1, 1, 0)
    # The same events again (a client resending after a reconnect): nothing moves.
    await send_batches(stub, [batch1, batch2, batch2])
    assert counts(await get(stub, manager.id)) == (5, 3, 1, 1, 0)
    child = await get(stub, "c1")
    assert child.status == S.JOB_STATUS_FAILED and child.error == "boom"
    assert child.parent_id == step.id and child.manager_id == manager.id


# Text that array literals, CSV-like encodings or SQL quoting would mangle.
AWKWARD_TEXT = "a{b}\"c\\d,e\nNULL 'f' \U0001f600 \u00e9 ()"


async def test_child_rows_written_in_bulk_read_back_exactly(stub) -> None:
    """A group's child rows go to the database as one statement per table (many rows at
    once): names, errors and stamps read back as sent, through GetJob and ListJobs."""
    manager, (step,) = await manager_with_steps(stub, 1)
    await start(stub, step.id)
    ids = [f"bulk-{i}" for i in range(40)]
    first = []
    for child_id in ids:
        event = created(step.id, child_id)
        event.name = f"{AWKWARD_TEXT} {child_id}"
        first.append(event)
    second = [running(step.id, c) for c in ids[:20]]
    second += [failed(step.id, c, error=f"{AWKWARD_TEXT} {c}") for c in ids[:10]]
    second += [completed(step.id, "NULL-" + "x" * 8)]  # an unknown child: created by its end
    acks = await send_batches(stub, [first, second])
    assert all(not a.rejected for a in acks)
    assert counts(await get(stub, manager.id)) == (20, 10, 1, 10, 0)
    child = await get(stub, "bulk-3")
    assert child.name == f"{AWKWARD_TEXT} bulk-3"
    assert child.error == f"{AWKWARD_TEXT} bulk-3"
    assert child.status == S.JOB_STATUS_FAILED
    assert child.started_at.ToDatetime() <= child.finished_at.ToDatetime()
    assert child.created_at.ToDatetime() <= child.started_at.ToDatetime()
    listed = await stub.ListJobs(m.ListJobsRequest(parent_id=step.id, page_size=100))
    by_id = {j.id: j for j in listed.jobs}
    assert len(by_id) == 41
    assert by_id["bulk-39"].status == S.JOB_STATUS_PENDING
    assert by_id["bulk-39"].name == f"{AWKWARD_TEXT} bulk-39"
    assert by_id["bulk-15"].status == S.JOB_STATUS_RUNNING
    assert not by_id["bulk-15"].HasField("finished_at")
    assert by_id["NULL-xxxxxxxx"].status == S.JOB_STATUS_COMPLETED


async def test_late_event_does_not_reopen_a_terminal_child(stub) -> None:
    manager, (step,) = await manager_with_steps(stub, 1)
    await send_batches(
        stub, [[created(step.id, "x"), completed(step.id, "x")], [running(step.id, "x")]]
    )
    assert (await get(stub, "x")).status == S.JOB_STATUS_COMPLETED
    assert counts(await get(stub, manager.id)) == (0, 0, 1, 0, 0)


async def test_unknown_child_of_known_step_is_created_by_any_event(stub) -> None:
    manager, (step,) = await manager_with_steps(stub, 1)
    await send_batches(stub, [[completed(step.id, "late-created")]])
    assert (await get(stub, "late-created")).status == S.JOB_STATUS_COMPLETED
    assert counts(await get(stub, manager.id)) == (0, 0, 1, 0, 0)


@pytest.mark.parametrize("seal_first", [True, False])
async def test_handed_step_ends_when_all_children_terminal(stub, seal_first: bool) -> None:
    manager, (step,) = await manager_with_steps(stub, 1)
    await start(stub, step.id)
    children = [created(step.id, f"k{i}") for i in range(4)]
    ends = [
        completed(step.id, "k0"),
        completed(step.id, "k1"),
        failed(step.id, "k2"),
        cancelled(step.id, "k3"),
    ]
    seal = [sealed(step.id, 4, handed=True)]
    batches = [seal, children, ends] if seal_first else [children, ends[:3], seal, ends[3:]]
    acks = await send_batches(stub, batches)
    assert all(not a.rejected for a in acks)
    got = await get(stub, manager.id)
    e = entry(got, step.id)
    assert e["status"] == "completed"  # some completed + some failed -> completed
    assert e["child_count"] == 4
    assert e["children"] == {
        "pending": 0,
        "running": 0,
        "completed": 2,
        "failed": 1,
        "cancelled": 1,
    }
    assert meta(got)["current_step_status"] == "completed"
    assert meta(got)["completed_steps"] == 1
    row = await get(stub, step.id)
    assert row.status == S.JOB_STATUS_COMPLETED and row.end_reason == "children_terminal"
    assert row.HasField("finished_at")


@pytest.mark.parametrize(
    ("ends", "status", "reason_fragment"),
    [
        (["completed", "completed"], "completed", ""),
        (["failed", "failed"], "failed", "2 of 2 child jobs failed"),
        (["failed", "cancelled"], "failed", "1 of 2"),
        (["cancelled", "cancelled"], "cancelled", "cancelled"),
        (["completed", "failed"], "completed", ""),
    ],
)
async def test_final_status_rules(stub, ends: list[str], status: str, reason_fragment: str) -> None:
    manager, (step,) = await manager_with_steps(stub, 1)
    make = {"completed": completed, "failed": failed, "cancelled": cancelled}
    events = [sealed(step.id, 2)] + [make[kind](step.id, f"z{i}") for i, kind in enumerate(ends)]
    await send_batches(stub, [events])
    got = await get(stub, manager.id)
    assert entry(got, step.id)["status"] == status
    row = await get(stub, step.id)
    assert reason_fragment in row.error


async def test_zero_children_seal_completes_at_once(stub) -> None:
    manager, (step,) = await manager_with_steps(stub, 1)
    await start(stub, step.id)
    await send_batches(stub, [[sealed(step.id, 0)]])
    row = await get(stub, step.id)
    assert row.status == S.JOB_STATUS_COMPLETED and row.end_reason == "no_children"
    assert entry(await get(stub, manager.id), step.id)["status"] == "completed"


async def test_wait_true_seal_leaves_the_step_to_the_orchestrator(stub) -> None:
    manager, (step,) = await manager_with_steps(stub, 1)
    await start(stub, step.id)
    await send_batches(
        stub, [[sealed(step.id, 1, handed=False), created(step.id, "w"), completed(step.id, "w")]]
    )
    row = await get(stub, step.id)
    assert row.status == S.JOB_STATUS_RUNNING
    assert row.HasField("deadline")  # the monitor still guards it with the default wait timeout
    assert entry(await get(stub, manager.id), step.id)["child_count"] == 1


async def test_handed_step_without_seal_or_child_completes_after_grace(stub) -> None:
    manager, (step,) = await manager_with_steps(stub, 1)
    await stub.UpdateJobStatus(
        m.UpdateJobStatusRequest(job_id=step.id, status=S.JOB_STATUS_SPAWNED)
    )
    assert entry(await get(stub, manager.id), step.id)["status"] == "spawned"

    async def ended():
        row = await get(stub, step.id)
        return row if row.status == S.JOB_STATUS_COMPLETED else None

    row = await wait_for(ended, timeout=10)
    assert row.end_reason == "grace_period"
    assert entry(await get(stub, manager.id), step.id)["status"] == "completed"


async def test_step_timeout_fails_it_and_cancels_children(stub) -> None:
    manager = (await stub.CreateJob(m.CreateJobRequest(kind=S.JOB_KIND_MANAGER, name="t"))).job
    step = (
        await stub.CreateJob(
            m.CreateJobRequest(
                kind=S.JOB_KIND_STEP,
                parent_id=manager.id,
                name="slow",
                type="simulate",
                metadata=struct({"step_index": 0}),
                timeout=duration_pb2.Duration(nanos=300_000_000),
            )
        )
    ).job
    await start(stub, step.id)
    await send_batches(stub, [[created(step.id, "s1"), running(step.id, "s1"), sealed(step.id, 1)]])

    async def ended():
        row = await get(stub, step.id)
        return row if row.status == S.JOB_STATUS_FAILED else None

    row = await wait_for(ended, timeout=10)
    assert row.error == "timed out waiting for child jobs" and row.end_reason == "timeout"
    got = await get(stub, manager.id)
    assert entry(got, step.id)["status"] == "failed"
    assert counts(got) == (0, 0, 0, 0, 1)
    assert (await get(stub, "s1")).status == S.JOB_STATUS_CANCELLED


async def test_manager_timeout_fails_it_and_cancels_running_steps(stub) -> None:
    manager = (
        await stub.CreateJob(
            m.CreateJobRequest(
                kind=S.JOB_KIND_MANAGER, name="t", timeout=duration_pb2.Duration(nanos=300_000_000)
            )
        )
    ).job
    step = (
        await stub.CreateJob(
            m.CreateJobRequest(
                kind=S.JOB_KIND_STEP,
                parent_id=manager.id,
                name="a",
                metadata=struct({"step_index": 0}),
            )
        )
    ).job
    await start(stub, step.id)

    async def ended():
        row = await get(stub, manager.id)
        return row if row.status == S.JOB_STATUS_FAILED else None

    row = await wait_for(ended, timeout=10)
    assert row.error == "job timed out"
    assert (await get(stub, step.id)).status == S.JOB_STATUS_CANCELLED
    assert entry(row, step.id)["status"] == "cancelled"


async def test_cancel_through_api_cascades_and_reaches_step_stats(stub) -> None:
    manager, steps = await manager_with_steps(stub, 2)
    await start(stub, steps[0].id)
    await send_batches(
        stub, [[created(steps[0].id, "a"), running(steps[0].id, "a"), created(steps[0].id, "b")]]
    )
    await stub.UpdateJobStatus(
        m.UpdateJobStatusRequest(job_id=manager.id, status=S.JOB_STATUS_CANCELLED)
    )
    got = await get(stub, manager.id)
    assert got.status == S.JOB_STATUS_CANCELLED
    # The started step is cancelled; the one that never started is skipped.
    for step, ended in zip(steps, ("cancelled", "skipped"), strict=True):
        assert (await get(stub, step.id)).status == getattr(S, f"JOB_STATUS_{ended.upper()}")
        assert entry(got, step.id)["status"] == ended
    assert counts(got) == (0, 0, 0, 0, 2)
    assert meta(got)["completed_steps"] == 2
    # Events arriving after the cancel do not reopen anything.
    await send_batches(stub, [[completed(steps[0].id, "a")]])
    assert (await get(stub, "a")).status == S.JOB_STATUS_CANCELLED


async def test_invalid_events_are_rejected_without_losing_the_batch(stub) -> None:
    manager, (step,) = await manager_with_steps(stub, 1)
    good1 = created(step.id, "g1")
    unknown_step = created("no-such-step", "g2")
    seal = sealed(step.id, 1, handed=False)
    beyond = created(step.id, "g3")
    reseal = sealed(step.id, 5, handed=False)
    bad_kind = job_pb2.ChildEvent(event_id="bad", step_id=step.id, child_id="q", kind=99)
    no_child = job_pb2.ChildEvent(
        event_id="nochild", step_id=step.id, kind=S.CHILD_EVENT_KIND_RUNNING
    )
    good2 = completed(step.id, "g1")
    (ack,) = await send_batches(
        stub, [[good1, unknown_step, seal, beyond, reseal, bad_kind, no_child, good2]]
    )
    rejected = {r.event_id: r.reason for r in ack.rejected}
    assert set(rejected) == {
        unknown_step.event_id,
        beyond.event_id,
        reseal.event_id,
        "bad",
        "nochild",
    }
    assert "unknown step" in rejected[unknown_step.event_id]
    assert "beyond" in rejected[beyond.event_id]
    assert "already sealed" in rejected[reseal.event_id]
    assert counts(await get(stub, manager.id)) == (0, 0, 1, 0, 0)


async def test_oversized_batch_ends_the_stream_with_resource_exhausted(stub) -> None:
    _manager, (step,) = await manager_with_steps(stub, 1)
    from monitor_svc.convert import MAX_EVENTS_PER_BATCH

    events = [created(step.id, f"o{i}") for i in range(MAX_EVENTS_PER_BATCH + 1)]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await send_batches(stub, [events])
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_watch_sends_state_then_changes_then_ends_at_terminal(stub) -> None:
    _manager, (step,) = await manager_with_steps(stub, 1)
    call = stub.WatchJob(m.WatchJobRequest(job_id=step.id))
    first = await call.read()
    assert first.job.id == step.id
    await start(stub, step.id)
    second = await call.read()
    assert second.job.status == S.JOB_STATUS_RUNNING
    assert second.job.change_seq > first.job.change_seq
    await stub.UpdateJobStatus(
        m.UpdateJobStatusRequest(job_id=step.id, status=S.JOB_STATUS_COMPLETED)
    )
    seen = []
    while (resp := await call.read()) != grpc.aio.EOF:
        seen.append(resp.job)
    assert seen[-1].status == S.JOB_STATUS_COMPLETED  # the stream ends after the terminal state
    # Resuming from the last change_seq of a finished job sends nothing new... and from 0 the state.
    again = [r async for r in stub.WatchJob(m.WatchJobRequest(job_id=step.id, after_change_seq=0))]
    assert again[-1].job.status == S.JOB_STATUS_COMPLETED and len(again) == 1
    # A client that already has the terminal state is told so by the stream ending at once.
    rest = [
        r
        async for r in stub.WatchJob(
            m.WatchJobRequest(job_id=step.id, after_change_seq=seen[-1].change_seq)
        )
    ]
    assert rest == []


async def test_watch_of_manager_sees_live_counts(stub) -> None:
    manager, (step,) = await manager_with_steps(stub, 1)
    call = stub.WatchJob(m.WatchJobRequest(job_id=manager.id))
    first = await call.read()
    await send_batches(stub, [[created(step.id, "w1")]])
    nxt = await call.read()
    assert nxt.job.change_seq > first.job.change_seq
    assert nxt.job.step_stats[0].children.pending == 1
    call.cancel()


async def test_watch_unknown_job_is_not_found(stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.WatchJob(m.WatchJobRequest(job_id="nope")):
            pass
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_many_watchers_share_one_read_per_change(stub, monitor) -> None:
    _manager, (step,) = await manager_with_steps(stub, 1)
    calls = [stub.WatchJob(m.WatchJobRequest(job_id=step.id)) for _ in range(20)]
    for c in calls:
        await c.read()
    reads_before = monitor.hub.feed_reads(step.id)
    changes = 5
    for i in range(changes):
        await stub.UpdateJobMetadata(
            m.UpdateJobMetadataRequest(job_id=step.id, metadata=struct({"n": i}))
        )
        for c in calls:
            while meta((await c.read()).job).get("n") != i:
                pass
    # One read per change (plus at most one for the joins still settling), not one per watcher.
    assert monitor.hub.feed_reads(step.id) - reads_before <= changes + 1
    for c in calls:
        c.cancel()


async def test_child_first_seen_after_its_step_ended_is_recorded_cancelled(stub) -> None:
    manager, (step,) = await manager_with_steps(stub, 1)
    await start(stub, step.id)
    await stub.UpdateJobStatus(
        m.UpdateJobStatusRequest(job_id=step.id, status=S.JOB_STATUS_CANCELLED)
    )
    (ack,) = await send_batches(stub, [[created(step.id, "late"), running(step.id, "late")]])
    assert not ack.rejected
    child = await get(stub, "late")
    assert child.status == S.JOB_STATUS_CANCELLED
    assert counts(await get(stub, manager.id)) == (0, 0, 0, 0, 1)


async def test_a_childs_metadata_survives_its_events(stub) -> None:
    _, (step,) = await manager_with_steps(stub, 1)
    await send_batches(stub, [[created(step.id, "meta-kid")]])
    await stub.UpdateJobMetadata(
        m.UpdateJobMetadataRequest(job_id="meta-kid", metadata=struct({"url": "https://x"}))
    )
    assert meta(await get(stub, "meta-kid")) == {"url": "https://x"}
    await send_batches(stub, [[running(step.id, "meta-kid"), completed(step.id, "meta-kid")]])
    kid = await get(stub, "meta-kid")
    assert kid.status == S.JOB_STATUS_COMPLETED
    assert meta(kid) == {"url": "https://x"}
