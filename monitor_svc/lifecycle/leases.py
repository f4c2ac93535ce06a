"""Orchestrators come and go: leases, instances, adoption, resumption, give-backs and orphans,
as plain code against a ``UnitOfWork``.

An orchestrator holds a lease under its owner name, renewed by its heartbeat, and held by one
*instance* (process). A new instance under a known owner is a restart: it supersedes the older
instance for good (the older one's heartbeats are fenced from then on, and through
``fencing`` its writes and events) and takes over the owner's unfinished managers at once.
When a lease lapses (or is given up) its unfinished managers are orphaned (``owner`` empty, an
orphan deadline set); a live orchestrator's heartbeat adopts those it can run (it says which
worker types it has), oldest first. Taking a job over counts the runs its orchestrator was
lost in as interruptions; children that must not run twice end ``failed``
``orchestrator_lost``. An orphan fails ``orchestrator_lost`` only when it is overdue and no
live orchestrator could run it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import structlog

from monitor_svc.lifecycle import fencing, rules
from monitor_svc.lifecycle.uow import UnitOfWork
from monitor_svc.log_lines import resumed_line
from monitor_svc.records import InstanceRecord, JobState, Lease
from stepflow_common.errors import Fenced, InvalidArgument
from stepflow_common.job_keys import RUNNERS_TYPE
from stepflow_common.limits import MAX_DURATION_S
from stepflow_common.status import EndReason, Status
from stepflow_common.takeover import LOST_WHILE_RUNNING, MAX_INTERRUPTIONS, MAX_OWNED_IDS

ORCHESTRATOR_LOST = EndReason.ORCHESTRATOR_LOST

MIN_LEASE_S = 1.0
MAX_ADOPT = 1000  # per heartbeat: one transaction stays short whatever the caller asks
MAX_RUNNING_IDS = 200_000  # running_job_ids a heartbeat may name (about 7 MiB)
ADOPT_CANDIDATES = 64  # orphans looked at per adoption slot, for those the caller can run

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class HeartbeatResult:
    lease_expires_at: datetime
    owned_job_ids: list[str]
    adopted_job_ids: list[str]
    resumed_job_ids: list[str]
    fenced_job_ids: list[str] = field(default_factory=list)
    superseded_lease_remaining_s: float = 0.0
    superseded_instance: str = ""


# -- the lease ---------------------------------------------------------------------------------
def heartbeat(
    tx: UnitOfWork,
    owner: str,
    instance: str,
    lease_s: float,
    max_adopt: int,
    timers: rules.StepTimers,
    worker_types: Sequence[str] = (),
    running_job_ids: Sequence[str] = (),
) -> HeartbeatResult:
    """Take or renew ``owner``'s lease for ``instance``; if the instance is new, supersede the
    owner's older instance and resume its jobs; adopt up to ``max_adopt`` orphans it can run;
    answer the unfinished managers it owns and which of ``running_job_ids`` it does not."""
    if not owner:
        raise InvalidArgument("owner is required")
    if not MIN_LEASE_S <= lease_s <= MAX_DURATION_S:
        raise InvalidArgument(
            f"lease must be between {MIN_LEASE_S:g}s and {MAX_DURATION_S:g}s, got {lease_s:g}s"
        )
    if len(running_job_ids) > MAX_RUNNING_IDS:
        raise InvalidArgument(f"running_job_ids: at most {MAX_RUNNING_IDS:,} ids")
    types = tuple(sorted(set(worker_types)))
    current = tx.lease(owner)
    known = tx.instance_record(owner, instance) if instance else None
    if known is not None and known.superseded_by:
        # An older process of this owner (it was frozen, or cut off, while a newer one took
        # over): it must stop all its work and never take a job back.
        raise Fenced(fencing.superseded_reason(owner, instance, known.superseded_by))
    # -- nothing is refused from here on: the instance rows are written at once.
    if instance and known is None:
        tx.add_instance(InstanceRecord(instance, owner))
        tx.supersede_instances(owner, instance)
    if current is not None and current.expires_at <= tx.now:
        # Lapsed, and the timer has not got to it yet: the jobs stopped being this owner's
        # when it lapsed, whoever asks now.
        _expire(tx, owner, timers)
        current = None
    resumed: list[str] = []
    remaining_s = 0.0
    lease = Lease(owner, instance, tx.now + timedelta(seconds=lease_s), types)
    if current is not None and current.instance != instance:
        remaining_s = max(0.0, (current.expires_at - tx.now).total_seconds())
        for manager in tx.live_managers(owner):
            if lease.can_run(_step_types(tx, manager)):
                take_over(tx, manager, owner, timers)
                tx.log(resumed_line(manager, owner, current.instance, instance))
                resumed.append(manager.id)
            else:
                _orphan(tx, manager, timers)
                log.warning(
                    "job given back: the new instance lacks its worker types",
                    manager_id=manager.id,
                    owner=owner,
                    worker_types=list(types),
                )
    tx.put_lease(lease)
    adopted: list[str] = []
    if max_adopt > 0:
        wanted = min(max_adopt, MAX_ADOPT)
        for orphan in tx.orphans(min(wanted * ADOPT_CANDIDATES, MAX_ADOPT)):
            if len(adopted) >= wanted:
                break
            if lease.can_run(_step_types(tx, orphan)):
                take_over(tx, orphan, owner, timers)
                adopted.append(orphan.id)
    owned = tx.live_manager_ids(owner, MAX_OWNED_IDS)
    fenced: list[str] = []
    if running_job_ids:
        mine = (
            set(owned) if len(owned) < MAX_OWNED_IDS else _owned_among(tx, owner, running_job_ids)
        )
        fenced = [job_id for job_id in running_job_ids if job_id not in mine]
    return HeartbeatResult(
        lease.expires_at,
        owned,
        adopted,
        resumed,
        fenced,
        remaining_s,
        current.instance if current is not None and current.instance != instance else "",
    )


def _owned_among(tx: UnitOfWork, owner: str, job_ids: Iterable[str]) -> set[str]:
    """Those of ``job_ids`` that are unfinished managers of ``owner`` (when the owned list
    was cut at its cap)."""
    found = set()
    for job_id in job_ids:
        job = tx.cached_job(job_id) or tx.job(job_id)
        if job is not None and job.owner == owner and not job.status.terminal:
            found.add(job_id)
    return found


def release_lease(
    tx: UnitOfWork,
    owner: str,
    timers: rules.StepTimers,
    instance: str = "",
    job_ids: Sequence[str] = (),
    reason: str = "",
) -> list[str]:
    """Give the lease up at once: the owner's unfinished managers are orphaned now (an unknown
    owner has nothing to release). With ``job_ids``, only those managers are given back (the
    holder cannot run them). A superseded instance releases nothing."""
    if not owner:
        raise InvalidArgument("owner is required")
    current = tx.lease(owner)
    if instance and current is not None and current.instance != instance:
        raise Fenced(fencing.superseded_reason(owner, instance, current.instance))
    if not job_ids:
        return _expire(tx, owner, timers)
    orphaned = []
    for job_id in job_ids:
        manager = tx.job(job_id)
        if manager is None or manager.owner != owner or manager.status.terminal:
            continue
        _orphan(tx, manager, timers)
        orphaned.append(job_id)
        log.warning("job given back", manager_id=job_id, owner=owner, reason=reason)
    return orphaned


def _expire(tx: UnitOfWork, owner: str, timers: rules.StepTimers) -> list[str]:
    if tx.lease(owner) is not None:
        tx.delete_lease(owner)
    orphaned = []
    for manager in tx.live_managers(owner):
        _orphan(tx, manager, timers)
        orphaned.append(manager.id)
    return orphaned


def _orphan(tx: UnitOfWork, manager: JobState, timers: rules.StepTimers) -> None:
    deadline = tx.now + timedelta(seconds=timers.orphan_timeout_s)
    tx.put(replace(manager, owner="", orphan_deadline=deadline, version=manager.version + 1))


def _step_types(tx: UnitOfWork, manager: JobState) -> frozenset[str] | None:
    """The worker types a manager's steps need, from its stored definition (None: none)."""
    definition = tx.definition_of(manager.id)
    steps = (definition or {}).get("steps")
    if not isinstance(steps, list):
        return None
    types = [t for s in steps if isinstance(s, dict) and isinstance(t := s.get("type"), str) and t]
    if len(types) != len(steps):
        return None
    if any(isinstance(s, dict) and s.get("executor") == "celery" for s in steps):
        types.append(RUNNERS_TYPE)  # only an orchestrator with a broker can run it
    return frozenset(types)


# -- taking a job over -------------------------------------------------------------------------
def take_over(tx: UnitOfWork, manager: JobState, owner: str, timers: rules.StepTimers) -> None:
    """``owner`` continues ``manager``: each running step and each running child of a running
    or handed-off step was interrupted (a handed-off step's children still need an
    orchestrator to run them); a child a runner runs is not (its runner goes on). A child
    whose step must not run twice (``on_interrupt = "fail"``), or interrupted for the third
    time, ends failed ``orchestrator_lost``; pending
    children never ran and are left alone. The steps and live children follow the manager to
    its new owner."""
    tx.put(replace(manager, owner=owner, orphan_deadline=None, version=manager.version + 1))
    definition: dict[str, Any] | None = None
    for step in tx.children_of(manager.id, live_only=True):
        if step.status is Status.PENDING:
            if step.owner != owner:
                tx.put(replace(step, owner=owner, version=step.version + 1))
            continue  # never ran
        if step.status is Status.RUNNING:
            # A spawned step is not run again (the monitor ends it): only its children are.
            step = replace(
                step, owner=owner, interruptions=step.interruptions + 1, version=step.version + 1
            )
            tx.put(step)
        elif step.owner != owner:
            step = replace(step, owner=owner, version=step.version + 1)
            tx.put(step)
        if definition is None:
            definition = tx.definition_of(manager.id) or {}
        fail_all = _on_interrupt(definition, step) == "fail"
        for child in tx.children_of(step.id, live_only=True):
            if child.status is not Status.RUNNING or child.runner:
                # Pending, or run by a runner (executor celery): the runner goes on with it,
                # whoever owns the job, and the broker gives it to another if it is lost.
                if child.owner != owner:
                    tx.put(replace(child, owner=owner, version=child.version + 1))
                continue
            interrupted = replace(
                child,
                owner=owner,
                interruptions=child.interruptions + 1,
                version=child.version + 1,
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
    """Expire lapsed leases (orphaning their managers), then fail the orphans nobody adopted
    in time and no live orchestrator could run, with the usual cascade. An overdue orphan that
    a live orchestrator could run (it is busy) waits another orphan timeout."""
    fired = 0
    for owner in tx.due_leases():
        lease = tx.lease(owner)
        if lease is not None and lease.expires_at <= tx.now:
            _expire(tx, owner, timers)
            fired += 1
    live: list[Lease] | None = None
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
        if live is None:
            live = tx.live_leases()
        types = _step_types(tx, manager)
        if types is not None and any(lease.can_run(types) for lease in live):
            _orphan(tx, manager, timers)  # someone can run it: wait for its room
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
