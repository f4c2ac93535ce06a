"""Bounded growth: ``monitor-svc prune --older-than D`` deletes finished job trees
(manager, steps, children, step progress rows) in batches while the monitor serves, leaves
every live job as it was, and the tables shrink by exactly what it reports. Dedupe keeps no
state of its own: replaying every event adds no row anywhere.

SQLite and PostgreSQL (the ``database_url`` fixture); the monitor runs in-process, prune is
the real console script.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import subprocess
from collections.abc import Sequence
from typing import Any

import grpc
import pytest
from grpc import aio
from sqlalchemy import create_engine, inspect, text

from monitor_svc.server import RunningMonitor
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from tests.helpers import manager_with_steps, meta, struct
from tests.jobs import get, list_all
from tests.process_helpers import (
    MONITOR_SVC,
    clean_env,
    wait_job,
)

pytestmark = pytest.mark.timeout(120)

S = job_pb2
K = job_pb2
Stub = m_grpc.MonitorServiceStub
CALL_S = 15.0
TABLES = ("jobs", "step_progress", "job_log")
LAST_LOG_LINES: list[int] = []  # what the last prune() reported
_ids = itertools.count(1)


def ev(kind: int, step_id: str, child_id: str = "", **kw: Any) -> job_pb2.ChildEvent:
    return job_pb2.ChildEvent(
        event_id=f"p{next(_ids)}", kind=kind, step_id=step_id, child_id=child_id, **kw
    )


def children_events(step_id: str, n: int, end: int = K.CHILD_EVENT_KIND_COMPLETED) -> list[Any]:
    out = []
    for k in range(n):
        out += [
            ev(K.CHILD_EVENT_KIND_CREATED, step_id, f"{step_id}.c{k}"),
            ev(end, step_id, f"{step_id}.c{k}"),
        ]
    return out


async def send(stub: Stub, batches: Sequence[Sequence[job_pb2.ChildEvent]]) -> None:
    call = stub.StreamChildEvents(timeout=CALL_S)
    for i, batch in enumerate(batches, start=1):
        await call.write(m.StreamChildEventsRequest(batch_id=i, events=list(batch)))
    await call.done_writing()
    acks = []
    while (ack := await call.read()) is not aio.EOF:
        assert not ack.rejected, ack.rejected
        acks.append(ack)
    assert len(acks) == len(batches)


async def set_status(stub: Stub, job_id: str, status: int) -> None:
    await stub.UpdateJobStatus(
        m.UpdateJobStatusRequest(job_id=job_id, status=status),  # type: ignore[arg-type]
        timeout=CALL_S,
    )


def row_counts(database_url: str) -> dict[str, int]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in TABLES}
    finally:
        engine.dispose()


def table_names(database_url: str) -> set[str]:
    engine = create_engine(database_url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def prune(database_url: str, older_than: str, batch_size: int = 2) -> tuple[int, int, int]:
    """Run `monitor-svc prune`; (managers, job rows, step progress rows) it reports."""
    done = subprocess.run(
        [str(MONITOR_SVC), "prune", "--older-than", older_than, "--database-url", database_url,
         "--batch-size", str(batch_size)],
        capture_output=True, text=True, timeout=60, env=clean_env(), check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    found = re.search(
        # The line as it was before the job log (scripts read it), then the log's lines.
        r"pruned (\d+) finished jobs \((\d+) job rows, (\d+) step progress rows\); (\d+) log "
        r"lines",
        done.stdout,
    )
    assert found, done.stdout
    managers, jobs, progress, log_lines = (int(g) for g in found.groups())
    LAST_LOG_LINES[:] = [log_lines]
    return managers, jobs, progress


async def finished_trees(stub: Stub) -> list[tuple[str, int, int]]:
    """Three finished trees: completed through the stream, cancelled, failed.
    Each: (manager id, job rows, step rows)."""
    trees = []
    # completed: two handed-off steps ended by their children
    manager, steps = await manager_with_steps(stub, 2)
    await send(
        stub,
        [
            children_events(steps[0].id, 5),
            children_events(steps[1].id, 4, K.CHILD_EVENT_KIND_FAILED),
            [ev(K.CHILD_EVENT_KIND_SEALED, s.id, child_count=n, handed_to_monitor=True)
             for s, n in ((steps[0], 5), (steps[1], 4))],
        ],
    )  # fmt: skip
    for step in steps:
        await wait_job(
            stub, step.id, lambda j: j.status in {S.JOB_STATUS_COMPLETED, S.JOB_STATUS_FAILED}, 10
        )
    await set_status(stub, manager.id, S.JOB_STATUS_COMPLETED)
    trees.append((manager.id, 1 + 2 + 9, 2))
    # cancelled: the cascade ends a running step and its running children
    manager, (step,) = await manager_with_steps(stub, 1)
    await set_status(stub, step.id, S.JOB_STATUS_RUNNING)
    await send(
        stub, [[ev(K.CHILD_EVENT_KIND_CREATED, step.id, f"{step.id}.k{k}") for k in range(3)]]
    )
    await set_status(stub, manager.id, S.JOB_STATUS_CANCELLED)
    trees.append((manager.id, 1 + 1 + 3, 1))
    # failed, with no children at all
    manager, steps = await manager_with_steps(stub, 3)
    await set_status(stub, manager.id, S.JOB_STATUS_FAILED)
    trees.append((manager.id, 1 + 3, 3))
    return trees


async def live_trees(stub: Stub) -> tuple[str, str, str]:
    """A running manager with a finished step and a running one (children live), and a
    pending manager with nothing started. Returns (running manager, its running step,
    pending manager)."""
    manager, steps = await manager_with_steps(stub, 2)
    await set_status(stub, manager.id, S.JOB_STATUS_RUNNING)
    await send(stub, [children_events(steps[0].id, 3)])
    await set_status(stub, steps[0].id, S.JOB_STATUS_COMPLETED)
    await set_status(stub, steps[1].id, S.JOB_STATUS_RUNNING)
    await send(
        stub, [[ev(K.CHILD_EVENT_KIND_CREATED, steps[1].id, f"live.c{k}") for k in range(4)]]
    )
    pending, _ = await manager_with_steps(stub, 1)
    return manager.id, steps[1].id, pending.id


async def tree(stub: Stub, manager_id: str) -> list[bytes]:
    jobs = await list_all(stub, manager_id=manager_id)
    return sorted(j.SerializeToString(deterministic=True) for j in jobs)


async def assert_gone(stub: Stub, manager_id: str) -> None:
    with pytest.raises(aio.AioRpcError) as err:
        await get(stub, manager_id)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert await list_all(stub, manager_id=manager_id) == []


async def test_prune_deletes_finished_trees_and_leaves_live_jobs_alone(
    monitor: RunningMonitor, stub: Stub, database_url: str
) -> None:
    finished = await finished_trees(stub)
    live_manager, live_step, pending = await live_trees(stub)
    live_before = {job: await tree(stub, job) for job in (live_manager, pending)}
    before = row_counts(database_url)

    # Nothing finished longer ago than an hour: nothing goes.
    assert await asyncio.to_thread(prune, database_url, "1h") == (0, 0, 0)
    assert row_counts(database_url) == before

    await asyncio.sleep(0.05)
    # Events keep flowing into the live job while prune runs.
    live_events = [[ev(K.CHILD_EVENT_KIND_RUNNING, live_step, f"live.c{k}")] for k in range(4)] + [
        [ev(K.CHILD_EVENT_KIND_COMPLETED, live_step, f"live.c{k}")] for k in range(4)
    ]
    streaming = asyncio.ensure_future(send(stub, live_events))
    managers, jobs, progress = await asyncio.to_thread(prune, database_url, "10ms", 2)
    await asyncio.wait_for(streaming, CALL_S)

    assert managers == len(finished)
    assert jobs == sum(rows for _, rows, _ in finished)
    assert progress == sum(steps for _, _, steps in finished)
    after = row_counts(database_url)
    assert after["jobs"] == before["jobs"] - jobs
    assert after["step_progress"] == before["step_progress"] - progress
    # Their logs went with them (the events meanwhile end nothing, so they write no line).
    assert LAST_LOG_LINES[0] > 0
    assert after["job_log"] == before["job_log"] - LAST_LOG_LINES[0]
    for manager_id, _, _ in finished:
        await assert_gone(stub, manager_id)

    # The live trees: all there, the pending one exactly as it was, the running one with
    # exactly the events that arrived meanwhile.
    assert await tree(stub, pending) == live_before[pending]
    job = await get(stub, live_manager)
    assert job.status == S.JOB_STATUS_RUNNING
    counts = {s.step_id: s.children for s in job.step_stats}
    assert (counts[live_step].pending, counts[live_step].running, counts[live_step].completed) == (
        0,
        0,
        4,
    )
    assert len(await list_all(stub, manager_id=live_manager)) == 1 + 2 + 3 + 4
    # And once more changes nothing.
    assert await asyncio.to_thread(prune, database_url, "10ms") == (0, 0, 0)
    assert row_counts(database_url) == after


async def test_a_pruned_job_is_not_found_and_the_monitor_serves_on(
    monitor: RunningMonitor, stub: Stub, database_url: str
) -> None:
    """Late events for a pruned step are rejected (never recreate it), watches of it are
    NOT_FOUND, and new jobs are unaffected."""
    (manager_id, _, _), *_ = await finished_trees(stub)
    steps = [e for e in (await get(stub, manager_id)).step_stats]
    assert await asyncio.to_thread(prune, database_url, "10ms") == (3, 12 + 5 + 4, 6)
    call = stub.StreamChildEvents(timeout=CALL_S)
    late = ev(K.CHILD_EVENT_KIND_COMPLETED, steps[0].step_id, f"{steps[0].step_id}.c0")
    await call.write(m.StreamChildEventsRequest(batch_id=1, events=[late]))
    await call.done_writing()
    ack = await call.read()
    assert [r.event_id for r in ack.rejected] == [late.event_id]
    await assert_gone(stub, manager_id)
    with pytest.raises(aio.AioRpcError) as err:
        async for _ in stub.WatchJob(m.WatchJobRequest(job_id=manager_id), timeout=CALL_S):
            pass
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    manager, _ = await manager_with_steps(stub, 1)
    assert (await get(stub, manager.id)).status == S.JOB_STATUS_PENDING


async def test_dedupe_keeps_no_state_so_replays_add_no_rows(
    monitor: RunningMonitor, stub: Stub, database_url: str
) -> None:
    """Duplicates are recognised by the child's state transition, not by remembering event
    ids: sending every event again (three times) adds no row to any table."""
    tables = {"jobs", "step_progress", "counters", "leases", "lease_instances", "alembic_version"}
    # The job log keeps lines, not events: a replay changes nothing, so it writes no line.
    tables |= {"job_log", "job_log_heads"}
    # None of them remembers events (metadata_writes keeps only keyed metadata writes).
    assert table_names(database_url) - {"metadata_writes"} <= tables
    assert "metadata_writes" in table_names(database_url)
    manager, steps = await manager_with_steps(stub, 2)
    batches = [children_events(steps[0].id, 50), children_events(steps[1].id, 30)]
    await send(stub, batches)
    once = row_counts(database_url)
    first = await tree(stub, manager.id)
    for _ in range(3):
        await send(stub, [[ev(e.kind, e.step_id, e.child_id) for e in b] for b in batches])
    assert row_counts(database_url) == once
    again = await get(stub, manager.id)
    assert [s.children.completed for s in again.step_stats] == [50, 30]
    # Only change_seq-free fields compared: a replay changes nothing a client can see.
    assert await tree(stub, manager.id) == first


async def test_a_manager_set_completed_with_a_handed_off_step_leaves_nothing_live_to_prune(
    monitor: RunningMonitor, stub: Stub, database_url: str
) -> None:
    """A manager set `completed` through the API while one of its steps is still handed off
    (spawned, children running) ends that step and its children in the same call, so no live
    job is left under a finished manager and prune removes the whole tree."""
    manager, (step,) = await manager_with_steps(stub, 1)
    kid = [
        ev(K.CHILD_EVENT_KIND_CREATED, step.id, "kid"),
        ev(K.CHILD_EVENT_KIND_RUNNING, step.id, "kid"),
        ev(K.CHILD_EVENT_KIND_SEALED, step.id, child_count=1, handed_to_monitor=True),
    ]
    await send(stub, [kid])
    await set_status(stub, manager.id, S.JOB_STATUS_COMPLETED)
    assert (await get(stub, step.id)).status == S.JOB_STATUS_CANCELLED
    assert (await get(stub, "kid")).status == S.JOB_STATUS_CANCELLED
    await asyncio.sleep(0.05)
    await asyncio.to_thread(prune, database_url, "10ms")
    with pytest.raises(aio.AioRpcError) as gone:
        await get(stub, step.id)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


async def test_prune_succeeds_while_the_monitor_is_busy_writing(
    monitor: RunningMonitor, stub: Stub, database_url: str, request: pytest.FixtureRequest
) -> None:
    """Prune is meant to run beside live traffic: with a writer committing every few
    milliseconds, every prune (one tree per transaction) still completes."""
    live, _ = await manager_with_steps(stub, 1)
    stop = asyncio.Event()

    async def busy() -> int:
        n = 0
        while not stop.is_set():
            await stub.UpdateJobMetadata(
                m.UpdateJobMetadataRequest(job_id=live.id, metadata=struct({"n": n})),
                timeout=CALL_S,
            )
            n += 1
        return n

    writer = asyncio.ensure_future(busy())
    try:
        for _ in range(3):
            finished = [(await finished_trees(stub))[2][0] for _ in range(2)]
            await asyncio.sleep(0.05)
            managers, _, _ = await asyncio.to_thread(prune, database_url, "10ms", 1)
            assert managers >= len(finished)
            for manager_id in finished:
                await assert_gone(stub, manager_id)
    finally:
        stop.set()
        writes = await asyncio.wait_for(writer, CALL_S)
    assert writes > 0
    assert meta(await get(stub, live.id))["n"] == writes - 1


def metadata_write_keys(database_url: str) -> int:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM metadata_writes")).scalar_one())
    finally:
        engine.dispose()


async def test_prune_deletes_the_keys_of_metadata_writes_with_their_job_and_by_age(
    stub: Stub, database_url: str
) -> None:
    """A keyed UpdateJobMetadata leaves its key; prune deletes it with a pruned tree, and any
    key older than the cutoff on a job that lives on (a retry comes within seconds)."""
    finished, _ = await manager_with_steps(stub, 1)
    live, _ = await manager_with_steps(stub, 1)
    for job_id in (finished.id, live.id):
        for n in range(3):
            await stub.UpdateJobMetadata(
                m.UpdateJobMetadataRequest(
                    job_id=job_id, metadata=struct({"n": n}), request_id=f"{job_id}-w{n}"
                ),
                timeout=CALL_S,
            )
    assert metadata_write_keys(database_url) == 6
    await set_status(stub, finished.id, S.JOB_STATUS_COMPLETED)
    await asyncio.to_thread(prune, database_url, "1h")
    assert metadata_write_keys(database_url) == 6  # nothing is that old yet
    await asyncio.sleep(0.05)
    await asyncio.to_thread(prune, database_url, "10ms")
    assert metadata_write_keys(database_url) == 0
    assert (await get(stub, live.id)).metadata["n"] == 2.0  # the live job is untouched
