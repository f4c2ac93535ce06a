"""Sending child-event batches over a real StreamChildEvents stream (tests only)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Sequence

from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc

K = job_pb2
_ids = itertools.count(1)


def ev(kind: int, step_id: str, child_id: str = "", **kw: object) -> job_pb2.ChildEvent:
    return job_pb2.ChildEvent(
        event_id=f"e{next(_ids)}",
        kind=kind,
        step_id=step_id,
        child_id=child_id,
        **kw,  # type: ignore[arg-type]
    )


def created(step_id: str, child_id: str) -> job_pb2.ChildEvent:
    return ev(K.CHILD_EVENT_KIND_CREATED, step_id, child_id)


def running(step_id: str, child_id: str) -> job_pb2.ChildEvent:
    return ev(K.CHILD_EVENT_KIND_RUNNING, step_id, child_id)


def completed(step_id: str, child_id: str) -> job_pb2.ChildEvent:
    return ev(K.CHILD_EVENT_KIND_COMPLETED, step_id, child_id)


def failed(step_id: str, child_id: str, error: str = "boom") -> job_pb2.ChildEvent:
    return ev(K.CHILD_EVENT_KIND_FAILED, step_id, child_id, error=error)


def cancelled(step_id: str, child_id: str) -> job_pb2.ChildEvent:
    return ev(K.CHILD_EVENT_KIND_CANCELLED, step_id, child_id)


def sealed(step_id: str, count: int, handed: bool = True) -> job_pb2.ChildEvent:
    return ev(K.CHILD_EVENT_KIND_SEALED, step_id, child_count=count, handed_to_monitor=handed)


async def send_batches(
    stub: m_grpc.MonitorServiceStub, batches: Sequence[Sequence[job_pb2.ChildEvent]]
) -> list[m.StreamChildEventsResponse]:
    """Send each batch on one stream; return the acks (one per batch, in order)."""

    async def requests() -> AsyncIterator[m.StreamChildEventsRequest]:
        for i, batch in enumerate(batches, start=1):
            yield m.StreamChildEventsRequest(batch_id=i, events=list(batch))

    acks = []
    call = stub.StreamChildEvents(requests())
    async for ack in call:
        acks.append(ack)
    return acks


async def wait_for(predicate, timeout: float = 5.0, interval: float = 0.02):  # type: ignore[no-untyped-def]
    """Poll an async predicate until it returns a truthy value (only for asserting on
    monitor-side timers that fire by themselves)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)
