"""Every rule of a job's life, as plain code against a ``UnitOfWork``: creating jobs, status
moves and their cascades, the ways a step ends, and the deadlines (child events and seals:
``child_events``).

Each public function here is one unit of work: it reads and writes through the unit of work
only, and raises a domain error (``stepflow_common.errors``) to refuse; the unit of work then
undoes the unit's writes. Nothing here knows about SQL or gRPC.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from monitor_svc import document_size, metadata_rules
from monitor_svc.lifecycle import fencing
from monitor_svc.lifecycle.uow import UnitOfWork
from monitor_svc.records import DocumentLimits, JobState, JobView, NewJob, Progress
from stepflow_common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    StatusConflict,
    VersionConflict,
)
from stepflow_common.status import (
    EndReason,
    Kind,
    Status,
    Transition,
    check_status_for_kind,
    check_transition,
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


# -- units called by the API ---------------------------------------------------------------
def _view(tx: UnitOfWork, job: JobState) -> JobView:
    if job.kind is not Kind.MANAGER:
        return JobView(job)
    return JobView(job, tx.tallies_for_manager(job.id))


def _require(tx: UnitOfWork, job_id: str) -> JobState:
    job = tx.job(job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job


def create_job(tx: UnitOfWork, new: NewJob, timers: StepTimers, limits: DocumentLimits) -> JobView:
    if new.request_id:
        existing = tx.job_by_request_id(new.request_id)
        if existing is not None:
            if existing.kind is not new.kind or (existing.parent_id or "") != (new.parent_id or ""):
                raise AlreadyExists(
                    f"request_id {new.request_id} was used for another job ({existing.id})"
                )
            return _view(tx, existing)
    manager_id: str
    if new.kind is Kind.MANAGER:
        if new.parent_id:
            raise InvalidArgument("a manager job has no parent_id")
        job_id = uuid.uuid4().hex
        manager_id = job_id
    else:
        if not new.parent_id:
            raise InvalidArgument(f"a {new.kind} job needs parent_id")
        parent = _require(tx, new.parent_id)
        wanted = Kind.MANAGER if new.kind is Kind.STEP else Kind.STEP
        if parent.kind is not wanted:
            raise FailedPrecondition(
                f"the parent of a {new.kind} must be a {wanted}; {parent.id} is a {parent.kind}"
            )
        if parent.status.terminal:
            raise FailedPrecondition(f"parent {parent.id} is already {parent.status}")
        fencing.check_fence(tx, parent, new.owner, new.instance)
        job_id = uuid.uuid4().hex
        manager_id = parent.manager_id
        if new.kind is Kind.STEP:
            _check_room_for_step(tx, manager_id, limits)
    metadata = metadata_rules.merge_metadata(
        {}, new.metadata
    ).metadata  # same checks as UpdateJobMetadata
    _check_document_size(job_id, {}, metadata, limits)
    step_index = _step_index(new) if new.kind is Kind.STEP else None
    state = JobState(
        id=job_id,
        kind=new.kind,
        parent_id=new.parent_id or None,
        manager_id=manager_id,
        name=new.name,
        type=new.type,
        status=Status.PENDING,
        error="",
        end_reason="",
        metadata=metadata,
        version=1,
        change_seq=0,
        step_index=step_index,
        timeout_s=new.timeout_s,
        deadline=None if new.kind is Kind.STEP else deadline_after(tx.now, new.timeout_s),
        created_at=tx.now,
        started_at=None,
        finished_at=None,
        request_id=new.request_id or None,
        owner=new.owner,
        definition=new.definition if new.kind is Kind.MANAGER else None,
    )
    if new.kind is Kind.CHILD:
        assert new.parent_id is not None
        count_child_change(tx, new.parent_id, manager_id, None, Status.PENDING, timers)
    tx.insert(state)
    if new.kind is Kind.STEP:
        tx.put_progress(Progress(job_id, manager_id), new=True)
    return _view(tx, state)


def _step_index(new: NewJob) -> int | None:
    """A step's position from its metadata (``step_index``), when it is one."""
    value = new.metadata.get("step_index")
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    if not (value == int(value) and 0 <= value <= metadata_rules.MAX_STEP_INDEX):
        raise InvalidArgument(
            f"metadata.step_index must be a whole number from 0 to {metadata_rules.MAX_STEP_INDEX}"
        )
    return int(value)


def update_status(
    tx: UnitOfWork,
    job_id: str,
    status: Status,
    error: str,
    end_reason: str,
    timers: StepTimers,
    owner: str = "",
    instance: str = "",
) -> JobView | StatusConflict:
    """A client's status write. A job found past its deadline is timed out first (see
    ``_fire_if_overdue``); if that makes the write impossible, the timeout is kept and the
    conflict is *returned*, not raised, so the unit commits: the caller raises it after the
    commit. A write naming an ``owner`` is fenced (see ``leases``)."""
    fencing.check_end_reason(end_reason, owner)
    job = _require(tx, job_id)
    fencing.check_fence(tx, job, owner, instance)
    check_status_for_kind(job.kind, status)
    overdue = _fire_if_overdue(tx, job, timers)
    try:
        transition = check_transition(overdue.status, status, what=f"{job.kind} {job_id}")
    except StatusConflict as exc:
        if overdue is job:
            raise
        return exc  # the timeout is committed; the caller is told its write came too late
    job = overdue
    if transition is Transition.NOOP:
        if status is Status.RUNNING:
            job = fencing.rerun_step(tx, job)
        return _view(tx, job)
    reason = end_reason or (EndReason.CANCELLED if status is Status.CANCELLED else EndReason.API)
    job = set_status(tx, job, status, error, reason, timers)
    return _view(tx, job)


def update_metadata(
    tx: UnitOfWork,
    job_id: str,
    patch: dict[str, Any],
    expected_version: int | None,
    limits: DocumentLimits,
    owner: str = "",
    instance: str = "",
    request_id: str = "",
) -> JobView:
    """Merge ``patch`` into a job's metadata. A write keyed by ``request_id`` is applied at
    most once: its retry (the answer was lost) changes nothing and answers the job as it is,
    before any fence or version check, since those held when it was applied."""
    job = _require(tx, job_id)
    if request_id and tx.metadata_write(job_id, request_id) is not None:
        return _view(tx, job)
    fencing.check_fence(tx, job, owner, instance)
    if expected_version is not None and expected_version != job.version:
        raise VersionConflict.stale(job_id, expected_version, job.version)
    merged = metadata_rules.merge_metadata(job.metadata, patch)
    if merged.changed:
        _check_document_size(job_id, job.metadata, merged.metadata, limits)
        job = job.clone()  # hot path: cheaper than dataclasses.replace
        job.metadata, job.version = merged.metadata, job.version + 1
        tx.put(job)
    if request_id:
        tx.record_metadata_write(job_id, request_id, job.version)
    return _view(tx, job)


def update_step_stat(
    tx: UnitOfWork,
    manager_id: str,
    step_id: str,
    status: Status,
    owner: str = "",
    instance: str = "",
) -> StepStatResult:
    manager = _require(tx, manager_id)
    if manager.kind is not Kind.MANAGER:
        raise FailedPrecondition(f"job {manager_id} is a {manager.kind}, not a manager")
    fencing.check_fence(tx, manager, owner, instance)
    update = metadata_rules.set_step_stat_status(manager.metadata, step_id, status)
    if update.changed:
        manager = manager.clone()
        manager.metadata, manager.version = update.metadata, manager.version + 1
        tx.put(manager)
    # All the manager's step counts in one query per transaction, shared by its calls.
    tx.load_manager_progress(manager.id)
    progress = tx.progress(step_id)
    tally = progress.tally() if progress is not None else ChildTally()
    return StepStatResult(update.entry, tally, update.current_step_status_changed, manager.version)


# -- limits: what a client may make the monitor store ------------------------------------------
def _check_room_for_step(tx: UnitOfWork, manager_id: str, limits: DocumentLimits) -> None:
    """Each step gets a step_stats entry the monitor writes whatever the document's size, so
    the number of steps bounds how far the monitor's own writes can grow the document."""
    tx.load_manager_progress(manager_id)
    steps = len(tx.tallies_for_manager(manager_id))
    if steps >= limits.max_steps_per_manager:
        raise ResourceExhausted(
            f"manager {manager_id} has {steps} steps; the limit is "
            f"{limits.max_steps_per_manager} steps per manager"
        )


def _check_document_size(
    job_id: str, old: dict[str, Any], new: dict[str, Any], limits: DocumentLimits
) -> None:
    """Refuse a client's write that would make the document larger than the limit (a write
    that does not grow an over-limit document, e.g. a status, still passes). Only clients'
    writes are checked: the monitor's own entries (bounded by the step count) always land."""
    size = document_size.size_after(old, new)
    if size <= limits.max_metadata_bytes or size <= document_size.document_size(old):
        return
    raise ResourceExhausted(
        f"job {job_id}'s metadata would be {size} bytes; the limit is "
        f"{limits.max_metadata_bytes} bytes (remove or shrink keys first)"
    )


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
def _fire_if_overdue(tx: UnitOfWork, job: JobState, timers: StepTimers) -> JobState:
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
