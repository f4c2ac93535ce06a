"""Every way a job's life moves and ends, on the lifecycle rules directly: over the in-memory
unit of work (microseconds), and the same tests over the SQL unit of work on SQLite and
PostgreSQL, so the rules and the store's unit of work cannot drift apart."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest

from monitor_svc import lifecycle
from monitor_svc.records import DocumentLimits, JobState
from stepflow_common.errors import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    StatusConflict,
    VersionConflict,
)
from stepflow_common.status import EndReason, Kind, Status
from stepflow_common.step_outcome import ChildTally
from tests.lifecycle_harness import TIMERS, Life

pytestmark = pytest.mark.timeout(30)


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


def test_a_step_ended_completed_cancels_its_live_children(life: Life) -> None:
    manager, step = life.manager_with_step()
    done, running, pending = children(life, step.id, "completed", "running", "created")

    ended = life.status(step.id, Status.COMPLETED)

    assert (ended.status, ended.end_reason) == (Status.COMPLETED, EndReason.API)
    assert life.job(done).status is Status.COMPLETED
    for child_id in (running, pending):
        child = life.job(child_id)
        assert (child.status, child.end_reason) == (Status.CANCELLED, EndReason.CANCELLED)
    assert life.tally(step.id) == ChildTally(completed=1, cancelled=2)
    assert life.entry(manager.id, step.id)["status"] == "completed"


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


def test_a_step_handed_off_straight_from_pending_keeps_its_own_timeout(life: Life) -> None:
    manager = life.create(Kind.MANAGER)
    step = life.create(Kind.STEP, manager.id, timeout_s=60, step_index=0)
    assert life.job(step.id).deadline is None  # not started: no clock yet

    assert life.seal(step.id, 1) == []  # pending -> spawned by the hand-off

    spawned = life.job(step.id)
    assert spawned.status is Status.SPAWNED
    assert spawned.started_at == life.backend.now
    assert spawned.deadline is not None
    assert (spawned.deadline - spawned.started_at).total_seconds() == 60  # not the wait timeout
    life.later(61)
    assert life.fire_due() == 1
    assert life.job(step.id).end_reason == EndReason.TIMEOUT


def test_a_status_write_past_the_deadline_finds_the_job_timed_out(life: Life) -> None:
    _, step = life.manager_with_step(step_timeout_s=60)
    life.later(61)  # the timer has not fired yet

    with pytest.raises(StatusConflict) as refused:
        life.status(step.id, Status.COMPLETED)

    assert (refused.value.current, refused.value.requested) == ("failed", "completed")
    ended = life.job(step.id)  # the timeout was committed, though the write was refused
    assert (ended.status, ended.end_reason) == (Status.FAILED, EndReason.TIMEOUT)
    assert ended.error == "timed out waiting for child jobs"
    assert life.fire_due() == 0


def test_a_write_the_timeout_makes_a_no_op_answers_the_timed_out_job(life: Life) -> None:
    manager = life.create(Kind.MANAGER, timeout_s=30)
    life.later(31)

    answered = life.status(manager.id, Status.FAILED, "gave up")

    assert (answered.status, answered.end_reason) == (Status.FAILED, EndReason.TIMEOUT)
    assert answered.error == "job timed out"
    assert life.job(manager.id) == answered


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
@pytest.mark.parametrize("status", [Status.COMPLETED, Status.CANCELLED, Status.FAILED])
def test_ending_a_manager_ends_everything_live_under_it(life: Life, status: Status) -> None:
    manager, step = life.manager_with_step()
    handed = life.create(Kind.STEP, manager.id, step_index=1)
    life.status(handed.id, Status.SPAWNED)
    never_started = life.create(Kind.STEP, manager.id, step_index=2)
    (child,) = children(life, step.id, "created")
    (handed_child,) = children(life, handed.id, "running")

    life.status(manager.id, status)

    for job_id in (step.id, handed.id, child, handed_child):
        job = life.job(job_id)
        assert (job.status, job.end_reason) == (Status.CANCELLED, EndReason.CANCELLED), job_id
    skipped = life.job(never_started.id)
    assert (skipped.status, skipped.end_reason) == (Status.SKIPPED, EndReason.CANCELLED)
    assert skipped.started_at is None
    stats = {e["step_id"]: e["status"] for e in life.job(manager.id).metadata["step_stats"]}
    assert stats == {step.id: "cancelled", handed.id: "cancelled", never_started.id: "skipped"}


def test_ending_a_manager_cancels_children_left_live_under_an_ended_step(life: Life) -> None:
    """Rows stored before steps took their children with them: an ended step with a live
    child. The manager's end still leaves nothing live."""
    manager, step = life.manager_with_step()
    (child,) = children(life, step.id, "running")
    ended = life.job(step.id)
    life.run(lambda tx: tx.put(replace(ended, status=Status.COMPLETED, finished_at=tx.now)))
    assert life.job(child).status is Status.RUNNING

    life.status(manager.id, Status.CANCELLED)

    left = life.job(child)
    assert (left.status, left.end_reason) == (Status.CANCELLED, EndReason.CANCELLED)
    assert life.job(step.id).status is Status.COMPLETED
    assert life.tally(step.id) == ChildTally(cancelled=1)


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


def test_a_seal_that_starts_the_wait_raises_the_steps_version(life: Life) -> None:
    _, step = life.manager_with_step()
    before = life.job(step.id)
    assert before.deadline is None

    assert life.seal(step.id, 2, handed=False) == []

    after = life.job(step.id)
    assert after.deadline == life.backend.now + timedelta(seconds=TIMERS.default_wait_timeout_s)
    assert after.version == before.version + 1
    assert after.change_seq > before.change_seq


def test_a_hand_off_ending_after_a_client_marked_its_entry_moves_the_managers_change_seq(
    life: Life,
) -> None:
    manager, step = life.manager_with_step()
    life.status(step.id, Status.SPAWNED)  # no seal, no child: ends by the grace period
    life.run(lambda tx: lifecycle.update_step_stat(tx, manager.id, step.id, Status.COMPLETED))
    marked = life.job(manager.id)
    assert life.entry(manager.id, step.id)["status"] == "completed"

    life.later(TIMERS.grace_period_s + 1)
    assert life.fire_due() == 1

    assert life.job(step.id).end_reason == EndReason.GRACE_PERIOD
    after = life.job(manager.id)
    assert after.metadata == marked.metadata  # the entry had nothing new to say
    assert after.version == marked.version
    assert after.change_seq > marked.change_seq  # but its watchers must wake


# -- limits ----------------------------------------------------------------------------------
def test_metadata_over_the_size_limit_is_refused_and_nothing_is_written(life: Life) -> None:
    life.limits = DocumentLimits(max_metadata_bytes=200)
    manager = life.create(Kind.MANAGER, note="small")
    before = life.job(manager.id)

    with pytest.raises(ResourceExhausted, match="the limit is 200 bytes"):
        life.update(manager.id, metadata={"blob": "x" * 300})
    assert life.job(manager.id) == before

    with pytest.raises(ResourceExhausted, match="the limit is 200 bytes"):
        life.create(Kind.STEP, manager.id, step_index=0, blob="x" * 300)
    assert life.run(lambda tx: tx.children_of(manager.id, live_only=False)) == []

    life.update(manager.id, metadata={"blob": "x" * 100})  # within the limit: stored
    assert life.job(manager.id).metadata["blob"] == "x" * 100


def test_a_write_that_does_not_grow_an_over_limit_document_passes(life: Life) -> None:
    manager = life.create(Kind.MANAGER, blob="x" * 300)
    life.limits = DocumentLimits(max_metadata_bytes=200)  # lowered after it was stored

    shrunk = life.update(manager.id, metadata={"blob": "x" * 250})
    assert shrunk.metadata["blob"] == "x" * 250
    with pytest.raises(ResourceExhausted):
        life.update(manager.id, metadata={"more": 1})


def test_a_step_beyond_the_managers_step_limit_is_refused(life: Life) -> None:
    life.limits = DocumentLimits(max_steps_per_manager=2)
    manager = life.create(Kind.MANAGER)
    first = life.create(Kind.STEP, manager.id, step_index=0)
    second = life.create(Kind.STEP, manager.id, step_index=1)

    with pytest.raises(ResourceExhausted, match="has 2 steps; the limit is 2"):
        life.create(Kind.STEP, manager.id, step_index=2)

    steps = life.run(lambda tx: tx.children_of(manager.id, live_only=False))
    assert {s.id for s in steps} == {first.id, second.id}
    assert life.create(Kind.CHILD, first.id).kind is Kind.CHILD  # children are not steps


@pytest.mark.parametrize("index", [-1, 1.5, 2**31])
def test_a_step_index_out_of_range_is_refused(life: Life, index: float) -> None:
    manager = life.create(Kind.MANAGER)
    with pytest.raises(InvalidArgument, match="step_index must be a whole number"):
        life.create(Kind.STEP, manager.id, step_index=index)


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


def _keyed(
    life: Life, job_id: str, patch: dict[str, Any], key: str, expected: int | None = None
) -> JobState:
    return life.run(
        lambda tx: lifecycle.update_metadata(
            tx, job_id, patch, expected, life.limits, request_id=key
        )
    ).job


def test_a_keyed_metadata_write_is_applied_once_whatever_its_retry_says(life: Life) -> None:
    manager = life.create(Kind.MANAGER, n=1)
    first = _keyed(life, manager.id, {"n": 2}, "w-1", expected=manager.version)
    assert (first.metadata["n"], first.version) == (2, manager.version + 1)
    life.update(manager.id, metadata={"n": 5})  # another writer, between the write and its retry
    # The retry of w-1: its expected_version is stale now, and it would undo n=5; it changes
    # nothing and answers the job as it is.
    again = _keyed(life, manager.id, {"n": 2}, "w-1", expected=manager.version)
    assert (again.metadata["n"], again.version) == (5, manager.version + 2)
    assert life.job(manager.id).metadata["n"] == 5
    # The same key on another job is another write.
    other = life.create(Kind.MANAGER, n=1)
    assert _keyed(life, other.id, {"n": 9}, "w-1").metadata["n"] == 9


def test_a_refused_keyed_write_is_not_remembered(life: Life) -> None:
    manager = life.create(Kind.MANAGER, n=1)
    with pytest.raises(VersionConflict):
        _keyed(life, manager.id, {"n": 2}, "w-2", expected=manager.version + 7)
    # Its key was not kept with the refusal: sent again with the right version, it applies.
    assert _keyed(life, manager.id, {"n": 2}, "w-2", expected=manager.version).metadata["n"] == 2


def test_a_keyed_write_that_changes_nothing_is_remembered_too(life: Life) -> None:
    manager = life.create(Kind.MANAGER, n=1)
    same = _keyed(life, manager.id, {"n": 1}, "w-3", expected=manager.version)
    assert same.version == manager.version
    life.update(manager.id, metadata={"n": 4})
    assert _keyed(life, manager.id, {"n": 1}, "w-3", expected=manager.version).metadata["n"] == 4
