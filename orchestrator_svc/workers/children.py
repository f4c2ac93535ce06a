"""The one child lifecycle every spawning worker shares: create, run with bounded
concurrency, end each child exactly once, and honour cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from orchestrator_svc.workers.base import ChildStatus, StepContext

YIELD_EVERY_CHILDREN = 64
"""Children handled between forced event-loop yields when nothing else suspends (callbacks
that return at once and zero-length children would otherwise starve the loop)."""

NOT_STARTED_ERROR = "step cancelled before the child started"


@dataclass(frozen=True, slots=True)
class ChildOutcome:
    status: ChildStatus
    error: str = ""


RunOne = Callable[[int], Awaitable[ChildOutcome]]
"""Runs child ``index``; must return ``cancelled`` promptly once ``ctx.cancelled`` is set."""


async def run_children(
    ctx: StepContext, names: Iterable[str], run_one: RunOne, *, concurrency: int
) -> int:
    """Create one child per name, run them ``concurrency`` at a time; return how many exist.

    Every child is created before any runs, so the monitor shows the whole step (N pending)
    from the start. On cancellation no further child is created or started; children that
    were created but not started are reported ``cancelled`` here, running ones by ``run_one``.
    An exception from ``run_one`` fails that child; one from a callback stops the step.
    ``names`` may be a generator, so a large step need not hold every name at once.
    """
    created = 0
    for index, name in enumerate(names):
        if ctx.cancelled.is_set():
            break
        await ctx.child_created(ctx.child_id(index), name)
        created += 1
        if index % YIELD_EVERY_CHILDREN == YIELD_EVERY_CHILDREN - 1:
            await asyncio.sleep(0)

    next_index = 0

    async def runner() -> None:
        nonlocal next_index
        handled = 0
        while not ctx.cancelled.is_set() and next_index < created:
            # Claimed before the first await, so no two runners take the same child.
            index, next_index = next_index, next_index + 1
            await ctx.child_running(ctx.child_id(index))
            try:
                outcome = await run_one(index)
            except Exception as exc:
                outcome = ChildOutcome("failed", f"{type(exc).__name__}: {exc}")
            await ctx.child_finished(ctx.child_id(index), outcome.status, outcome.error)
            handled += 1
            if handled % YIELD_EVERY_CHILDREN == 0:
                await asyncio.sleep(0)

    tasks = [asyncio.create_task(runner()) for _ in range(min(concurrency, created))]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        # A runner failed (gather leaves its siblings running) or we were cancelled (gather
        # already cancelled them): cancel only what is not already stopping, because a second
        # cancel would interrupt a child's clean-up (killing its process) half-way.
        for task in tasks:
            if not task.done() and not task.cancelling():
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise

    for index in range(next_index, created):
        await ctx.child_finished(ctx.child_id(index), "cancelled", NOT_STARTED_ERROR)
        if index % YIELD_EVERY_CHILDREN == YIELD_EVERY_CHILDREN - 1:
            await asyncio.sleep(0)
    return created
