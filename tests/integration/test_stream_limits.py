"""No event wedges the event stream: the orchestrator's real EventStream against a real monitor.

Events whose total is far beyond what the monitor accepts in one message go through in
byte-capped batches; an event the monitor refuses even alone is dropped (logged, counted,
reported) while every other event, of this step and of others, is committed.
"""

from __future__ import annotations

import asyncio
import math

import pytest
from grpc import aio

from monitor_svc.server import RunningMonitor
from orchestrator_svc.event_stream import BATCH_MAX_BYTES, EventStream
from orchestrator_svc.records import ChildEvent, EventKind
from stepflow_common import metrics
from stepflow_common.limits import MAX_ERROR_CHARS, MAX_REQUEST_BYTES
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from tests.helpers import manager_with_steps

K = job_pb2
FLUSH_TIMEOUT_S = 60.0


async def running_steps(stub: m_grpc.MonitorServiceStub, n: int) -> tuple[str, list[str]]:
    manager, steps = await manager_with_steps(stub, n)
    for step in steps:
        await stub.UpdateJobStatus(
            m.UpdateJobStatusRequest(job_id=step.id, status=K.JOB_STATUS_RUNNING)
        )
    return manager.id, [s.id for s in steps]


async def counts(stub: m_grpc.MonitorServiceStub, manager_id: str) -> dict[str, tuple[int, ...]]:
    job = (await stub.GetJob(m.GetJobRequest(job_id=manager_id))).job
    return {
        s.step_id: (
            s.children.pending,
            s.children.running,
            s.children.completed,
            s.children.failed,
        )
        for s in job.step_stats
    }


async def emit_children(
    stream: EventStream, step_id: str, n: int, *, error: str = "", prefix: str = "c"
) -> None:
    for i in range(n):
        child = f"{step_id}.{prefix}{i}"
        await stream.emit(ChildEvent(EventKind.CREATED, step_id=step_id, child_id=child))
        kind = EventKind.FAILED if error else EventKind.COMPLETED
        await stream.emit(ChildEvent(kind, step_id=step_id, child_id=child, error=error))


def dropped_metric() -> float:
    return metrics.registry().get_sample_value("stepflow_orchestrator_dropped_events_total") or 0.0


@pytest.mark.parametrize("char", ["x", "\U0001f4a5"], ids=["ascii", "4-byte"])
async def test_events_far_beyond_one_message_are_all_committed(
    monitor: RunningMonitor, stub: m_grpc.MonitorServiceStub, char: str
) -> None:
    """500 FAILED events with 34,000-character errors: about 17 MB (68 MB in 4-byte
    characters) if sent as one batch; each error is stored truncated, with its marker."""
    manager_id, (step_id,) = await running_steps(stub, 1)
    stream = EventStream(lambda: aio.insecure_channel(monitor.address))
    stream.start()
    try:
        await emit_children(stream, step_id, 500, error=char * 34_000)
        await asyncio.wait_for(stream.wait_acked(), FLUSH_TIMEOUT_S)
        assert stream.stats.rejected == [] and stream.stats.dropped_events == 0
        assert stream.stats.refused_batches == 0  # capped below the limit, never refused
        # Split by bytes, not only by count (500 events a batch).
        error_bytes = 500 * MAX_ERROR_CHARS * len(char.encode())
        assert stream.stats.sent_batches >= max(2, math.ceil(error_bytes / BATCH_MAX_BYTES))
        assert (await counts(stub, manager_id))[step_id] == (0, 0, 0, 500)
        child = (await stub.GetJob(m.GetJobRequest(job_id=f"{step_id}.c7"))).job
        assert child.status == K.JOB_STATUS_FAILED
        assert len(child.error) <= MAX_ERROR_CHARS and child.error.startswith(char * 100)
        assert "truncated" in child.error
    finally:
        await stream.close(flush_timeout=1.0)


@pytest.mark.parametrize(
    "batch_max_bytes",
    [None, 4 * MAX_REQUEST_BYTES],
    ids=["default-cap", "cap-above-the-monitors-limit"],
)
async def test_an_event_refused_even_alone_is_dropped_and_nothing_else_waits(
    monitor: RunningMonitor, stub: m_grpc.MonitorServiceStub, batch_max_bytes: int | None
) -> None:
    """One event larger than any message the monitor accepts, amid 300 good events of its
    step and followed by another step's: the refused batch is halved down to that event,
    which alone is dropped; every other event is committed, and the stream goes on."""
    manager_id, (poisoned, other) = await running_steps(stub, 2)
    rejected: list[tuple[str, str]] = []
    stream = EventStream(
        lambda: aio.insecure_channel(monitor.address),
        on_rejected=lambda event, reason: rejected.append((event.child_id[:20], reason)),
        **({} if batch_max_bytes is None else {"batch_max_bytes": batch_max_bytes}),
    )
    before = dropped_metric()
    stream.start()
    try:
        await emit_children(stream, poisoned, 150)
        # Not a valid child id either way: what matters is its size (> the message limit).
        poison = ChildEvent(
            kind=EventKind.CREATED,
            step_id=poisoned,
            child_id=f"{poisoned}.huge-" + "x" * (MAX_REQUEST_BYTES + 1024),
        )
        await stream.emit(poison)
        await emit_children(stream, poisoned, 150, prefix="d")
        await emit_children(stream, other, 100)
        await asyncio.wait_for(stream.wait_acked(), FLUSH_TIMEOUT_S)
        assert stream.stats.dropped_events == 1
        assert dropped_metric() == before + 1
        assert len(rejected) == 1 and rejected[0][0] == f"{poisoned}.huge-"[:20]
        assert "refused by the monitor" in rejected[0][1]
        assert stream.stats.refused_batches >= 1
        if batch_max_bytes is not None:
            assert stream.stats.split_batches >= 1  # the big batch was halved, not resent
        assert await counts(stub, manager_id) == {
            poisoned: (0, 0, 300, 0),
            other: (0, 0, 100, 0),
        }
        # The stream is healthy afterwards.
        await emit_children(stream, other, 10, prefix="late")
        await asyncio.wait_for(stream.wait_acked(), FLUSH_TIMEOUT_S)
        assert (await counts(stub, manager_id))[other] == (0, 0, 110, 0)
        assert stream.stats.dropped_events == 1
    finally:
        await stream.close(flush_timeout=1.0)
