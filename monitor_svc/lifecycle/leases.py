"""Orchestrators come and go: leases, adoption, resumption, orphans and fencing, as plain
code against a ``UnitOfWork``.

An orchestrator holds a lease, renewed by its heartbeat. When the lease lapses (or is given
up) its unfinished managers are orphaned (``owner`` empty, an orphan deadline set); a live
orchestrator's heartbeat adopts them, oldest first. Adopting, or resuming one's own jobs after
a restart, is a *take over*: the runs its orchestrator was lost in are counted as
interruptions, and children that must not run twice end ``failed`` ``orchestrator_lost``.
An orphan nobody adopts in time fails ``orchestrator_lost``. A write naming an owner that is
no longer the manager's is refused (fenced), so a previous owner that wakes up cannot change
the job.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from monitor_svc.lifecycle import rules
from monitor_svc.lifecycle.uow import UnitOfWork
from monitor_svc.records import JobState, Lease
from stepflow_common.errors import FENCED_PREFIX, Fenced, InvalidArgument
from stepflow_common.limits import MAX_DURATION_S
from stepflow_common.status import CLIENT_END_REASONS, EndReason, Kind, Status

ORCHESTRATOR_LOST = EndReason.ORCHESTRATOR_LOST

MIN_LEASE_S = 1.0
MAX_ADOPT = 1000  # per heartbeat: one transaction stays short whatever the caller asks
MAX_OWNED_IDS = 10_000  # keeps the answer well inside a default client's message size
MAX_INTERRUPTIONS = 3  # a child interrupted this often fails instead of running again
LOST_WHILE_RUNNING = "its orchestrator was lost while it ran"


@dataclass(frozen=True, slots=True)
class HeartbeatResult:
    lease_expires_at: datetime
    owned_job_ids: list[str]
    adopted_job_ids: list[str]
    resumed_job_ids: list[str]


# -- the lease ---------------------------------------------------------------------------------
def heartbeat(
    tx: UnitOfWork,
    owner: str,
    instance: str,
    lease_s: float,
    max_adopt: int,
    timers: rules.StepTimers,
) -> HeartbeatResult:
    """Take or renew ``owner``'s lease; resume its jobs if this is a new instance (a restart);
    adopt up to ``max_adopt`` orphans; answer every unfinished manager it owns."""
    if not owner:
        raise InvalidArgument("owner is required")
    if not MIN_LEASE_S <= lease_s <= MAX_DURATION_S:
        raise InvalidArgument(
            f"lease must be between {MIN_LEASE_S:g}s and {MAX_DURATION_S:g}s, got {lease_s:g}s"
        )
    current = tx.lease(owner)
    if current is not None and current.expires_at <= tx.now:
        # Lapsed, and the timer has not got to it yet: the jobs stopped being this owner's
        # when it lapsed, whoever asks now.
        _expire(tx, owner, timers)
        current = None
    resumed: list[str] = []
    if current is not None and current.instance != instance:
        for manager in tx.live_managers(owner):
            take_over(tx, manager, owner, timers)
            resumed.append(manager.id)
    expires_at = tx.now + timedelta(seconds=lease_s)
    tx.put_lease(Lease(owner, instance, expires_at))
    adopted: list[str] = []
    if max_adopt > 0:
        for orphan in tx.orphans(min(max_adopt, MAX_ADOPT)):
            take_over(tx, orphan, owner, timers)
            adopted.append(orphan.id)
    owned = tx.live_manager_ids(owner, MAX_OWNED_IDS)
    return HeartbeatResult(expires_at, owned, adopted, resumed)


def release_lease(tx: UnitOfWork, owner: str, timers: rules.StepTimers) -> list[str]:
    """Give the lease up at once: the owner's unfinished managers are orphaned now (an unknown
    owner has nothing to release)."""
    if not owner:
        raise InvalidArgument("owner is required")
    return _expire(tx, owner, timers)


def _expire(tx: UnitOfWork, owner: str, timers: rules.StepTimers) -> list[str]:
    if tx.lease(owner) is not None:
        tx.delete_lease(owner)
    deadline = tx.now + timedelta(seconds=timers.orphan_timeout_s)
    orphaned = []
    for manager in tx.live_managers(owner):
        tx.put(replace(manager, owner="", orphan_deadline=deadline, version=manager.version + 1))
        orphaned.append(manager.id)
    return orphaned


# -- taking a job over -------------------------------------------------------------------------
def take_over(tx: UnitOfWork, manager: JobState, owner: str, timers: rules.StepTimers) -> None:
    """``owner`` continues ``manager``: each running step and each running child of a running
    or handed-off step was interrupted (a handed-off step's children still need an
    orchestrator to run them). A child whose step must not run twice (``on_interrupt =
    "fail"``), or interrupted for the third time, ends failed ``orchestrator_lost``; pending
    children never ran and are left alone."""
    tx.put(replace(manager, owner=owner, orphan_deadline=None, version=manager.version + 1))
    definition: dict[str, Any] | None = None
    for step in tx.children_of(manager.id, live_only=True):
        if step.status is Status.PENDING:
            continue  # never ran
        if step.status is Status.RUNNING:
            # A spawned step is not run again (the monitor ends it): only its children are.
            step = replace(step, interruptions=step.interruptions + 1, version=step.version + 1)
            tx.put(step)
        if definition is None:
            definition = tx.definition_of(manager.id) or {}
        fail_all = _on_interrupt(definition, step) == "fail"
        for child in tx.children_of(step.id, live_only=True):
            if child.status is not Status.RUNNING:
                continue
            interrupted = replace(
                child, interruptions=child.interruptions + 1, version=child.version + 1
            )
            tx.put(interrupted)
            if fail_all or interrupted.interruptions >= MAX_INTERRUPTIONS:
                rules.set_status(
                    tx, interrupted, Status.FAILED, LOST_WHILE_RUNNING, ORCHESTRATOR_LOST, timers
                )


def _on_interrupt(definition: dict[str, Any] | None, step: JobState) -> str:
    """The step's ``on_interrupt`` in the stored job definition (by its index, checked by its
    name; else by its name); "rerun" when unknown."""
    steps = (definition or {}).get("steps")
    if not isinstance(steps, list):
        return "rerun"
    entry: Any = None
    index = step.step_index
    if index is not None and 0 <= index < len(steps):
        candidate = steps[index]
        if isinstance(candidate, dict) and candidate.get("name") == step.name:
            entry = candidate
    if entry is None:
        entry = next((s for s in steps if isinstance(s, dict) and s.get("name") == step.name), {})
    value = entry.get("on_interrupt") if isinstance(entry, dict) else None
    return value if isinstance(value, str) else "rerun"


# -- the clock's work --------------------------------------------------------------------------
def fire_due(tx: UnitOfWork, timers: rules.StepTimers) -> int:
    """Expire lapsed leases (orphaning their managers), then fail orphans nobody adopted in
    time, with the usual cascade."""
    fired = 0
    for owner in tx.due_leases():
        lease = tx.lease(owner)
        if lease is not None and lease.expires_at <= tx.now:
            _expire(tx, owner, timers)
            fired += 1
    for manager_id in tx.due_orphans():
        manager = tx.job(manager_id)
        if (
            manager is None
            or manager.status.terminal
            or manager.owner
            or manager.orphan_deadline is None
            or manager.orphan_deadline > tx.now
        ):
            continue
        rules.set_status(
            tx,
            manager,
            Status.FAILED,
            f"no orchestrator took the job over within {_seconds(timers.orphan_timeout_s)}",
            ORCHESTRATOR_LOST,
            timers,
        )
        fired += 1
    return fired


def _seconds(value: float) -> str:
    return f"{value:g}s"


# -- fencing -----------------------------------------------------------------------------------
def fence_reason(manager: JobState | None, owner: str) -> str:
    """Why a write naming ``owner`` may not change a job of ``manager`` ("" if it may)."""
    if not owner or manager is None or manager.owner == owner:
        return ""
    if not manager.owner:
        return f"{FENCED_PREFIX}job {manager.id} is orphaned (owned by no orchestrator)"
    return f"{FENCED_PREFIX}job {manager.id} is owned by {manager.owner}"


def check_fence(tx: UnitOfWork, job: JobState, owner: str) -> None:
    """Refuse a write naming ``owner`` to a job whose manager another owner holds."""
    if not owner:
        return
    manager = job if job.kind is Kind.MANAGER else tx.job(job.manager_id)
    reason = fence_reason(manager, owner)
    if reason:
        raise Fenced(reason)


def event_fence_reason(manager: JobState | None, owner: str) -> str:
    """The stream's rejection of an event for a job adopted by another owner ("" if none)."""
    if not owner or manager is None or manager.owner == owner:
        return ""
    if not manager.owner:
        return f"{FENCED_PREFIX}job {manager.id} is orphaned"
    return f"{FENCED_PREFIX}job {manager.id} was adopted by {manager.owner}"


def check_end_reason(end_reason: str, owner: str) -> None:
    """A client records only the reasons it can know; only the owning orchestrator reports
    that an orchestrator was lost."""
    if end_reason and end_reason not in CLIENT_END_REASONS:
        raise InvalidArgument(
            f"end_reason {end_reason[:40]!r} cannot be set by a client; use one of "
            f"{', '.join(CLIENT_END_REASONS)} (or leave it empty for api)"
        )
    if end_reason == ORCHESTRATOR_LOST and not owner:
        raise InvalidArgument(
            f"end_reason {ORCHESTRATOR_LOST} is set by the job's orchestrator only (with owner)"
        )


# -- attempts ----------------------------------------------------------------------------------
def event_attempt(current: int, status: Status, attempt: int) -> int:
    """A child's attempt after an event: runs are counted from RUNNING (and from an outcome
    reported without it); ``attempt`` 0 means the first."""
    if status is Status.PENDING:
        return current
    if status is Status.CANCELLED:
        return max(current, attempt)
    return max(current, attempt or 1)


def rerun_step(tx: UnitOfWork, step: JobState) -> JobState:
    """A RUNNING status for a step already running: a new run after an interruption counts
    as an attempt (once per interruption, so a repeated call does not count again)."""
    if step.kind is not Kind.STEP or step.attempt >= 1 + step.interruptions:
        return step
    rerun = replace(step, attempt=step.attempt + 1, version=step.version + 1)
    tx.put(rerun)
    return rerun
