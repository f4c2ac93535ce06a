"""Every rule of a job's life, as plain code against a ``UnitOfWork``: creating jobs, status
moves and their cascades, the ways a step ends, and the deadlines (child events and seals:
``child_events``).

Each public function here is one unit of work: it reads and writes through the unit of work
only, and raises a domain error (``stepflow_common.errors``) to refuse; the unit of work then
undoes the unit's writes. Nothing here knows about SQL or gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from monitor_svc import metadata_rules
from monitor_svc.lifecycle.uow import UnitOfWork
from monitor_svc.records import JobState, Progress
from stepflow_common.errors import (
    FailedPrecondition,
)
from stepflow_common.status import (
    EndReason,
    Kind,
    Status,
)
from stepflow_common.step_outcome import ChildTally, children_done, final_step_status


@dataclass(frozen=True, slots=True)
class StepTimers:
    """Monitor-wide timings (flags): the default wait for children and the hand-off grace."""

    default_wait_timeout_s: float = 1800.0
    grace_period_s: float = 30.0
    orphan_timeout_s: float = 600.0  # an orphan nobody adopts by then fails orchestrator_lost


@dataclass(frozen=True, slots=True)
class StepStatResult:
    entry: dict[str, Any]
    tally: ChildTally
    current_step_status_changed: bool
    version: int


def deadline_after(now: datetime, seconds: float | None) -> datetime | None:
    return None if seconds is None else now + timedelta(seconds=seconds)


# -- the one place a job's status changes ------------------------------------------------------
def set_status(
    tx: UnitOfWork, job: JobState, status: Status, error: str, reason: str, timers: StepTimers
) -> JobState:
    """Move a job forward and carry the change everywhere it shows, in this transaction:
    the manager's step_stats for a step, the step's counts for a child, and the cascade."""
    new = replace(job, status=status, version=job.version + 1)
    if error:
        new.error = error
    if job.kind is Kind.STEP and job.status is Status.PENDING:
        new.attempt = job.attempt + 1  # a step's run starts (running, or spawned at once)
    if status in (Status.RUNNING, Status.SPAWNED) and new.started_at is None:
        new.started_at = tx.now
        if job.kind is Kind.STEP and job.timeout_s is not None:
            # A step's own timeout runs from its start (running, or spawned straight from
            # pending by a hand-off seal), not from when the job created it.
            new.deadline = deadline_after(tx.now, job.timeout_s)
    if status.terminal:
        new.finished_at = tx.now
        new.end_reason = reason
        new.deadline = None
        new.orphan_deadline = None
    tx.put(new)
    if job.kind is Kind.CHILD:
        count_child_change(tx, job.parent_id or "", job.manager_id, job.status, status, timers)
    elif job.kind is Kind.STEP:
        _on_step_status(tx, new, timers)
    elif job.kind is Kind.MANAGER and status.terminal:
        _end_manager_descendants(tx, new.id, timers)
    latest = tx.job(new.id)
    assert latest is not None
    return latest


def _end_manager_descendants(tx: UnitOfWork, manager_id: str, timers: StepTimers) -> None:
    """Nothing under an ended manager stays live, however it ended (completed included: a
    client that completes its job early leaves nothing running): a step that never started
    is ``skipped``, one that had started ``cancelled`` (its live children with it), and the
    children still live under steps that had already ended are cancelled too."""
    for step in tx.children_of(manager_id, live_only=True):
        ended = Status.SKIPPED if step.status is Status.PENDING else Status.CANCELLED
        set_status(tx, step, ended, "", EndReason.CANCELLED, timers)
    for child in tx.live_children_of_manager(manager_id):
        set_status(tx, child, Status.CANCELLED, "", EndReason.CANCELLED, timers)


def _on_step_status(tx: UnitOfWork, step: JobState, timers: StepTimers) -> None:
    progress = tx.progress(step.id)
    if step.status.terminal:
        # A step that ends, whichever way (completed included), takes its live children with
        # it: nothing under an ended step stays running.
        for child in tx.children_of(step.id, live_only=True):
            set_status(tx, child, Status.CANCELLED, "", EndReason.CANCELLED, timers)
        progress = tx.progress(step.id)
        if progress is not None and progress.grace_deadline is not None:
            working = working_progress(tx, step.id)
            working.grace_deadline = None
    elif step.status is Status.SPAWNED:
        working = working_progress(tx, step.id)
        if step.deadline is None:
            tx.put(replace(step, deadline=deadline_after(tx.now, timers.default_wait_timeout_s)))
        if working.sealed_count is None and working.tally().total == 0:
            working.grace_deadline = tx.now + timedelta(seconds=timers.grace_period_s)
        working.handed = True
    _record_in_manager(tx, step.id)
    if step.status is Status.SPAWNED:
        check_step_end(tx, step.id, timers)


def _record_in_manager(tx: UnitOfWork, step_id: str) -> None:
    step = tx.job(step_id)
    assert step is not None
    manager = tx.job(step.manager_id)
    if manager is None:
        return
    progress = tx.progress(step_id)
    tally = progress.tally() if progress is not None else None
    child_count = None
    if progress is not None:
        child_count = progress.sealed_count if progress.sealed_count is not None else tally.total  # type: ignore[union-attr]
    facts = metadata_rules.StepFacts(
        step_id=step.id,
        step_name=step.name,
        step_type=step.type,
        step_index=step.step_index,
        status=step.status,
        error=step.error,
        child_count=child_count,
        tally=tally,
    )
    metadata = metadata_rules.record_step_status(manager.metadata, facts)
    if metadata != manager.metadata:
        tx.put(replace(manager, metadata=metadata, version=manager.version + 1))
    else:
        # The entry already says as much (a client marked it first), but the step's row
        # changed: the manager's watchers must still wake to see it.
        tx.touch(manager.id)


def working_progress(tx: UnitOfWork, step_id: str) -> Progress:
    step = tx.job(step_id)
    assert step is not None
    return tx.working_progress(step_id, step.manager_id)


# -- the one place a child's change reaches its step ---------------------------------------
class BeyondSeal(FailedPrecondition):
    def __init__(self, step_id: str, sealed_count: int) -> None:
        super().__init__(f"step {step_id} is sealed with {sealed_count} children")
        self.sealed_count = sealed_count


def count_child_change(
    tx: UnitOfWork,
    step_id: str,
    manager_id: str,
    old: Status | None,
    status: Status,
    timers: StepTimers,
    ends: set[str] | None = None,
) -> None:
    """Every change of a child goes through here, by an RPC or by the stream: a new child
    (``old`` None) must fit under its step's seal; the step's counts follow in this unit; then
    the step is checked for its end, at once, or once per batch when ``ends`` collects the
    steps to check (the stream's batches)."""
    progress = tx.working_progress(step_id, manager_id)
    if old is None:
        if progress.sealed_count is not None and progress.tally().total >= progress.sealed_count:
            raise BeyondSeal(step_id, progress.sealed_count)
        progress.grace_deadline = None  # a hand-off that has a child no longer waits for one
    else:
        progress.add(old, -1)
    progress.add(status, 1)
    tx.touch(manager_id)
    if ends is None:
        check_step_end(tx, step_id, timers)
    else:
        ends.add(step_id)


def check_step_end(tx: UnitOfWork, step_id: str, timers: StepTimers) -> None:
    """End a handed-off step whose seal is met: zero children, or all children terminal."""
    step = tx.job(step_id)
    if step is None or step.status.terminal:
        return
    progress = tx.progress(step_id)
    if progress is None or not progress.handed or progress.sealed_count is None:
        return
    tally = progress.tally()
    if progress.sealed_count == 0:
        set_status(tx, step, Status.COMPLETED, "", EndReason.NO_CHILDREN, timers)
    elif children_done(tally, progress.sealed_count):
        status, error = final_step_status(tally)
        set_status(tx, step, status, error, EndReason.CHILDREN_TERMINAL, timers)


# -- deadlines -------------------------------------------------------------------------------
def fire_if_overdue(tx: UnitOfWork, job: JobState, timers: StepTimers) -> JobState:
    """A write to a job whose deadline has passed finds it timed out, as it would had the
    timer fired on the dot: the outcome does not depend on the timer's lag."""
    if job.status.terminal or job.deadline is None or job.deadline > tx.now:
        return job
    return _time_out(tx, job, timers)


def _time_out(tx: UnitOfWork, job: JobState, timers: StepTimers) -> JobState:
    error = "timed out waiting for child jobs" if job.kind is Kind.STEP else "job timed out"
    return set_status(tx, job, Status.FAILED, error, EndReason.TIMEOUT, timers)


def fire_due(tx: UnitOfWork, timers: StepTimers) -> int:
    """End every job whose stored deadline has passed (and hand-offs past their grace).
    ``lifecycle.fire_due`` runs this and the lease rules' clock work in one unit."""
    fired = 0
    for job_id in tx.due_jobs():
        job = tx.job(job_id)
        if job is None or job.status.terminal or job.deadline is None or job.deadline > tx.now:
            continue
        _time_out(tx, job, timers)
        fired += 1
    for step_id in tx.due_graces():
        step = tx.job(step_id)
        progress = tx.progress(step_id)
        if step is None or progress is None:
            continue
        working = working_progress(tx, step_id)
        working.grace_deadline = None
        if (
            step.status is Status.SPAWNED
            and progress.sealed_count is None
            and progress.tally().total == 0
        ):
            set_status(tx, step, Status.COMPLETED, "", EndReason.GRACE_PERIOD, timers)
            fired += 1
    return fired
