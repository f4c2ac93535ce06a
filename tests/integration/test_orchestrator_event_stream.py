"""The orchestrator's event stream when the connection breaks again while it is still resending.

The restart tests show resending through a real monitor; this one needs an exact sequence no
real server gives on demand: a stream that takes some batches and breaks without acknowledging
them, a second stream that breaks after taking only the first resent batch, then a good one. A
scripted channel plays the monitor. Every batch ever sent must still be acknowledged in the end.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc import aio

from orchestrator_svc.event_stream import EventStream
from orchestrator_svc.records import ChildEvent, EventKind
from stepflow_proto.v1 import monitor_service_pb2 as m


class ScriptedCall:
    """One StreamChildEvents call: take ``take`` requests, then break (UNAVAILABLE) without
    acknowledging; ``take=None`` acknowledges every request for as long as the stream lives."""

    def __init__(
        self,
        requests: AsyncIterator[m.StreamChildEventsRequest],
        take: int | None,
        log: list[tuple[int, list[str]]],
        stream_no: int,
    ) -> None:
        self._requests, self._take, self._log, self._no = requests, take, log, stream_no

    def __aiter__(self) -> AsyncIterator[m.StreamChildEventsResponse]:
        return self._run()

    async def _run(self) -> AsyncIterator[m.StreamChildEventsResponse]:
        taken = 0
        async for request in self._requests:
            self._log.append((self._no, [e.event_id for e in request.events]))
            taken += 1
            if self._take is None:
                yield m.StreamChildEventsResponse(batch_id=request.batch_id)
            elif taken >= self._take:
                raise aio.AioRpcError(
                    grpc.StatusCode.UNAVAILABLE, aio.Metadata(), aio.Metadata(), "gone"
                )


class ScriptedChannel:
    """Just enough of ``aio.Channel`` for ``MonitorServiceStub``: only the stream is used."""

    def __init__(self, script: list[int | None]) -> None:
        self.script = script
        self.log: list[tuple[int, list[str]]] = []
        self.streams = 0

    def unary_unary(self, *args: Any, **kwargs: Any) -> Callable[..., Any]:
        return self._unused

    unary_stream = unary_unary

    def stream_stream(self, *args: Any, **kwargs: Any) -> Callable[..., ScriptedCall]:
        def call(requests: AsyncIterator[m.StreamChildEventsRequest], **_: Any) -> ScriptedCall:
            self.streams += 1
            take = self.script.pop(0) if self.script else None
            return ScriptedCall(requests, take, self.log, self.streams)

        return call

    def _unused(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("only StreamChildEvents is scripted")

    async def close(self) -> None:
        pass


async def test_unacknowledged_batches_survive_a_second_break_during_the_resend() -> None:
    channel = ScriptedChannel([3, 1, None])
    stream = EventStream(lambda: channel, instance_id="t")  # type: ignore[arg-type,return-value]
    stream.start()
    try:
        emitted = []
        for i in range(3):
            seq = await stream.emit(ChildEvent(EventKind.CREATED, step_id="s", child_id=f"c{i}"))
            emitted.append(f"t-{seq}")
            await asyncio.sleep(0.02)  # one batch each
        # Every event acknowledged, however the streams broke.
        await asyncio.wait_for(stream.wait_acked(), 10)
        assert stream.buffered == 0
        acked = [eid for no, ids in channel.log if no == 3 for eid in ids]
        assert sorted(acked) == sorted(emitted), channel.log
        assert channel.streams == 3
        assert stream.stats.resent_batches >= 3 + 1, stream.stats
    finally:
        await stream.close(flush_timeout=0.1)
