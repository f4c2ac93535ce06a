"""The monitor's own job-log lines agree with ``step_stats`` (SPEC §6): for every way a step
ends, its end is told exactly once, in the transaction that ended it, with the status and
end reason the manager's ``step_stats`` shows; a seal, a failed child, a cancel, an orphaning
and an adoption are told too. On each unit of work (memory, SQLite, PostgreSQL), and a unit
that is refused leaves no line."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from monitor_svc.log_lines import EVENT
from stepflow_common.errors import StepflowError
from stepflow_common.status import EndReason, Status
from tests.lease_calls import beat, fire, manager
from tests.lifecycle_harness import TIMERS, Life


def ends_of(life: Life, manager_id: str, step_id: str) -> list[str]:
    """The event lines of a step that tell a terminal status."""
    terminal = {s.value for s in Status if s.terminal}
    return [
        message
        for sid, source, message in life.log(manager_id)
        if sid == step_id and source == EVENT and message.split(" ")[2] in terminal
    ]


def told_as_step_stats(life: Life, manager_id: str, step_id: str) -> None:
    step = life.job(step_id)
    entry = life.entry(manager_id, step_id)
    assert entry["status"] == step.status.value
    expected = f"step {step.name} {step.status.value}"
    if step.end_reason:
        expected += f" ({step.end_reason})"
    if step.error:
        expected += f": {step.error}"
    assert ends_of(life, manager_id, step_id) == [expected]


def by_api(life: Life, step_id: str) -> None:
    life.status(step_id, Status.COMPLETED)


def failed_by_its_orchestrator(life: Life, step_id: str) -> None:
    life.status(step_id, Status.FAILED, "exit status 3", EndReason.ORCHESTRATOR)


def by_its_children(life: Life, step_id: str) -> None:
    assert life.seal(step_id, 2) == []
    life.events((step_id, "c1", "created"), (step_id, "c2", "created"))
    life.events((step_id, "c1", "completed"), (step_id, "c2", "failed", "boom"))


def sealed_with_no_children(life: Life, step_id: str) -> None:
    assert life.seal(step_id, 0) == []


def by_the_grace_period(life: Life, step_id: str) -> None:
    life.status(step_id, Status.SPAWNED)
    life.later(TIMERS.grace_period_s + 1)
    assert life.fire_due() == 1


def by_its_wait_deadline(life: Life, step_id: str) -> None:
    assert life.seal(step_id, 1) == []
    life.events((step_id, "c1", "created"))
    life.later(TIMERS.default_wait_timeout_s + 1)
    assert life.fire_due() == 1


def cancelled(life: Life, step_id: str) -> None:
    life.status(step_id, Status.CANCELLED, "stop it")


WAYS: dict[str, Callable[[Life, str], None]] = {
    "api": by_api,
    "orchestrator": failed_by_its_orchestrator,
    "children_terminal": by_its_children,
    "no_children": sealed_with_no_children,
    "grace_period": by_the_grace_period,
    "timeout": by_its_wait_deadline,
    "cancelled": cancelled,
}


@pytest.mark.parametrize("way", list(WAYS))
def test_every_way_a_step_ends_is_told_once_as_step_stats_has_it(life: Life, way: str) -> None:
    manager, step = life.manager_with_step()
    WAYS[way](life, step.id)
    assert life.job(step.id).end_reason == way
    told_as_step_stats(life, manager.id, step.id)
    # A late write changes nothing, and tells nothing.
    with pytest.raises(StepflowError):
        life.status(step.id, Status.RUNNING)
    told_as_step_stats(life, manager.id, step.id)


def test_a_seal_a_failed_child_and_the_managers_end_are_told_in_commit_order(life: Life) -> None:
    manager, step = life.manager_with_step()
    by_its_children(life, step.id)
    life.status(manager.id, Status.FAILED, "step failed")
    messages = [m for _, source, m in life.log(manager.id) if source == EVENT]
    name = step.name
    assert messages == [
        f"job {manager.name} created",
        f"step {name} running",
        f"step {name} sealed with 2 children; the monitor ends the step",
        f"step {name} spawned",
        "child c2 failed: boom",
        f"step {name} completed (children_terminal)",
        f"job {manager.name} failed (api): step failed",
    ]


def test_a_cancelled_manager_tells_its_own_cancel_and_each_steps_not_each_childs(
    life: Life,
) -> None:
    manager, step = life.manager_with_step()
    life.events(*[(step.id, f"c{k}", "created") for k in range(20)])
    life.status(manager.id, Status.CANCELLED, "no longer needed")
    events = [m for _, source, m in life.log(manager.id) if source == EVENT]
    assert f"job {manager.name} cancelled (cancelled): no longer needed" in events
    assert sum(m.startswith(f"step {step.name} cancelled") for m in events) == 1
    assert not [m for m in events if m.startswith("child ")]


def test_orphaning_and_adoption_are_told_from_which_owner_to_which(life: Life) -> None:
    beat(life, "a", lease_s=5.0)
    job = manager(life, "a")
    life.later(6)
    fire(life)
    beat(life, "b", "i2", max_adopt=5)
    assert life.job(job.id).owner == "b"
    events = [m for _, source, m in life.log(job.id) if source == EVENT]
    assert "orchestrator a lost: the job is orphaned until another adopts it" in events
    assert "job adopted by orchestrator b" in events


def test_a_refused_unit_leaves_no_line(life: Life) -> None:
    manager, step = life.manager_with_step()
    before = life.log(manager.id)
    with pytest.raises(StepflowError):
        life.status(step.id, Status.PENDING)  # backwards: refused
    assert life.log(manager.id) == before


def test_a_new_instance_under_the_same_owner_taking_the_job_is_told(life: Life) -> None:
    beat(life, "a", "i1")
    job = manager(life, "a")
    beat(life, "a", "i2")  # a restart: the new process resumes the job
    events = [m for _, source, m in life.log(job.id) if source == EVENT]
    assert "job taken over by instance i2 of orchestrator a from instance i1" in events
