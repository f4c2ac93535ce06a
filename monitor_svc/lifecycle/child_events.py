"""The child-event stream's rules: a batch of child transitions and seals applied in one unit
of work, each event fenced by its job's owner, each transition applied once (a resent event
changes nothing), and the step ended when its sealed children have all ended."""

from __future__ import annotations

from dataclasses import replace

from monitor_svc import metadata_rules
from monitor_svc.lifecycle import claims, fencing
from monitor_svc.lifecycle.rules import (
    BeyondSeal,
    StepTimers,
    check_step_end,
    count_child_change,
    deadline_after,
    set_status,
    working_progress,
)
from monitor_svc.lifecycle.uow import UnitOfWork
from monitor_svc.log_lines import refused_line, seal_line
from monitor_svc.records import ChildEventIn, JobState
from stepflow_common.status import (
    EndReason,
    Kind,
    Status,
    is_forward,
)

EVENT_STATUS = {
    "created": Status.PENDING,
    "running": Status.RUNNING,
    "completed": Status.COMPLETED,
    "failed": Status.FAILED,
    "cancelled": Status.CANCELLED,
}


def apply_events(
    tx: UnitOfWork,
    events: list[ChildEventIn],
    timers: StepTimers,
    owner: str = "",
    instance: str = "",
) -> list[tuple[str, str]]:
    """Apply one batch of child events. Dedupe is by the child's state transition: statuses
    only move forward, so a replayed or late event finds nothing to change, and nothing extra
    has to be kept (or pruned) to recognise it."""
    rejected: list[tuple[str, str]] = []
    steps: dict[str, JobState | None] = {}
    for event in events:
        if event.step_id not in steps:
            steps[event.step_id] = tx.job(event.step_id) if event.step_id else None
    tx.child_states({e.child_id for e in events if e.child_id})
    affected: set[str] = set()
    fences: dict[str, str] = {}
    refused_by_fence: dict[str, int] = {}
    for event in events:
        reason = _fence_event(tx, steps.get(event.step_id), owner, instance, fences)
        if reason:
            refused_by_fence[event.step_id] = refused_by_fence.get(event.step_id, 0) + 1
        reason = reason or _apply_event(tx, event, steps, timers, affected)
        if reason:
            rejected.append((event.event_id, reason))
        else:
            affected.add(event.step_id)
    for step_id, count in refused_by_fence.items():
        step = steps[step_id]
        assert step is not None
        tx.log(refused_line(step, count, fences[step.manager_id]))
    for step_id in affected:
        check_step_end(tx, step_id, timers)
    return rejected


def _fence_event(
    tx: UnitOfWork, step: JobState | None, owner: str, instance: str, fences: dict[str, str]
) -> str:
    """The fencing rejection of an event for ``step`` (once per manager and batch)."""
    if not owner or step is None:
        return ""
    if step.manager_id not in fences:
        fences[step.manager_id] = fencing.event_fence_reason(
            tx, tx.job(step.manager_id), owner, instance
        )
    return fences[step.manager_id]


def _apply_event(
    tx: UnitOfWork,
    event: ChildEventIn,
    steps: dict[str, JobState | None],
    timers: StepTimers,
    ends: set[str],
) -> str:
    """One event of a batch; the reason it is rejected, or "". Steps whose children changed
    are added to ``ends``, to be checked for their end once the batch is applied."""
    step = steps.get(event.step_id)
    if step is None:
        return f"unknown step {event.step_id!r}"
    if step.kind is not Kind.STEP:
        return f"job {event.step_id} is a {step.kind}, not a step"
    if event.kind == "sealed":
        return _apply_seal(tx, event, timers)
    status = EVENT_STATUS.get(event.kind)
    if status is None:
        return f"unknown event kind {event.kind!r}"
    if not event.child_id:
        return "child_id is required"
    child = tx.cached_job(event.child_id)
    if event.runner:
        if child is None:
            return f"unknown child {event.child_id!r} (its orchestrator creates it first)"
        if child.kind is not Kind.CHILD or child.parent_id != event.step_id:
            return f"job {event.child_id} is not a child of step {event.step_id}"
        return claims.apply_runner_event(tx, event, child, status, timers, ends)
    if child is not None:
        if child.kind is not Kind.CHILD or child.parent_id != event.step_id:
            return f"job {event.child_id} is not a child of step {event.step_id}"
        if child.status != status and is_forward(child.status, status):
            new = child.clone()
            new.status, new.version = status, child.version + 1
            new.attempt = fencing.event_attempt(child.attempt, status, event.attempt)
            if status is Status.RUNNING:
                new.started_at = new.started_at or tx.now
            elif status.terminal:
                new.finished_at = tx.now
                new.end_reason = EndReason.ORCHESTRATOR
                new.error = event.error
            tx.put(new, status_only=True)
            count_child_change(
                tx, event.step_id, step.manager_id, child.status, status, timers, ends
            )
        elif status is Status.RUNNING and child.status is status and event.attempt > child.attempt:
            # A new attempt of a running child (a retry, or a run after an interruption).
            new = child.clone()
            new.attempt, new.version = event.attempt, child.version + 1
            tx.put(new, status_only=True)
        return ""
    error = event.error
    if step.status.terminal and not status.terminal:
        # A child first heard of after its step ended (cancelled, timed out) is recorded, but
        # as cancelled: nothing under an ended step may stay live.
        status, error = Status.CANCELLED, f"step already {step.status}"
    try:
        count_child_change(tx, event.step_id, step.manager_id, None, status, timers, ends)
    except BeyondSeal as beyond:
        return f"beyond the seal's child_count {beyond.sealed_count}"
    tx.insert(
        JobState(
            id=event.child_id,
            kind=Kind.CHILD,
            parent_id=event.step_id,
            manager_id=step.manager_id,
            name=event.name,
            type=step.type,
            status=status,
            error=error if status.terminal else "",
            end_reason=EndReason.ORCHESTRATOR if status.terminal else "",
            metadata={},
            version=1,
            change_seq=0,
            step_index=None,
            timeout_s=None,
            deadline=None,
            created_at=tx.now,
            started_at=tx.now if status is not Status.PENDING else None,
            finished_at=tx.now if status.terminal else None,
            request_id=None,
            owner=step.owner,
            attempt=fencing.event_attempt(0, status, event.attempt),
        )
    )
    return ""


def _apply_seal(tx: UnitOfWork, event: ChildEventIn, timers: StepTimers) -> str:
    progress = working_progress(tx, event.step_id)
    if event.child_count < 0:
        return "child_count must be >= 0"
    if progress.sealed_count is not None:
        if progress.sealed_count == event.child_count:
            return ""  # the same seal again
        return f"already sealed with child_count {progress.sealed_count}"
    seen = progress.tally().total
    if event.child_count < seen:
        return f"child_count {event.child_count} is below the {seen} children already seen"
    progress.sealed_count = event.child_count
    progress.grace_deadline = None
    step = tx.job(event.step_id)
    assert step is not None
    tx.log(seal_line(step, event.child_count, event.handed_to_monitor))
    hand_off = (
        event.handed_to_monitor and not step.status.terminal and step.status is not Status.SPAWNED
    )
    if step.deadline is None and not step.status.terminal and not hand_off:
        # The seal starts the wait for the children; the deadline is part of the step's row,
        # so its version moves. (A hand-off gets its deadline from the move to spawned below.)
        step = replace(
            step,
            deadline=deadline_after(tx.now, timers.default_wait_timeout_s),
            version=step.version + 1,
        )
        tx.put(step)
    manager = tx.job(step.manager_id)
    if manager is not None:
        metadata = metadata_rules.record_child_count(manager.metadata, step.id, event.child_count)
        if metadata != manager.metadata:
            tx.put(replace(manager, metadata=metadata, version=manager.version + 1))
    if event.handed_to_monitor:
        progress.handed = True
        if hand_off:
            set_status(tx, step, Status.SPAWNED, "", "", timers)
    tx.touch(step.manager_id)
    return ""
