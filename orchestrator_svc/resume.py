"""Continuing a job another run of an orchestrator started: what each step does next.

A job is resumed when its orchestrator restarts under the same owner, or adopted when its
owner's lease lapsed (or was released). Either way the monitor has already taken the job over
for the caller (its live children interrupted, those that may not run again ended), and what
is recorded decides the rest: ended steps stand, handed-off steps stay with the monitor, a
step that was running continues (child by child, or run again as a new attempt), and steps
not yet started run as usual. ``plan_step`` is that rule, pure; ``load`` reads the records.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from orchestrator_svc.definitions import JobSpec, OnInterrupt, StepSpec, from_mapping
from orchestrator_svc.monitor_client import MonitorClient
from orchestrator_svc.records import Job
from orchestrator_svc.workers.base import NO_CHILDREN, ExistingChild, Worker
from stepflow_common import manager_document as doc
from stepflow_common.errors import FailedPrecondition
from stepflow_common.status import Kind, Status
from stepflow_common.takeover import MAX_INTERRUPTIONS


class Plan(enum.Enum):
    STANDS = "stands"  # ended: its outcome stands (on_error, tolerance, the job's end)
    WATCH = "watch"  # handed off and sealed: the monitor ends it; its end is watched
    CONTINUE = "continue"  # a spawning step: its worker runs again over its existing children
    RERUN = "rerun"  # a step without children: run again as its next attempt
    LOST = "lost"  # a step without children that may not run again: fails orchestrator_lost
    START = "start"  # never started: runs as usual


@dataclass(frozen=True, slots=True)
class StepRecord:
    """What the monitor holds of one step when its job is continued."""

    status: Status
    error: str = ""
    attempt: int = 0
    interruptions: int = 0
    sealed: bool = False
    """Its seal is recorded (a live step's step_stats child_count is set only by one)."""
    failed_children: int = 0
    children: Mapping[str, ExistingChild] = field(default_factory=lambda: NO_CHILDREN)


def plan_step(spec: StepSpec, record: StepRecord, *, spawns_children: bool) -> Plan:
    if record.status.terminal:
        return Plan.STANDS
    if record.status is Status.PENDING:
        return Plan.START
    if spawns_children:
        # Children never run twice at once and are counted once whatever happens, so the
        # worker may always go on; the monitor has already failed the live children that may
        # not run again (on_interrupt = "fail", or interrupted too often). A handed-off step
        # is the monitor's to end, but its live children still need an orchestrator to run.
        live = any(not child.ended for child in record.children.values())
        if not spec.wait and record.sealed and not live:
            return Plan.WATCH
        return Plan.CONTINUE
    if spec.on_interrupt is OnInterrupt.FAIL or record.interruptions >= MAX_INTERRUPTIONS:
        return Plan.LOST
    return Plan.RERUN


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A job to continue: its manager, definition and steps (in definition order)."""

    manager: Job
    spec: JobSpec
    steps: list[Job]
    records: list[StepRecord]

    @property
    def ended(self) -> bool:
        return self.manager.status.terminal


def child_status(job: Job) -> str:
    return job.status.value


async def load(
    monitor: MonitorClient, manager_id: str, workers: Mapping[str, Worker], *, owner: str
) -> JobRecord:
    """Read a job to continue. Steps the submitter did not get to create are created now (by
    the same request ids, so nothing is created twice)."""
    manager = await monitor.get_job(manager_id, include_definition=True)
    if not manager.definition:
        raise FailedPrecondition(
            f"job {manager_id} has no stored definition; it cannot be continued"
        )
    spec = from_mapping(manager.definition, workers=workers)
    if manager.status.terminal:
        return JobRecord(manager, spec, [], [])
    steps = [
        await monitor.create_job(
            kind=Kind.STEP,
            parent_id=manager.id,
            name=step.name,
            type_=step.type,
            metadata={doc.STEP_INDEX: index},
            timeout_s=step.timeout_s,
            request_id=step_request_id(manager.id, index),
            owner=owner,
        )
        for index, step in enumerate(spec.steps)
    ]
    stats = {stat.step_id: stat for stat in manager.step_stats}
    records: list[StepRecord] = []
    for step_spec, row in zip(spec.steps, steps, strict=True):
        stat = stats.get(row.id)
        status = row.status
        children: Mapping[str, ExistingChild] = NO_CHILDREN
        if status in (Status.RUNNING, Status.SPAWNED) and workers[step_spec.type].spawns_children:
            children = {
                child.id: ExistingChild(child_status(child), child.attempt, child.interruptions)
                for child in await monitor.list_jobs(parent_id=row.id)
            }
        records.append(
            StepRecord(
                status=status,
                error=row.error,
                attempt=row.attempt,
                interruptions=row.interruptions,
                sealed=stat is not None and stat.child_count > 0,
                failed_children=stat.children.failed if stat is not None else 0,
                children=children,
            )
        )
    return JobRecord(manager, spec, steps, records)


def step_request_id(manager_id: str, index: int) -> str:
    """The idempotency key of a job's ``index``-th step: whoever creates it, it is one step."""
    return f"{manager_id}.step.{index}"
