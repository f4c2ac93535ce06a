"""The orchestrator's half of a step whose children run on runners (``executor = "celery"``):
create the children, publish them in windows of the step's concurrency as they end, and wait
until every one has ended. The runners report the children's own events to the monitor;
this side learns of their ends from the manager's watch (the step's live counts).

What was published survives this orchestrator: the step's metadata holds
``published_children``, the count of children (in index order) whose messages the broker
confirmed, written after the confirm. A job's next owner publishes from there on only: the
children before it are queued or running on runners, and the few after it that were
published before the count was written are copies the monitor refuses to run (a runner's
claim names its message, see ``monitor_svc/lifecycle/claims``).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from orchestrator_svc.remote.parcel import Parcel, parcel_size
from orchestrator_svc.remote.publisher import Publisher
from orchestrator_svc.runner.context import JobContext, log
from orchestrator_svc.runner.step_state import StepRun
from orchestrator_svc.workers.base import StepContext
from orchestrator_svc.workers.children import create_children
from stepflow_common.step_outcome import ChildTally

PUBLISHED_KEY = "published_children"
MARK_EVERY_S = 0.5
"""``published_children`` is written at most this often (and when publishing ends)."""
NOT_PUBLISHED_ERROR = "step cancelled before the child was sent to a runner"


class CeleryDispatch:
    """``run_children`` for one step of ``executor = "celery"``."""

    def __init__(self, job: JobContext, step: StepRun, publisher: Publisher) -> None:
        self.job = job
        self.step = step
        self.publisher = publisher
        self._mark_written = -1
        self._mark_at = 0.0

    async def __call__(
        self,
        ctx: StepContext,
        names: Iterable[str],
        run_one: Callable[[int, int], Awaitable[Any]],
        concurrency: int,
    ) -> int:
        """Create the children, run them on runners; return how many exist. ``run_one`` is
        not called here: runners call the worker's own."""
        existing = ctx.existing_children
        created = await create_children(ctx, names)
        # A runner's claim needs its child: every creation is committed before a message goes.
        await self.job.stream.wait_acked()
        published = await self._published_before(existing)
        waiting: deque[tuple[int, int]] = deque()
        for index in range(published, created):
            before = existing.get(ctx.child_id(index))
            if before is None or before.status == "pending":
                waiting.append((index, before.attempt + 1 if before is not None else 1))
        unpublished_at_start = len(waiting)
        done_before = sum(1 for c in existing.values() if c.ended)
        in_flight_at_start = created - done_before - unpublished_at_start
        size = parcel_size(concurrency)
        sent = 0
        log.info(
            "step's children go to runners",
            step_id=self.step.job_id,
            children=created,
            already_published=published,
            to_publish=unpublished_at_start,
            concurrency=concurrency,
            parcel=size,
        )
        failed_seen = sum(1 for c in existing.values() if c.status == "failed")
        while True:
            tally = self.step.observed or ChildTally()
            if tally.failed > failed_seen:
                # The runners' failures count against the job's error tolerance too.
                self.job.count_child_failures(tally.failed - failed_seen)
                failed_seen = tally.failed
            ended = max(0, tally.terminal - done_before)
            in_flight = in_flight_at_start + sent - ended
            if ctx.stopping:
                break
            if waiting and in_flight < concurrency:
                room = min(concurrency - in_flight, len(waiting))
                batch = [waiting.popleft() for _ in range(room)]
                parcels = [
                    Parcel(
                        self.job.manager_id,
                        self.step.job_id,
                        self.step.index,
                        tuple(batch[i : i + size]),
                    )
                    for i in range(0, len(batch), size)
                ]
                await self.publisher.publish(parcels)
                if not sent:
                    await self._warn_without_runners(ctx)
                sent += len(batch)
                published = batch[-1][0] + 1
                await self._write_mark(published, force=not waiting)
                continue
            if not waiting and tally.pending + tally.running == 0 and tally.total >= created:
                return created
            self.step.observed_changed.clear()
            await _first_of(self.step.observed_changed, ctx)
        # Stopped: cancelled, or this orchestrator drains.
        if waiting:
            await self._write_mark(waiting[0][0], force=True)
        if ctx.cancelled.is_set():
            for index, _ in waiting:
                await ctx.child_finished(ctx.child_id(index), "cancelled", NOT_PUBLISHED_ERROR)
        return created

    async def _warn_without_runners(self, ctx: StepContext) -> None:
        """Say so in the job's log when no runner takes from the queue: the children wait
        (pending) until one starts, which is what an operator needs to know first."""
        try:
            consumers = await self.publisher.consumers()
        except Exception as exc:  # only a hint: the children are published either way
            log.warning("could not count the queue's runners", error=str(exc))
            return
        if consumers == 0:
            queue = self.publisher.settings.queue
            log.warning("no runner takes from the queue", queue=queue, step_id=self.step.job_id)
            await ctx.log(
                f"no runner takes from queue {queue} now: the children wait until one starts "
                f"(orchestrator-svc runner --queue {queue})",
                level="warning",
            )

    async def _published_before(self, existing: object) -> int:
        """How many children an earlier owner published (0 for a step run the first time)."""
        if not existing:
            return 0
        row = await self.job.monitor.get_job(self.step.job_id)
        value = row.metadata.get(PUBLISHED_KEY)
        return int(value) if isinstance(value, int | float) and value > 0 else 0

    async def _write_mark(self, published: int, *, force: bool) -> None:
        now = time.monotonic()
        if published <= self._mark_written or (not force and now - self._mark_at < MARK_EVERY_S):
            return
        self._mark_written, self._mark_at = published, now
        await self.job.write_metadata(self.step.job_id, {PUBLISHED_KEY: published})


async def _first_of(changed: asyncio.Event, ctx: StepContext) -> None:
    """Wait for new counts, a cancel, or a drain (whichever comes first)."""
    waits = [asyncio.ensure_future(changed.wait()), asyncio.ensure_future(ctx.cancelled.wait())]
    if ctx.draining is not None:
        waits.append(asyncio.ensure_future(ctx.draining.wait()))
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()
