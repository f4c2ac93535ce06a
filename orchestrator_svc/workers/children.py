"""The one child lifecycle every spawning worker shares: create, run with bounded
concurrency, retry a failed child, resume a step's existing children, end each child exactly
once, and honour cancellation."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import cast

from orchestrator_svc.workers.base import (
    _ATTEMPT,
    ChildStatus,
    StepContext,
    current_attempt,
    sleep_unless_cancelled,
)

YIELD_EVERY_CHILDREN = 64
"""Children handled between forced event-loop yields when nothing else suspends (callbacks
that return at once and zero-length children would otherwise starve the loop)."""

NOT_STARTED_ERROR = "step cancelled before the child started"
CANCELLED_BEFORE_RETRY_ERROR = "step cancelled while the child waited to be retried"


@dataclass(frozen=True, slots=True)
class ChildOutcome:
    status: ChildStatus
    error: str = ""


RunOne = Callable[[int, int], Awaitable[ChildOutcome]]
"""``run_one(index, attempt)`` runs child ``index`` once (``attempt`` 1 is its first run); must
return ``cancelled`` promptly once ``ctx.cancelled`` is set."""

__all__ = [
    "ChildOutcome",
    "RunOne",
    "RunOneV1",
    "create_children",
    "current_attempt",
    "run_children",
]

RunOneV1 = Callable[[int], Awaitable[ChildOutcome]]
"""The first shape of the interface, kept: ``run_one(index)``. Its attempt is
``current_attempt()`` (and ``ctx.child_attempt(index)``) while it runs."""


class RunOneShapeError(TypeError):
    """A ``run_one`` that fits no supported shape of the worker interface."""


def as_run_one(run_one: RunOne | RunOneV1) -> RunOne:
    """``run_one`` in the current shape: ``(index, attempt)`` as it is, ``(index)`` (the first
    shape, before retries) called without the attempt, which it reads from
    ``current_attempt()``. Any other shape is refused at once, naming what to change."""
    try:
        params = list(inspect.signature(run_one).parameters.values())
    except (TypeError, ValueError):
        return run_one  # type: ignore[return-value]  # a builtin or C callable: trust it
    positional = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    varargs = any(p.kind is p.VAR_POSITIONAL for p in params)
    if len(positional) >= 2 or varargs:
        return run_one  # type: ignore[return-value]
    if len(positional) == 1:
        one = cast(RunOneV1, run_one)

        async def with_attempt(index: int, attempt: int) -> ChildOutcome:
            return await one(index)

        return with_attempt
    raise RunOneShapeError(
        f"run_one{inspect.signature(run_one)} fits no worker interface: take (index, attempt) "
        "(or (index), reading the attempt from current_attempt())"
    )


async def create_children(ctx: StepContext, names: Iterable[str]) -> int:
    """Report one child per name (``pending``), skipping those the step already has, until
    the step stops; return how many exist. Every child is created before any runs, so the
    monitor shows the whole step from the start."""
    created = 0
    for index, name in enumerate(names):
        if ctx.stopping:
            break
        child_id = ctx.child_id(index)
        if child_id not in ctx.existing_children:
            await ctx.child_created(child_id, name)
        created += 1
        if index % YIELD_EVERY_CHILDREN == YIELD_EVERY_CHILDREN - 1:
            await asyncio.sleep(0)
    return created


async def run_children(
    ctx: StepContext, names: Iterable[str], run_one: RunOne | RunOneV1, *, concurrency: int
) -> int:
    """Create one child per name, run them ``concurrency`` at a time; return how many exist.

    Every child is created before any runs, so the monitor shows the whole step (N pending)
    from the start. A child that fails runs again (``ctx.retry``) after a backoff, staying
    ``running`` between attempts; only its last attempt's outcome is reported. Children in
    ``ctx.existing_children`` are not created again: ended ones are left alone, live ones run
    as their next attempt. On cancellation no further child is created or started; children
    that were created but not started are reported ``cancelled`` here, running ones by
    ``run_one``. An exception from ``run_one`` fails that attempt; one from a callback stops
    the step. ``names`` may be a generator, so a large step need not hold every name at once.
    When ``ctx.draining`` is set, no further child is created or started and the children not
    started are NOT reported (the step is continued by the job's next owner); running ones
    finish as usual.
    """
    run_attempt = as_run_one(run_one)  # before any child is created: a wrong shape creates none
    if ctx.dispatch is not None:
        return await ctx.dispatch(ctx, names, run_attempt, concurrency)
    existing = ctx.existing_children
    created = await create_children(ctx, names)
    next_index = 0

    async def run_attempts(index: int) -> ChildOutcome:
        child_id = ctx.child_id(index)
        before = existing.get(child_id)
        attempt = before.attempt + 1 if before is not None else 1
        last = ctx.retry.last_attempt(before.interruptions if before is not None else 0)
        while True:
            await ctx.child_running(child_id, attempt)
            token = _ATTEMPT.set(attempt)
            try:
                outcome = await run_attempt(index, attempt)
            except Exception as exc:
                outcome = ChildOutcome("failed", f"{type(exc).__name__}: {exc}")
            finally:
                _ATTEMPT.reset(token)
            if outcome.status != "failed" or attempt >= last:
                return outcome
            # Asked for only here: the runner makes a child's cancel signal on first use, and
            # most children never need one.
            cancelled = ctx.child_cancelled(child_id)
            if cancelled.is_set():
                return outcome
            attempt += 1
            if not await sleep_unless_cancelled(cancelled, ctx.retry.delay_before(attempt)):
                return ChildOutcome("cancelled", CANCELLED_BEFORE_RETRY_ERROR)

    def already_ended(index: int) -> bool:
        before = existing.get(ctx.child_id(index))
        return before is not None and before.ended

    async def runner() -> None:
        nonlocal next_index
        handled = 0
        while not ctx.stopping and next_index < created:
            # Claimed before the first await, so no two runners take the same child.
            index, next_index = next_index, next_index + 1
            if existing and already_ended(index):
                continue
            outcome = await run_attempts(index)
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

    if not ctx.cancelled.is_set():
        return created  # drained: the unstarted children stay pending for the next owner
    for index in range(next_index, created):
        if existing and already_ended(index):
            continue
        await ctx.child_finished(ctx.child_id(index), "cancelled", NOT_STARTED_ERROR)
        if index % YIELD_EVERY_CHILDREN == YIELD_EVERY_CHILDREN - 1:
            await asyncio.sleep(0)
    return created
