"""The units the API calls: create a job, move its status, merge its metadata, set a step's
entry; each checks the request against the record and the limits, then goes through the one
place a status changes (``rules.set_status``)."""

from __future__ import annotations

import uuid
from typing import Any

from monitor_svc import document_size, metadata_rules
from monitor_svc.lifecycle import fencing
from monitor_svc.lifecycle.rules import (
    StepStatResult,
    StepTimers,
    count_child_change,
    deadline_after,
    fire_if_overdue,
    set_status,
)
from monitor_svc.lifecycle.uow import UnitOfWork
from monitor_svc.records import DocumentLimits, JobState, JobView, NewJob, Progress
from stepflow_common import manager_document as doc
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
from stepflow_common.step_outcome import ChildTally


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
    value = new.metadata.get(doc.STEP_INDEX)
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
    ``fire_if_overdue``); if that makes the write impossible, the timeout is kept and the
    conflict is *returned*, not raised, so the unit commits: the caller raises it after the
    commit. A write naming an ``owner`` is fenced (see ``leases``)."""
    fencing.check_end_reason(end_reason, owner)
    job = _require(tx, job_id)
    fencing.check_fence(tx, job, owner, instance)
    check_status_for_kind(job.kind, status)
    overdue = fire_if_overdue(tx, job, timers)
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
