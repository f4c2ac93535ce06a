"""Who may still write to a job: the fence of every write an orchestrator makes, and the
attempt arithmetic of a child's runs. A leaf: the lease rules and the job rules both use it.

An orchestrator writes under its ``owner`` name and its ``instance`` (one process). A write is
refused (fenced) when the job's manager has another owner (adopted, or orphaned), and — when
the write names its instance — when that instance is not the one holding the owner's lease:
a newer process under the same owner superseded it.
"""

from __future__ import annotations

from dataclasses import replace

from monitor_svc.lifecycle.uow import UnitOfWork
from monitor_svc.records import JobState
from stepflow_common.errors import FENCED_PREFIX, Fenced, InvalidArgument
from stepflow_common.status import CLIENT_END_REASONS, EndReason, Kind, Status


def superseded_reason(owner: str, instance: str, current: str) -> str:
    return (
        f"{FENCED_PREFIX}instance {instance} of orchestrator {owner} was superseded by a newer "
        f"instance ({current or 'none'}) under the same owner"
    )


def _instance_reason(tx: UnitOfWork, owner: str, instance: str) -> str:
    if not instance:
        return ""
    lease = tx.lease(owner)
    if lease is None or lease.instance == instance:
        return ""  # no lease left: the owner check decides (its jobs were orphaned)
    return superseded_reason(owner, instance, lease.instance)


def fence_reason(
    tx: UnitOfWork,
    manager: JobState | None,
    owner: str,
    instance: str = "",
    *,
    event: bool = False,
) -> str:
    """Why a write (or, with ``event``, a stream event) naming ``owner`` and ``instance`` may
    not change a job of ``manager`` ("" if it may)."""
    if not owner or manager is None:
        return ""
    if manager.owner != owner:
        if not manager.owner:
            orphaned = "is orphaned" if event else "is orphaned (owned by no orchestrator)"
            return f"{FENCED_PREFIX}job {manager.id} {orphaned}"
        held = "was adopted by" if event else "is owned by"
        return f"{FENCED_PREFIX}job {manager.id} {held} {manager.owner}"
    return _instance_reason(tx, owner, instance)


def check_fence(tx: UnitOfWork, job: JobState, owner: str, instance: str = "") -> None:
    """Refuse a write naming ``owner`` to a job whose manager another owner (or another
    instance of the same owner) holds."""
    if not owner:
        return
    manager = job if job.kind is Kind.MANAGER else tx.job(job.manager_id)
    reason = fence_reason(tx, manager, owner, instance)
    if reason:
        raise Fenced(reason)


def event_fence_reason(
    tx: UnitOfWork, manager: JobState | None, owner: str, instance: str = ""
) -> str:
    """The stream's rejection of an event for a job adopted by another owner, or sent by a
    superseded instance ("" if none)."""
    return fence_reason(tx, manager, owner, instance, event=True)


def check_end_reason(end_reason: str, owner: str) -> None:
    """A client records only the reasons it can know; only the owning orchestrator reports
    that an orchestrator was lost."""
    if end_reason and end_reason not in CLIENT_END_REASONS:
        raise InvalidArgument(
            f"end_reason {end_reason[:40]!r} cannot be set by a client; use one of "
            f"{', '.join(CLIENT_END_REASONS)} (or leave it empty for api)"
        )
    if end_reason == EndReason.ORCHESTRATOR_LOST and not owner:
        raise InvalidArgument(
            f"end_reason {EndReason.ORCHESTRATOR_LOST} is set by the job's orchestrator only "
            "(with owner)"
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
