"""Scale-out: two ``monitor-svc`` processes on one PostgreSQL database at once.

- the orchestrator's event stream on one replica, its unary calls, other writers and the
  watchers on the other; then swapped: nothing lost, every step ended exactly once, no
  metadata key lost between the replicas;
- many short deadlines both replicas race to fire: each fired by exactly one of them (the
  replicas' logs add up to the number of deadlines, and every step shows one ending);
- WatchJob on either replica sees a change committed through the other promptly (LISTEN /
  NOTIFY: far sooner than the deadline timer's idle poll would).

PostgreSQL only (SQLite is one process's file); every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from grpc import aio

from orchestrator_svc.definitions import from_mapping
from orchestrator_svc.event_stream import EventStream
from orchestrator_svc.monitor_client import MonitorClient
from orchestrator_svc.orchestrator import Orchestrator
from orchestrator_svc.workers.registry import load_registry
from orchestrator_svc.workers.simulate import expected_tally
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from tests.helpers import meta, struct
from tests.jobs import get, list_all
from tests.process_helpers import (
    TERMINAL,
    ServerProcess,
    assert_ended_once,
    assert_tree_consistent,
    monitor_process,
    running,
    wait_job,
)

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.parametrize(
        "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
    ),
]

S = job_pb2
Stub = m_grpc.MonitorServiceStub
WAIT_S = 60.0
CALL_S = 15.0


def simulate(children: int, **more: Any) -> dict[str, Any]:
    return {"children": children, "duration_ms": 3, "concurrency": 16, **more}


def job_definition(i: int) -> dict[str, Any]:
    return {
        "name": f"replicated-{i}",
        "steps": [
            {"name": "handed", "type": "simulate", "wait": False,
             "config": simulate(120 + i, fail_every=9)},
            {"name": "waited", "type": "simulate", "config": simulate(60 + i, cancel_every=5)},
            {"name": "shell", "type": "command", "config": {"command": "true"}},
        ],
    }  # fmt: skip


def expected_counts(data: dict[str, Any]) -> dict[str, tuple[int, int, int, int, int]]:
    out = {}
    for step in data["steps"]:
        if step["type"] == "simulate":
            t = expected_tally(step["config"])
            out[step["name"]] = (0, 0, t.completed, t.failed, t.cancelled)
    return out


class Recorder:
    """Every state a WatchJob on one replica sends, until the job is terminal."""

    def __init__(self, stub: Stub, job_id: str) -> None:
        self.states: list[job_pb2.Job] = []
        self._task = asyncio.create_task(self._run(stub, job_id))

    async def _run(self, stub: Stub, job_id: str) -> None:
        async for msg in stub.WatchJob(m.WatchJobRequest(job_id=job_id), timeout=WAIT_S):
            self.states.append(msg.job)

    async def done(self) -> job_pb2.Job:
        await asyncio.wait_for(self._task, WAIT_S)
        assert self.states
        seqs = [s.change_seq for s in self.states]
        assert seqs == sorted(set(seqs)), "change_seq went backwards"
        rank = {s: min(s, S.JOB_STATUS_COMPLETED) for s in range(8)}
        last: dict[str, int] = {}
        for state in self.states:
            for stat in state.step_stats:
                before = last.get(stat.step_id)
                if before is not None:
                    assert rank[stat.status] >= rank[before], "a step status went backwards"
                    if before in TERMINAL:
                        assert stat.status == before, "a finished step changed"
                last[stat.step_id] = stat.status
        return self.states[-1]


async def metadata_writer(stub: Stub, manager_id: str, writer: int, stop: asyncio.Event) -> int:
    """Unary writes racing the other replica's event ingestion on the same manager."""
    n = 0
    while not stop.is_set():
        await stub.UpdateJobMetadata(
            m.UpdateJobMetadataRequest(
                job_id=manager_id, metadata=struct({f"w{writer}_{n}": n, f"last_{writer}": n})
            ),
            timeout=CALL_S,
        )
        n += 1
        await asyncio.sleep(0.005)
    return n


async def run_split(stream_on: ServerProcess, calls_on: ServerProcess, owner: str) -> None:
    """Jobs whose events stream into ``stream_on`` while the orchestrator's unary calls,
    watchers and other writers use ``calls_on``."""
    workers = load_registry()
    async with aio.insecure_channel(calls_on.address) as calls:
        stub = Stub(calls)
        stream = EventStream(lambda: aio.insecure_channel(stream_on.address))
        stream.start()
        orch = Orchestrator(MonitorClient(calls), stream, workers, owner=owner)
        try:
            data = [job_definition(i) for i in range(3)]
            ids = [await orch.submit(from_mapping(d, workers=workers)) for d in data]
            recorders = [Recorder(stub, i) for i in ids]
            stop = asyncio.Event()
            writers = [
                asyncio.create_task(metadata_writer(stub, ids[w % len(ids)], w, stop))
                for w in range(4)
            ]
            finals = [await r.done() for r in recorders]
            stop.set()
            written = await asyncio.wait_for(asyncio.gather(*writers), WAIT_S)
            await asyncio.wait_for(orch.wait_all(), WAIT_S)
            assert stream.stats.rejected == []
            assert stream.stats.acked_events > 0

            for manager_id, final, d in zip(ids, finals, data, strict=True):
                assert final.status == S.JOB_STATUS_COMPLETED, (final.status, final.error)
                await assert_tree_consistent(stub, manager_id, expected_counts=expected_counts(d))
            # No write from either replica was lost on the manager both were changing.
            for w, n in enumerate(written):
                md = meta(await get(stub, ids[w % len(ids)]))
                assert n > 0 and md[f"last_{w}"] == n - 1
                assert all(md[f"w{w}_{k}"] == k for k in range(n)), f"writer {w} lost a key"
        finally:
            await orch.drain(0)
            await stream.close(flush_timeout=5)


async def test_two_replicas_split_stream_and_calls_then_swapped(
    database_url: str, tmp_path: Path
) -> None:
    a = monitor_process(database_url, tmp_path, name="monitor-a")
    b = monitor_process(database_url, tmp_path, name="monitor-b")
    async with running(a, b):
        await run_split(stream_on=a, calls_on=b, owner="split-ab")
        await run_split(stream_on=b, calls_on=a, owner="split-ba")


# -- deadlines: each fired by exactly one replica ----------------------------------------------
def fired_in(server: ServerProcess) -> int:
    total = 0
    for line in server.log_text().splitlines():
        if '"deadlines fired"' not in line:
            continue
        record = json.loads(line)
        total += int(record["count"])
    return total


async def test_every_deadline_is_fired_by_exactly_one_replica(
    database_url: str, tmp_path: Path
) -> None:
    """Sixty running steps with short timeouts, created half through each replica so both
    timers know them; both race to fire them. Every step ends once (failed by timeout, its
    child cancelled, one version for the ending), and the replicas' counts add up."""
    a = monitor_process(database_url, tmp_path, name="monitor-a")
    b = monitor_process(database_url, tmp_path, name="monitor-b")
    n_managers, per_manager = 6, 10
    async with (
        running(a, b),
        aio.insecure_channel(a.address) as ca,
        aio.insecure_channel(b.address) as cb,
    ):
        stubs = [Stub(ca), Stub(cb)]
        steps: list[str] = []
        managers: list[str] = []
        for i in range(n_managers):
            stub = stubs[i % 2]
            manager = (
                await stub.CreateJob(
                    m.CreateJobRequest(kind=S.JOB_KIND_MANAGER, name=f"deadlines-{i}"),
                    timeout=CALL_S,
                )
            ).job
            managers.append(manager.id)
            for k in range(per_manager):
                stub = stubs[(i + k) % 2]
                req = m.CreateJobRequest(
                    kind=S.JOB_KIND_STEP,
                    parent_id=manager.id,
                    name=f"step-{k}",
                    metadata=struct({"step_index": k}),
                )
                req.timeout.FromMilliseconds(1000 + 40 * k)
                step = (await stub.CreateJob(req, timeout=CALL_S)).job
                await stub.CreateJob(
                    m.CreateJobRequest(kind=S.JOB_KIND_CHILD, parent_id=step.id, name="kid"),
                    timeout=CALL_S,
                )
                await stub.UpdateJobStatus(
                    m.UpdateJobStatusRequest(job_id=step.id, status=S.JOB_STATUS_RUNNING),
                    timeout=CALL_S,
                )
                steps.append(step.id)

        for i, step_id in enumerate(steps):
            done = await wait_job(stubs[i % 2], step_id, lambda j: j.status in TERMINAL, WAIT_S)
            assert done.status == S.JOB_STATUS_FAILED, done
            assert done.end_reason == "timeout", done.end_reason
            assert done.error == "timed out waiting for child jobs"
            assert_ended_once(done, versions=[3])  # created, running, failed: nothing more
            (kid,) = await list_all(stubs[(i + 1) % 2], parent_id=step_id)
            assert kid.status == S.JOB_STATUS_CANCELLED
            assert_ended_once(kid, versions=[2])
        for manager_id in managers:
            job = await get(stubs[0], manager_id)
            assert job.status == S.JOB_STATUS_PENDING  # steps time out; the job is not touched
            md = meta(job)
            assert md["completed_steps"] == per_manager
            assert {e["status"] for e in md["step_stats"]} == {"failed"}
            assert len(md["step_stats"]) == per_manager

        # The timers log what they fired once the commit is through: wait for the last line.
        for _ in range(100):
            if fired_in(a) + fired_in(b) >= len(steps):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # and let a double firing, if any, show up
        by_replica = (fired_in(a), fired_in(b))
        print(f"deadlines fired by replica a, b: {by_replica}")
        assert sum(by_replica) == len(steps), by_replica


# -- WatchJob across replicas -----------------------------------------------------------------
async def latencies(watch_on: Stub, write_on: Stub, writes: int = 15) -> list[float]:
    """Seconds from a committed write through one replica to a WatchJob on the other
    showing it."""
    job = (
        await write_on.CreateJob(
            m.CreateJobRequest(kind=S.JOB_KIND_MANAGER, name="watched"), timeout=CALL_S
        )
    ).job
    seen: asyncio.Queue[tuple[int, float]] = asyncio.Queue()

    async def watch() -> None:
        async for msg in watch_on.WatchJob(m.WatchJobRequest(job_id=job.id), timeout=WAIT_S):
            await seen.put((msg.job.version, time.monotonic()))

    watcher = asyncio.create_task(watch())
    try:
        version, _ = await asyncio.wait_for(seen.get(), 10)
        assert version == job.version
        out = []
        for k in range(writes):
            resp = await write_on.UpdateJobMetadata(
                m.UpdateJobMetadataRequest(job_id=job.id, metadata=struct({"k": k})),
                timeout=CALL_S,
            )
            committed = time.monotonic()
            while True:
                version, at = await asyncio.wait_for(seen.get(), 5)
                if version >= resp.job.version:
                    out.append(at - committed)
                    break
        await write_on.UpdateJobStatus(
            m.UpdateJobStatusRequest(job_id=job.id, status=S.JOB_STATUS_COMPLETED), timeout=CALL_S
        )
        await asyncio.wait_for(watcher, 10)  # the terminal state reaches it and ends the watch
        return out
    finally:
        watcher.cancel()


async def test_a_watch_on_one_replica_sees_writes_through_the_other_promptly(
    database_url: str, tmp_path: Path
) -> None:
    a = monitor_process(database_url, tmp_path, name="monitor-a")
    b = monitor_process(database_url, tmp_path, name="monitor-b")
    async with (
        running(a, b),
        aio.insecure_channel(a.address) as ca,
        aio.insecure_channel(b.address) as cb,
    ):
        for watch_on, write_on in ((Stub(ca), Stub(cb)), (Stub(cb), Stub(ca))):
            seconds = await latencies(watch_on, write_on)
            assert max(seconds) < 1.5, seconds
            assert statistics.median(seconds) < 0.3, seconds


async def test_child_events_through_one_replica_reach_a_watch_on_the_other(
    database_url: str, tmp_path: Path
) -> None:
    """Child events change only the counts (change_seq, not version): those wake a watcher
    on the other replica too."""
    a = monitor_process(database_url, tmp_path, name="monitor-a")
    b = monitor_process(database_url, tmp_path, name="monitor-b")
    async with (
        running(a, b),
        aio.insecure_channel(a.address) as ca,
        aio.insecure_channel(b.address) as cb,
    ):
        stub_a, stub_b = Stub(ca), Stub(cb)
        manager = (
            await stub_a.CreateJob(
                m.CreateJobRequest(kind=S.JOB_KIND_MANAGER, name="counts"), timeout=CALL_S
            )
        ).job
        step = (
            await stub_a.CreateJob(
                m.CreateJobRequest(kind=S.JOB_KIND_STEP, parent_id=manager.id, name="s"),
                timeout=CALL_S,
            )
        ).job
        await stub_a.UpdateJobStatus(
            m.UpdateJobStatusRequest(job_id=step.id, status=S.JOB_STATUS_RUNNING), timeout=CALL_S
        )

        async def events() -> AsyncIterator[m.StreamChildEventsRequest]:
            for k in range(10):
                yield m.StreamChildEventsRequest(
                    batch_id=k + 1,
                    events=[
                        S.ChildEvent(
                            event_id=f"x{k}", step_id=step.id, child_id=f"c{k}",
                            kind=S.CHILD_EVENT_KIND_CREATED,
                        )
                    ],
                )  # fmt: skip

        started = time.monotonic()
        watching = asyncio.ensure_future(
            wait_job(
                stub_b,
                manager.id,
                lambda j: bool(j.step_stats) and j.step_stats[0].children.pending == 10,
                within=10,
            )
        )
        await asyncio.sleep(0.3)
        acks = [ack async for ack in stub_a.StreamChildEvents(events(), timeout=CALL_S)]
        assert len(acks) == 10
        await watching
        assert time.monotonic() - started < 3.0


# -- leases: each orphan adopted by exactly one caller ------------------------------------------
async def test_each_orphan_is_adopted_once_across_replicas(
    database_url: str, tmp_path: Path
) -> None:
    """Forty orphans; two orchestrators heartbeat at once, each through its own replica, a few
    adoptions at a time, until none is left: every orphan is adopted by exactly one of them,
    and ends up owned by that one."""
    a = monitor_process(database_url, tmp_path, name="monitor-a")
    b = monitor_process(database_url, tmp_path, name="monitor-b")
    async with (
        running(a, b),
        aio.insecure_channel(a.address) as ca,
        aio.insecure_channel(b.address) as cb,
    ):
        stubs = [Stub(ca), Stub(cb)]
        orphans = []
        for i in range(40):
            request = m.CreateJobRequest(kind=S.JOB_KIND_MANAGER, name=f"o{i}", owner="gone")
            orphans.append((await stubs[i % 2].CreateJob(request, timeout=CALL_S)).job.id)
        released = await stubs[0].ReleaseLease(m.ReleaseLeaseRequest(owner="gone"))
        assert sorted(released.orphaned_job_ids) == sorted(orphans)

        async def adopter(stub: Stub, owner: str) -> list[str]:
            adopted: list[str] = []
            while True:
                request = m.HeartbeatRequest(owner=owner, instance=owner, max_adopt=3)
                request.lease.FromSeconds(60)
                answer = await stub.Heartbeat(request, timeout=CALL_S)
                adopted.extend(answer.adopted_job_ids)
                if not answer.adopted_job_ids:
                    return adopted

        took_a, took_b = await asyncio.gather(
            adopter(stubs[0], "orch-a"), adopter(stubs[1], "orch-b")
        )
        assert sorted(took_a + took_b) == sorted(orphans)  # each exactly once
        for owner, took in (("orch-a", took_a), ("orch-b", took_b)):
            for job_id in took:
                assert (await get(stubs[1], job_id)).owner == owner
