"""What a worker is, and what the runner hands it: the seam between step logic and the runner.

A worker never talks to the monitor. It reports each child through the awaited callbacks in
its StepContext; they may block (backpressure while the monitor is unreachable), which is
exactly what keeps a fast worker from outrunning the event stream, so no worker may bypass
them or fire them without awaiting.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, Protocol, runtime_checkable

ChildStatus = Literal["completed", "failed", "cancelled"]
"""How a child ended, as reported through ``child_finished``."""

ChildCreated = Callable[[str, str], Awaitable[None]]
"""``child_created(child_id, name)``: the child exists (pending)."""


class ChildRunning(Protocol):
    """``child_running(child_id, attempt=1)``: the child started (its ``attempt``-th run)."""

    def __call__(self, child_id: str, attempt: int = 1, /) -> Awaitable[None]: ...


ChildFinished = Callable[[str, ChildStatus, str], Awaitable[None]]
"""``child_finished(child_id, status, error)``: the child ended; ``error`` is "" on success."""


class LineSink(Protocol):
    """``write_log(message, source=, level=, child_id=, attempt=)``: one line into the job's
    log (awaited: it waits while the event stream's buffer is full)."""

    def __call__(
        self,
        message: str,
        /,
        *,
        source: str = "log",
        level: str = "info",
        child_id: str = "",
        attempt: int = 0,
    ) -> Awaitable[None]: ...


class ChildDispatch(Protocol):
    """Where ``run_children`` sends a step's children when they do not run here: ``(ctx,
    names, run_one, concurrency)``, returning how many children exist (see ``remote``)."""

    def __call__(
        self,
        ctx: StepContext,
        names: Iterable[str],
        run_one: Callable[[int, int], Awaitable[Any]],
        concurrency: int,
        /,
    ) -> Awaitable[int]: ...


class CancelSignal(Protocol):
    """What a worker needs of a cancellation flag; ``asyncio.Event`` is one."""

    def is_set(self) -> bool: ...

    async def wait(self) -> object: ...


_ATTEMPT: contextvars.ContextVar[int] = contextvars.ContextVar("stepflow_child_attempt", default=1)


def current_attempt() -> int:
    """The attempt of the child whose ``run_one`` is running (1 = its first run)."""
    return _ATTEMPT.get()


MAX_BACKOFF_S = 60.0
"""Retry backoff doubles per attempt up to this cap."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often a failed child runs again, and how long it waits first."""

    retries: int = 0
    backoff_s: float = 1.0

    def delay_before(self, attempt: int) -> float:
        """Seconds to wait before ``attempt`` (2 = the first retry): doubling, capped."""
        return min(self.backoff_s * 2.0 ** max(attempt - 2, 0), MAX_BACKOFF_S)

    def last_attempt(self, interruptions: int = 0) -> int:
        """The highest attempt a child may reach: the first run, its retries, and one more run
        for each time an orchestrator was lost while it ran (those runs did not fail)."""
        return 1 + self.retries + interruptions


@dataclass(frozen=True, slots=True)
class ExistingChild:
    """A child the step already has: a step continued after its orchestrator was lost (or
    restarted) resumes child by child instead of creating its children again."""

    status: str
    """pending, running, completed, failed or cancelled."""
    attempt: int = 0
    """The attempt last started (1 = the first; 0 = never started)."""
    interruptions: int = 0
    """How many times an orchestrator was lost while this child was live."""

    @property
    def ended(self) -> bool:
        return self.status in ("completed", "failed", "cancelled")


NO_CHILDREN: Mapping[str, ExistingChild] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class StepContext:
    """Everything a worker may use while running one step.

    ``cancelled`` is set when the step is cancelled, times out, or the job stops: the worker
    must then start no more children, cancel the running ones, report every child it created
    and has not ended as ``cancelled``, and return. ``child_cancelled(child_id)`` is the
    signal for one child.

    ``existing_children`` (by child id) is empty on a first run. When a step continues after
    its orchestrator was lost, it holds the children already recorded: a worker must not
    create them again, must leave the ended ones alone, and runs each live one again as
    attempt ``existing.attempt + 1``. ``run_children`` does all of that for a worker.
    ``attempt`` is the step's own attempt (a step without children that is run again).

    ``log`` writes a line into the job's log under this step (or one of its children); a
    command's output goes there line by line through the same sink (``write_log``).

    ``dispatch``, when set, runs the children elsewhere: ``run_children`` hands them to it
    (a step of ``executor = "celery"`` on the orchestrator, or one parcel of it on a runner).
    A worker that runs its children through ``run_children`` runs remotely unchanged.

    ``draining`` is set when the orchestrator shuts down (not a cancel): the worker should
    start no more children, let the running ones finish, and return WITHOUT reporting the
    children it never started; the job's next owner continues the step from its recorded
    children. ``run_children`` does that. A worker that ignores it is stopped (its tasks
    cancelled) once the shutdown grace is over.
    """

    step_id: str
    step_name: str
    config: Mapping[str, Any]
    child_created: ChildCreated
    child_running: ChildRunning
    child_finished: ChildFinished
    cancelled: CancelSignal
    child_cancel: Callable[[str], CancelSignal] | None = None
    attempt: int = 1
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    existing_children: Mapping[str, ExistingChild] = field(default_factory=lambda: NO_CHILDREN)
    draining: CancelSignal | None = None
    write_log: LineSink | None = None
    dispatch: ChildDispatch | None = None

    async def log(
        self, message: str, *, level: str = "info", child_id: str = "", source: str = "log"
    ) -> None:
        """One line in the job's log: the step's own (``child_id`` empty) or a child's, at
        ``level`` (debug, info, warning, error); ``source`` is ``log``, ``stdout`` or
        ``stderr``. Without a log (a context built by hand) the line goes nowhere."""
        if self.write_log is not None:
            attempt = current_attempt() if child_id else self.attempt
            await self.write_log(
                message, source=source, level=level, child_id=child_id, attempt=attempt
            )

    @property
    def stopping(self) -> bool:
        """Start nothing new: the step is cancelled or the orchestrator is draining."""
        return self.cancelled.is_set() or (self.draining is not None and self.draining.is_set())

    def child_cancelled(self, child_id: str) -> CancelSignal:
        """Set when this one child is cancelled (CancelJob on it) or its whole step is: a
        worker running the child must then stop it (its process too) and report it
        ``cancelled``."""
        return self.cancelled if self.child_cancel is None else self.child_cancel(child_id)

    def child_attempt(self, index: int) -> int:
        """The attempt of child ``index`` now running (1 = its first run): for a ``run_one``
        written against the interface's first shape, ``run_one(index)``."""
        return current_attempt()

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
