"""Reporting child events to the monitor over one long-lived StreamChildEvents stream: batched,
acknowledged in order, never lost, never wedged by one event, and bounded in memory.

Any service that runs a step's children (the orchestrator, or your own) reports them through
``ChildEventEmitter`` (asyncio) or ``SyncChildEventEmitter`` (plain threads)::

    async with ChildEventEmitter(channel) as events:
        await events.created(step_id, child_id)
        await events.completed(step_id, child_id)
        await events.flush()  # every event so far is committed

Why it is shaped like this: the monitor acknowledges a batch only once it is committed, so an
event is safe exactly when its batch is acknowledged. Until then the batch stays in
``_unacked``; when the stream breaks (monitor restart, network) a new stream is opened with
backoff on the same channel (its keepalive settings stay in force) and the unacknowledged
batches are sent again first, in their original order. The monitor dedupes by each child's
state transition, so a batch applied before the break and sent again changes nothing. The
buffer is bounded: ``send`` waits when it is full, which slows the producer instead of dropping
events or growing without limit while the monitor is down.

One stream at a time: every stream has a number, only the current one takes events from the
queue or counts an acknowledgement, so a broken stream whose request generator wakes late
cannot slip a batch between the new stream's (batch ids are per stream, acks in order; an ack
for no batch in flight is stale and ignored).

Batches are capped by events and by bytes, far below what the monitor accepts in one message.
A batch the monitor still refuses whole (RESOURCE_EXHAUSTED or INVALID_ARGUMENT end the
stream) is found by sending one batch at a time, then halved until the refused event is alone;
that event is dropped (logged, counted, reported like a rejection), so one bad event never
holds back the others.

This module needs only grpc, protobuf, the generated stubs and ``stepflow_common.limits``:
logging goes to the standard library unless a ``log`` hook is given, and a service's own
metrics and repairs plug in through ``EmitterHooks``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any

from grpc import aio

from stepflow_client._event_parts import (
    BACKOFF_INITIAL_S,
    BACKOFF_MAX_S,
    BATCH_LINGER_S,
    BATCH_MAX_BYTES,
    BATCH_MAX_EVENTS,
    CLOSE_FLUSH_S,
    MAX_BATCHES_IN_FLIGHT,
    MAX_BUFFERED_EVENTS,
    REFUSED,
    Batch,
    EmitterClosed,
    EmitterHooks,
    EmitterStats,
    EventCallback,
    LogHook,
    StreamEnded,
    child_event,
    event_bytes,
    is_fenced,
    over_the_limit,
    sealed_event,
    sizes_bound,
    stdlib_log,
)
from stepflow_common.errors import FENCED_PREFIX
from stepflow_common.limits import MAX_ERROR_CHARS, MAX_NAME_CHARS, truncate_text
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc

__all__ = [
    "BATCH_MAX_BYTES",
    "BATCH_MAX_EVENTS",
    "FENCED_PREFIX",
    "MAX_BUFFERED_EVENTS",
    "ChildEventEmitter",
    "EmitterClosed",
    "EmitterHooks",
    "EmitterStats",
    "event_bytes",
    "is_fenced",
]


class ChildEventEmitter:
    """Reports child events to the monitor; an event is safe once ``flush`` returns.

    ``channel`` is used and left open (its owner closes it); with ``channel_factory`` instead,
    the emitter makes its own channel on start and closes it on close. Either way one
    channel serves every stream the emitter opens, so a reconnect keeps its settings.

    ``owner`` fences every batch: events for a job whose manager another owner holds are
    rejected (``is_fenced``). ``max_buffered`` bounds the events sent but not yet
    acknowledged; ``send`` waits while it is reached. ``on_rejected(event, reason)`` hears of
    every event that will never be committed (unless a hook in ``hooks`` takes it).

    Use ``async with`` (or ``start`` / ``close``) inside one event loop; every method must be
    called from that loop.
    """

    def __init__(
        self,
        channel: aio.Channel | None = None,
        *,
        channel_factory: Callable[[], aio.Channel] | None = None,
        owner: str = "",
        max_buffered: int = MAX_BUFFERED_EVENTS,
        on_rejected: EventCallback | None = None,
        hooks: EmitterHooks | None = None,
        instance_id: str | None = None,
        batch_max_events: int = BATCH_MAX_EVENTS,
        batch_max_bytes: int = BATCH_MAX_BYTES,
    ) -> None:
        if (channel is None) == (channel_factory is None):
            raise ValueError("give exactly one of channel and channel_factory")
        for what, value in (
            ("max_buffered", max_buffered),
            ("batch_max_events", batch_max_events),
            ("batch_max_bytes", batch_max_bytes),
        ):
            if value < 1:
                raise ValueError(f"{what} must be at least 1, not {value}")
        self._channel = channel
        self._channel_factory = channel_factory
        self.owner = owner
        # The orchestrator instance (one process) holding ``owner``'s lease: with it, the
        # batches of an instance superseded by a newer one are fenced.
        self.instance = ""
        self.on_rejected = on_rejected
        self._hooks = hooks or EmitterHooks()
        self._log: LogHook = self._hooks.log or stdlib_log
        self._instance = instance_id or uuid.uuid4().hex[:12]
        self._seq = itertools.count(1)
        self._batch_max = batch_max_events
        self._batch_max_bytes = batch_max_bytes
        self._max_buffered = max_buffered
        self._queue: collections.deque[tuple[int, job_pb2.ChildEvent]] = collections.deque()
        self._unacked: collections.deque[Batch] = collections.deque()
        self._buffered = 0
        self._last_sent = 0
        self._acked_through = 0
        # The stream that may take events and count acks (0: none); see the module docstring.
        self._stream_no = 0
        self._streams = itertools.count(1)
        # After a refusal, one batch at a time until everything then unacknowledged is settled,
        # so a refused stream always names its batch.
        self._careful_through = 0
        self._changed = asyncio.Condition()
        self._flush_targets: list[int] = []  # the ``through`` of every waiting flush
        self._room_waiters = 0  # sends in the locked path (for the lock or for room)
        self._task: asyncio.Task[None] | None = None
        self._stopped: str = ""  # why nothing more can be sent or awaited ("": it can)
        self.stats = EmitterStats()

    # -- producer side -------------------------------------------------------------------------
    async def send(self, event: job_pb2.ChildEvent) -> int:
        """Queue ``event``, waiting while the buffer is full; returns its sequence number
        (for ``flush(through=...)``).

        The emitter takes the message over: it sets ``event_id`` (unique per emitter, so a
        rejection names its event) and bounds its texts (an error to MAX_ERROR_CHARS with a
        visible marker), so every event is small whatever a worker reports.
        """
        if self._task is None:
            self.start()
        error = event.error  # each read of a message's field makes a new str
        if error and (len(error) > MAX_ERROR_CHARS or "\x00" in error):
            event.error = truncate_text(error.replace("\x00", "\ufffd"))
        name = event.name
        if name and (len(name) > MAX_NAME_CHARS or "\x00" in name):
            event.name = name.replace("\x00", "\ufffd")[:MAX_NAME_CHARS]
        if (
            self._queue
            and self._buffered < self._max_buffered
            and not self._room_waiters
            and not self._stopped
        ):
            # The common case, with no lock round: there is room, no earlier send waits for
            # it (so none is overtaken), and the queue is not empty (so the stream, waiting
            # only for an empty queue to fill, needs no wake-up; nothing else waits on what
            # a send changes).
            return self._enqueue(event)
        # Counted from before the lock is taken, so no later send overtakes this one.
        self._room_waiters += 1
        try:
            async with self._changed:
                while self._buffered >= self._max_buffered and not self._stopped:
                    await self._changed.wait()
                if self._stopped:
                    raise EmitterClosed(self._stopped)
                seq = self._enqueue(event)
                self._changed.notify_all()
        finally:
            self._room_waiters -= 1
        return seq

    def _enqueue(self, event: job_pb2.ChildEvent) -> int:
        seq = next(self._seq)
        event.event_id = f"{self._instance}-{seq}"
        self._queue.append((seq, event))
        self._buffered += 1
        self._last_sent = seq
        return seq

    async def created(
        self, step_id: str, child_id: str, *, name: str = "", attempt: int = 0
    ) -> int:
        """A child of ``step_id`` exists (the monitor creates its record, ``pending``)."""
        return await self.send(
            child_event(
                job_pb2.CHILD_EVENT_KIND_CREATED, step_id, child_id, name=name, attempt=attempt
            )
        )

    async def running(self, step_id: str, child_id: str, *, attempt: int = 0) -> int:
        """The child started (again, for a later ``attempt``)."""
        return await self.send(
            child_event(job_pb2.CHILD_EVENT_KIND_RUNNING, step_id, child_id, attempt=attempt)
        )

    async def completed(self, step_id: str, child_id: str) -> int:
        return await self.send(child_event(job_pb2.CHILD_EVENT_KIND_COMPLETED, step_id, child_id))

    async def failed(self, step_id: str, child_id: str, error: str) -> int:
        return await self.send(
            child_event(job_pb2.CHILD_EVENT_KIND_FAILED, step_id, child_id, error=error)
        )

    async def cancelled(self, step_id: str, child_id: str, error: str = "") -> int:
        return await self.send(
            child_event(job_pb2.CHILD_EVENT_KIND_CANCELLED, step_id, child_id, error=error)
        )

    async def sealed(
        self, step_id: str, child_count: int, *, handed_to_monitor: bool = True
    ) -> int:
        """The step spawned its last child (``child_count`` in all). Handed to the monitor
        (the default), the monitor ends the step once every child is terminal; otherwise the
        step's runner ends it itself (UpdateJobStatus)."""
        return await self.send(sealed_event(step_id, child_count, handed_to_monitor))

    async def flush(self, *, through: int | None = None) -> None:
        """Return once every event up to sequence ``through`` (default: all sent so far) is
        settled: committed, or reported as never to be (``on_rejected`` and the hooks run
        before this returns). Bound the wait with ``asyncio.timeout`` if the monitor may be
        away for long: events are kept and resent meanwhile, so this waits as long as that."""
        target = self._last_sent if through is None else through
        self._flush_targets.append(target)
        try:
            async with self._changed:
                await self._changed.wait_for(
                    lambda: self._acked_through >= target or bool(self._stopped)
                )
        finally:
            self._flush_targets.remove(target)
        if self._acked_through < target:
            self._raise_if_stopped()

    @property
    def buffered(self) -> int:
        """Events sent but not yet settled (queued or in flight)."""
        return self._buffered

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the stream task on the running loop (``send`` starts it too if needed)."""
        self._raise_if_stopped()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="child-event-stream")
            self._task.add_done_callback(self._task_done)

    async def close(self, flush_timeout: float | None = CLOSE_FLUSH_S) -> int:
        """Flush what is buffered (for at most ``flush_timeout`` seconds; None: no limit),
        then stop. Returns how many events were left unsettled (0: everything was)."""
        if self._buffered and not self._stopped:
            try:
                async with asyncio.timeout(flush_timeout):
                    await self.flush()
            except TimeoutError:
                self._log(
                    logging.WARNING, "closing with unacknowledged events", count=self._buffered
                )
            except EmitterClosed:
                pass
        left = self._buffered
        await self._stop("the emitter is closed")
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])  # its failure, if any, is reported already
        return left

    async def __aenter__(self) -> ChildEventEmitter:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _stop(self, why: str) -> None:
        async with self._changed:
            self._stopped = self._stopped or why
            self._changed.notify_all()

    def _raise_if_stopped(self) -> None:
        if self._stopped:
            raise EmitterClosed(self._stopped)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        """The stream task never ends by itself; if it fails, waiters must not hang."""
        if task.cancelled() or task.exception() is None:
            return
        why = f"the event stream failed: {task.exception()!r}"
        self._log(logging.ERROR, "event stream task failed", error=repr(task.exception()))
        stopping = asyncio.get_running_loop().create_task(self._stop(why))
        stopping.add_done_callback(lambda _: None)

    # -- the stream ----------------------------------------------------------------------------
    async def _run(self) -> None:
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
                            unacked_batches=len(self._unacked),
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
                self.stats.reconnects += 1
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

        def current() -> bool:
            return self._stream_no == stream_no

        async def send_slot() -> bool:
            """Wait until this stream may send one more batch; False once it is replaced."""
            async with self._changed:
                await self._changed.wait_for(
                    lambda: not current() or len(in_flight) < self._window()
                )
            return current()

        def sent(batch: Batch) -> m.StreamChildEventsRequest:
            batch.stream_batch_id = next(batch_ids)
            batch.sent_at = time.monotonic()
            in_flight.append(batch)
            request = m.StreamChildEventsRequest(
                batch_id=batch.stream_batch_id,
                events=batch.events,
                owner=self.owner,
                instance=self.instance,
            )
            self._hook(self._hooks.on_send, request)
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
        by_id = {e.event_id: e for e in batch.events} if ack.rejected else {}
        rejected = [(by_id[r.event_id], r.reason) for r in ack.rejected if r.event_id in by_id]
        await self._settle(batch, rejected)

    async def _settle(
        self,
        batch: Batch,
        rejected: list[tuple[job_pb2.ChildEvent, str]],
        *,
        dropped: bool = False,
    ) -> None:
        """The batch is done with: committed, with ``rejected`` refused (reported first, so a
        waiter on ``flush`` finds their consequences already in motion)."""
        with contextlib.suppress(ValueError):
            self._unacked.remove(batch)
        for event, reason in rejected:
            self.stats.rejected.append((event.event_id, reason))
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
            self._buffered -= len(batch.events)
            self._acked_through = max(self._acked_through, batch.last_seq)
            self.stats.acked_events += len(batch.events)
            self._changed.notify_all()

    def _reporter(self, reason: str, *, dropped: bool) -> EventCallback | None:
        """Who hears of an event that will never be committed (see ``EmitterHooks``)."""
        if dropped and self._hooks.on_dropped is not None:
            return self._hooks.on_dropped
        if is_fenced(reason) and self._hooks.on_fenced is not None:
            return self._hooks.on_fenced
        return self.on_rejected

    def _hook(self, hook: Callable[..., None] | None, *args: Any) -> None:
        if hook is None:
            return
        try:
            hook(*args)
        except Exception:
            self._log(logging.ERROR, "event emitter hook failed", hook=repr(hook), exc_info=True)

    def _window(self) -> int:
        careful = self._acked_through < self._careful_through
        return 1 if careful else MAX_BATCHES_IN_FLIGHT

    async def _refused(self, in_flight: collections.deque[Batch], exc: aio.AioRpcError) -> None:
        """The monitor refused a batch whole. With one batch in flight that is the one: halve
        it, or drop its only event. Otherwise send one at a time until it shows itself."""
        self.stats.refused_batches += 1
        self._hook(self._hooks.on_refused_batch)
        if self._unacked:
            self._careful_through = max(self._careful_through, self._unacked[-1].last_seq)
        if len(in_flight) != 1 or in_flight[0] not in self._unacked:
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
            first, second = culprit.halves()
            position = self._unacked.index(culprit)
            self._unacked[position] = second
            self._unacked.insert(position, first)
            self.stats.split_batches += 1
            self._log(
                logging.WARNING,
                "monitor refused a batch; sending it in halves",
                code=exc.code().name,
                details=exc.details(),
                events=len(culprit.events),
            )
            return
        event = culprit.events[0]
        self.stats.dropped_events += 1
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
        reason = f"refused by the monitor ({exc.code().name}: {exc.details()})"
        await self._settle(culprit, [(event, reason)], dropped=True)

    def _awaited_whole(self) -> bool:
        """Whether a waiting flush needs every event sent so far."""
        last = self._last_sent
        return any(target >= last for target in self._flush_targets)

    def _batch_if_it_fits(self) -> Batch | None:
        """The next batch, taken whole from the head of the queue when even an upper bound
        of its size is within the byte cap (the usual case: small events), else None with the
        queue untouched. The same batch the event-by-event packing makes, without measuring
        each event from Python."""
        take = min(len(self._queue), self._batch_max)
        head = list(itertools.islice(self._queue, take))
        events = [event for _, event in head]
        if sizes_bound(events) > self._batch_max_bytes:
            return None
        for _ in range(take):
            self._queue.popleft()
        return Batch(events, [seq for seq, _ in head])

    async def _next_batch(self, current: Callable[[], bool]) -> Batch | None:
        """The next batch from the queue, or None if the stream is replaced meanwhile.

        The batch is taken and recorded in ``_unacked`` with no await in between, and only by
        the current stream, so ``_unacked`` is always in send order.
        """
        async with self._changed:
            await self._changed.wait_for(lambda: bool(self._queue) or not current())
        if current() and len(self._queue) < self._batch_max and not self._awaited_whole():
            # Let a burst fill the batch; not when a flush waits for every queued event (the
            # end of a burst, typically): that wait is all the linger would lengthen.
            await asyncio.sleep(BATCH_LINGER_S)
        if not current() or not self._queue:
            return None if not current() else await self._next_batch(current)
        batch = self._batch_if_it_fits()
        if batch is not None:
            self._unacked.append(batch)
            return batch
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
        batch = Batch(events, seqs)
        self._unacked.append(batch)
        return batch
