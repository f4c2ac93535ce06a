"""One step's state in its runner: its signals, its plan when continued, and its children
counted as the events this runner sends move them (a typed tally, no I/O)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field

from orchestrator_svc.definitions import StepSpec
from orchestrator_svc.resume import Plan, StepRecord
from orchestrator_svc.workers.base import NO_CHILDREN, ChildStatus, ExistingChild
from stepflow_common.status import Status
from stepflow_common.step_outcome import ChildTally


class AnySet:
    """A cancel signal set when the step's or the child's own event is."""

    def __init__(self, step: asyncio.Event) -> None:
        self.step = step
        self.own = asyncio.Event()

    def is_set(self) -> bool:
        return self.step.is_set() or self.own.is_set()

    async def wait(self) -> object:
        if self.is_set():
            return True
        waits = [asyncio.ensure_future(self.step.wait()), asyncio.ensure_future(self.own.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        return True


@dataclass(slots=True)
class ChildControl:
    """One child's own cancel signal (CancelJob on the child) and its end."""

    signal: AnySet
    ended: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(slots=True)
class ChildCounts:
    """The step's children by status, as this runner's events move them.

    A child is counted ``running`` once (seen running here, or recorded running): a further
    RUNNING event of it (a later attempt, a re-run after a take-over) moves no count, and its
    end leaves ``running``; any other child's end (it never ran: cancelled before it started)
    leaves ``pending``.
    """

    pending: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    counted_running: set[str] = field(default_factory=set)

    @property
    def running(self) -> int:
        return len(self.counted_running)

    def created(self) -> None:
        self.pending += 1

    def started(self, child_id: str) -> None:
        if child_id not in self.counted_running:
            self.counted_running.add(child_id)
            self.pending -= 1

    def ended(self, child_id: str, status: ChildStatus) -> None:
        if child_id in self.counted_running:
            self.counted_running.discard(child_id)
        else:
            self.pending -= 1
        if status == "completed":
            self.completed += 1
        elif status == "failed":
            self.failed += 1
        else:
            self.cancelled += 1

    def recorded(self, child_id: str, status: str) -> None:
        """A child as the monitor recorded it (a continued step)."""
        if status == Status.PENDING.value:
            self.pending += 1
        elif status == Status.RUNNING.value:
            self.counted_running.add(child_id)
        elif status == Status.COMPLETED.value:
            self.completed += 1
        elif status == Status.FAILED.value:
            self.failed += 1
        elif status == Status.CANCELLED.value:
            self.cancelled += 1
        else:
            raise ValueError(f"not a child's status: {status!r}")

    def tally(self) -> ChildTally:
        return ChildTally(self.pending, self.running, self.completed, self.failed, self.cancelled)


@dataclass(slots=True)
class StepRun:
    """A step of the job in this runner, from before its start to its end."""

    index: int
    spec: StepSpec
    job_id: str
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    # Set once the step has ended or been handed off: the next step may start.
    released: asyncio.Event = field(default_factory=asyncio.Event)
    started: bool = False
    handed: bool = False
    cancel_reason: str = ""  # set by CancelJob on this step
    # Stream sequence of the step's first CREATED event (0: none yet), and its signal.
    first_child_seq: int = 0
    first_child: asyncio.Event = field(default_factory=asyncio.Event)
    final: Status | None = None
    error: str = ""
    # Children whose terminal event the monitor rejected: their records being repaired, and
    # what could not be repaired (the step then cannot claim its children's outcome).
    repairs: list[asyncio.Task[None]] = field(default_factory=list)
    unrecorded: list[str] = field(default_factory=list)
    # Children cancelled one by one (CancelJob on a child), and their workers' signals.
    children: dict[str, ChildControl] = field(default_factory=dict)
    # Continuing a job: what this step does next, the step's attempt, the children it already
    # has.
    plan: Plan = Plan.START
    attempt: int = 1
    existing: Mapping[str, ExistingChild] = field(default_factory=lambda: NO_CHILDREN)
    counts: ChildCounts = field(default_factory=ChildCounts)
    # Cancelled events this runner sent for the step: more in the monitor means a child was
    # cancelled through the API (perhaps through another orchestrator).
    cancelled_sent: int = 0
    # The stream sequence of the step's last log line: its end is written after that is
    # committed, so the log has a step's output before the line that says it ended.
    last_log_seq: int = 0
    cancelled_seen: int = 0  # the monitor's cancelled count last looked into
    cancelled_elsewhere: set[str] = field(default_factory=set)
    # The step's child counts as the manager's watch last showed them (children other
    # processes run and end: executor celery), and a signal set at each new showing.
    observed: ChildTally | None = None
    observed_changed: asyncio.Event = field(default_factory=asyncio.Event)

    def observe(self, tally: ChildTally) -> None:
        if tally != self.observed:
            self.observed = tally
            self.observed_changed.set()

    def child(self, child_id: str) -> ChildControl:
        control = self.children.get(child_id)
        if control is None:
            control = self.children[child_id] = ChildControl(AnySet(self.cancel))
            if child_id in self.cancelled_elsewhere:
                control.signal.own.set()  # cancelled through the API before it started
        return control

    def adopt(self, record: StepRecord) -> None:
        """Continue from the children the monitor recorded for this step."""
        self.existing = record.children
        for child_id, child in record.children.items():
            self.counts.recorded(child_id, child.status)
            if child.status == Status.CANCELLED.value:
                self.cancelled_sent += 1

    def unrecorded_error(self) -> str:
        more = len(self.unrecorded) - 1
        return f"the outcome of its children is not recorded: {self.unrecorded[0]}" + (
            f" (and {more} more)" if more > 0 else ""
        )
