"""Every way a job's life moves and ends, on the lifecycle rules directly: over the in-memory
unit of work (microseconds), and the same tests over the SQL unit of work on SQLite and
PostgreSQL, so the rules and the store's unit of work cannot drift apart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from monitor_svc.store.migrate import upgrade
from stepflow_common.errors import FailedPrecondition, StatusConflict
from stepflow_common.status import EndReason, Kind, Status
from stepflow_common.step_outcome import ChildTally
from tests.conftest import fresh_database
from tests.lifecycle_harness import TIMERS, Life, MemoryBackend, SqlBackend

pytestmark = pytest.mark.timeout(30)

BACKENDS = ["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def life(
    request: pytest.FixtureRequest, tmp_path: Path, postgres_template: str | None
) -> Iterator[Life]:
    if request.param == "memory":
        yield Life(MemoryBackend())
        return
    with fresh_database(request.param, tmp_path, postgres_template) as url:
        if request.param == "sqlite":
            upgrade(url)
        backend = SqlBackend(url)
        try:
            yield Life(backend)
        finally:
            backend.close()


def children(life: Life, step_id: str, *statuses: str) -> list[str]:
    """Children of a step, each sent through the stream up to the given status."""
    path = ["created", "running"]
    ids = []
    for n, status in enumerate(statuses):
        child_id = f"{step_id}-c{n}"
        steps = path[: path.index(status) + 1] if status in path else [*path, status]
        assert life.events(*[(step_id, child_id, kind) for kind in steps]) == []
        ids.append(child_id)
    return ids


# -- path 1 and 3: the API ends a step -----------------------------------------------------
def test_cancelling_a_step_cancels_its_live_children_and_reaches_the_manager(life: Life) -> None:
    manager, step = life.manager_with_step()
    done, running, pending = children(life, step.id, "completed", "running", "created")

    ended = life.status(step.id, Status.CANCELLED)

    assert (ended.status, ended.end_reason) == (Status.CANCELLED, EndReason.CANCELLED)
    assert life.job(done).status is Status.COMPLETED
    for child_id in (running, pending):
        child = life.job(child_id)
        assert (child.status, child.end_reason) == (Status.CANCELLED, EndReason.CANCELLED)
    assert life.tally(step.id) == ChildTally(completed=1, cancelled=2)
    entry = life.entry(manager.id, step.id)
    assert entry["status"] == "cancelled"
    assert entry["children"] == {
        "pending": 0,
        "running": 0,
        "completed": 1,
        "failed": 0,
        "cancelled": 2,
    }
    assert life.job(manager.id).metadata["current_step_status"] == "cancelled"
    assert life.job(manager.id).status is Status.PENDING  # a step's end never ends its job


def test_a_status_set_through_the_api_records_end_reason_api(life: Life) -> None:
    manager, step = life.manager_with_step()
    (child,) = children(life, step.id, "running")

    ended = life.status(step.id, Status.FAILED, "disk full")

    assert (ended.status, ended.error, ended.end_reason) == (Status.FAILED, "disk full", "api")
    assert life.job(child).status is Status.CANCELLED  # nothing stays live under an ended step
    assert life.entry(manager.id, step.id)["error"] == "disk full"
    with pytest.raises(StatusConflict):
        life.status(step.id, Status.COMPLETED)


def test_an_explicit_end_reason_is_kept(life: Life) -> None:
    _, step = life.manager_with_step()
    ended = life.status(step.id, Status.COMPLETED, end_reason=EndReason.ORCHESTRATOR)
    assert ended.end_reason == EndReason.ORCHESTRATOR


# -- path 2: deadlines ---------------------------------------------------------------------
def test_a_handed_off_step_fails_when_its_wait_deadline_passes(life: Life) -> None:
    manager, step = life.manager_with_step()
    assert life.seal(step.id, 2) == []
    (child,) = children(life, step.id, "running")
    assert life.job(step.id).status is Status.SPAWNED

    life.later(TIMERS.default_wait_timeout_s - 1)
    assert life.fire_due() == 0
    life.later(2)
    assert life.fire_due() == 1

    ended = life.job(step.id)
    assert (ended.status, ended.end_reason) == (Status.FAILED, EndReason.TIMEOUT)
    assert ended.error == "timed out waiting for child jobs"
    assert ended.deadline is None
    assert life.job(child).status is Status.CANCELLED
    assert life.entry(manager.id, step.id)["status"] == "failed"
    assert life.fire_due() == 0  # fired once


def test_a_step_timeout_runs_from_its_start(life: Life) -> None:
    _, step = life.manager_with_step(step_timeout_s=60)
    started = life.job(step.id)
    assert started.started_at is not None and started.deadline is not None
    assert (started.deadline - started.started_at).total_seconds() == 60

    life.later(61)
    assert life.fire_due() == 1
    assert life.job(step.id).end_reason == EndReason.TIMEOUT


def test_a_job_timeout_fails_the_job_and_cancels_everything_live_under_it(life: Life) -> None:
    manager, step = life.manager_with_step(timeout_s=120)
    done = life.create(Kind.STEP, manager.id, step_index=1)
    life.status(done.id, Status.COMPLETED)
    (child,) = children(life, step.id, "running")

    life.later(121)
    assert life.fire_due() == 1

    ended = life.job(manager.id)
    assert (ended.status, ended.error, ended.end_reason) == (
        Status.FAILED,
        "job timed out",
        EndReason.TIMEOUT,
    )
    assert life.job(step.id).status is Status.CANCELLED
    assert life.job(done.id).status is Status.COMPLETED
    assert life.job(child).status is Status.CANCELLED
    assert life.tally(step.id) == ChildTally(cancelled=1)


# -- path 1: a manager's end cascades --------------------------------------------------------
@pytest.mark.parametrize("status", [Status.CANCELLED, Status.FAILED])
def test_ending_a_manager_cancels_its_live_steps_and_their_children(
    life: Life, status: Status
) -> None:
    manager, step = life.manager_with_step()
    handed = life.create(Kind.STEP, manager.id, step_index=1)
    life.status(handed.id, Status.SPAWNED)
    (child,) = children(life, step.id, "created")
    (handed_child,) = children(life, handed.id, "running")

    life.status(manager.id, status)

    for job_id in (step.id, handed.id, child, handed_child):
        job = life.job(job_id)
        assert (job.status, job.end_reason) == (Status.CANCELLED, EndReason.CANCELLED), job_id
    stats = {e["step_id"]: e["status"] for e in life.job(manager.id).metadata["step_stats"]}
    assert stats == {step.id: "cancelled", handed.id: "cancelled"}


# -- path 4: a hand-off with no children -----------------------------------------------------
def test_a_seal_of_zero_children_completes_the_step_at_once(life: Life) -> None:
    manager, step = life.manager_with_step()

    assert life.seal(step.id, 0) == []

    ended = life.job(step.id)
    assert (ended.status, ended.end_reason) == (Status.COMPLETED, EndReason.NO_CHILDREN)
    entry = life.entry(manager.id, step.id)
    assert (entry["status"], entry["child_count"]) == ("completed", 0)


def test_a_hand_off_with_no_seal_and_no_child_completes_after_the_grace_period(
    life: Life,
) -> None:
    _, step = life.manager_with_step()
    life.status(step.id, Status.SPAWNED)

    life.later(TIMERS.grace_period_s - 1)
    assert life.fire_due() == 0
    life.later(2)
    assert life.fire_due() == 1

    ended = life.job(step.id)
    assert (ended.status, ended.end_reason) == (Status.COMPLETED, EndReason.GRACE_PERIOD)


def test_a_child_within_the_grace_period_keeps_the_hand_off_waiting(life: Life) -> None:
    _, step = life.manager_with_step()
    life.status(step.id, Status.SPAWNED)
    children(life, step.id, "running")

    life.later(TIMERS.grace_period_s + 1)
    assert life.fire_due() == 0
    assert life.job(step.id).status is Status.SPAWNED


# -- path 5: every child ended ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("outcomes", "status", "error"),
    [
        (["completed", "completed"], Status.COMPLETED, ""),
        (["completed", "failed"], Status.COMPLETED, ""),
        (["failed", "cancelled"], Status.FAILED, "1 of 2 child jobs failed"),
        (["cancelled", "cancelled"], Status.CANCELLED, "all 2 child jobs were cancelled"),
    ],
)
def test_a_sealed_step_ends_when_its_last_child_ends(
    life: Life, outcomes: list[str], status: Status, error: str
) -> None:
    manager, step = life.manager_with_step()
    assert life.seal(step.id, len(outcomes)) == []
    _, last = children(life, step.id, outcomes[0], "running")
    assert life.job(step.id).status is Status.SPAWNED

    assert life.events((step.id, last, outcomes[1])) == []

    ended = life.job(step.id)
    assert (ended.status, ended.error, ended.end_reason) == (
        status,
        error,
        EndReason.CHILDREN_TERMINAL,
    )
    entry = life.entry(manager.id, step.id)
    assert (entry["status"], entry["child_count"]) == (status.value, 2)
    assert sum(entry["children"].values()) == 2


def test_a_step_that_is_not_handed_off_is_not_ended_by_its_children(life: Life) -> None:
    _, step = life.manager_with_step()
    assert life.seal(step.id, 1, handed=False) == []
    children(life, step.id, "completed")
    assert life.job(step.id).status is Status.RUNNING  # the orchestrator ends it


def test_a_child_ended_through_the_api_ends_its_step(life: Life) -> None:
    _, step = life.manager_with_step()
    assert life.seal(step.id, 1) == []
    (child,) = children(life, step.id, "running")

    life.status(child, Status.FAILED, "bad input")

    assert life.job(step.id).status is Status.FAILED
    assert life.tally(step.id) == ChildTally(failed=1)


# -- the child-event stream ------------------------------------------------------------------
def test_a_replayed_or_late_event_changes_nothing(life: Life) -> None:
    manager, step = life.manager_with_step()
    (child,) = children(life, step.id, "completed")
    before = life.job(child)
    seq = life.job(manager.id).change_seq

    assert life.events((step.id, child, "created"), (step.id, child, "running")) == []

    after = life.job(child)
    assert (after.status, after.version) == (Status.COMPLETED, before.version)
    assert life.tally(step.id) == ChildTally(completed=1)
    assert life.job(manager.id).change_seq == seq


def test_a_child_change_moves_the_managers_change_seq_not_its_version(life: Life) -> None:
    manager, step = life.manager_with_step()
    before = life.job(manager.id)
    children(life, step.id, "running")
    after = life.job(manager.id)
    assert after.version == before.version
    assert after.change_seq > before.change_seq


def test_children_beyond_the_seal_are_refused_on_both_paths(life: Life) -> None:
    _, step = life.manager_with_step()
    assert life.seal(step.id, 1, handed=False) == []
    children(life, step.id, "running")

    assert life.events((step.id, "extra", "created")) == ["beyond the seal's child_count 1"]
    with pytest.raises(FailedPrecondition, match="sealed with 1 children"):
        life.create(Kind.CHILD, step.id)
    assert life.tally(step.id) == ChildTally(running=1)


def test_a_child_first_heard_of_after_its_step_ended_is_recorded_cancelled(life: Life) -> None:
    _, step = life.manager_with_step()
    life.status(step.id, Status.CANCELLED)

    assert life.events((step.id, "late", "running")) == []

    late = life.job("late")
    assert (late.status, late.error) == (Status.CANCELLED, "step already cancelled")
    assert life.tally(step.id) == ChildTally(cancelled=1)


def test_events_naming_no_step_or_a_foreign_child_are_rejected(life: Life) -> None:
    manager, step = life.manager_with_step()
    other = life.create(Kind.STEP, manager.id, step_index=1)
    (child,) = children(life, other.id, "running")

    assert life.events(
        ("nope", "c", "created"),
        (manager.id, "c", "created"),
        (step.id, child, "completed"),
    ) == [
        "unknown step 'nope'",
        f"job {manager.id} is a manager, not a step",
        f"job {child} is not a child of step {step.id}",
    ]
    assert life.seal(step.id, 1) == []
    assert life.seal(step.id, 2) == ["already sealed with child_count 1"]


def test_a_refused_unit_leaves_nothing_behind(life: Life) -> None:
    _, step = life.manager_with_step()
    assert life.seal(step.id, 0, handed=False) == []
    before = life.job(step.id)
    with pytest.raises(FailedPrecondition):
        life.create(Kind.CHILD, step.id)
    assert life.job(step.id) == before
    assert life.tally(step.id) == ChildTally()
