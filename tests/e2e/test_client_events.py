"""The client's child-event emitter, as another service would use it, against a real monitor.

A service that runs a step's children reports them with ``ChildEventEmitter`` (or, from plain
threads, ``SyncChildEventEmitter``) and the manager's ``step_stats`` counts are exact: after a
thousand children, across a monitor that stops answering (``send`` waits instead of buffering
without bound), and across a monitor killed and restarted (unacknowledged batches resent,
nothing counted twice).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from monitor_svc.server import RunningMonitor
from stepflow_client._events import (
    ChildEventEmitter,
    EmitterClosed,
    EmitterHooks,
    is_fenced,
)
from stepflow_client._events_sync import SyncChildEventEmitter
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from tests.helpers import manager_with_steps, struct
from tests.process_helpers import ServerProcess, monitor_process

K = job_pb2
# A restarted monitor is found again quickly (gRPC's default reconnect backoff starts at 1s).
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]
FLUSH_TIMEOUT_S = 60.0


async def running_step(stub: m_grpc.MonitorServiceStub) -> tuple[str, str]:
    """A manager with one running step, as the service that runs the step would find it."""
    manager, (step,) = await manager_with_steps(stub, 1)
    await stub.UpdateJobStatus(
        m.UpdateJobStatusRequest(job_id=step.id, status=K.JOB_STATUS_RUNNING)
    )
    return manager.id, step.id


async def step_entry(stub: m_grpc.MonitorServiceStub, manager_id: str) -> job_pb2.StepStat:
    (entry,) = (await stub.GetJob(m.GetJobRequest(job_id=manager_id))).job.step_stats
    return entry


def tally(entry: job_pb2.StepStat) -> tuple[int, int, int, int, int]:
    c = entry.children
    return (c.pending, c.running, c.completed, c.failed, c.cancelled)


# -- against an in-process monitor ---------------------------------------------------------------
async def test_a_service_reports_a_thousand_children_and_the_counts_are_exact(
    monitor: RunningMonitor, channel: aio.Channel, stub: m_grpc.MonitorServiceStub
) -> None:
    manager_id, step_id = await running_step(stub)

    # What a service that runs the step's children writes (the README shows the same lines).
    async with ChildEventEmitter(channel) as events:
        for i in range(1000):
            child_id = f"{step_id}.c{i}"
            await events.created(step_id, child_id, name=f"item {i}")
            await events.running(step_id, child_id)
            if i % 10 == 0:
                await events.failed(step_id, child_id, "bad input")
            else:
                await events.completed(step_id, child_id)
        await events.sealed(step_id, 1000)  # the monitor ends the step when all have ended
        await events.flush()  # every event above is committed

    assert events.stats.rejected == []
    assert events.stats.acked_events == 3 * 1000 + 1
    entry = await step_entry(stub, manager_id)
    assert tally(entry) == (0, 0, 900, 100, 0)
    assert entry.child_count == 1000
    assert entry.status == K.JOB_STATUS_COMPLETED
    child = (await stub.GetJob(m.GetJobRequest(job_id=f"{step_id}.c10"))).job
    assert (child.status, child.error, child.name) == (K.JOB_STATUS_FAILED, "bad input", "item 10")


async def test_rejected_events_are_reported_and_flush_still_returns(
    monitor: RunningMonitor, channel: aio.Channel, stub: m_grpc.MonitorServiceStub
) -> None:
    """An event the monitor rejects (a child of a step that does not exist) is settled:
    reported once to ``on_rejected``, never resent, and the good events around it commit."""
    manager_id, step_id = await running_step(stub)
    rejected: list[tuple[str, str]] = []
    async with ChildEventEmitter(
        channel, on_rejected=lambda event, reason: rejected.append((event.child_id, reason))
    ) as events:
        await events.created(step_id, f"{step_id}.good")
        await events.created("no-such-step", "no-such-step.c1")
        await events.completed(step_id, f"{step_id}.good")
        await events.flush()
        assert [child for child, _ in rejected] == ["no-such-step.c1"]
        assert rejected[0][1]  # with its reason
        assert events.stats.dropped_events == 0
    assert tally(await step_entry(stub, manager_id)) == (0, 0, 1, 0, 0)


async def test_hooks_hear_of_every_ack_and_fenced_rejections_go_to_their_own_hook(
    monitor: RunningMonitor, channel: aio.Channel, stub: m_grpc.MonitorServiceStub
) -> None:
    """A batch sent with an ``owner`` that does not own the job is rejected as fenced: the
    ``on_fenced`` hook hears of it, ``on_rejected`` does not; ``on_ack`` counts every event."""
    heartbeat = m.HeartbeatRequest(owner="the-owner", instance="i1")
    heartbeat.lease.FromTimedelta(timedelta(seconds=30))
    await stub.Heartbeat(heartbeat)
    manager = (
        await stub.CreateJob(
            m.CreateJobRequest(kind=K.JOB_KIND_MANAGER, name="job", owner="the-owner")
        )
    ).job
    step = (
        await stub.CreateJob(
            m.CreateJobRequest(
                kind=K.JOB_KIND_STEP,
                parent_id=manager.id,
                name="fetch",
                metadata=struct({"step_index": 0}),
                owner="the-owner",
            )
        )
    ).job
    await stub.UpdateJobStatus(
        m.UpdateJobStatusRequest(job_id=step.id, status=K.JOB_STATUS_RUNNING, owner="the-owner")
    )
    fenced: list[tuple[str, str]] = []
    rejected: list[str] = []
    acked: list[int] = []
    async with ChildEventEmitter(
        channel,
        owner="an-intruder",
        instance_id="svc",
        on_rejected=lambda event, reason: rejected.append(reason),
        hooks=EmitterHooks(
            on_fenced=lambda event, reason: fenced.append((event.child_id, reason)),
            on_ack=lambda count, lag_s: acked.append(count),
        ),
    ) as events:
        await events.created(step.id, f"{step.id}.c1")
        await events.flush()
    assert [child for child, _ in fenced] == [f"{step.id}.c1"]
    assert is_fenced(fenced[0][1]) and fenced[0][1].endswith("by the-owner"), fenced
    assert rejected == [] and sum(acked) == 1
    assert events.stats.rejected == [("svc-1", fenced[0][1])]  # event ids: instance-seq


async def test_a_closed_emitter_refuses_more_and_bad_bounds_are_refused(
    channel: aio.Channel,
) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        ChildEventEmitter()
    with pytest.raises(ValueError, match="max_buffered"):
        ChildEventEmitter(channel, max_buffered=0)
    events = ChildEventEmitter(channel)
    async with events:
        pass
    assert await events.close() == 0  # closing twice is harmless
    with pytest.raises(EmitterClosed):
        await events.created("s", "s.c1")


async def test_a_stream_task_that_cannot_start_fails_its_waiters_instead_of_hanging() -> None:
    def no_channel() -> aio.Channel:
        raise RuntimeError("no route to the monitor configured")

    events = ChildEventEmitter(channel_factory=no_channel)
    await events.created("s", "s.c1")  # queued: the buffer has room
    with pytest.raises(EmitterClosed, match="no route to the monitor"):
        await events.flush()
    assert await events.close() == 1  # left unsettled, and said so


# -- against a monitor process: stopped, killed, restarted ---------------------------------------
@pytest.fixture
def monitor_proc(tmp_path: Path) -> Iterator[ServerProcess]:
    """A monitor subprocess on SQLite that a test may stop (SIGSTOP) or kill and restart on
    the same port; the database file survives its restarts."""
    server = monitor_process(f"sqlite:///{tmp_path / 'monitor.db'}", tmp_path)
    server.start()
    _wait_serving(server)
    try:
        yield server
    finally:
        server.stop()


def _wait_serving(server: ServerProcess) -> None:
    """Blocking health poll (usable from sync tests, which have no event loop)."""
    deadline = time.monotonic() + 60.0
    with grpc.insecure_channel(server.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        while True:
            assert server.proc is not None and server.proc.poll() is None, server.log_tail()
            try:
                answer = health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.05)


@pytest.fixture
async def proc_stub(monitor_proc: ServerProcess) -> AsyncIterator[m_grpc.MonitorServiceStub]:
    async with aio.insecure_channel(monitor_proc.address, options=FAST_RECONNECT) as ch:
        yield m_grpc.MonitorServiceStub(ch)


async def _send_children(
    events: ChildEventEmitter, step_id: str, numbers: range, prefix: str = "c"
) -> None:
    for i in numbers:
        await events.created(step_id, f"{step_id}.{prefix}{i}")
        await events.completed(step_id, f"{step_id}.{prefix}{i}")


async def test_send_waits_when_the_buffer_is_full_and_the_monitor_does_not_ack(
    monitor_proc: ServerProcess, proc_stub: m_grpc.MonitorServiceStub
) -> None:
    """With the monitor stopped (SIGSTOP), ``send`` takes events up to the bound and then
    waits: the producer slows down, memory does not grow. Once the monitor runs again, the
    waiting send goes through and every event is committed exactly once."""
    manager_id, step_id = await running_step(proc_stub)
    bound = 40
    async with aio.insecure_channel(monitor_proc.address) as channel:
        events = ChildEventEmitter(channel, max_buffered=bound, batch_max_events=8)
        async with events:
            await _send_children(events, step_id, range(10))
            await events.flush()
            monitor_proc.send(signal.SIGSTOP)
            try:
                await _send_children(events, step_id, range(10, 10 + bound // 2))
                assert events.buffered == bound  # taken, none acknowledged
                blocked = asyncio.create_task(events.created(step_id, f"{step_id}.over"))
                await asyncio.sleep(1.0)  # the monitor cannot ack: nothing may free a slot
                assert not blocked.done(), "send did not wait for room in the buffer"
                assert events.buffered == bound
            finally:
                monitor_proc.send(signal.SIGCONT)
            await blocked
            await events.completed(step_id, f"{step_id}.over")
            async with asyncio.timeout(FLUSH_TIMEOUT_S):
                await events.flush()
        assert events.stats.rejected == []
    total = 10 + bound // 2 + 1
    assert tally(await step_entry(proc_stub, manager_id)) == (0, 0, total, 0, 0)


async def test_unacknowledged_events_are_resent_to_a_restarted_monitor_and_counted_once(
    monitor_proc: ServerProcess, proc_stub: m_grpc.MonitorServiceStub
) -> None:
    """Events in flight when the monitor dies are resent to the restarted monitor: some never
    reached it (it was stopped, then killed), and a burst sent while it was killed may have
    been committed without its ack arriving. Every child is counted exactly once."""
    manager_id, step_id = await running_step(proc_stub)
    async with aio.insecure_channel(monitor_proc.address, options=FAST_RECONNECT) as channel:
        acked = 0
        burst_half_acked = asyncio.Event()

        def on_ack(count: int, _lag_s: float) -> None:
            nonlocal acked
            acked += count
            if acked >= 2 * 600:  # children 0..599 in: the burst is half-way
                burst_half_acked.set()

        hooks = EmitterHooks(on_ack=on_ack)
        async with ChildEventEmitter(channel, batch_max_events=50, hooks=hooks) as events:
            await _send_children(events, step_id, range(100))
            await events.flush()
            # Sent to a monitor that will never answer: these batches must be resent.
            monitor_proc.send(signal.SIGSTOP)
            await _send_children(events, step_id, range(100, 200))
            await asyncio.sleep(0.2)  # let them leave in batches
            assert events.buffered == 200
            monitor_proc.kill()
            monitor_proc.start()
            await monitor_proc.wait_serving()
            async with asyncio.timeout(FLUSH_TIMEOUT_S):
                await events.flush()
            assert events.stats.resent_batches >= 1
            assert events.stats.reconnects >= 1
            # A burst killed mid-way: whatever was committed before its ack is sent again.
            burst = asyncio.create_task(_send_children(events, step_id, range(200, 1000)))
            await burst_half_acked.wait()
            monitor_proc.kill()
            await burst
            monitor_proc.start()
            await monitor_proc.wait_serving()
            async with asyncio.timeout(FLUSH_TIMEOUT_S):
                await events.flush()
        assert events.stats.rejected == []
    assert tally(await step_entry(proc_stub, manager_id)) == (0, 0, 1000, 0, 0)


def test_the_sync_emitter_from_plain_threads(monitor_proc: ServerProcess) -> None:
    """No event loop in sight: four threads report 250 children each through one
    ``SyncChildEventEmitter`` (its loop runs on its own thread), and the counts are exact."""
    manager_id, step_id = asyncio.run(_setup_step(monitor_proc.address))
    errors: list[BaseException] = []

    def report(emitter: SyncChildEventEmitter, worker: int) -> None:
        try:
            for i in range(250):
                child_id = f"{step_id}.w{worker}-{i}"
                emitter.created(step_id, child_id)
                emitter.running(step_id, child_id)
                if i % 50 == 0:
                    emitter.failed(step_id, child_id, "worker said no")
                else:
                    emitter.completed(step_id, child_id)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    with SyncChildEventEmitter(
        lambda: aio.insecure_channel(monitor_proc.address), max_buffered=100
    ) as emitter:
        threads = [threading.Thread(target=report, args=(emitter, w)) for w in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        emitter.sealed(step_id, 1000)
        emitter.flush(timeout=FLUSH_TIMEOUT_S)
        assert emitter.buffered == 0
        assert emitter.stats.rejected == []
    with pytest.raises(EmitterClosed):
        emitter.created(step_id, f"{step_id}.late")
    entry = asyncio.run(_entry(monitor_proc.address, manager_id))
    assert tally(entry) == (0, 0, 980, 20, 0)
    assert entry.status == K.JOB_STATUS_COMPLETED


async def _setup_step(address: str) -> tuple[str, str]:
    async with aio.insecure_channel(address) as ch:
        return await running_step(m_grpc.MonitorServiceStub(ch))


async def _entry(address: str, manager_id: str) -> job_pb2.StepStat:
    async with aio.insecure_channel(address) as ch:
        return await step_entry(m_grpc.MonitorServiceStub(ch), manager_id)


def test_the_sync_emitter_blocks_a_thread_while_the_monitor_does_not_ack(
    monitor_proc: ServerProcess,
) -> None:
    """Backpressure reaches plain threads: with the monitor stopped, a ``send`` past the
    bound blocks, and with a ``timeout`` gives up without queueing its event."""
    manager_id, step_id = asyncio.run(_setup_step(monitor_proc.address))
    with SyncChildEventEmitter(
        lambda: aio.insecure_channel(monitor_proc.address), max_buffered=10
    ) as emitter:
        emitter.created(step_id, f"{step_id}.c0")
        emitter.flush(timeout=FLUSH_TIMEOUT_S)
        monitor_proc.send(signal.SIGSTOP)
        try:
            for i in range(1, 11):
                emitter.created(step_id, f"{step_id}.c{i}")
            assert emitter.buffered == 10
            with pytest.raises(TimeoutError):
                emitter.send(
                    job_pb2.ChildEvent(
                        kind=K.CHILD_EVENT_KIND_CREATED, step_id=step_id, child_id=f"{step_id}.x"
                    ),
                    timeout=0.5,
                )
            assert emitter.buffered == 10  # the timed-out event was not queued
        finally:
            monitor_proc.send(signal.SIGCONT)
        emitter.flush(timeout=FLUSH_TIMEOUT_S)
        assert emitter.stats.acked_events == 11
    assert tally(asyncio.run(_entry(monitor_proc.address, manager_id))) == (11, 0, 0, 0, 0)


def test_the_emitter_needs_no_server_side_package() -> None:
    """A service that reports events installs the client, not the services: importing the
    emitter loads no structlog, Prometheus, SQL or service code."""
    probe = (
        "import sys, stepflow_client._events\n"
        "banned = ('structlog', 'prometheus_client', 'sqlalchemy', 'orchestrator_svc',"
        " 'monitor_svc')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in banned))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]", out.stdout
