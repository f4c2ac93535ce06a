"""What a worker is, and what the runner hands it: the seam between step logic and the runner.

A worker never talks to the monitor. It reports each child through the awaited callbacks in
its StepContext; they may block (backpressure while the monitor is unreachable), which is
exactly what keeps a fast worker from outrunning the event stream, so no worker may bypass
them or fire them without awaiting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

ChildStatus = Literal["completed", "failed", "cancelled"]
"""How a child ended, as reported through ``child_finished``."""

ChildCreated = Callable[[str, str], Awaitable[None]]
"""``child_created(child_id, name)``: the child exists (pending)."""
ChildRunning = Callable[[str], Awaitable[None]]
"""``child_running(child_id)``: the child started."""
ChildFinished = Callable[[str, ChildStatus, str], Awaitable[None]]
"""``child_finished(child_id, status, error)``: the child ended; ``error`` is "" on success."""


class CancelSignal(Protocol):
    """What a worker needs of a cancellation flag; ``asyncio.Event`` is one."""

    def is_set(self) -> bool: ...

    async def wait(self) -> object: ...


@dataclass(frozen=True, slots=True)
class StepContext:
    """Everything a worker may use while running one step.

    ``cancelled`` is set when the step is cancelled, times out, or the job stops: the worker
    must then start no more children, cancel the running ones, report every child it created
    and has not ended as ``cancelled``, and return. ``child_cancelled(child_id)`` is the
    signal for one child.
    """

    step_id: str
    step_name: str
    config: Mapping[str, Any]
    child_created: ChildCreated
    child_running: ChildRunning
    child_finished: ChildFinished
    cancelled: CancelSignal
    child_cancel: Callable[[str], CancelSignal] | None = None

    def child_cancelled(self, child_id: str) -> CancelSignal:
        """Set when this one child is cancelled (CancelJob on it) or its whole step is: a
        worker running the child must then stop it (its process too) and report it
        ``cancelled``."""
        return self.cancelled if self.child_cancel is None else self.child_cancel(child_id)

    def child_id(self, index: int) -> str:
        """The id of the step's ``index``-th child (0-based).

        Deterministic, so an event resent after a reconnect names the same child and the
        monitor's dedupe recognises it.
        """
        return f"{self.step_id}.{index}"


@dataclass(frozen=True, slots=True)
class StepResult:
    """How ``run`` ended.

    For a worker without children, ``ok``/``error`` decide the step. For a worker with
    children the runner counts outcomes from the callbacks; ``child_count`` is how many
    children the worker created (it goes into the seal), and ``ok=False`` means the worker
    itself broke (the step fails with ``error`` whatever its children did). ``cancelled`` says
    the worker stopped because ``ctx.cancelled`` was set. Raising from ``run`` is a failure too.
    """

    ok: bool = True
    error: str = ""
    child_count: int = 0
    cancelled: bool = False

    @classmethod
    def success(cls) -> StepResult:
        return cls()

    @classmethod
    def failure(cls, error: str, *, child_count: int = 0) -> StepResult:
        return cls(ok=False, error=error, child_count=child_count)

    @classmethod
    def spawned(cls, child_count: int, *, cancelled: bool = False) -> StepResult:
        return cls(child_count=child_count, cancelled=cancelled)

    @classmethod
    def stopped(cls, error: str = "cancelled") -> StepResult:
        return cls(ok=False, error=error, cancelled=True)


@runtime_checkable
class Worker(Protocol):
    """A step type. Registered by ``type``; third parties add theirs through the
    ``stepflow.workers`` entry-point group (see ``registry``)."""

    @property
    def type(self) -> str: ...

    @property
    def description(self) -> str: ...

    @property
    def spawns_children(self) -> bool: ...

    def validate_config(self, config: Mapping[str, Any]) -> None:
        """Raise InvalidArgument starting with the offending key, e.g. ``"children: ..."``."""
        ...

    async def run(self, ctx: StepContext) -> StepResult: ...


class BaseWorker:
    """Convenience base for workers: set the three class attributes, override ``run``."""

    type: str = ""
    description: str = ""
    spawns_children: bool = False

    def validate_config(self, config: Mapping[str, Any]) -> None:
        """Accepts any config; override to check it before the job starts."""

    async def run(self, ctx: StepContext) -> StepResult:
        raise NotImplementedError(f"worker {self.type!r} does not implement run()")


async def sleep_unless_cancelled(signal: CancelSignal, seconds: float) -> bool:
    """Sleep ``seconds``; False as soon as ``signal`` is set (or already was), True otherwise."""
    if signal.is_set():
        return False
    if seconds <= 0:
        return True
    try:
        async with asyncio.timeout(seconds):
            await signal.wait()
    except TimeoutError:
        return True
    return False
