"""No lost updates (design §1): many clients, each on its own channel, write one manager at once.

Every key and every status written must be there afterwards, and the manager's version must
have risen by exactly the number of calls that changed something (no-ops do not count).
Runs on SQLite and PostgreSQL through the ``database_url`` fixture.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc import aio

from monitor_svc.lifecycle import StepTimers
from monitor_svc.server import MonitorConfig, RunningMonitor, create_server
from stepflow_common.proto_status import STATUS_TO_PB, TERMINAL_PB
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from tests.helpers import entry, manager_with_steps, meta, struct
from tests.jobs import get

pytestmark = pytest.mark.timeout(120)

S = job_pb2
Stub = m_grpc.MonitorServiceStub
CLIENTS = 16
RPC_TIMEOUT_S = 30.0
FINAL = sorted(TERMINAL_PB)
NAME = {pb: status.value for status, pb in STATUS_TO_PB.items()}


@dataclass(frozen=True, slots=True)
class Call:
    """One RPC a client makes, and whether it must change the manager (count its version)."""

    run: Callable[[Stub], Awaitable[Any]]
    changes_manager: bool


def interleave(chains: Sequence[Sequence[Call]], seed: int) -> list[Call]:
    """Shuffle calls across chains, keeping each chain's own order (running before the end)."""
    rng = random.Random(seed)
    queues = [list(c) for c in chains if c]
    out: list[Call] = []
    while queues:
        q = rng.choice(queues)
        out.append(q.pop(0))
        if not q:
            queues.remove(q)
    return out


@asynccontextmanager
async def clients(addresses: Sequence[str], n: int) -> AsyncIterator[list[Stub]]:
    """n stubs, each on its own channel (round-robin over the servers given)."""
    async with AsyncExitStack() as stack:
        stubs = []
        for i in range(n):
            channel = await stack.enter_async_context(
                aio.insecure_channel(addresses[i % len(addresses)])
            )
            await asyncio.wait_for(channel.channel_ready(), RPC_TIMEOUT_S)
            stubs.append(Stub(channel))
        yield stubs


async def run_all(stubs: Sequence[Stub], plans: Sequence[Sequence[Call]]) -> None:
    """Each client runs its plan in order; all clients start together."""
    go = asyncio.Event()

    async def client(stub: Stub, plan: Sequence[Call]) -> None:
        await go.wait()
        for call in plan:
            await call.run(stub)

    tasks = [asyncio.create_task(client(s, p)) for s, p in zip(stubs, plans, strict=True)]
    await asyncio.sleep(0)
    go.set()
    await asyncio.gather(*tasks)


# -- call builders ------------------------------------------------------------------------------
def set_key(manager_id: str, key: str, value: Any, *, changes: bool = True) -> Call:
    async def run(stub: Stub) -> None:
        req = m.UpdateJobMetadataRequest(job_id=manager_id, metadata=struct({key: value}))
        await stub.UpdateJobMetadata(req, timeout=RPC_TIMEOUT_S)

    return Call(run, changes)


def patch_entry(manager_id: str, step_id: str, fields: dict[str, Any]) -> Call:
    async def run(stub: Stub) -> None:
        patch = {"step_stats": [{"step_id": step_id, **fields}]}
        req = m.UpdateJobMetadataRequest(job_id=manager_id, metadata=struct(patch))
        await stub.UpdateJobMetadata(req, timeout=RPC_TIMEOUT_S)

    return Call(run, True)


def step_stat(manager_id: str, step_id: str, status: int, *, changes: bool = True) -> Call:
    async def run(stub: Stub) -> None:
        req = m.UpdateStepStatInManagerRequest(
            manager_id=manager_id, step_id=step_id, status=status
        )
        resp = await stub.UpdateStepStatInManager(req, timeout=RPC_TIMEOUT_S)
        assert resp.step_stat.status == status

    return Call(run, changes)


def job_status(step_id: str, status: int, *, changes: bool = True) -> Call:
    async def run(stub: Stub) -> None:
        req = m.UpdateJobStatusRequest(job_id=step_id, status=status, error=f"e-{status}")
        resp = await stub.UpdateJobStatus(req, timeout=RPC_TIMEOUT_S)
        assert resp.job.status == status

    return Call(run, changes)


# -- the scenarios ------------------------------------------------------------------------------
KEYS_PER_CLIENT = 16
STEPS_PER_CLIENT = 2


async def _metadata_and_step_stats(stubs: Sequence[Stub], setup: Stub) -> None:
    n_steps = CLIENTS * STEPS_PER_CLIENT
    manager, steps = await manager_with_steps(setup, n_steps)
    final = {s.id: FINAL[i % len(FINAL)] for i, s in enumerate(steps)}
    plans: list[list[Call]] = []
    for c in range(CLIENTS):
        chains: list[list[Call]] = []
        for k in range(KEYS_PER_CLIENT):
            key, value = f"k{c}_{k}", {"client": c, "n": k}
            chain = [set_key(manager.id, key, value)]
            if k == 0:  # the same write again: a no-op that must not raise the version
                chain.append(set_key(manager.id, key, value, changes=False))
            chains.append(chain)
        for step in steps[c * STEPS_PER_CLIENT : (c + 1) * STEPS_PER_CLIENT]:
            chains.append(
                [
                    step_stat(manager.id, step.id, S.JOB_STATUS_RUNNING),
                    step_stat(manager.id, step.id, final[step.id]),
                    step_stat(manager.id, step.id, final[step.id], changes=False),
                ]
            )
        plans.append(interleave(chains, seed=c))
    total = sum(len(p) for p in plans)
    changing = sum(call.changes_manager for p in plans for call in p)
    assert total >= 300

    await run_all(stubs, plans)

    got = await get(setup, manager.id)
    doc = meta(got)
    for c in range(CLIENTS):
        for k in range(KEYS_PER_CLIENT):
            assert doc[f"k{c}_{k}"] == {"client": c, "n": k}, (c, k)
    assert [e["step_id"] for e in doc["step_stats"]] == [s.id for s in steps]
    for step in steps:
        assert entry(got, step.id)["status"] == NAME[final[step.id]], step.name
    assert [s.status for s in got.step_stats] == [final[s.id] for s in steps]
    assert doc["current_step_status"] == NAME[final[steps[0].id]]
    assert doc["completed_steps"] == n_steps
    assert doc["total_steps"] == n_steps
    assert got.version == manager.version + changing


@asynccontextmanager
async def monitors(
    first: RunningMonitor, database_url: str, timers: StepTimers, count: int
) -> AsyncIterator[list[str]]:
    """Addresses of ``count`` monitors on one database: the fixture's, plus more started here.
    Two monitors are two engines and two writer threads, so only the database's row lock /
    immediate transaction stands between their read-modify-writes."""
    extra: list[RunningMonitor] = []
    try:
        for _ in range(count - 1):
            extra.append(
                await create_server(
                    MonitorConfig(
                        database_url=database_url, port=0, timers=timers, shutdown_grace_s=1.0
                    )
                )
            )
        yield [first.address, *(e.address for e in extra)]
    finally:
        for running in extra:
            await running.stop(grace=0.5)


@pytest.mark.parametrize("servers", [1, 2])
async def test_no_lost_updates_metadata_keys_and_step_stats(
    monitor: RunningMonitor, database_url: str, timers: StepTimers, servers: int
) -> None:
    async with (
        monitors(monitor, database_url, timers, servers) as addresses,
        clients(addresses, CLIENTS + 1) as stubs,
    ):
        await _metadata_and_step_stats(stubs[:CLIENTS], stubs[CLIENTS])


@pytest.mark.parametrize("servers", [1, 2])
async def test_no_lost_updates_with_step_status_changes(
    monitor: RunningMonitor, database_url: str, timers: StepTimers, servers: int
) -> None:
    """UpdateJobStatus on steps (which rewrites the manager's step_stats, current_step_status
    and completed_steps) mixed with UpdateStepStatInManager, metadata keys, and step_stats
    merges that touch the very entries whose status is moving."""
    n_steps = CLIENTS * 2
    keys_per_client = 12
    async with (
        monitors(monitor, database_url, timers, servers) as addresses,
        clients(addresses, CLIENTS + 1) as stubs,
    ):
        setup = stubs[CLIENTS]
        manager, steps = await manager_with_steps(setup, n_steps)
        by_row = steps[0::2]  # ended with UpdateJobStatus on the step
        by_stat = steps[1::2]  # ended with UpdateStepStatInManager on the manager
        final = {s.id: FINAL[i % len(FINAL)] for i, s in enumerate(steps)}
        docs = {s.id: 100 + i for i, s in enumerate(steps)}
        plans: list[list[Call]] = []
        for c in range(CLIENTS):
            row_step, stat_step = by_row[c], by_stat[c]
            chains: list[list[Call]] = [
                [set_key(manager.id, f"k{c}_{k}", c * 1000 + k)] for k in range(keys_per_client)
            ]
            chains.append(
                [
                    job_status(row_step.id, S.JOB_STATUS_RUNNING),
                    job_status(row_step.id, final[row_step.id]),
                    job_status(row_step.id, final[row_step.id], changes=False),
                ]
            )
            chains.append(
                [
                    step_stat(manager.id, stat_step.id, S.JOB_STATUS_RUNNING),
                    step_stat(manager.id, stat_step.id, final[stat_step.id]),
                ]
            )
            # Merges into the entries whose status other calls are moving right now.
            chains.append(
                [patch_entry(manager.id, row_step.id, {"document_count": docs[row_step.id]})]
            )
            chains.append(
                [patch_entry(manager.id, stat_step.id, {"document_count": docs[stat_step.id]})]
            )
            plans.append(interleave(chains, seed=100 + c))
        total = sum(len(p) for p in plans)
        changing = sum(call.changes_manager for p in plans for call in p)
        assert total >= 300

        await run_all(stubs[:CLIENTS], plans)

        got = await get(setup, manager.id)
        doc = meta(got)
        for c in range(CLIENTS):
            for k in range(keys_per_client):
                assert doc[f"k{c}_{k}"] == c * 1000 + k
        assert [e["step_id"] for e in doc["step_stats"]] == [s.id for s in steps]
        for step in steps:
            e = entry(got, step.id)
            assert e["status"] == NAME[final[step.id]], step.name
            assert e["document_count"] == docs[step.id], step.name
        for step in by_row:
            row = await get(setup, step.id)
            assert row.status == final[step.id]
            assert entry(got, step.id)["error"] == f"e-{final[step.id]}"
        for step in by_stat:  # UpdateStepStatInManager leaves the step's own row alone
            assert (await get(setup, step.id)).status == S.JOB_STATUS_PENDING
        assert doc["current_step_status"] == NAME[final[steps[0].id]]
        assert doc["completed_steps"] == n_steps
        assert got.version == manager.version + changing


async def test_expected_version_compare_and_set_loses_nothing(monitor: RunningMonitor) -> None:
    """Optimistic concurrency: every client increments one shared counter with a
    read / UpdateJobMetadata(expected_version) / retry-on-ABORTED loop."""
    rounds = 4
    async with clients([monitor.address], CLIENTS + 1) as stubs:
        setup = stubs[CLIENTS]
        created = await setup.CreateJob(
            m.CreateJobRequest(kind=S.JOB_KIND_MANAGER, name="cas", metadata=struct({"counter": 0}))
        )
        job = created.job
        aborted = 0

        async def increment(stub: Stub) -> None:
            nonlocal aborted
            while True:
                current = await get(stub, job.id)
                req = m.UpdateJobMetadataRequest(
                    job_id=job.id,
                    metadata=struct({"counter": meta(current)["counter"] + 1}),
                    expected_version=current.version,
                )
                try:
                    resp = await stub.UpdateJobMetadata(req, timeout=RPC_TIMEOUT_S)
                except aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.ABORTED, exc
                    aborted += 1
                    continue
                assert resp.job.version == current.version + 1
                return

        async def client(stub: Stub) -> None:
            for _ in range(rounds):
                await increment(stub)

        await asyncio.gather(*(client(s) for s in stubs[:CLIENTS]))
        got = await get(setup, job.id)
        assert meta(got)["counter"] == CLIENTS * rounds
        assert got.version == job.version + CLIENTS * rounds
        assert aborted > 0  # the clients really did collide


@pytest.mark.parametrize("servers", [1, 2])
async def test_child_events_replayed_through_every_monitor_count_once(
    monitor: RunningMonitor, database_url: str, timers: StepTimers, servers: int
) -> None:
    """The same child events sent at once on several streams, through every monitor: each
    child's transitions reach its step's counts once. Two transactions that read a child row
    (or its step's counts) before the other's commit would both apply the transition, and the
    counts would drift from the children's final states."""
    from tests.stream_helpers import completed, created, failed, running, send_batches

    n_children, per_batch, streams = 120, 15, 6
    async with (
        monitors(monitor, database_url, timers, servers) as addresses,
        clients(addresses, streams + 1) as stubs,
    ):
        setup = stubs[streams]
        manager, (step,) = await manager_with_steps(setup, 1)
        await setup.UpdateJobStatus(
            m.UpdateJobStatusRequest(job_id=step.id, status=S.JOB_STATUS_RUNNING),
            timeout=RPC_TIMEOUT_S,
        )
        ids = [f"{step.id}-c{i}" for i in range(n_children)]
        events = [created(step.id, c) for c in ids] + [running(step.id, c) for c in ids]
        events += [(completed if i % 3 else failed)(step.id, c) for i, c in enumerate(ids)]
        batches = [events[i : i + per_batch] for i in range(0, len(events), per_batch)]

        async def stream(stub: Stub, k: int) -> None:
            # Each stream starts at another batch, so streams overtake each other.
            order = batches[k * 7 % len(batches) :] + batches[: k * 7 % len(batches)]
            acks = await send_batches(stub, order)
            assert len(acks) == len(order) and not any(a.rejected for a in acks)

        await asyncio.gather(*(stream(stubs[k], k) for k in range(streams)))
        got = await get(setup, manager.id)
        children = got.step_stats[0].children
        failures = len(ids[0::3])
        assert (children.pending, children.running) == (0, 0)
        assert (children.completed, children.failed, children.cancelled) == (
            n_children - failures,
            failures,
            0,
        )
        for i in (0, 1, n_children - 1):
            child = await get(setup, ids[i])
            assert child.status == (S.JOB_STATUS_COMPLETED if i % 3 else S.JOB_STATUS_FAILED)
