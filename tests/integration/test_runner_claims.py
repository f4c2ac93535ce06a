"""The attempt rules of children run by runners (``monitor_svc/lifecycle/claims``), on every
unit of work: a claim before the work, only the claimant ends its attempt, a copy of a message
never runs beside the first, a redelivery is the next attempt counted once, the third
interruption (or a dead letter) fails ``runner_lost``, and a take-over leaves runners' children
alone."""

from __future__ import annotations

import itertools

from monitor_svc.lifecycle import leases
from monitor_svc.records import ChildEventIn, JobState
from stepflow_common.status import EndReason, Status
from stepflow_common.step_outcome import ChildTally
from tests.lifecycle_harness import TIMERS, Life

_IDS = itertools.count(1)


def runner_event(
    life: Life,
    step: JobState,
    child_id: str,
    kind: str,
    *,
    runner: str,
    claim: str,
    attempt: int = 1,
    error: str = "",
    runner_lost: bool = False,
) -> str:
    """Apply one runner's event; the reason it was refused ("" if accepted)."""
    event = ChildEventIn(
        f"r{next(_IDS)}",
        step.id,
        child_id,
        kind,
        error,
        0,
        False,
        "",
        attempt,
        runner,
        claim,
        runner_lost,
    )
    rejected = life._apply([event])
    return rejected[0][1] if rejected else ""


def _step_with_child(life: Life) -> tuple[JobState, JobState, str]:
    manager, step = life.manager_with_step()
    child_id = f"{step.id}.0"
    assert life.events((step.id, child_id, "created")) == []
    return manager, step, child_id


def test_a_claim_starts_the_child_under_its_runner(life: Life) -> None:
    _, step, child = _step_with_child(life)
    assert runner_event(life, step, child, "running", runner="A", claim="m1") == ""
    row = life.job(child)
    assert (row.status, row.runner, row.attempt, row.interruptions) == (
        Status.RUNNING,
        "A",
        1,
        0,
    )
    assert life.tally(step.id) == ChildTally(running=1)
    # The same claim again changes nothing.
    assert runner_event(life, step, child, "running", runner="A", claim="m1") == ""
    assert life.job(child).version == row.version


def test_a_copy_of_the_message_is_refused_while_the_first_runs(life: Life) -> None:
    _, step, child = _step_with_child(life)
    assert runner_event(life, step, child, "running", runner="A", claim="m1") == ""
    reason = runner_event(life, step, child, "running", runner="B", claim="m2", attempt=2)
    assert "another message" in reason
    row = life.job(child)
    assert (row.runner, row.attempt) == ("A", 1)


def test_a_redelivery_runs_the_next_attempt_counted_once_and_the_stale_end_is_refused(
    life: Life,
) -> None:
    manager, step, child = _step_with_child(life)
    assert runner_event(life, step, child, "running", runner="A", claim="m1") == ""
    # A was lost: the broker gave m1 to B, which claims attempt 2.
    assert runner_event(life, step, child, "running", runner="B", claim="m1", attempt=2) == ""
    row = life.job(child)
    assert (row.runner, row.attempt, row.interruptions) == ("B", 2, 1)
    assert life.tally(step.id) == ChildTally(running=1)
    # A wakes up and reports its attempt 1: refused, and the log says so.
    stale = runner_event(life, step, child, "completed", runner="A", claim="m1", attempt=1)
    assert "stale end of attempt 1 from runner A" in stale
    assert life.job(child).status is Status.RUNNING
    messages = [m for _, _, m in life.log(manager.id)]
    assert any("runs again as attempt 2 on runner B" in m for m in messages)
    assert any("stale end of attempt 1 from runner A" in m for m in messages)
    # B's end counts.
    assert runner_event(life, step, child, "completed", runner="B", claim="m1", attempt=2) == ""
    row = life.job(child)
    assert (row.status, row.end_reason, row.runner, row.attempt) == (
        Status.COMPLETED,
        EndReason.RUNNER,
        "B",
        2,
    )
    assert life.tally(step.id) == ChildTally(completed=1)
    # Resent, B's end changes nothing; A's is still refused.
    assert runner_event(life, step, child, "completed", runner="B", claim="m1", attempt=2) == ""
    assert runner_event(life, step, child, "failed", runner="A", claim="m1", attempt=1)
    assert life.tally(step.id) == ChildTally(completed=1)


def test_only_the_claimant_ends_an_attempt(life: Life) -> None:
    _, step, child = _step_with_child(life)
    assert runner_event(life, step, child, "running", runner="A", claim="m1") == ""
    assert "stale end" in runner_event(life, step, child, "completed", runner="B", claim="m1")
    assert "stale end" in runner_event(
        life, step, child, "completed", runner="A", claim="m1", attempt=2
    )
    assert life.job(child).status is Status.RUNNING


def test_an_end_without_a_claim_is_refused(life: Life) -> None:
    _, step, child = _step_with_child(life)
    reason = runner_event(life, step, child, "completed", runner="A", claim="m1")
    assert "not claimed" in reason
    assert life.job(child).status is Status.PENDING


def test_a_retry_by_the_same_runner_is_not_an_interruption(life: Life) -> None:
    _, step, child = _step_with_child(life)
    assert runner_event(life, step, child, "running", runner="A", claim="m1") == ""
    assert runner_event(life, step, child, "running", runner="A", claim="m1", attempt=2) == ""
    row = life.job(child)
    assert (row.attempt, row.interruptions) == (2, 0)
    assert "stale" in runner_event(life, step, child, "running", runner="A", claim="m1")


def test_the_third_interruption_fails_the_child_runner_lost(life: Life) -> None:
    _, step, child = _step_with_child(life)
    assert runner_event(life, step, child, "running", runner="A", claim="m1") == ""
    assert runner_event(life, step, child, "running", runner="B", claim="m1", attempt=2) == ""
    assert runner_event(life, step, child, "running", runner="A", claim="m1", attempt=3) == ""
    reason = runner_event(life, step, child, "running", runner="B", claim="m1", attempt=4)
    assert EndReason.RUNNER_LOST in reason
    row = life.job(child)
    assert (row.status, row.end_reason, row.interruptions) == (
        Status.FAILED,
        EndReason.RUNNER_LOST,
        3,
    )
    assert life.tally(step.id) == ChildTally(failed=1)


def test_a_dead_letter_fails_the_child_whichever_runner_holds_it(life: Life) -> None:
    _, step, child = _step_with_child(life)
    assert runner_event(life, step, child, "running", runner="A", claim="m1") == ""
    assert runner_event(life, step, child, "failed", runner="C", claim="m1", runner_lost=True) == ""
    row = life.job(child)
    assert (row.status, row.end_reason) == (Status.FAILED, EndReason.RUNNER_LOST)
    assert "dead-lettered" in row.error
    assert life.tally(step.id) == ChildTally(failed=1)
    # Again (a second dead letter of a copy): nothing changes.
    assert runner_event(life, step, child, "failed", runner="C", claim="m2", runner_lost=True) == ""
    assert life.tally(step.id) == ChildTally(failed=1)


def test_a_copys_dead_letter_leaves_the_child_its_message_runs(life: Life) -> None:
    _, step, child = _step_with_child(life)
    assert runner_event(life, step, child, "running", runner="A", claim="m1") == ""
    reason = runner_event(life, step, child, "failed", runner="C", claim="m2", runner_lost=True)
    assert "another message" in reason
    assert life.job(child).status is Status.RUNNING
    # A pending child's dead letter fails it: no message of it ever ran.
    other = f"{step.id}.1"
    assert life.events((step.id, other, "created")) == []
    assert runner_event(life, step, other, "failed", runner="C", claim="m3", runner_lost=True) == ""
    assert life.job(other).end_reason == EndReason.RUNNER_LOST


def test_a_cancelled_child_is_not_claimed_nor_ended_by_a_runner(life: Life) -> None:
    _, step, child = _step_with_child(life)
    assert runner_event(life, step, child, "running", runner="A", claim="m1") == ""
    life.status(step.id, Status.CANCELLED)  # the cascade cancels the running child
    assert life.job(child).status is Status.CANCELLED
    assert "already cancelled" in runner_event(
        life, step, child, "completed", runner="A", claim="m1"
    )
    assert "already cancelled" in runner_event(
        life, step, child, "running", runner="B", claim="m1", attempt=2
    )
    assert life.tally(step.id) == ChildTally(cancelled=1)


def test_a_runner_neither_creates_children_nor_claims_unknown_ones(life: Life) -> None:
    _, step, child = _step_with_child(life)
    assert "does not create" in runner_event(life, step, child, "created", runner="A", claim="m")
    assert "unknown child" in runner_event(
        life, step, f"{step.id}.9", "running", runner="A", claim="m"
    )
    assert life.tally(step.id) == ChildTally(pending=1)


def test_a_take_over_leaves_a_runners_child_running(life: Life) -> None:
    manager, step, child = _step_with_child(life)
    local = f"{step.id}.1"
    assert life.events((step.id, local, "created"), (step.id, local, "running")) == []
    assert runner_event(life, step, child, "running", runner="A", claim="m1") == ""
    life.run(lambda tx: leases.take_over(tx, tx.job(manager.id), "adopter", TIMERS))
    remote = life.job(child)
    assert (remote.status, remote.attempt, remote.interruptions, remote.runner) == (
        Status.RUNNING,
        1,
        0,
        "A",
    )
    assert life.job(local).interruptions == 1  # the orchestrator's own child was interrupted
