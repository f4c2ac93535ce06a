"""The child-event emitter for threaded code: ``ChildEventEmitter`` on its own event loop in a
background thread, with blocking calls."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any

from grpc import aio

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
    T,
    child_event,
    log_entry,
    sealed_event,
)
from stepflow_client._events import ChildEventEmitter
from stepflow_proto.v1 import job_pb2


class SyncChildEventEmitter:
    """``ChildEventEmitter`` for threaded code: it runs on its own event loop in a background
    thread, so plain threads (any number) report events with blocking calls.

    ``channel_factory`` is called on that thread, inside its loop: a gRPC asyncio channel
    belongs to the loop that made it. The emitter closes it on close. Every other argument
    is ``ChildEventEmitter``'s; ``on_rejected`` and the hooks run on the background thread
    (they must not call back into this emitter: that would wait on itself).

    ``send`` blocks while the buffer is full (the backpressure reaches the producing
    threads); ``flush`` blocks until everything sent is committed. Use ``with`` or ``close``.
    """

    def __init__(
        self,
        channel_factory: Callable[[], aio.Channel],
        *,
        owner: str = "",
        max_buffered: int = MAX_BUFFERED_EVENTS,
        on_rejected: EventCallback | None = None,
        hooks: EmitterHooks | None = None,
        instance_id: str | None = None,
        batch_max_events: int = BATCH_MAX_EVENTS,
        batch_max_bytes: int = BATCH_MAX_BYTES,
        thread_name: str = "stepflow-child-events",
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name=thread_name, daemon=True)
        self._closed = False
        self._close_lock = threading.Lock()
        self._thread.start()

        async def make() -> ChildEventEmitter:
            emitter = ChildEventEmitter(
                channel_factory=channel_factory,
                owner=owner,
                max_buffered=max_buffered,
                on_rejected=on_rejected,
                hooks=hooks,
                instance_id=instance_id,
                batch_max_events=batch_max_events,
                batch_max_bytes=batch_max_bytes,
            )
            emitter.start()
            return emitter

        try:
            self._emitter = self._call(make())
        except BaseException:
            self._stop_loop()
            raise

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            if pending:
                self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the emitter's loop and wait for its result.

        Time limits are applied inside the loop (``asyncio.timeout``), never by abandoning the
        wait here: a send then either queues its event or raises, with no window in which it
        is queued although the caller was told it timed out."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a SyncChildEventEmitter cannot be called from its own thread")
        if self._closed and self._loop.is_closed():
            coro.close()
            raise EmitterClosed("the emitter is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def buffered(self) -> int:
        """Events sent but not yet settled (a snapshot)."""
        return self._emitter.buffered

    @property
    def stats(self) -> EmitterStats:
        """The emitter's counters (a live object updated by the background thread)."""
        return self._emitter.stats

    def send(self, event: job_pb2.ChildEvent, *, timeout: float | None = None) -> int:
        """``ChildEventEmitter.send``: blocks while the buffer is full (``TimeoutError``
        after ``timeout`` seconds, the event not queued)."""
        return self._call(self._send(event, timeout))

    async def _send(self, event: Item, limit_s: float | None) -> int:
        async with asyncio.timeout(limit_s):
            if isinstance(event, job_pb2.JobLogEntry):
                return await self._emitter.send_line(event)
            return await self._emitter.send(event)

    def created(self, step_id: str, child_id: str, *, name: str = "", attempt: int = 0) -> int:
        return self.send(
            child_event(
                job_pb2.CHILD_EVENT_KIND_CREATED, step_id, child_id, name=name, attempt=attempt
            )
        )

    def running(self, step_id: str, child_id: str, *, attempt: int = 0) -> int:
        return self.send(
            child_event(job_pb2.CHILD_EVENT_KIND_RUNNING, step_id, child_id, attempt=attempt)
        )

    def completed(self, step_id: str, child_id: str) -> int:
        return self.send(child_event(job_pb2.CHILD_EVENT_KIND_COMPLETED, step_id, child_id))

    def failed(self, step_id: str, child_id: str, error: str) -> int:
        return self.send(
            child_event(job_pb2.CHILD_EVENT_KIND_FAILED, step_id, child_id, error=error)
        )

    def cancelled(self, step_id: str, child_id: str, error: str = "") -> int:
        return self.send(
            child_event(job_pb2.CHILD_EVENT_KIND_CANCELLED, step_id, child_id, error=error)
        )

    def sealed(self, step_id: str, child_count: int, *, handed_to_monitor: bool = True) -> int:
        return self.send(sealed_event(step_id, child_count, handed_to_monitor))

    def log(
        self,
        step_id: str,
        message: str,
        *,
        child_id: str = "",
        attempt: int = 0,
        source: str = "log",
        level: str = "info",
        timeout: float | None = None,
    ) -> int:
        """``ChildEventEmitter.log``: a line in the job's log, sent with the events."""
        entry = log_entry(
            step_id, message, child_id=child_id, attempt=attempt, source=source, level=level
        )
        return self._call(self._send(entry, timeout))

    def flush(self, *, through: int | None = None, timeout: float | None = None) -> None:
        """``ChildEventEmitter.flush``, blocking (``TimeoutError`` after ``timeout`` seconds;
        the events stay buffered and keep being sent)."""
        self._call(self._flush(through, timeout))

    async def _flush(self, through: int | None, limit_s: float | None) -> None:
        async with asyncio.timeout(limit_s):
            await self._emitter.flush(through=through)

    def close(self, flush_timeout: float | None = CLOSE_FLUSH_S) -> int:
        """Flush (bounded), stop the stream, the loop and its thread. Returns how many events
        were left unsettled. Closing twice is harmless (the second returns 0)."""
        with self._close_lock:
            if self._closed:
                return 0
            self._closed = True
        try:
            return self._call(self._emitter.close(flush_timeout))
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._closed = True
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()

    def __enter__(self) -> SyncChildEventEmitter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
