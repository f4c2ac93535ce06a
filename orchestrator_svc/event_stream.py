"""The orchestrator's one long-lived StreamChildEvents: events batched, acknowledged in order,
never lost.

Why it is shaped like this: the monitor acknowledges a batch only once it is committed, so an
event is safe exactly when its batch is acknowledged. Until then the batch stays in
``_unacked``; when the stream breaks (monitor restart, network) a new stream is opened with
backoff and the unacknowledged batches are sent again first, in their original order. The
monitor dedupes by each child's state transition, so a batch applied before the break and
sent again changes nothing. The buffer is bounded: ``emit`` waits when it is full, which slows
child execution instead of dropping events or growing without limit while the monitor is down.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
import structlog
from grpc import aio

from stepflow_common import metrics
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc

log = structlog.get_logger(__name__)

BATCH_MAX_EVENTS = 500
BATCH_LINGER_S = 0.002  # wait this long for more events before sending a partial batch
MAX_BUFFERED_EVENTS = 20_000
MAX_BATCHES_IN_FLIGHT = 16
BACKOFF_INITIAL_S = 0.05
BACKOFF_MAX_S = 2.0


@dataclass(slots=True)
class _Batch:
    events: list[job_pb2.ChildEvent]
    last_seq: int
    stream_batch_id: int = 0
    sent_at: float = 0.0  # time.monotonic() when last sent: the ack lag metric


@dataclass(slots=True)
class StreamStats:
    sent_batches: int = 0
    acked_events: int = 0
    resent_batches: int = 0
    reconnects: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)


class EventStream:
    def __init__(
        self,
        channel_factory: Callable[[], aio.Channel],
        *,
        instance_id: str | None = None,
        batch_max_events: int = BATCH_MAX_EVENTS,
        max_buffered_events: int = MAX_BUFFERED_EVENTS,
        on_rejected: Callable[[str, str], None] | None = None,
    ) -> None:
        self._channel_factory = channel_factory
        self._instance = instance_id or uuid.uuid4().hex[:12]
        self._seq = itertools.count(1)
        self._batch_max = batch_max_events
        self._max_buffered = max_buffered_events
        self._on_rejected = on_rejected
        self._queue: collections.deque[tuple[int, job_pb2.ChildEvent]] = collections.deque()
        self._unacked: collections.deque[_Batch] = collections.deque()
        self._buffered = 0
        self._last_emitted = 0
        self._acked_through = 0
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.stats = StreamStats()
        self.connected = asyncio.Event()

    # -- producer side -----------------------------------------------------------------------
    async def emit(self, event: job_pb2.ChildEvent) -> int:
        """Queue one event (its event_id is assigned here); waits while the buffer is full."""
        async with self._changed:
            while self._buffered >= self._max_buffered:
                await self._changed.wait()
            seq = next(self._seq)
            event.event_id = f"{self._instance}-{seq}"
            self._queue.append((seq, event))
            self._buffered += 1
            self._last_emitted = seq
            self._changed.notify_all()
        return seq

    async def wait_acked(self, seq: int | None = None) -> None:
        """Return once every event up to ``seq`` (default: all emitted so far) is committed."""
        target = self._last_emitted if seq is None else seq
        async with self._changed:
            await self._changed.wait_for(lambda: self._acked_through >= target)

    @property
    def buffered(self) -> int:
        """Events emitted but not yet acknowledged (queued or in flight)."""
        return self._buffered

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="event-stream")

    async def close(self, flush_timeout: float = 5.0) -> None:
        """Flush what is buffered (bounded wait), then stop."""
        if self._buffered:
            try:
                await asyncio.wait_for(self.wait_acked(), flush_timeout)
            except TimeoutError:
                log.warning("closing with unacknowledged events", count=self._buffered)
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        backoff = BACKOFF_INITIAL_S
        channel = self._channel_factory()
        try:
            while not self._closing:
                try:
                    await self._one_stream(channel)
                    backoff = BACKOFF_INITIAL_S
                except asyncio.CancelledError:
                    raise
                except aio.AioRpcError as exc:
                    self.connected.clear()
                    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        log.error("monitor refused a batch as too large", details=exc.details())
                    log.warning(
                        "event stream broken; reconnecting",
                        code=exc.code().name,
                        unacked_batches=len(self._unacked),
                        retry_in_s=backoff,
                    )
                except Exception:
                    self.connected.clear()
                    log.exception("event stream failed; reconnecting", retry_in_s=backoff)
                self.stats.reconnects += 1
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
        finally:
            await channel.close()

    async def _one_stream(self, channel: aio.Channel) -> None:
        stub = m_grpc.MonitorServiceStub(channel)
        batch_ids = itertools.count(1)
        # Batches of this stream not yet acknowledged, in send order (acks come in order).
        in_flight: collections.deque[_Batch] = collections.deque()
        # A batch leaves ``_unacked`` only when its ack arrives, never when it is (re)sent: if
        # this stream breaks too, even half-way through the resend, the next one starts again
        # from every batch still unacknowledged. (Emptying ``_unacked`` here and refilling it
        # batch by batch as they were resent lost the batches not yet resent when a resend was
        # cut short, and ``wait_acked`` then waited for them forever.)
        resend = list(self._unacked)
        window = asyncio.Semaphore(MAX_BATCHES_IN_FLIGHT)

        async def requests() -> AsyncIterator[m.StreamChildEventsRequest]:
            for batch in resend:
                await window.acquire()
                batch.stream_batch_id = next(batch_ids)
                batch.sent_at = time.monotonic()
                in_flight.append(batch)
                self.stats.resent_batches += 1
                yield m.StreamChildEventsRequest(
                    batch_id=batch.stream_batch_id, events=batch.events
                )
            while True:
                await window.acquire()
                batch = await self._next_batch()
                batch.stream_batch_id = next(batch_ids)
                batch.sent_at = time.monotonic()
                self._unacked.append(batch)
                in_flight.append(batch)
                self.stats.sent_batches += 1
                yield m.StreamChildEventsRequest(
                    batch_id=batch.stream_batch_id, events=batch.events
                )

        call = stub.StreamChildEvents(requests(), wait_for_ready=True)
        self.connected.set()
        async for ack in call:
            if not in_flight or in_flight[0].stream_batch_id != ack.batch_id:
                raise RuntimeError(f"ack for unexpected batch {ack.batch_id}")
            batch = in_flight.popleft()
            metrics.ACK_LAG.observe(time.monotonic() - batch.sent_at)
            # This stream sends in ``_unacked`` order (the resend first), so the oldest
            # unacknowledged batch is the one acknowledged.
            if not self._unacked or self._unacked[0] is not batch:
                raise RuntimeError(f"ack for batch {ack.batch_id} out of order")
            self._unacked.popleft()
            window.release()
            for rejected in ack.rejected:
                self.stats.rejected.append((rejected.event_id, rejected.reason))
                log.warning(
                    "event rejected by monitor", event_id=rejected.event_id, reason=rejected.reason
                )
                if self._on_rejected is not None:
                    self._on_rejected(rejected.event_id, rejected.reason)
            async with self._changed:
                self._buffered -= len(batch.events)
                self._acked_through = max(self._acked_through, batch.last_seq)
                self.stats.acked_events += len(batch.events)
                self._changed.notify_all()

    async def _next_batch(self) -> _Batch:
        async with self._changed:
            await self._changed.wait_for(lambda: bool(self._queue))
        if len(self._queue) < self._batch_max:
            await asyncio.sleep(BATCH_LINGER_S)  # let a burst fill the batch
        events: list[job_pb2.ChildEvent] = []
        last = 0
        while self._queue and len(events) < self._batch_max:
            seq, event = self._queue.popleft()
            events.append(event)
            last = seq
        return _Batch(events, last)
