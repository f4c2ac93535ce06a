"""What a child-event emitter holds until each event is settled, and in which order: the queue of
events not yet in a batch, the batches sent and not yet acknowledged, and the sequence numbers
through which everything is settled.

Pure bookkeeping, apart from the stream that sends it and the producers that fill it (no I/O,
no waiting): ``ChildEventEmitter`` and its ``StreamLoop`` take their turns on it under one
``asyncio.Condition``, and every change here is made with no await in between, so the batches
in ``unacked`` are always in send order.
"""

from __future__ import annotations

import collections
import contextlib
import itertools

from stepflow_client._event_parts import (
    LOG_ENTRY,
    MAX_BATCHES_IN_FLIGHT,
    Batch,
    Item,
    event_bytes,
    sizes_bound,
)


class EventBuffer:
    """The events sent to an emitter and not yet settled: ``queue`` (not yet in a batch) and
    ``unacked`` (in a batch, sent or to be sent again), ``buffered`` in all.

    A batch leaves ``unacked`` only when it is settled (committed, or reported as never to be),
    never when it is (re)sent, so a new stream resends every batch still there.
    """

    def __init__(
        self, id_prefix: str, *, max_buffered: int, batch_max_events: int, batch_max_bytes: int
    ) -> None:
        self.id_prefix = id_prefix
        self.max_buffered = max_buffered
        self.batch_max = batch_max_events
        self.batch_max_bytes = batch_max_bytes
        self.queue: collections.deque[tuple[int, Item]] = collections.deque()
        self.lines_queued = 0  # log lines among the queued items (0: a batch has none)
        self.unacked: collections.deque[Batch] = collections.deque()
        self.buffered = 0
        self.last_sent = 0
        self.acked_through = 0
        # After a refusal, one batch at a time until everything then unacknowledged is settled,
        # so a refused stream always names its batch.
        self.careful_through = 0
        self.flush_targets: list[int] = []  # the ``through`` of every waiting flush
        self._seq = itertools.count(1)

    def enqueue(self, event: Item) -> int:
        """Queue ``event`` under the next sequence number (its ``event_id`` says which; a log
        line's ``key``, unless it has one, so a resent line is stored once)."""
        seq = next(self._seq)
        if type(event) is LOG_ENTRY:
            if not event.key:
                event.key = f"{self.id_prefix}-{seq}"
            self.lines_queued += 1
        else:
            event.event_id = f"{self.id_prefix}-{seq}"  # type: ignore[union-attr]
        self.queue.append((seq, event))
        self.buffered += 1
        self.last_sent = seq
        return seq

    def window(self) -> int:
        """How many batches may be in flight on a stream at once."""
        careful = self.acked_through < self.careful_through
        return 1 if careful else MAX_BATCHES_IN_FLIGHT

    def may_grow(self) -> bool:
        """Whether the next batch is worth a linger for more events: it is not full, and no
        flush waits for every event sent so far (the end of a burst, typically: that wait is
        all the linger would lengthen)."""
        return len(self.queue) < self.batch_max and not self._awaited_whole()

    def _awaited_whole(self) -> bool:
        last = self.last_sent
        return any(target >= last for target in self.flush_targets)

    def take_batch(self) -> Batch:
        """The next batch from the head of the (non-empty) queue, within both caps, recorded
        in ``unacked``."""
        batch = self._batch_if_it_fits()
        if batch is None:
            batch = self._packed_batch()
        if self.lines_queued:
            lines = sum(1 for e in batch.events if type(e) is LOG_ENTRY)
            self.lines_queued -= lines
            batch.has_lines = lines > 0
        self.unacked.append(batch)
        return batch

    def _batch_if_it_fits(self) -> Batch | None:
        """The next batch, taken whole from the head of the queue when even an upper bound
        of its size is within the byte cap (the usual case: small events), else None with the
        queue untouched. The same batch the event-by-event packing makes, without measuring
        each event from Python."""
        take = min(len(self.queue), self.batch_max)
        head = list(itertools.islice(self.queue, take))
        events = [event for _, event in head]
        if sizes_bound(events) > self.batch_max_bytes:
            return None
        for _ in range(take):
            self.queue.popleft()
        return Batch(events, [seq for seq, _ in head])

    def _packed_batch(self) -> Batch:
        """The next batch, event by event until the next would pass the byte cap (the first
        is always taken: a batch is never empty)."""
        events: list[Item] = []
        seqs: list[int] = []
        size = 0
        while self.queue and len(events) < self.batch_max:
            seq, event = self.queue[0]
            grows = event_bytes(event)
            if events and size + grows > self.batch_max_bytes:
                break
            self.queue.popleft()
            events.append(event)
            seqs.append(seq)
            size += grows
        return Batch(events, seqs)

    def retire(self, batch: Batch) -> None:
        """``batch`` is settled: no stream sends it again."""
        with contextlib.suppress(ValueError):
            self.unacked.remove(batch)

    def count_settled(self, batch: Batch) -> None:
        """``batch``'s events leave the buffer, and a flush through its last one may return."""
        self.buffered -= len(batch.events)
        self.acked_through = max(self.acked_through, batch.last_seq)

    def be_careful(self) -> None:
        """After a refusal: one batch in flight until everything unacknowledged now is settled,
        so the next refusal names its batch."""
        if self.unacked:
            self.careful_through = max(self.careful_through, self.unacked[-1].last_seq)

    def split(self, batch: Batch) -> None:
        """Send the unacknowledged ``batch`` as its two halves instead, in its place."""
        first, second = batch.halves()
        position = self.unacked.index(batch)
        self.unacked[position] = second
        self.unacked.insert(position, first)
