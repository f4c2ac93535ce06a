"""The orchestrator's one long-lived StreamChildEvents: events batched, acknowledged in order,
never lost, and never wedged by one event.

Why it is shaped like this: the monitor acknowledges a batch only once it is committed, so an
event is safe exactly when its batch is acknowledged. Until then the batch stays in
``_unacked``; when the stream breaks (monitor restart, network) a new stream is opened with
backoff and the unacknowledged batches are sent again first, in their original order. The
monitor dedupes by each child's state transition, so a batch applied before the break and
sent again changes nothing. The buffer is bounded: ``emit`` waits when it is full, which slows
child execution instead of dropping events or growing without limit while the monitor is down.

One stream at a time: every stream has a number, only the current one takes events from the
queue or counts an acknowledgement, so a broken stream whose request generator wakes late
cannot slip a batch between the new stream's (batch ids are per stream, acks in order).

Batches are capped by bytes as well as by events, far below what the monitor accepts in one
message. A batch the monitor still refuses whole (RESOURCE_EXHAUSTED or INVALID_ARGUMENT end
the stream) is found by sending one batch at a time, then halved until the refused event is
alone; that event is dropped (logged, counted, reported like a rejection), so one bad event
never holds back the others.
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

from orchestrator_svc.convert import event_from_pb, event_to_pb
from orchestrator_svc.records import ChildEvent
from stepflow_common import metrics
from stepflow_common.limits import MAX_ERROR_CHARS, MAX_REQUEST_BYTES, truncate_text
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc

log = structlog.get_logger(__name__)

BATCH_MAX_EVENTS = 500
# A quarter of what the monitor accepts: a full batch of the largest events an emit can make
# (an error of MAX_ERROR_CHARS 4-byte characters) still fits several times over.
BATCH_MAX_BYTES = MAX_REQUEST_BYTES // 4
BATCH_LINGER_S = 0.002  # wait this long for more events before sending a partial batch
MAX_BUFFERED_EVENTS = 20_000
MAX_BATCHES_IN_FLIGHT = 16
BACKOFF_INITIAL_S = 0.05
BACKOFF_MAX_S = 2.0
MAX_NAME_CHARS = 512  # the monitor keeps no more of a child's name
# How the monitor says it will not take a batch as it is: sending it again unchanged fails the
# same way, so it is split instead.
REFUSED = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT})

Rejected = Callable[[ChildEvent, str], None]
"""``on_rejected(event, reason)``: the monitor rejected ``event`` (in an ack) or refused it
even alone (dropped); either is final."""


def event_bytes(event: job_pb2.ChildEvent) -> int:
    """What ``event`` adds to a request: its size plus its field tag and length prefix."""
    size = event.ByteSize()
    return size + 1 + max(1, (size.bit_length() + 6) // 7)


@dataclass(slots=True, eq=False)  # compared by identity: a batch is one send
class _Batch:
    events: list[job_pb2.ChildEvent]
    seqs: list[int]
    stream_batch_id: int = 0
    sent_at: float = 0.0  # time.monotonic() when last sent: the ack lag metric

    @property
    def last_seq(self) -> int:
        return self.seqs[-1]

    def halves(self) -> tuple[_Batch, _Batch]:
        mid = len(self.events) // 2
        return (
            _Batch(self.events[:mid], self.seqs[:mid]),
            _Batch(self.events[mid:], self.seqs[mid:]),
        )


@dataclass(slots=True)
class StreamStats:
    sent_batches: int = 0
    acked_events: int = 0
    resent_batches: int = 0
    reconnects: int = 0
    refused_batches: int = 0
    split_batches: int = 0
    dropped_events: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)


class _StreamEnded(Exception):
    """The stream is no longer usable (an acknowledgement out of order): open another."""


class EventStream:
    def __init__(
        self,
        channel_factory: Callable[[], aio.Channel],
        *,
        instance_id: str | None = None,
        owner: str = "",
        batch_max_events: int = BATCH_MAX_EVENTS,
        batch_max_bytes: int = BATCH_MAX_BYTES,
        max_buffered_events: int = MAX_BUFFERED_EVENTS,
        on_rejected: Rejected | None = None,
    ) -> None:
        self._channel_factory = channel_factory
        self._instance = instance_id or uuid.uuid4().hex[:12]
        # Fences every batch: events for a job another orchestrator owns are rejected.
        self.owner = owner
        self._seq = itertools.count(1)
        self._batch_max = batch_max_events
        self._batch_max_bytes = batch_max_bytes
        self._max_buffered = max_buffered_events
        self.on_rejected = on_rejected
        # Called with each request before it is sent (tracing names its jobs' spans there).
        self.on_send: Callable[[m.StreamChildEventsRequest], None] | None = None
        self._queue: collections.deque[tuple[int, job_pb2.ChildEvent]] = collections.deque()
        self._unacked: collections.deque[_Batch] = collections.deque()
        self._buffered = 0
        self._last_emitted = 0
        self._acked_through = 0
        # The stream that may take events and count acks (0: none); see the module docstring.
        self._stream_no = 0
        self._streams = itertools.count(1)
        # After a refusal, one batch at a time until everything then unacknowledged is settled,
        # so a refused stream always names its batch.
        self._careful_through = 0
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.stats = StreamStats()

    # -- producer side -----------------------------------------------------------------------
    async def emit(self, child_event: ChildEvent) -> int:
        """Queue one event (its event_id is assigned here); waits while the buffer is full;
        returns its sequence number (see ``wait_acked``).

        Texts are bounded first (an error to MAX_ERROR_CHARS with a visible marker), so every
        event is small whatever a worker reports.
        """
        event = event_to_pb(child_event)
        if len(event.error) > MAX_ERROR_CHARS or "\x00" in event.error:
            event.error = truncate_text(event.error.replace("\x00", "\ufffd"))
        if len(event.name) > MAX_NAME_CHARS or "\x00" in event.name:
            event.name = event.name.replace("\x00", "\ufffd")[:MAX_NAME_CHARS]
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
        """Return once every event up to ``seq`` (default: all emitted so far) is settled:
        committed, rejected, or dropped (the last two reported through ``on_rejected``)."""
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
                in_flight: collections.deque[_Batch] = collections.deque()
                try:
                    await self._one_stream(channel, in_flight)
                    backoff = BACKOFF_INITIAL_S
                except asyncio.CancelledError:
                    raise
                except aio.AioRpcError as exc:
                    if exc.code() in REFUSED or _over_the_limit(in_flight):
                        await self._refused(in_flight, exc)
                        backoff = BACKOFF_INITIAL_S  # the connection is fine: resend at once
                    else:
                        log.warning(
                            "event stream broken; reconnecting",
                            code=exc.code().name,
                            details=exc.details(),
                            unacked_batches=len(self._unacked),
                            retry_in_s=backoff,
                        )
                except _StreamEnded as exc:
                    log.warning("event stream restarted", why=str(exc), retry_in_s=backoff)
                except Exception:
                    log.exception("event stream failed; reconnecting", retry_in_s=backoff)
                self.stats.reconnects += 1
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
        finally:
            await channel.close()

    async def _one_stream(self, channel: aio.Channel, in_flight: collections.deque[_Batch]) -> None:
        stub = m_grpc.MonitorServiceStub(channel)
        stream_no = next(self._streams)
        batch_ids = itertools.count(1)

        def current() -> bool:
            return self._stream_no == stream_no

        async def send_slot() -> bool:
            """Wait until this stream may send one more batch; False once it is replaced."""
            async with self._changed:
                await self._changed.wait_for(
                    lambda: not current() or len(in_flight) < self._window()
                )
            return current()

        def sent(batch: _Batch) -> m.StreamChildEventsRequest:
            batch.stream_batch_id = next(batch_ids)
            batch.sent_at = time.monotonic()
            in_flight.append(batch)
            request = m.StreamChildEventsRequest(
                batch_id=batch.stream_batch_id, events=batch.events, owner=self.owner
            )
            if self.on_send is not None:
                self.on_send(request)
            return request

        async def requests() -> AsyncIterator[m.StreamChildEventsRequest]:
            # A batch leaves ``_unacked`` only when it is settled, never when it is (re)sent:
            # if this stream breaks too, even half-way through the resend, the next one starts
            # again from every batch still unsettled.
            for batch in list(self._unacked):
                if not await send_slot():
                    return
                if batch not in self._unacked:  # settled meanwhile (dropped)
                    continue
                self.stats.resent_batches += 1
                yield sent(batch)
            while True:
                if not await send_slot():
                    return
                fresh = await self._next_batch(current)
                if fresh is None:
                    return
                self.stats.sent_batches += 1
                yield sent(fresh)

        self._stream_no = stream_no
        call = stub.StreamChildEvents(requests(), wait_for_ready=True)
        try:
            async for ack in call:
                await self._on_ack(ack, in_flight)
        finally:
            # Retire this stream before another opens: its generator, wherever it waits,
            # returns without taking another event.
            async with self._changed:
                if current():
                    self._stream_no = 0
                self._changed.notify_all()
            cancel = getattr(call, "cancel", None)
            if cancel is not None:
                cancel()

    async def _on_ack(
        self, ack: m.StreamChildEventsResponse, in_flight: collections.deque[_Batch]
    ) -> None:
        if not in_flight or in_flight[0].stream_batch_id != ack.batch_id:
            if all(b.stream_batch_id != ack.batch_id for b in in_flight):
                log.warning("ignoring an acknowledgement for no batch in flight", id=ack.batch_id)
                return
            raise _StreamEnded(f"acknowledgement for batch {ack.batch_id} out of order")
        batch = in_flight.popleft()
        metrics.ACK_LAG.observe(time.monotonic() - batch.sent_at)
        by_id = {e.event_id: e for e in batch.events} if ack.rejected else {}
        rejected = [(by_id[r.event_id], r.reason) for r in ack.rejected if r.event_id in by_id]
        await self._settle(batch, rejected)

    async def _settle(self, batch: _Batch, rejected: list[tuple[job_pb2.ChildEvent, str]]) -> None:
        """The batch is done with: committed, with ``rejected`` refused (reported first, so a
        waiter on ``wait_acked`` finds their consequences already in motion)."""
        with contextlib.suppress(ValueError):
            self._unacked.remove(batch)
        for event, reason in rejected:
            self.stats.rejected.append((event.event_id, reason))
            log.warning(
                "event rejected by monitor",
                event_id=event.event_id,
                step_id=event.step_id,
                child_id=event.child_id,
                kind=job_pb2.ChildEventKind.Name(event.kind),
                reason=reason,
            )
            if self.on_rejected is not None:
                try:
                    self.on_rejected(event_from_pb(event), reason)
                except Exception:
                    log.exception("rejection handler failed", event_id=event.event_id)
        async with self._changed:
            self._buffered -= len(batch.events)
            self._acked_through = max(self._acked_through, batch.last_seq)
            self.stats.acked_events += len(batch.events)
            self._changed.notify_all()

    def _window(self) -> int:
        careful = self._acked_through < self._careful_through
        return 1 if careful else MAX_BATCHES_IN_FLIGHT

    async def _refused(self, in_flight: collections.deque[_Batch], exc: aio.AioRpcError) -> None:
        """The monitor refused a batch whole. With one batch in flight that is the one: halve
        it, or drop its only event. Otherwise send one at a time until it shows itself."""
        self.stats.refused_batches += 1
        metrics.REFUSED_BATCHES.inc()
        if self._unacked:
            self._careful_through = max(self._careful_through, self._unacked[-1].last_seq)
        if len(in_flight) != 1 or in_flight[0] not in self._unacked:
            log.warning(
                "monitor refused a batch; sending one batch at a time to find it",
                code=exc.code().name,
                details=exc.details(),
                in_flight=len(in_flight),
            )
            return
        culprit = in_flight[0]
        if len(culprit.events) > 1:
            first, second = culprit.halves()
            position = self._unacked.index(culprit)
            self._unacked[position] = second
            self._unacked.insert(position, first)
            self.stats.split_batches += 1
            log.warning(
                "monitor refused a batch; sending it in halves",
                code=exc.code().name,
                details=exc.details(),
                events=len(culprit.events),
            )
            return
        event = culprit.events[0]
        self.stats.dropped_events += 1
        metrics.DROPPED_EVENTS.inc()
        log.error(
            "event dropped: the monitor refuses it even alone",
            event_id=event.event_id,
            step_id=event.step_id,
            child_id=event.child_id,
            kind=job_pb2.ChildEventKind.Name(event.kind),
            bytes=event.ByteSize(),
            code=exc.code().name,
            details=exc.details(),
        )
        reason = f"refused by the monitor ({exc.code().name}: {exc.details()})"
        await self._settle(culprit, [(event, reason)])

    async def _next_batch(self, current: Callable[[], bool]) -> _Batch | None:
        """The next batch from the queue, or None if the stream is replaced meanwhile.

        The batch is taken and recorded in ``_unacked`` with no await in between, and only by
        the current stream, so ``_unacked`` is always in send order.
        """
        async with self._changed:
            await self._changed.wait_for(lambda: bool(self._queue) or not current())
        if current() and len(self._queue) < self._batch_max:
            await asyncio.sleep(BATCH_LINGER_S)  # let a burst fill the batch
        if not current() or not self._queue:
            return None if not current() else await self._next_batch(current)
        events: list[job_pb2.ChildEvent] = []
        seqs: list[int] = []
        size = 0
        while self._queue and len(events) < self._batch_max:
            seq, event = self._queue[0]
            grows = event_bytes(event)
            if events and size + grows > self._batch_max_bytes:
                break
            self._queue.popleft()
            events.append(event)
            seqs.append(seq)
            size += grows
        batch = _Batch(events, seqs)
        self._unacked.append(batch)
        return batch


def _over_the_limit(in_flight: collections.deque[_Batch]) -> bool:
    """Whether a batch in flight is larger than a message may be. gRPC itself then fails the
    stream (INTERNAL, not RESOURCE_EXHAUSTED) before the monitor sees it; it is a refusal all
    the same, to be split, never a broken connection to resend it on unchanged."""
    return any(
        sum(event_bytes(event) for event in batch.events) >= MAX_REQUEST_BYTES
        for batch in in_flight
    )
