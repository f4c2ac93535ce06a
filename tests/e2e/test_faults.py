"""Faults: the record survives what production does to it.

- the monitor SIGKILLed mid-stream and started again on the same database, with a client
  written against the protos alone that resends what was not acknowledged;
- PostgreSQL stopped and started under a running job (a private cluster this test owns);
- a client that disappears mid-stream (call cancelled, connection dropped mid-message);
- deadlines on every RPC, also while the database is slow.

After each: every child counted once, every step ended once. SQLite and PostgreSQL where it
applies (the ``database_url`` fixture); every wait is bounded.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import make_url

from monitor_svc.server import RunningMonitor
from orchestrator_svc.server import OrchestratorConfig
from orchestrator_svc.server import create_server as create_orchestrator
from orchestrator_svc.workers.simulate import expected_tally
from stepflow_common.metrics import RPC_HANDLED
from stepflow_common.proto_status import LIVE_PB as LIVE
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from stepflow_proto.v1 import orchestrator_service_pb2 as o
from stepflow_proto.v1 import orchestrator_service_pb2_grpc as o_grpc
from tests.helpers import manager_with_steps, meta, struct
from tests.jobs import get, list_all
from tests.orchestrator_fixtures import definition
from tests.process_helpers import (
    FAST_RECONNECT,
    TERMINAL,
    assert_ended_once,
    assert_tree_consistent,
    counts,
    monitor_process,
    postgres_binaries_missing,
    postgres_cluster,
    rows_to_counts,
    running,
    wait_job,
)

pytestmark = pytest.mark.timeout(180)

S = job_pb2
K = job_pb2
Stub = m_grpc.MonitorServiceStub
WAIT_S = 60.0
# Codes a client sees when the server process dies under a call.
BROKEN = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.CANCELLED,
}


# -- a stream client written against the protos alone -------------------------------------------
_event_ids = itertools.count(1)


def event(kind: int, step_id: str, child_id: str = "", **kw: Any) -> job_pb2.ChildEvent:
    return job_pb2.ChildEvent(
        event_id=f"fault-{next(_event_ids)}", kind=kind, step_id=step_id, child_id=child_id, **kw
    )


def outcome(k: int) -> int:
    """How child k (1-based) ends: every 7th fails, else every 11th is cancelled."""
    if k % 7 == 0:
        return K.CHILD_EVENT_KIND_FAILED
    if k % 11 == 0:
        return K.CHILD_EVENT_KIND_CANCELLED
    return K.CHILD_EVENT_KIND_COMPLETED


def expected_counts(n: int) -> tuple[int, int, int, int, int]:
    failed = n // 7
    cancelled = n // 11 - n // 77
    return (0, 0, n - failed - cancelled, failed, cancelled)


def child_events(step_ids: Sequence[str], n: int, seal_first: set[str]) -> list[job_pb2.ChildEvent]:
    """Every child of every step: created, running, its outcome, the steps interleaved; each
    step sealed (handed to the monitor) first or last."""
    per_step: list[list[job_pb2.ChildEvent]] = []
    for step_id in step_ids:
        evs: list[job_pb2.ChildEvent] = []
        for k in range(1, n + 1):
            child = f"{step_id}.c{k}"
            evs.append(event(K.CHILD_EVENT_KIND_CREATED, step_id, child, name=f"child-{k}"))
            evs.append(event(K.CHILD_EVENT_KIND_RUNNING, step_id, child))
            evs.append(event(outcome(k), step_id, child, error="boom" if k % 7 == 0 else ""))
        seal = event(K.CHILD_EVENT_KIND_SEALED, step_id, child_count=n, handed_to_monitor=True)
        per_step.append([seal, *evs] if step_id in seal_first else [*evs, seal])
    mixed = [e for group in itertools.zip_longest(*per_step) for e in group if e is not None]
    return mixed


def batches_of(events: Sequence[job_pb2.ChildEvent], size: int) -> list[list[job_pb2.ChildEvent]]:
    return [list(events[i : i + size]) for i in range(0, len(events), size)]


@dataclass
class ResendingClient:
    """StreamChildEvents as the contract asks a client to use it: a batch is kept until its ack
    (sent once it is committed) arrives; when the stream breaks, a new stream sends every
    unacknowledged batch again, in order, before anything new. ``batch_id`` is per stream."""

    stub: Stub
    pending: collections.deque[list[job_pb2.ChildEvent]]
    window: int = 8
    unacked: collections.deque[list[job_pb2.ChildEvent]] = field(default_factory=collections.deque)
    acked: int = 0
    resent: int = 0
    streams: int = 0
    breaks: list[grpc.StatusCode] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    unacked_at_break: list[int] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return not self.pending and not self.unacked

    async def run(self, on_ack: Callable[[int], Awaitable[None]], within: float = WAIT_S) -> None:
        async def loop() -> None:
            while not self.done:
                try:
                    await self._one_stream(on_ack)
                except aio.AioRpcError as exc:
                    assert exc.code() in BROKEN, exc
                    self.breaks.append(exc.code())
                    self.unacked_at_break.append(len(self.unacked))
                    await asyncio.sleep(0.05)

        await asyncio.wait_for(loop(), within)

    async def _one_stream(self, on_ack: Callable[[int], Awaitable[None]]) -> None:
        self.streams += 1
        # What the last stream did not get acknowledged goes first, in its order.
        self.resent += len(self.unacked)
        self.pending.extendleft(reversed(self.unacked))
        self.unacked.clear()
        ids = itertools.count(1)
        in_flight: collections.deque[int] = collections.deque()
        window = asyncio.Semaphore(self.window)
        finished = asyncio.Event()
        call = self.stub.StreamChildEvents(wait_for_ready=True)

        async def writer() -> None:
            while self.pending:
                await window.acquire()
                batch = self.pending.popleft()
                batch_id = next(ids)
                self.unacked.append(batch)  # before the write: a break during it keeps it
                in_flight.append(batch_id)
                await call.write(m.StreamChildEventsRequest(batch_id=batch_id, events=batch))
            await finished.wait()  # half-close only once everything is acknowledged
            await call.done_writing()

        writing = asyncio.create_task(writer())
        try:
            while (ack := await call.read()) is not aio.EOF:
                assert in_flight and ack.batch_id == in_flight[0], (ack.batch_id, in_flight)
                in_flight.popleft()
                self.unacked.popleft()
                window.release()
                self.acked += 1
                self.rejected += [(r.event_id, r.reason) for r in ack.rejected]
                if self.done:
                    finished.set()
                await on_ack(self.acked)
        finally:
            writing.cancel()
            call.cancel()
            await asyncio.gather(writing, return_exceptions=True)


# -- the monitor killed mid-stream ----------------------------------------------------------------
async def test_monitor_sigkilled_mid_stream_loses_nothing_and_counts_nothing_twice(
    database_url: str, tmp_path: Path
) -> None:
    """SIGKILL the monitor twice while batches are in flight; start it again on the same
    database and port each time. The client resends what was not acknowledged (some of it was
    committed before the kill, so it is applied twice): the counts come out exact, every child
    moved exactly through created -> running -> end, and every step ended once."""
    n_children, n_steps = 90, 4
    monitor = monitor_process(database_url, tmp_path, default_wait_timeout="120s")
    async with (
        running(monitor),
        aio.insecure_channel(monitor.address, options=FAST_RECONNECT) as ch,
    ):
        stub = Stub(ch)
        manager, steps = await manager_with_steps(stub, n_steps)
        step_ids = [s.id for s in steps]
        events = child_events(step_ids, n_children, seal_first=set(step_ids[:2]))
        client = ResendingClient(stub, collections.deque(batches_of(events, 20)))
        total_batches = len(client.pending)
        kill_at = {8, 30}

        async def on_ack(acked: int) -> None:
            if acked in kill_at:
                kill_at.discard(acked)
                await asyncio.to_thread(monitor.kill)
                monitor.start()
                await monitor.wait_serving()

        await client.run(on_ack)

        assert monitor.starts == 3, "the monitor was not restarted twice"
        assert len(client.breaks) >= 2, client.breaks
        assert client.resent > 0 and any(client.unacked_at_break), "nothing was in flight"
        assert client.acked == total_batches  # one ack per batch, however often sent
        assert client.rejected == [], client.rejected[:5]

        # As the orchestrator would once every step has ended.
        for step_id in step_ids:
            step = await wait_job(stub, step_id, lambda j: j.status in TERMINAL, within=WAIT_S)
            assert step.end_reason == "children_terminal", step
            assert step.status == S.JOB_STATUS_COMPLETED
            # pending -> spawned -> completed: one version each; a second ending would show.
            assert_ended_once(step, versions=[3])
        await stub.UpdateJobStatus(
            m.UpdateJobStatusRequest(job_id=manager.id, status=S.JOB_STATUS_COMPLETED), timeout=10
        )
        expected = {s.name: expected_counts(n_children) for s in steps}
        job = await assert_tree_consistent(stub, manager.id, expected_counts=expected)
        for step_id in step_ids:
            children = await list_all(stub, parent_id=step_id)
            assert len(children) == n_children
            # created (1) -> running (2) -> end (3): a replayed event changed nothing.
            assert {c.version for c in children} == {3}, collections.Counter(
                c.version for c in children
            )
        assert {st.child_count for st in job.step_stats} == {n_children}
        assert meta(job)["completed_steps"] == n_steps


# -- PostgreSQL stopped and started while events flow ----------------------------------------
def final(config: dict[str, Any]) -> tuple[int, int, int, int, int]:
    """The exact counts a simulate step with ``config`` ends with."""
    t = expected_tally(config)
    return (0, 0, t.completed, t.failed, t.cancelled)


async def test_postgres_stopped_and_started_while_events_flow(tmp_path: Path) -> None:
    """A private PostgreSQL (never the system one) is stopped under a running job and started
    again. Meanwhile clients get UNAVAILABLE, the orchestrator keeps its events and retries;
    afterwards every child is counted once and every step ended once."""
    missing = postgres_binaries_missing()
    if missing:
        pytest.skip(missing)
    handed = {"children": 240, "duration_ms": 100, "concurrency": 12, "fail_every": 7,
              "cancel_every": 11}  # fmt: skip
    waited = {"children": 60, "duration_ms": 30, "concurrency": 6, "fail_every": 5}
    data = {
        "name": "through-an-outage",
        "steps": [
            {"name": "handed", "type": "simulate", "wait": False, "config": handed},
            {"name": "waited", "type": "simulate", "config": waited},
        ],
    }
    with postgres_cluster() as pg:
        url = await asyncio.to_thread(pg.create_database, "stepflow")
        monitor = monitor_process(url, tmp_path, default_wait_timeout="120s")
        async with running(monitor):
            orch = await create_orchestrator(
                OrchestratorConfig(
                    port=0, monitor=monitor.address, owner="pg-outage", shutdown_grace_s=1.0
                )
            )
            try:
                async with (
                    aio.insecure_channel(monitor.address, options=FAST_RECONNECT) as ch,
                    aio.insecure_channel(orch.address) as och,
                ):
                    stub = Stub(ch)
                    ostub = o_grpc.OrchestratorServiceStub(och)
                    resp = await ostub.SubmitJob(
                        o.SubmitJobRequest(definition=definition(data)), timeout=30
                    )
                    manager_id = resp.manager_id

                    def some_children_ended(job: job_pb2.Job) -> bool:
                        stats = {s.step_name: s for s in job.step_stats}
                        c = stats["handed"].children if "handed" in stats else None
                        return c is not None and c.completed + c.failed + c.cancelled >= 20

                    await wait_job(stub, manager_id, some_children_ended, within=WAIT_S)
                    reconnects_before = orch.stream.stats.reconnects
                    await asyncio.to_thread(pg.stop, "fast")
                    down_since = time.monotonic()
                    # While it is down: reads and writes are UNAVAILABLE (retryable), quickly.
                    for call in (
                        stub.GetJob(m.GetJobRequest(job_id=manager_id), timeout=10),
                        stub.UpdateJobMetadata(
                            m.UpdateJobMetadataRequest(
                                job_id=manager_id, metadata=struct({"during": "outage"})
                            ),
                            timeout=10,
                        ),
                    ):
                        with pytest.raises(aio.AioRpcError) as err:
                            await call
                        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
                        assert "database" in (err.value.details() or ""), err.value.details()
                    # Children keep running in the orchestrator; their events wait for it.
                    await asyncio.sleep(max(0.0, 2.0 - (time.monotonic() - down_since)))
                    await asyncio.to_thread(pg.start)

                    job = await wait_job(
                        stub, manager_id, lambda j: j.status in TERMINAL, within=WAIT_S
                    )
                    assert orch.stream.stats.reconnects > reconnects_before, "no retry happened"
                    assert job.status == S.JOB_STATUS_COMPLETED, (job.status, job.error)
                    await assert_tree_consistent(
                        stub,
                        manager_id,
                        expected_counts={"handed": final(handed), "waited": final(waited)},
                    )
                    assert orch.stream.stats.rejected == []
                    assert "during" not in meta(job), "a write refused as UNAVAILABLE was applied"
            finally:
                await orch.stop(grace=1.0)
        # The outage broke streams mid-batch; the monitor's log stayed one JSON event per
        # line throughout (no raw "Task exception was never retrieved" tracebacks).
        log_lines = [line for line in monitor.log_text().splitlines() if line.strip()]
        not_json = []
        for line in log_lines:
            if line.startswith("--- start"):  # the marker ServerProcess writes
                continue
            try:
                json.loads(line)
            except ValueError:
                not_json.append(line)
        assert not not_json, "\n".join(not_json[:20])
        assert "never retrieved" not in monitor.log_text()


# -- a client that disappears mid-stream -------------------------------------------------------
def all_or_nothing(
    got: tuple[int, int, int, int, int], allowed: Sequence[tuple[int, int, int, int, int]]
) -> None:
    assert got in allowed, f"a batch was half applied: counts {got}, allowed {allowed}"


async def step_counts(stub: Stub, manager_id: str, step_id: str) -> tuple[int, int, int, int, int]:
    job = await get(stub, manager_id)
    stat = next(s for s in job.step_stats if s.step_id == step_id)
    return counts(stat.children)


async def watch_counts_settle(
    stub: Stub,
    manager_id: str,
    step_id: str,
    allowed: Sequence[tuple[int, int, int, int, int]],
    settle_s: float = 1.0,
) -> tuple[int, int, int, int, int]:
    """Read the counts repeatedly until they stop changing: every read must be one of the
    ``allowed`` whole-batch states, never a part of a batch."""
    deadline = time.monotonic() + 15.0
    last, stable_since = None, time.monotonic()
    while True:
        got = await step_counts(stub, manager_id, step_id)
        all_or_nothing(got, allowed)
        if got != last:
            last, stable_since = got, time.monotonic()
        elif time.monotonic() - stable_since >= settle_s:
            return got
        assert time.monotonic() < deadline, "counts never settled"
        await asyncio.sleep(0.05)


async def assert_monitor_serves(monitor: RunningMonitor, stub: Stub) -> None:
    async with aio.insecure_channel(monitor.address) as ch:
        health = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    await stub.ListJobs(m.ListJobsRequest(page_size=1), timeout=5)


@pytest.mark.parametrize("delay_s", [0.0, 0.003, 0.03, 0.3])
async def test_a_client_cancelling_mid_batch_leaves_nothing_half_applied(
    monitor: RunningMonitor, stub: Stub, delay_s: float
) -> None:
    """The client sends a small batch, then a large one, and cancels the call ``delay_s``
    later (before, during or after the commit). The large batch is applied whole or not at
    all; the monitor keeps serving; resending it completes the step with exact counts."""
    n = 1500
    manager, (step,) = await manager_with_steps(stub, 1)
    first = [event(K.CHILD_EVENT_KIND_CREATED, step.id, "first")]
    big = [event(K.CHILD_EVENT_KIND_CREATED, step.id, f"c{k}") for k in range(n)]
    big += [event(K.CHILD_EVENT_KIND_COMPLETED, step.id, f"c{k}") for k in range(n)]
    call = stub.StreamChildEvents()
    await call.write(m.StreamChildEventsRequest(batch_id=1, events=first))
    await call.write(m.StreamChildEventsRequest(batch_id=2, events=big))
    ack = await asyncio.wait_for(call.read(), 10)
    assert ack.batch_id == 1
    await asyncio.sleep(delay_s)
    call.cancel()
    assert await asyncio.wait_for(call.code(), 10) == grpc.StatusCode.CANCELLED

    before = (1, 0, 0, 0, 0)
    after = (1, 0, n, 0, 0)
    await watch_counts_settle(stub, manager.id, step.id, [before, after])
    await assert_monitor_serves(monitor, stub)

    # The client comes back and sends again what it never saw acknowledged.
    rest = [
        event(K.CHILD_EVENT_KIND_COMPLETED, step.id, "first"),
        event(K.CHILD_EVENT_KIND_SEALED, step.id, child_count=n + 1, handed_to_monitor=True),
    ]
    client = ResendingClient(stub, collections.deque([big, rest]))

    async def nothing(_acked: int) -> None:
        return None

    await client.run(nothing, within=30)
    assert client.rejected == []
    done = await wait_job(stub, step.id, lambda j: j.status in TERMINAL, within=10)
    assert done.status == S.JOB_STATUS_COMPLETED and done.end_reason == "children_terminal"
    assert_ended_once(done)
    children = await list_all(stub, parent_id=step.id)
    assert rows_to_counts(children) == (0, 0, n + 1, 0, 0)
    assert {c.version for c in children} == {2}  # created -> completed, once each
    assert await step_counts(stub, manager.id, step.id) == (0, 0, n + 1, 0, 0)


async def test_a_connection_dropped_mid_message_applies_nothing_of_it(
    monitor: RunningMonitor, stub: Stub
) -> None:
    """A large batch (megabytes) whose connection is closed while it is still being sent:
    the monitor never sees a whole message, so nothing of it is applied, and it keeps serving
    every other client."""
    manager, (step,) = await manager_with_steps(stub, 1)
    n = 4000
    error = "e" * 1500  # ~6 MB in all: many HTTP/2 frames
    huge = [event(K.CHILD_EVENT_KIND_CREATED, step.id, f"c{k}") for k in range(n)]
    huge += [event(K.CHILD_EVENT_KIND_FAILED, step.id, f"c{k}", error=error) for k in range(n)]
    outcomes = []
    cut_off: list[bool] = []  # the connection went while the message was still being sent
    for delay_s in (0.0, 0.002, 0.01):
        ch = aio.insecure_channel(
            monitor.address,
            options=[("grpc.max_send_message_length", 16 * 1024 * 1024)],
        )
        call = Stub(ch).StreamChildEvents()
        writing = asyncio.ensure_future(
            call.write(m.StreamChildEventsRequest(batch_id=1, events=huge))
        )
        await asyncio.sleep(delay_s)
        cut_off.append(not writing.done())
        await ch.close(grace=None)
        writing.cancel()  # a write cut off by the closed channel never completes by itself
        await asyncio.gather(writing, return_exceptions=True)
        assert await asyncio.wait_for(call.code(), 10) != grpc.StatusCode.OK
        outcomes.append(
            await watch_counts_settle(stub, manager.id, step.id, [(0, 0, 0, 0, 0), (0, 0, 0, n, 0)])
        )
    await assert_monitor_serves(monitor, stub)
    # Whatever arrived whole was applied whole; send it once more (a replay changes nothing).
    client = ResendingClient(stub, collections.deque([huge]))

    async def nothing(_acked: int) -> None:
        return None

    await client.run(nothing, within=60)
    assert await step_counts(stub, manager.id, step.id) == (0, 0, 0, n, 0)
    children = await list_all(stub, parent_id=step.id)
    assert len(children) == n and {c.version for c in children} == {2}
    assert any(cut_off), "every message went out whole before its connection was dropped"
    assert outcomes[0] == (0, 0, 0, 0, 0), "a message cut off at once was applied"


# -- deadlines on every RPC --------------------------------------------------------------------
TINY_S = 0.001  # gRPC's deadline resolution; far less than any call on a large job takes
BLOB = {"blob": [f"{i:08d}" * 5 for i in range(15_000)]}  # ~700 kB: every call on it takes ms


async def every_rpc(
    stub: Stub, ids: dict[str, str], deadline_s: float
) -> dict[str, grpc.StatusCode]:
    """Call each RPC once with ``deadline_s``; the status each ended with. The streams are kept
    open by the client, so they end only by the deadline."""

    async def stream_events() -> grpc.StatusCode:
        call = stub.StreamChildEvents(timeout=deadline_s)
        batch = [event(K.CHILD_EVENT_KIND_CREATED, ids["step"], "tiny-child")]
        try:
            await call.write(m.StreamChildEventsRequest(batch_id=1, events=batch))
            while await call.read() is not aio.EOF:
                pass
        except aio.AioRpcError as exc:
            if write_lost_the_status(exc):
                # Core ended the call before the write reached it: at its deadline (the call
                # was opened with it and nothing else ends it); the monitor's side is checked
                # apart, from its metrics.
                return grpc.StatusCode.DEADLINE_EXCEEDED
        except asyncio.InvalidStateError:
            pass  # the write came after the client had already seen the status
        code: grpc.StatusCode = await call.code()
        return code

    async def watch() -> grpc.StatusCode:
        call = stub.WatchJob(m.WatchJobRequest(job_id=ids["manager"]), timeout=deadline_s)
        with contextlib.suppress(aio.AioRpcError):
            async for _ in call:
                pass
        code: grpc.StatusCode = await call.code()
        return code

    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "CreateJob": lambda: stub.CreateJob(
            m.CreateJobRequest(kind=S.JOB_KIND_STEP, parent_id=ids["manager"], name="tiny"),
            timeout=deadline_s,
        ),
        "GetJob": lambda: stub.GetJob(m.GetJobRequest(job_id=ids["manager"]), timeout=deadline_s),
        "ListJobs": lambda: stub.ListJobs(
            m.ListJobsRequest(manager_id=ids["manager"]), timeout=deadline_s
        ),
        "UpdateJobStatus": lambda: stub.UpdateJobStatus(
            m.UpdateJobStatusRequest(job_id=ids["step"], status=S.JOB_STATUS_RUNNING),
            timeout=deadline_s,
        ),
        "UpdateJobMetadata": lambda: stub.UpdateJobMetadata(
            m.UpdateJobMetadataRequest(job_id=ids["manager"], metadata=struct({"tiny": 1})),
            timeout=deadline_s,
        ),
        "UpdateStepStatInManager": lambda: stub.UpdateStepStatInManager(
            m.UpdateStepStatInManagerRequest(
                manager_id=ids["manager"], step_id=ids["step"], status=S.JOB_STATUS_RUNNING
            ),
            timeout=deadline_s,
        ),
        "StreamChildEvents": stream_events,
        "WatchJob": watch,
    }
    results: dict[str, grpc.StatusCode] = {}
    for name, fn in calls.items():
        try:
            got = await asyncio.wait_for(fn(), deadline_s + 10)
            results[name] = got if isinstance(got, grpc.StatusCode) else grpc.StatusCode.OK
        except aio.AioRpcError as exc:
            results[name] = exc.code()
    return results


def write_lost_the_status(exc: aio.AioRpcError) -> bool:
    """grpcio's asyncio client: a stream ``write`` that reaches Core after Core has already
    ended the call fails, and the client then reports its own ``INTERNAL: Internal error from
    Core`` (``Failed "execute_batch": (SendMessageOperation...``) instead of the status Core
    ended the call with (grpc/grpc#36066). Only that exact local status is recognised: an
    INTERNAL sent by the monitor has other details and no such debug string."""
    return (
        exc.code() == grpc.StatusCode.INTERNAL
        and exc.details() == "Internal error from Core"
        and "SendMessageOperation" in (exc.debug_error_string() or "")
    )


def handled_codes(method: str) -> collections.Counter[str]:
    """The monitor's count of finished calls of ``method`` by status code (its metrics)."""
    counts: collections.Counter[str] = collections.Counter()
    for metric in RPC_HANDLED.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels["method"] == method:
                counts[sample.labels["code"]] += int(sample.value)
    return counts


@contextlib.contextmanager
def database_write_lock(database_url: str) -> Iterator[None]:
    """Hold the lock every monitor write transaction needs first (SQLite: the database write
    lock; PostgreSQL: the change_seq counter row), so writes wait while reads go on."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        conn = sqlite3.connect(url.database or "", timeout=5, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        return
    dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn) as pg:
        pg.execute("SELECT value FROM counters WHERE name = 'change_seq' FOR UPDATE")
        try:
            yield
        finally:
            pg.rollback()


async def test_a_tiny_deadline_on_every_rpc_is_deadline_exceeded_and_the_server_stays_healthy(
    monitor: RunningMonitor, stub: Stub, database_url: str
) -> None:
    """Every RPC with a deadline of a millisecond, on a large manager, while the database
    makes writes wait: each write and stream ends DEADLINE_EXCEEDED, a read either answers in
    time (answers are built from cached bytes, so a read may well fit in a millisecond) or
    ends DEADLINE_EXCEEDED, what got through did so whole, and the monitor serves normally
    afterwards."""
    manager, (step,) = await manager_with_steps(stub, 1)
    await stub.UpdateJobMetadata(
        m.UpdateJobMetadataRequest(job_id=manager.id, metadata=struct(BLOB)), timeout=30
    )
    before = await get(stub, manager.id)
    streams_before = handled_codes("StreamChildEvents")
    with database_write_lock(database_url):
        results = await every_rpc(stub, {"manager": manager.id, "step": step.id}, TINY_S)
        await asyncio.sleep(0.2)  # let the server see the deadlines pass while it waits
    reads = {"GetJob", "ListJobs"}  # not held by the write lock
    exceeded = grpc.StatusCode.DEADLINE_EXCEEDED
    assert {k: v for k, v in results.items() if k not in reads} == dict.fromkeys(
        results.keys() - reads, exceeded
    ), results
    assert {results[k] for k in reads} <= {exceeded, grpc.StatusCode.OK}, results
    # The monitor ended the stream as a client that left (or it never reached the handler).
    streams = handled_codes("StreamChildEvents") - streams_before
    assert set(streams) <= {"CANCELLED", "DEADLINE_EXCEEDED"}, streams
    await assert_monitor_serves(monitor, stub)
    # Whatever got through did so whole: each change is all there with its version, or absent.
    after = await get(stub, manager.id)
    assert after.version - before.version == ("tiny" in meta(after)) + (
        after.step_stats[0].status != before.step_stats[0].status
    )
    step_now = await get(stub, step.id)
    assert step_now.status in (S.JOB_STATUS_PENDING, S.JOB_STATUS_RUNNING)
    assert step_now.version == 1 + (step_now.status == S.JOB_STATUS_RUNNING)
    # And everything works again with a sensible deadline.
    results = await every_rpc(stub, {"manager": manager.id, "step": step.id}, 0.5)
    long_lived = {"StreamChildEvents", "WatchJob"}  # held open: they end by the deadline
    assert results == {
        name: grpc.StatusCode.DEADLINE_EXCEEDED if name in long_lived else grpc.StatusCode.OK
        for name in results
    }, results


async def test_a_stream_left_while_its_batch_waits_for_the_database_ends_cancelled(
    monitor: RunningMonitor, stub: Stub, database_url: str
) -> None:
    """A client that cancels StreamChildEvents, or whose deadline passes, while its batch waits
    for the database: the monitor ends the call as one the client left (CANCELLED in its
    metrics), never as an internal error, and the batch then commits whole or not at all."""
    manager, (step,) = await manager_with_steps(stub, 1)
    before = handled_codes("StreamChildEvents")
    batch = [event(K.CHILD_EVENT_KIND_CREATED, step.id, f"left-{k}") for k in range(3)]
    with database_write_lock(database_url):
        cancelled = stub.StreamChildEvents()
        expired = stub.StreamChildEvents(timeout=1.0)
        await cancelled.write(m.StreamChildEventsRequest(batch_id=1, events=batch))
        await expired.write(m.StreamChildEventsRequest(batch_id=1, events=batch))
        await asyncio.sleep(0.3)  # both batches are in the writer, waiting for the lock
        cancelled.cancel()
        assert await cancelled.code() == grpc.StatusCode.CANCELLED
        assert await asyncio.wait_for(expired.code(), 10) == grpc.StatusCode.DEADLINE_EXCEEDED
        for _ in range(200):  # the server side of each call ends after the client's
            if sum((handled_codes("StreamChildEvents") - before).values()) >= 2:
                break
            await asyncio.sleep(0.05)
    assert handled_codes("StreamChildEvents") - before == {"CANCELLED": 2}
    await assert_monitor_serves(monitor, stub)
    created = await step_counts(stub, manager.id, step.id)
    assert sum(created) in (0, 3), created  # one batch of three (the other replays it)


async def test_deadlines_hold_while_the_database_is_slow(
    monitor: RunningMonitor, stub: Stub, database_url: str
) -> None:
    """Writes stuck behind a locked database end DEADLINE_EXCEEDED at their deadline (not when
    the lock goes), reads still answer, and once the lock is gone the monitor is prompt
    again. A write whose deadline passed before the database got to it is not applied."""
    manager, (step,) = await manager_with_steps(stub, 1)
    before = await get(stub, manager.id)
    with database_write_lock(database_url):
        # The first write takes the writer into the lock wait; it has no deadline.
        first = asyncio.ensure_future(
            stub.UpdateJobMetadata(
                m.UpdateJobMetadataRequest(job_id=manager.id, metadata=struct({"first": 1})),
                timeout=30,
            )
        )
        await asyncio.sleep(0.3)
        started = time.monotonic()
        for key in ("late_a", "late_b"):
            with pytest.raises(aio.AioRpcError) as err:
                await stub.UpdateJobMetadata(
                    m.UpdateJobMetadataRequest(job_id=manager.id, metadata=struct({key: 1})),
                    timeout=0.4,
                )
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(aio.AioRpcError) as err:
            await stub.UpdateJobStatus(
                m.UpdateJobStatusRequest(job_id=step.id, status=S.JOB_STATUS_RUNNING), timeout=0.4
            )
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 3.0, "deadlines were not honoured while waiting"
        # Reads do not wait for the write lock.
        got = await stub.GetJob(m.GetJobRequest(job_id=manager.id), timeout=2)
        assert got.job.version == before.version
        assert not first.done()
    await asyncio.wait_for(first, 15)
    await assert_monitor_serves(monitor, stub)
    started = time.monotonic()
    await stub.UpdateJobMetadata(
        m.UpdateJobMetadataRequest(job_id=manager.id, metadata=struct({"after": 1})), timeout=5
    )
    assert time.monotonic() - started < 2.0
    after = await get(stub, manager.id)
    md = meta(after)
    assert md["first"] == 1 and md["after"] == 1
    assert "late_a" not in md and "late_b" not in md, "a write past its deadline was applied"
    assert (await get(stub, step.id)).status == S.JOB_STATUS_PENDING
    assert after.version == before.version + 2


async def test_long_lived_calls_end_at_their_deadline_and_leave_nothing_behind(
    monitor: RunningMonitor, stub: Stub
) -> None:
    """WatchJob and StreamChildEvents with a deadline: what was acknowledged is committed,
    the call ends DEADLINE_EXCEEDED on time, and the monitor drops the watcher."""
    manager, (step,) = await manager_with_steps(stub, 1)
    seen: list[job_pb2.Job] = []
    started = time.monotonic()
    with pytest.raises(aio.AioRpcError) as err:
        async for msg in stub.WatchJob(m.WatchJobRequest(job_id=manager.id), timeout=0.5):
            seen.append(msg.job)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert seen and seen[0].id == manager.id
    assert time.monotonic() - started < 3.0

    acks: list[m.StreamChildEventsResponse] = []
    call = stub.StreamChildEvents(timeout=1.0)
    for i in range(3):
        batch = [event(K.CHILD_EVENT_KIND_CREATED, step.id, f"d{i}-{k}") for k in range(50)]
        await call.write(m.StreamChildEventsRequest(batch_id=i + 1, events=batch))
    with pytest.raises(aio.AioRpcError) as err:
        while (ack := await call.read()) is not aio.EOF:
            acks.append(ack)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert [a.batch_id for a in acks] == [1, 2, 3]
    assert await step_counts(stub, manager.id, step.id) == (150, 0, 0, 0, 0)

    async def no_feed_left() -> bool:
        return monitor.hub.feed_reads(manager.id) == 0 and not monitor.hub._feeds

    deadline = time.monotonic() + 5
    while not await no_feed_left():
        assert time.monotonic() < deadline, "the watcher outlived its call"
        await asyncio.sleep(0.05)
    await assert_monitor_serves(monitor, stub)
    job = await get(stub, manager.id)
    assert job.step_stats[0].status in LIVE
