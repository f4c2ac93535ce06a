"""The attempt rules of a child run by runners (a step's ``executor = "celery"``): the monitor,
not the broker, decides which runner's run of a child counts.

A runner claims a child's attempt (a RUNNING event naming the runner, the attempt and the
broker message it runs from) before the child's work starts; only the runner whose claim was
accepted may end that attempt. The broker delivers a message to one runner at a time, and
again only when that runner's connection was lost, so:

- a message's first claim, on a pending child, is accepted;
- the same message claimed by another runner, for a later attempt, is the redelivery after
  its runner was lost (killed, frozen past its heartbeat, cut off): one interruption more, and
  the child runs again as that attempt; at the third interruption it fails ``runner_lost``;
- the same runner claiming a later attempt of its own claim is a retry after a failed attempt;
- any other message for a claimed child is a copy (an orchestrator that published again what
  it could not know was published): refused, so the copy never runs beside the first;
- an end that does not name the current attempt and its runner is stale (a runner that woke
  up after its message went to another one): refused, and written in the job's log.

A dead-lettered message (``runner_lost``) fails its child, whichever runner holds the
claim: it was lost with its runner every time it ran (a copy's dead letter, for a child that
runs under another message, changes nothing).
"""

from __future__ import annotations

from monitor_svc.lifecycle.rules import StepTimers, count_child_change, set_status
from monitor_svc.lifecycle.uow import UnitOfWork
from monitor_svc.log_lines import stale_runner_line
from monitor_svc.records import ChildEventIn, JobState
from stepflow_common.errors import STALE_CLAIM
from stepflow_common.status import EndReason, Status

MAX_RUNNER_INTERRUPTIONS = 3
"""A child whose runner was lost this many times fails ``runner_lost``."""

DEAD_LETTERED = (
    "its message was dead-lettered: the runner running it was lost each time it was delivered"
)


def apply_runner_event(
    tx: UnitOfWork,
    event: ChildEventIn,
    child: JobState,
    status: Status,
    timers: StepTimers,
    ends: set[str],
) -> str:
    """One runner's event for an existing child; the reason it is refused, or ""."""
    if status is Status.PENDING:
        return "a runner does not create children (their orchestrator does)"
    if event.runner_lost:
        return _dead_lettered(tx, event, child, status, timers)
    if status is Status.RUNNING:
        return _claim(tx, event, child, timers, ends)
    return _end(tx, event, child, status, timers, ends)


def _claim(
    tx: UnitOfWork, event: ChildEventIn, child: JobState, timers: StepTimers, ends: set[str]
) -> str:
    attempt = event.attempt or 1
    if not event.claim_id:
        return "claim_id is required in a runner's claim"
    if child.status.terminal:
        return f"child {child.id} is already {child.status}"
    if child.status is Status.PENDING:
        if attempt <= child.attempt:
            return f"attempt {attempt} {STALE_CLAIM}: attempt {child.attempt} has run"
        _put_claim(tx, child, event, attempt, Status.RUNNING, timers, ends)
        return ""
    # Running: whose claim is it?
    if child.claim_id != event.claim_id:
        holder = f" on runner {child.runner}" if child.runner else ""
        return (
            f"child {child.id} is running attempt {child.attempt}{holder} from another message; "
            "this copy is not run"
        )
    if attempt == child.attempt and event.runner == child.runner:
        return ""  # the same claim again
    if attempt <= child.attempt:
        return (
            f"attempt {attempt} {STALE_CLAIM}: attempt {child.attempt} is claimed by runner "
            f"{child.runner}; claim attempt {child.attempt + 1}"
        )
    if event.runner == child.runner:
        _put_claim(tx, child, event, attempt, Status.RUNNING, timers, ends)  # a retry
        return ""
    # The message came back from a lost runner.
    interrupted = child.clone()
    interrupted.interruptions = child.interruptions + 1
    if interrupted.interruptions >= MAX_RUNNER_INTERRUPTIONS:
        _fail_lost(tx, interrupted, f"runner {child.runner} was lost", timers)
        return f"child {child.id} failed {EndReason.RUNNER_LOST}: its runners were lost " + (
            f"{interrupted.interruptions} times"
        )
    _put_claim(tx, interrupted, event, attempt, Status.RUNNING, timers, ends, full=True)
    return ""


def _end(
    tx: UnitOfWork,
    event: ChildEventIn,
    child: JobState,
    status: Status,
    timers: StepTimers,
    ends: set[str],
) -> str:
    attempt = event.attempt or 1
    current = child.runner == event.runner and child.attempt == attempt
    if child.status.terminal:
        if current and child.status is status:
            return ""  # the same end again
        return f"child {child.id} is already {child.status}"
    if child.status is Status.RUNNING and current:
        ended = child.clone()
        ended.error = event.error
        ended.end_reason = EndReason.RUNNER
        _put_claim(tx, ended, event, attempt, status, timers, ends)
        return ""
    reason = (
        f"stale end of attempt {attempt} from runner {event.runner}: the child's current "
        f"attempt is {child.attempt}"
        + (f" on runner {child.runner}" if child.runner else " (not claimed)")
    )
    tx.log(stale_runner_line(child, attempt, event.runner, reason))
    return reason


def _dead_lettered(
    tx: UnitOfWork, event: ChildEventIn, child: JobState, status: Status, timers: StepTimers
) -> str:
    if status is not Status.FAILED:
        return "runner_lost is set on a FAILED event only"
    if child.status.terminal:
        return ""  # it ended meanwhile (it is not failed again)
    if child.status is Status.RUNNING and child.claim_id and child.claim_id != event.claim_id:
        # A copy of the message was given up on; the child runs under another one.
        return (
            f"child {child.id} runs attempt {child.attempt} from another message; this copy's "
            "dead letter is dropped"
        )
    lost = child.clone()
    lost.interruptions = child.interruptions + 1
    _fail_lost(tx, lost, event.error or DEAD_LETTERED, timers)
    return ""


def _fail_lost(tx: UnitOfWork, lost: JobState, error: str, timers: StepTimers) -> None:
    """``lost`` (the child with its new interruption counted) ends failed ``runner_lost``."""
    lost.version += 1
    tx.put(lost)  # the interruption (a column the child-event write does not carry)
    set_status(tx, lost, Status.FAILED, error, EndReason.RUNNER_LOST, timers)


def _put_claim(
    tx: UnitOfWork,
    child: JobState,
    event: ChildEventIn,
    attempt: int,
    status: Status,
    timers: StepTimers,
    ends: set[str],
    *,
    full: bool = False,
) -> None:
    """``child`` (a clone, or the stored state) moved to ``status`` under ``event``'s claim."""
    before = tx.cached_job(child.id) or child
    new = child.clone()
    new.status, new.version = status, before.version + 1
    new.attempt = attempt
    new.runner, new.claim_id = event.runner, event.claim_id
    if status is Status.RUNNING:
        new.started_at = new.started_at or tx.now
    elif status.terminal:
        new.finished_at = tx.now
    tx.put(new, status_only=not full)
    if before.status is not status:
        count_child_change(
            tx, child.parent_id or "", child.manager_id, before.status, status, timers, ends
        )
