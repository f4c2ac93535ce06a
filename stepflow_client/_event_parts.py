"""The pieces the child-event emitters are made of: their limits, the hooks a service plugs
in, the batches they send, and the events they build (see ``_events`` for how they work)."""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import grpc

from stepflow_common.errors import FENCED_PREFIX
from stepflow_common.limits import MAX_REQUEST_BYTES, cut_log_line
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m

_logger = logging.getLogger("stepflow_client.events")

T = TypeVar("T")

BATCH_MAX_EVENTS = 500
# A quarter of what the monitor accepts: a full batch of the largest events a send can make
# (an error of MAX_ERROR_CHARS 4-byte characters) still fits several times over.
BATCH_MAX_BYTES = MAX_REQUEST_BYTES // 4
BATCH_LINGER_S = 0.002  # wait this long for more events before sending a partial batch
MAX_BUFFERED_EVENTS = 20_000
MAX_BATCHES_IN_FLIGHT = 16
BACKOFF_INITIAL_S = 0.05
BACKOFF_MAX_S = 2.0
CLOSE_FLUSH_S = 5.0
# How the monitor says it will not take a batch as it is: sending it again unchanged fails the
# same way, so it is split instead.
REFUSED = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT})

EventCallback = Callable[[job_pb2.ChildEvent, str], None]
"""``callback(event, reason)``: ``event`` will never be committed, for ``reason``."""

Item = job_pb2.ChildEvent | job_pb2.JobLogEntry
"""What an emitter sends: child events and, in the same order, job-log lines."""
LineCallback = Callable[[job_pb2.JobLogEntry, str], None]
"""``callback(line, reason)``: a log line the monitor refused (it is not stored)."""
LOG_ENTRY = job_pb2.JobLogEntry


def item_id(item: Item) -> str:
    """How an ack names an item: an event by its ``event_id``, a line by its ``key``."""
    return item.key if type(item) is LOG_ENTRY else item.event_id  # type: ignore[union-attr]


def log_entry(
    step_id: str,
    message: str,
    *,
    child_id: str = "",
    attempt: int = 0,
    source: str = "log",
    level: str = "info",
    key: str = "",
) -> job_pb2.JobLogEntry:
    """A log line, cut to the line limit here (with a marker) so every batch stays small."""
    message, _ = cut_log_line(message)
    return job_pb2.JobLogEntry(
        key=key,
        step_id=step_id,
        child_id=child_id,
        attempt=attempt,
        source=source,
        level=level,
        message=message.replace("\x00", "\ufffd"),
    )


def is_fenced(reason: str) -> bool:
    """Whether a rejection reason says the event's job has another owner now."""
    return reason.startswith(FENCED_PREFIX)


def event_bytes(event: Item) -> int:
    """What ``event`` adds to a request: its size plus its field tag and length prefix."""
    size = event.ByteSize()
    return size + 1 + max(1, (size.bit_length() + 6) // 7)


class LogHook(Protocol):
    """``log(level, message, **fields)`` (a ``logging`` level): where the emitter's own
    warnings go. ``exc_info=True`` among the fields asks for the current exception."""

    def __call__(self, level: int, message: str, /, **fields: Any) -> None: ...


def stdlib_log(level: int, message: str, /, **fields: Any) -> None:
    """The default ``LogHook``: the ``stepflow_client.events`` logger, fields as key=value."""
    if not _logger.isEnabledFor(level):
        return
    exc_info = bool(fields.pop("exc_info", False))
    text = " ".join(f"{key}={value!r}" for key, value in fields.items())
    _logger.log(level, "%s %s", message, text, exc_info=exc_info)


@dataclass(frozen=True, slots=True)
class EmitterHooks:
    """What an embedding service plugs in: its logging, its metrics, and what it does with
    an event that will never be committed. Every hook runs on the emitter's event loop and
    must not block; an exception in one is logged and otherwise ignored.

    Each event that is not committed is reported exactly once: to ``on_fenced`` for a fenced
    rejection, to ``on_dropped`` for an event the monitor refused even alone, when these are
    given, and otherwise to the emitter's ``on_rejected``.
    """

    on_fenced: EventCallback | None = None
    """A rejection that says the job has another owner (see ``is_fenced``)."""
    on_dropped: EventCallback | None = None
    """An event the monitor refused even alone: dropped, so that it holds back no other."""
    on_refused_batch: Callable[[], None] | None = None
    """The monitor refused a batch whole (it is split, never sent again unchanged)."""
    on_ack: Callable[[int, float], None] | None = None
    """A batch is acknowledged: ``on_ack(events, seconds_since_sent)``."""
    log: LogHook | None = None
    """Where log records go (default: the standard ``logging`` module)."""
    on_send: Callable[[m.StreamChildEventsRequest], None] | None = None
    """Each request just before it is sent (tracing stamps its steps' contexts there)."""
    on_line_rejected: LineCallback | None = None
    """A log line the monitor refused (it is logged either way; nothing is repaired)."""


@dataclass(slots=True)
class EmitterStats:
    """Counters for tests and diagnostics (metrics belong in ``EmitterHooks``)."""

    sent_batches: int = 0
    acked_events: int = 0
    resent_batches: int = 0
    reconnects: int = 0
    refused_batches: int = 0
    split_batches: int = 0
    dropped_events: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)
    """``(event_id, reason)`` of every event not committed (rejected, fenced or dropped)."""


class EmitterClosed(RuntimeError):
    """The emitter is closed (or its stream task failed): nothing more can be sent or
    awaited through it."""


@dataclass(slots=True, eq=False)  # compared by identity: a batch is one send
class Batch:
    events: list[Item]  # child events and log lines, in the order they were sent
    seqs: list[int]
    stream_batch_id: int = 0
    sent_at: float = 0.0  # time.monotonic() when last sent: the ack lag
    has_lines: bool = False

    def request_parts(self) -> tuple[list[job_pb2.ChildEvent], list[job_pb2.JobLogEntry]]:
        """The batch's events and its log lines, each in their order."""
        if not self.has_lines:
            return self.events, []  # type: ignore[return-value]
        events = [e for e in self.events if type(e) is not LOG_ENTRY]
        lines = [e for e in self.events if type(e) is LOG_ENTRY]
        return events, lines  # type: ignore[return-value]

    @property
    def last_seq(self) -> int:
        return self.seqs[-1]

    def halves(self) -> tuple[Batch, Batch]:
        mid = len(self.events) // 2
        return (
            Batch(self.events[:mid], self.seqs[:mid], has_lines=self.has_lines),
            Batch(self.events[mid:], self.seqs[mid:], has_lines=self.has_lines),
        )


class StreamEnded(Exception):
    """The stream is no longer usable (an acknowledgement out of order): open another."""


# -- building events -----------------------------------------------------------------------------
def child_event(
    kind: job_pb2.ChildEventKind,
    step_id: str,
    child_id: str,
    *,
    error: str = "",
    name: str = "",
    attempt: int = 0,
) -> job_pb2.ChildEvent:
    return job_pb2.ChildEvent(
        kind=kind, step_id=step_id, child_id=child_id, error=error, name=name, attempt=attempt
    )


def sealed_event(step_id: str, child_count: int, handed_to_monitor: bool) -> job_pb2.ChildEvent:
    return job_pb2.ChildEvent(
        kind=job_pb2.CHILD_EVENT_KIND_SEALED,
        step_id=step_id,
        child_count=child_count,
        handed_to_monitor=handed_to_monitor,
    )


def sizes_bound(events: list[Item]) -> int:
    """At least what ``event_bytes`` adds up to over ``events`` (a length prefix takes at
    most 5 bytes below 4 GiB), in one pass without a Python call per event."""
    return sum(map(job_pb2.ChildEvent.ByteSize, events)) + 6 * len(events)


def over_the_limit(in_flight: collections.deque[Batch]) -> bool:
    """Whether a batch in flight is larger than a message may be. gRPC itself then fails the
    stream (INTERNAL, not RESOURCE_EXHAUSTED) before the monitor sees it; it is a refusal all
    the same, to be split, never a broken connection to resend it on unchanged."""
    return any(
        sum(event_bytes(event) for event in batch.events) >= MAX_REQUEST_BYTES
        for batch in in_flight
    )
