"""Reporting child events to the monitor over one long-lived StreamChildEvents stream: batched,
acknowledged in order, never lost, never wedged by one event, and bounded in memory.

Any service that runs a step's children (the orchestrator, or your own) reports them through
``ChildEventEmitter`` (asyncio) or ``SyncChildEventEmitter`` (plain threads)::

    async with ChildEventEmitter(channel) as events:
        await events.created(step_id, child_id)
        await events.completed(step_id, child_id)
        await events.flush()  # every event so far is committed

Why it is shaped like this: the monitor acknowledges a batch only once it is committed, so an
event is safe exactly when its batch is acknowledged. Until then the batch is kept;
when the stream breaks (monitor restart, network) a new stream is opened with
backoff on the same channel (its keepalive settings stay in force) and the unacknowledged
batches are sent again first, in their original order. The monitor dedupes by each child's
state transition, so a batch applied before the break and sent again changes nothing. The
buffer is bounded: ``send`` waits when it is full, which slows the producer instead of dropping
events or growing without limit while the monitor is down.

The emitter is three parts: this class (what producers and flushes call, and its start and
stop), the bookkeeping of what is buffered and in which order (``_event_buffer.EventBuffer``),
and the stream task that sends it (``_event_stream_loop.StreamLoop``: one stream at a time,
refused batches split). They take turns under one ``asyncio.Condition``.

These modules need only grpc, protobuf, the generated stubs and ``stepflow_common.limits``:
logging goes to the standard library unless a ``log`` hook is given, and a service's own
metrics and repairs plug in through ``EmitterHooks``.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from types import TracebackType

from grpc import aio

from stepflow_client._event_buffer import EventBuffer
from stepflow_client._event_parts import (
    BATCH_MAX_BYTES,
    BATCH_MAX_EVENTS,
    CLOSE_FLUSH_S,
    MAX_BUFFERED_EVENTS,
    EmitterClosed,
    EmitterHooks,
    EmitterStats,
    EventCallback,
    Item,
    LogHook,
    child_event,
    event_bytes,
    is_fenced,
    log_entry,
    sealed_event,
    stdlib_log,
)
from stepflow_client._event_stream_loop import StreamLoop
from stepflow_common.errors import FENCED_PREFIX
from stepflow_common.limits import MAX_ERROR_CHARS, MAX_NAME_CHARS, truncate_text
from stepflow_proto.v1 import job_pb2

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
        self.owner = owner
        # The orchestrator instance (one process) holding ``owner``'s lease: with it, the
        # batches of an instance superseded by a newer one are fenced.
        self.instance = ""
        self.on_rejected = on_rejected
        hooks = hooks or EmitterHooks()
        self._log: LogHook = hooks.log or stdlib_log
        self._buffer = EventBuffer(
            instance_id or uuid.uuid4().hex[:12],
            max_buffered=max_buffered,
            batch_max_events=batch_max_events,
            batch_max_bytes=batch_max_bytes,
        )
        self._changed = asyncio.Condition()
        self._room_waiters = 0  # sends in the locked path (for the lock or for room)
        self._task: asyncio.Task[None] | None = None
        self._stopped: str = ""  # why nothing more can be sent or awaited ("": it can)
        self.stats = EmitterStats()
        self._stream = StreamLoop(
            self,
            self._buffer,
            self._changed,
            channel=channel,
            channel_factory=channel_factory,
            hooks=hooks,
            log=self._log,
            stats=self.stats,
        )

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
        return await self._send(event)

    async def _send(self, event: Item) -> int:
        """Queue an event or a log line (see ``send``)."""
        if self._task is None:
            self.start()
        buffer = self._buffer
        if (
            buffer.queue
            and buffer.buffered < buffer.max_buffered
            and not self._room_waiters
            and not self._stopped
        ):
            # The common case, with no lock round: there is room, no earlier send waits for
            # it (so none is overtaken), and the queue is not empty (so the stream, waiting
            # only for an empty queue to fill, needs no wake-up; nothing else waits on what
            # a send changes).
            return buffer.enqueue(event)
        # Counted from before the lock is taken, so no later send overtakes this one.
        self._room_waiters += 1
        try:
            async with self._changed:
                while buffer.buffered >= buffer.max_buffered and not self._stopped:
                    await self._changed.wait()
                if self._stopped:
                    raise EmitterClosed(self._stopped)
                seq = buffer.enqueue(event)
                self._changed.notify_all()
        finally:
            self._room_waiters -= 1
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

    async def log(
        self,
        step_id: str,
        message: str,
        *,
        child_id: str = "",
        attempt: int = 0,
        source: str = "log",
        level: str = "info",
    ) -> int:
        """A line in the job's log under ``step_id`` (or its child ``child_id``): sent in
        order with the events, acknowledged with their batch, and stored once however often
        it is resent. ``source`` is ``log``, ``stdout`` or ``stderr``; ``level`` ``debug``,
        ``info``, ``warning`` or ``error``. A line over 16 KiB is cut, with a marker."""
        return await self.send_line(
            log_entry(
                step_id, message, child_id=child_id, attempt=attempt, source=source, level=level
            )
        )

    async def send_line(self, entry: job_pb2.JobLogEntry) -> int:
        """Queue a log line built by hand (see ``log``); a line without a ``key`` gets one."""
        return await self._send(entry)

    async def flush(self, *, through: int | None = None) -> None:
        """Return once every event up to sequence ``through`` (default: all sent so far) is
        settled: committed, or reported as never to be (``on_rejected`` and the hooks run
        before this returns). Bound the wait with ``asyncio.timeout`` if the monitor may be
        away for long: events are kept and resent meanwhile, so this waits as long as that."""
        buffer = self._buffer
        target = buffer.last_sent if through is None else through
        buffer.flush_targets.append(target)
        try:
            async with self._changed:
                await self._changed.wait_for(
                    lambda: buffer.acked_through >= target or bool(self._stopped)
                )
        finally:
            buffer.flush_targets.remove(target)
        if buffer.acked_through < target:
            self._raise_if_stopped()

    @property
    def buffered(self) -> int:
        """Events sent but not yet settled (queued or in flight)."""
        return self._buffer.buffered

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the stream task on the running loop (``send`` starts it too if needed)."""
        self._raise_if_stopped()
        if self._task is None:
            self._task = asyncio.create_task(self._stream.run(), name="child-event-stream")
            self._task.add_done_callback(self._task_done)

    async def close(self, flush_timeout: float | None = CLOSE_FLUSH_S) -> int:
        """Flush what is buffered (for at most ``flush_timeout`` seconds; None: no limit),
        then stop. Returns how many events were left unsettled (0: everything was)."""
        if self._buffer.buffered and not self._stopped:
            try:
                async with asyncio.timeout(flush_timeout):
                    await self.flush()
            except TimeoutError:
                self._log(
                    logging.WARNING,
                    "closing with unacknowledged events",
                    count=self._buffer.buffered,
                )
            except EmitterClosed:
                pass
        left = self._buffer.buffered
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
