"""The lease and lifecycle calls the lease tests make, one unit of work each, on a ``Life``
(the in-memory, SQLite or PostgreSQL unit of work of ``lifecycle_harness``)."""

from __future__ import annotations

from typing import Any

from monitor_svc import lifecycle
from monitor_svc.lifecycle import StepTimers, leases
from monitor_svc.lifecycle.leases import HeartbeatResult
from monitor_svc.records import ChildEventIn, JobState, NewJob
from stepflow_common.status import Kind, Status
from tests.lifecycle_harness import Life

ORPHAN_TIMEOUT_S = 60.0
TIMERS = StepTimers(
    default_wait_timeout_s=600.0, grace_period_s=30.0, orphan_timeout_s=ORPHAN_TIMEOUT_S
)
LEASE_S = 10.0


def beat(
    life: Life, owner: str, instance: str = "i1", *, max_adopt: int = 0, lease_s: float = LEASE_S
) -> HeartbeatResult:
    return life.run(lambda tx: leases.heartbeat(tx, owner, instance, lease_s, max_adopt, TIMERS))


def release(life: Life, owner: str) -> list[str]:
    return life.run(lambda tx: leases.release_lease(tx, owner, TIMERS))


def fire(life: Life) -> int:
    return life.run(lambda tx: lifecycle.fire_due(tx, TIMERS))


def manager(life: Life, owner: str, definition: dict[str, Any] | None = None) -> JobState:
    life.later(0.001)  # distinct created_at: "oldest first" is by creation
    new = NewJob(Kind.MANAGER, None, "job", "", {}, None, None, owner, definition)
    return life.run(lambda tx: lifecycle.create_job(tx, new, TIMERS, life.limits)).job


def step(life: Life, manager_id: str, *, index: int = 0, owner: str = "") -> JobState:
    new = NewJob(
        Kind.STEP, manager_id, f"s{index}", "simulate", {"step_index": index}, None, None, owner
    )
    return life.run(lambda tx: lifecycle.create_job(tx, new, TIMERS, life.limits)).job


def status(
    life: Life, job_id: str, to: Status, *, owner: str = "", end_reason: str = ""
) -> JobState:
    result = life.run(
        lambda tx: lifecycle.update_status(tx, job_id, to, "", end_reason, TIMERS, owner)
    )
    assert not isinstance(result, Exception), result
    return result.job


def events(
    life: Life, step_id: str, *kinds: tuple[str, str] | tuple[str, str, int], owner: str = ""
) -> list[str]:
    """(child_id, kind[, attempt]) per event; the rejection reasons."""
    batch = []
    for n, event in enumerate(kinds):
        child_id, kind = event[0], event[1]
        attempt = event[2] if len(event) > 2 else 0
        batch.append(
            ChildEventIn(f"{step_id}-{n}", step_id, child_id, kind, "", 0, False, "", attempt)
        )
    return [r for _, r in life.run(lambda tx: lifecycle.apply_events(tx, batch, TIMERS, owner))]


def job_with_children(
    life: Life, owner: str, *, on_interrupt: str = "rerun"
) -> tuple[JobState, JobState, str, str, str]:
    """A manager of ``owner`` with a running step (children: running, pending, completed) and
    a pending second step."""
    definition = {
        "name": "job",
        "steps": [
            {"name": "s0", "type": "simulate", "on_interrupt": on_interrupt},
            {"name": "s1", "type": "simulate"},
        ],
    }
    m = manager(life, owner, definition)
    s0 = step(life, m.id, index=0)
    step(life, m.id, index=1)
    status(life, m.id, Status.RUNNING)
    status(life, s0.id, Status.RUNNING)
    run, wait, done = f"{s0.id}-run", f"{s0.id}-wait", f"{s0.id}-done"
    assert events(life, s0.id, (run, "created"), (run, "running"), (wait, "created")) == []
    assert events(life, s0.id, (done, "created"), (done, "running"), (done, "completed")) == []
    return m, s0, run, wait, done
