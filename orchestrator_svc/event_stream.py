"""The orchestrator's one long-lived StreamChildEvents: the client's ``ChildEventEmitter`` with
the orchestrator's records, logs, metrics and repairs plugged in.

The stream itself (batching, acks only after commit, resend in order after a reconnect, the
split and drop of a refused batch) lives in ``stepflow_client._events`` and the modules it is
made of, shared with every other service that reports children. What is the orchestrator's
own is here: its ``ChildEvent`` records in and out, structlog for the emitter's records, the
Prometheus counters, and who hears of an event that will not be committed (``on_rejected``
for a rejected or dropped event, whose runner then writes the child's end through
UpdateJobStatus; ``on_fenced`` for an event of a job another orchestrator owns now).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, NoReturn

import structlog
from grpc import aio

from orchestrator_svc import metrics
from orchestrator_svc.convert import child_event_pb, event_from_pb, event_to_pb
from orchestrator_svc.records import ChildEvent
from stepflow_client._events import (
    BATCH_MAX_BYTES,
    BATCH_MAX_EVENTS,
    MAX_BUFFERED_EVENTS,
    ChildEventEmitter,
    EmitterClosed,
    EmitterHooks,
    EmitterStats,
)
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m

__all__ = ["BATCH_MAX_BYTES", "BATCH_MAX_EVENTS", "EventStream", "Rejected", "StreamStats"]

log = structlog.get_logger("orchestrator_svc.event_stream")

StreamStats = EmitterStats

Rejected = Callable[[ChildEvent, str], None]
"""``on_rejected(event, reason)``: the monitor rejected ``event`` (in an ack) or refused it
even alone (dropped); either is final."""


def _log(level: int, message: str, /, **fields: Any) -> None:
    log.log(level, message, **fields)


async def _closed() -> NoReturn:
    """What a writer meets once the stream is closed: a wait until shutdown cancels it.

    Not an error: a step that raised here would be recorded ``failed`` by its runner, while a
    shutdown must leave its jobs exactly as they are for the next owner.
    """
    await asyncio.Event().wait()
    raise AssertionError("unreachable: the event is never set")


class EventStream:
    """The emitter as the orchestrator uses it: ``emit`` a record, ``wait_acked`` a sequence.

    ``on_rejected`` and ``on_fenced`` may be set after construction (the orchestrator that
    handles them is built with this stream); without ``on_fenced``, a fenced rejection goes to
    ``on_rejected`` like any other.
    """

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
        on_fenced: Rejected | None = None,
    ) -> None:
        self.on_rejected = on_rejected
        self.on_fenced = on_fenced
        # Called with each request before it is sent (tracing names its steps' spans there).
        self.on_send: Callable[[m.StreamChildEventsRequest], None] | None = None
        self._emitter = ChildEventEmitter(
            channel_factory=channel_factory,
            owner=owner,
            max_buffered=max_buffered_events,
            on_rejected=self._rejected,
            hooks=EmitterHooks(
                on_fenced=self._fenced,
                on_dropped=self._dropped,
                on_refused_batch=metrics.REFUSED_BATCHES.inc,
                on_ack=lambda _events, lag_s: metrics.ACK_LAG.observe(lag_s),
                log=_log,
                on_send=self._send_hook,
            ),
            instance_id=instance_id,
            batch_max_events=batch_max_events,
            batch_max_bytes=batch_max_bytes,
        )

    @property
    def owner(self) -> str:
        """Fences every batch: events for a job another orchestrator owns are rejected."""
        return self._emitter.owner

    @owner.setter
    def owner(self, value: str) -> None:
        self._emitter.owner = value

    @property
    def instance(self) -> str:
        """With ``owner``: this process's instance (a superseded one's events are fenced)."""
        return self._emitter.instance

    @instance.setter
    def instance(self, value: str) -> None:
        self._emitter.instance = value

    @property
    def stats(self) -> StreamStats:
        return self._emitter.stats

    @property
    def buffered(self) -> int:
        """Events emitted but not yet acknowledged (queued or in flight)."""
        return self._emitter.buffered

    async def emit(self, child_event: ChildEvent) -> int:
        """Queue one event (its event_id is assigned here); waits while the buffer is full;
        returns its sequence number (see ``wait_acked``). Once the stream is closed (shutdown)
        it waits until cancelled: see ``_closed``."""
        try:
            return await self._emitter.send(event_to_pb(child_event))
        except EmitterClosed:
            return await _closed()

    async def emit_child(
        self,
        kind: str,
        step_id: str,
        child_id: str,
        *,
        error: str = "",
        name: str = "",
        attempt: int = 0,
    ) -> int:
        """``emit`` of a child's event (``kind`` an ``EventKind`` value other than ``sealed``),
        built without the intermediate record: the per-child path."""
        try:
            return await self._emitter.send(
                child_event_pb(kind, step_id, child_id, error=error, name=name, attempt=attempt)
            )
        except EmitterClosed:
            return await _closed()

    async def emit_log(
        self,
        step_id: str,
        message: str,
        *,
        source: str = "log",
        level: str = "info",
        child_id: str = "",
        attempt: int = 0,
    ) -> int:
        """A line of a step's (or a child's) output, in order with the events (same
        backpressure, same acknowledgement, stored once whatever is resent)."""
        try:
            return await self._emitter.log(
                step_id, message, child_id=child_id, attempt=attempt, source=source, level=level
            )
        except EmitterClosed:
            return await _closed()

    async def wait_acked(self, seq: int | None = None) -> None:
        """Return once every event up to ``seq`` (default: all emitted so far) is settled:
        committed, rejected, or dropped (the last two reported through ``on_rejected``).
        Once the stream is closed with the events unsettled it waits until cancelled."""
        try:
            await self._emitter.flush(through=seq)
        except EmitterClosed:
            await _closed()

    def start(self) -> None:
        self._emitter.start()

    async def close(self, flush_timeout: float = 5.0) -> None:
        """Flush what is buffered (bounded wait), then stop."""
        await self._emitter.close(flush_timeout)

    def _send_hook(self, request: m.StreamChildEventsRequest) -> None:
        if self.on_send is not None:
            self.on_send(request)

    def _rejected(self, event: job_pb2.ChildEvent, reason: str) -> None:
        if self.on_rejected is not None:
            self.on_rejected(event_from_pb(event), reason)

    def _fenced(self, event: job_pb2.ChildEvent, reason: str) -> None:
        handler = self.on_fenced or self.on_rejected
        if handler is not None:
            handler(event_from_pb(event), reason)

    def _dropped(self, event: job_pb2.ChildEvent, reason: str) -> None:
        metrics.DROPPED_EVENTS.inc()
        self._rejected(event, reason)
