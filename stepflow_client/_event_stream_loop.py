"""The stream task of a child-event emitter: one StreamChildEvents stream at a time, opened again
with backoff when it breaks, sending the emitter's batches and settling them as they are
acknowledged.

One stream at a time: every stream has a number, only the current one takes events from the
queue or counts an acknowledgement, so a broken stream whose request generator wakes late
cannot slip a batch between the new stream's (batch ids are per stream, acks in order; an ack
for no batch in flight is stale and ignored).

Batches are capped by events and by bytes, far below what the monitor accepts in one message.
A batch the monitor still refuses whole (RESOURCE_EXHAUSTED or INVALID_ARGUMENT end the
stream) is found by sending one batch at a time, then halved until the refused event is alone;
that event is dropped (logged, counted, reported like a rejection), so one bad event never
holds back the others.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from grpc import aio

from stepflow_client._event_buffer import EventBuffer
from stepflow_client._event_parts import (
    BACKOFF_INITIAL_S,
    BACKOFF_MAX_S,
    BATCH_LINGER_S,
    REFUSED,
    Batch,
    EmitterHooks,
    EmitterStats,
    EventCallback,
    Item,
    LogHook,
    StreamEnded,
    is_fenced,
    item_id,
    over_the_limit,
)
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc


class Sender(Protocol):
    """What the loop reads of its emitter at each use, since it may change while the loop
    runs: whose the batches are, and who hears of an event that will never be committed."""

    owner: str
    instance: str
    on_rejected: EventCallback | None


class StreamLoop:
    """Sends ``buffer``'s batches for ``sender`` until cancelled; ``changed`` is the condition
    the emitter's producers and flushes wait on, notified at every settle."""

    def __init__(
        self,
        sender: Sender,
        buffer: EventBuffer,
        changed: asyncio.Condition,
        *,
        channel: aio.Channel | None,
        channel_factory: Callable[[], aio.Channel] | None,
        hooks: EmitterHooks,
        log: LogHook,
        stats: EmitterStats,
    ) -> None:
        self._sender = sender
        self._buffer = buffer
        self._changed = changed
        self._channel = channel
        self._channel_factory = channel_factory
        self._hooks = hooks
        self._log = log
        self._stats = stats
        # The stream that may take events and count acks (0: none); see the module docstring.
        self._stream_no = 0
        self._streams = itertools.count(1)

    async def run(self) -> None:
        backoff = BACKOFF_INITIAL_S
        channel = self._channel if self._channel is not None else self._make_channel()
        try:
            while True:
                in_flight: collections.deque[Batch] = collections.deque()
                try:
                    await self._one_stream(channel, in_flight)
                    backoff = BACKOFF_INITIAL_S
                except asyncio.CancelledError:
                    raise
                except aio.AioRpcError as exc:
                    if exc.code() in REFUSED or over_the_limit(in_flight):
                        await self._refused(in_flight, exc)
                        backoff = BACKOFF_INITIAL_S  # the connection is fine: resend at once
                    else:
                        self._log(
                            logging.WARNING,
                            "event stream broken; reconnecting",
                            code=exc.code().name,
                            details=exc.details(),
                            unacked_batches=len(self._buffer.unacked),
                            retry_in_s=backoff,
                        )
                except StreamEnded as exc:
                    self._log(
                        logging.WARNING, "event stream restarted", why=str(exc), retry_in_s=backoff
                    )
                except Exception:
                    self._log(
                        logging.ERROR,
                        "event stream failed; reconnecting",
                        retry_in_s=backoff,
                        exc_info=True,
                    )
                self._stats.reconnects += 1
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
        finally:
            if self._channel is None:
                await channel.close()

    def _make_channel(self) -> aio.Channel:
        assert self._channel_factory is not None
        return self._channel_factory()

    async def _one_stream(self, channel: aio.Channel, in_flight: collections.deque[Batch]) -> None:
        stub = m_grpc.MonitorServiceStub(channel)
        stream_no = next(self._streams)
        batch_ids = itertools.count(1)
        unacked = self._buffer.unacked

        def current() -> bool:
            return self._stream_no == stream_no

        async def send_slot() -> bool:
            """Wait until this stream may send one more batch; False once it is replaced."""
            async with self._changed:
                await self._changed.wait_for(
                    lambda: not current() or len(in_flight) < self._buffer.window()
                )
            return current()

        def sent(batch: Batch) -> m.StreamChildEventsRequest:
            batch.stream_batch_id = next(batch_ids)
            batch.sent_at = time.monotonic()
            in_flight.append(batch)
            events, lines = batch.request_parts()
            request = m.StreamChildEventsRequest(
                batch_id=batch.stream_batch_id,
                events=events,
                owner=self._sender.owner,
                instance=self._sender.instance,
                log_lines=lines,
            )
            self._hook(self._hooks.on_send, request)
            return request

        async def requests() -> AsyncIterator[m.StreamChildEventsRequest]:
            # A batch leaves ``unacked`` only when it is settled, never when it is (re)sent:
            # if this stream breaks too, even half-way through the resend, the next one starts
            # again from every batch still unsettled.
            for batch in list(unacked):
                if not await send_slot():
                    return
                if batch not in unacked:  # settled meanwhile (dropped)
                    continue
                self._stats.resent_batches += 1
                yield sent(batch)
            while True:
                if not await send_slot():
                    return
                fresh = await self._next_batch(current)
                if fresh is None:
                    return
                self._stats.sent_batches += 1
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
        self, ack: m.StreamChildEventsResponse, in_flight: collections.deque[Batch]
    ) -> None:
        if not in_flight or in_flight[0].stream_batch_id != ack.batch_id:
            if all(b.stream_batch_id != ack.batch_id for b in in_flight):
                self._log(
                    logging.WARNING,
                    "ignoring an acknowledgement for no batch in flight",
                    id=ack.batch_id,
                )
                return
            raise StreamEnded(f"acknowledgement for batch {ack.batch_id} out of order")
        batch = in_flight.popleft()
        self._hook(self._hooks.on_ack, len(batch.events), time.monotonic() - batch.sent_at)
        by_id = {item_id(e): e for e in batch.events} if ack.rejected else {}
        rejected = [(by_id[r.event_id], r.reason) for r in ack.rejected if r.event_id in by_id]
        await self._settle(batch, rejected)

    async def _settle(
        self,
        batch: Batch,
        rejected: list[tuple[Item, str]],
        *,
        dropped: bool = False,
    ) -> None:
        """The batch is done with: committed, with ``rejected`` refused (reported first, so a
        waiter on ``flush`` finds their consequences already in motion)."""
        self._buffer.retire(batch)
        for event, reason in rejected:
            self._stats.rejected.append((item_id(event), reason))
            if isinstance(event, job_pb2.JobLogEntry):
                self._line_refused(event, reason)
                continue
            if not dropped:
                self._log(
                    logging.WARNING,
                    "event rejected by monitor",
                    event_id=event.event_id,
                    step_id=event.step_id,
                    child_id=event.child_id,
                    kind=job_pb2.ChildEventKind.Name(event.kind),
                    reason=reason,
                )
            self._hook(self._reporter(reason, dropped=dropped), event, reason)
        async with self._changed:
            self._buffer.count_settled(batch)
            self._stats.acked_events += len(batch.events)
            self._changed.notify_all()

    def _line_refused(self, line: job_pb2.JobLogEntry, reason: str) -> None:
        """A log line not stored: said in the emitter's log, and to ``on_line_rejected``
        (nothing else depends on it, so nothing is repaired)."""
        self._log(
            logging.WARNING,
            "log line refused by monitor",
            key=line.key,
            step_id=line.step_id,
            child_id=line.child_id,
            reason=reason,
        )
        self._hook(self._hooks.on_line_rejected, line, reason)

    def _reporter(self, reason: str, *, dropped: bool) -> EventCallback | None:
        """Who hears of an event that will never be committed (see ``EmitterHooks``)."""
        if dropped and self._hooks.on_dropped is not None:
            return self._hooks.on_dropped
        if is_fenced(reason) and self._hooks.on_fenced is not None:
            return self._hooks.on_fenced
        return self._sender.on_rejected

    def _hook(self, hook: Callable[..., None] | None, *args: Any) -> None:
        if hook is None:
            return
        try:
            hook(*args)
        except Exception:
            self._log(logging.ERROR, "event emitter hook failed", hook=repr(hook), exc_info=True)

    async def _refused(self, in_flight: collections.deque[Batch], exc: aio.AioRpcError) -> None:
        """The monitor refused a batch whole. With one batch in flight that is the one: halve
        it, or drop its only event. Otherwise send one at a time until it shows itself."""
        self._stats.refused_batches += 1
        self._hook(self._hooks.on_refused_batch)
        self._buffer.be_careful()
        if len(in_flight) != 1 or in_flight[0] not in self._buffer.unacked:
            self._log(
                logging.WARNING,
                "monitor refused a batch; sending one batch at a time to find it",
                code=exc.code().name,
                details=exc.details(),
                in_flight=len(in_flight),
            )
            return
        culprit = in_flight[0]
        if len(culprit.events) > 1:
            self._buffer.split(culprit)
            self._stats.split_batches += 1
            self._log(
                logging.WARNING,
                "monitor refused a batch; sending it in halves",
                code=exc.code().name,
                details=exc.details(),
                events=len(culprit.events),
            )
            return
        event = culprit.events[0]
        self._stats.dropped_events += 1
        reason = f"refused by the monitor ({exc.code().name}: {exc.details()})"
        if isinstance(event, job_pb2.JobLogEntry):
            await self._settle(culprit, [(event, reason)], dropped=True)
            return
        self._log(
            logging.ERROR,
            "event dropped: the monitor refuses it even alone",
            event_id=event.event_id,
            step_id=event.step_id,
            child_id=event.child_id,
            kind=job_pb2.ChildEventKind.Name(event.kind),
            bytes=event.ByteSize(),
            code=exc.code().name,
            details=exc.details(),
        )
        await self._settle(culprit, [(event, reason)], dropped=True)

    async def _next_batch(self, current: Callable[[], bool]) -> Batch | None:
        """The next batch from the queue, or None if the stream is replaced meanwhile.

        The batch is taken and recorded in ``unacked`` with no await in between, and only by
        the current stream, so ``unacked`` is always in send order.
        """
        buffer = self._buffer
        async with self._changed:
            await self._changed.wait_for(lambda: bool(buffer.queue) or not current())
        if current() and buffer.may_grow():
            # Let a burst fill the batch (see ``EventBuffer.may_grow``).
            await asyncio.sleep(BATCH_LINGER_S)
        if not current() or not buffer.queue:
            return None if not current() else await self._next_batch(current)
        return buffer.take_batch()
