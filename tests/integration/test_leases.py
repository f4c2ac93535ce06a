"""Orchestrators come and go, on the lifecycle rules directly: leases, restarts, expiry,
adoption, take-over, the orphan timeout, fencing and attempts, over the in-memory unit of work
and the same tests over the SQL unit of work on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest

from monitor_svc import lifecycle
from monitor_svc.records import ChildEventIn
from stepflow_common.errors import FailedPrecondition, InvalidArgument
from stepflow_common.status import EndReason, Status
from stepflow_common.step_outcome import ChildTally
from tests.lease_calls import (
    LEASE_S,
    ORPHAN_TIMEOUT_S,
    TIMERS,
    beat,
    events,
    fire,
    job_with_children,
    manager,
    release,
    status,
    step,
)
from tests.lifecycle_harness import Life

pytestmark = pytest.mark.timeout(30)


def owners(life: Life, *job_ids: str) -> list[str]:
    return [life.job(j).owner for j in job_ids]


# -- rule 1: heartbeat -------------------------------------------------------------------------
def test_a_heartbeat_takes_then_renews_the_lease_and_lists_the_owned_jobs(life: Life) -> None:
    mine = [manager(life, "orch-a").id, manager(life, "orch-a").id]
    manager(life, "orch-b")
    ended = manager(life, "orch-a")
    status(life, ended.id, Status.CANCELLED)

    first = beat(life, "orch-a")
    assert first.lease_expires_at == life.backend.now + timedelta(seconds=LEASE_S)
    assert first.owned_job_ids == mine  # live ones only, oldest first
    assert (first.adopted_job_ids, first.resumed_job_ids) == ([], [])

    life.later(5)
    again = beat(life, "orch-a")
    assert again.lease_expires_at == life.backend.now + timedelta(seconds=LEASE_S)
    assert (again.owned_job_ids, again.resumed_job_ids) == (mine, [])
    assert life.run(lambda tx: tx.lease("orch-a")).expires_at == again.lease_expires_at


@pytest.mark.parametrize(
    ("owner", "lease_s", "message"),
    [("", LEASE_S, "owner is required"), ("orch", 0.5, "lease must be between")],
)
def test_a_heartbeat_needs_an_owner_and_a_sane_lease(
    life: Life, owner: str, lease_s: float, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        beat(life, owner, lease_s=lease_s)
    assert life.run(lambda tx: tx.lease(owner)) is None


def test_a_restart_under_the_same_owner_resumes_its_jobs_at_once(life: Life) -> None:
    beat(life, "orch-a", "first")
    m, s0, run, wait, done = job_with_children(life, "orch-a")
    versions = {j: life.job(j).version for j in (m.id, s0.id, run, wait, done)}

    same = beat(life, "orch-a", "first")
    assert same.resumed_job_ids == []

    restarted = beat(life, "orch-a", "second")
    assert restarted.resumed_job_ids == [m.id]
    assert restarted.owned_job_ids == [m.id]
    assert life.job(s0.id).interruptions == 1
    assert life.job(run).interruptions == 1
    assert life.job(run).status is Status.RUNNING  # it runs again as a new attempt
    assert life.job(wait).interruptions == 0  # pending: it never ran
    assert life.job(done).interruptions == 0
    for job_id in (m.id, s0.id, run):
        assert life.job(job_id).version == versions[job_id] + 1
    assert beat(life, "orch-a", "second").resumed_job_ids == []  # once per restart


# -- rule 2: lease expiry and release -------------------------------------------------------------
def test_an_expired_lease_orphans_the_owners_live_managers_exactly_once(life: Life) -> None:
    beat(life, "orch-a")
    beat(life, "orch-b", lease_s=3 * LEASE_S)
    live = [manager(life, "orch-a"), manager(life, "orch-a")]
    ended = manager(life, "orch-a")
    status(life, ended.id, Status.COMPLETED)
    other = manager(life, "orch-b")

    life.later(LEASE_S - 1)
    assert fire(life) == 0
    life.later(2)
    assert fire(life) == 1  # one lease

    for m in live:
        orphan = life.job(m.id)
        assert orphan.owner == ""
        assert orphan.orphan_deadline == life.backend.now + timedelta(seconds=ORPHAN_TIMEOUT_S)
        assert orphan.version == m.version + 1
    assert life.job(ended.id).owner == "orch-a"
    assert life.job(other.id).owner == "orch-b"
    assert life.run(lambda tx: tx.lease("orch-a")) is None
    before = [life.job(m.id).version for m in live]
    assert fire(life) == 0  # fired once
    assert [life.job(m.id).version for m in live] == before


def test_a_lapsed_lease_not_yet_fired_no_longer_holds_its_jobs(life: Life) -> None:
    """The owner's heartbeat after its lease lapsed finds its jobs orphaned, whether or not the
    timer got there first: the outcome does not depend on the timer's lag."""
    beat(life, "orch-a")
    m = manager(life, "orch-a")
    life.later(LEASE_S + 1)
    late = beat(life, "orch-a")
    assert late.owned_job_ids == []
    assert life.job(m.id).owner == ""


def test_release_orphans_at_once_and_an_unknown_owner_releases_nothing(life: Life) -> None:
    beat(life, "orch-a")
    m = manager(life, "orch-a")
    assert release(life, "orch-a") == [m.id]
    assert life.job(m.id).owner == ""
    assert life.run(lambda tx: tx.lease("orch-a")) is None
    assert release(life, "nobody") == []
    with pytest.raises(InvalidArgument, match="owner is required"):
        release(life, "")


# -- adoption --------------------------------------------------------------------------------
def test_adoption_takes_at_most_max_adopt_oldest_first_and_never_twice(life: Life) -> None:
    beat(life, "dead")
    orphans = [manager(life, "dead").id for _ in range(3)]
    never_owned = manager(life, "")  # created without an owner: not an orphan to adopt
    assert release(life, "dead") == orphans

    b = beat(life, "orch-b", max_adopt=2)
    assert b.adopted_job_ids == orphans[:2]
    assert b.owned_job_ids == orphans[:2]
    c = beat(life, "orch-c", max_adopt=5)
    assert c.adopted_job_ids == orphans[2:]
    assert beat(life, "orch-d", max_adopt=5).adopted_job_ids == []
    assert owners(life, *orphans) == ["orch-b", "orch-b", "orch-c"]
    assert all(life.job(j).orphan_deadline is None for j in orphans)
    assert life.job(never_owned.id).owner == ""
    assert beat(life, "orch-b", max_adopt=5).owned_job_ids == orphans[:2]


def test_an_adopter_interrupts_running_children_only(life: Life) -> None:
    beat(life, "orch-a")
    m, s0, run, wait, done = job_with_children(life, "orch-a")
    release(life, "orch-a")

    assert beat(life, "orch-b", max_adopt=1).adopted_job_ids == [m.id]
    assert (life.job(s0.id).interruptions, life.job(run).interruptions) == (1, 1)
    assert life.job(run).status is Status.RUNNING
    assert (life.job(wait).interruptions, life.job(wait).status) == (0, Status.PENDING)
    assert life.job(done).status is Status.COMPLETED
    assert life.tally(s0.id) == ChildTally(pending=1, running=1, completed=1)


def test_on_interrupt_fail_ends_running_children_orchestrator_lost(life: Life) -> None:
    beat(life, "orch-a")
    m, s0, run, wait, _ = job_with_children(life, "orch-a", on_interrupt="fail")
    release(life, "orch-a")

    beat(life, "orch-b", max_adopt=1)

    lost = life.job(run)
    assert (lost.status, lost.end_reason) == (Status.FAILED, EndReason.ORCHESTRATOR_LOST)
    assert lost.error == "its orchestrator was lost while it ran"
    assert lost.interruptions == 1
    assert life.job(wait).status is Status.PENDING  # never ran: it may still run
    assert life.tally(s0.id) == ChildTally(pending=1, completed=1, failed=1)
    shown = life.run(lambda tx: tx.tallies_for_manager(m.id))  # what the manager's answers show
    assert shown[s0.id] == ChildTally(pending=1, completed=1, failed=1)
    assert life.job(s0.id).status is Status.RUNNING  # the orchestrator ends a step it waits for


def test_a_handed_off_steps_running_children_are_interrupted_but_the_step_is_not(
    life: Life,
) -> None:
    """A spawned step is ended by the monitor, but its children still need an orchestrator to
    run them: they were interrupted like a running step's, and the same rules apply."""
    beat(life, "orch-a")
    _, s0, run, wait, _ = job_with_children(life, "orch-a", on_interrupt="fail")
    assert life.job(s0.id).status is Status.RUNNING
    events_in = [ChildEventIn(f"{s0.id}-seal", s0.id, "", "sealed", "", 3, True, "", 0)]
    assert life.run(lambda tx: lifecycle.apply_events(tx, events_in, TIMERS, "")) == []
    assert life.job(s0.id).status is Status.SPAWNED
    release(life, "orch-a")

    beat(life, "orch-b", max_adopt=1)

    lost = life.job(run)
    assert (lost.status, lost.end_reason, lost.interruptions) == (
        Status.FAILED,
        EndReason.ORCHESTRATOR_LOST,
        1,
    )
    assert life.job(wait).status is Status.PENDING
    spawned = life.job(s0.id)
    assert (spawned.status, spawned.interruptions) == (Status.SPAWNED, 0)


def test_a_third_interruption_fails_the_child(life: Life) -> None:
    beat(life, "orch-a", "i1")
    _, s0, run, _, _ = job_with_children(life, "orch-a")
    beat(life, "orch-a", "i2")
    beat(life, "orch-a", "i3")
    assert (life.job(run).status, life.job(run).interruptions) == (Status.RUNNING, 2)
    beat(life, "orch-a", "i4")
    lost = life.job(run)
    assert (lost.status, lost.end_reason, lost.interruptions) == (
        Status.FAILED,
        EndReason.ORCHESTRATOR_LOST,
        3,
    )
    assert life.job(s0.id).interruptions == 3


# -- rule 4: the orphan timeout -------------------------------------------------------------------
def test_an_orphan_nobody_adopts_fails_orchestrator_lost_with_its_cascade(life: Life) -> None:
    beat(life, "orch-a")
    m, s0, run, wait, done = job_with_children(life, "orch-a")
    s1 = next(j for j in life.run(lambda tx: tx.children_of(m.id, live_only=True)) if j.id != s0.id)
    release(life, "orch-a")

    life.later(ORPHAN_TIMEOUT_S - 1)
    assert fire(life) == 0
    life.later(2)
    assert fire(life) == 1

    lost = life.job(m.id)
    assert (lost.status, lost.end_reason) == (Status.FAILED, EndReason.ORCHESTRATOR_LOST)
    assert lost.error == "no orchestrator took the job over within 60s"
    assert lost.orphan_deadline is None
    assert life.job(s0.id).status is Status.CANCELLED
    assert life.job(s1.id).status is Status.SKIPPED
    assert life.job(run).status is Status.CANCELLED
    assert life.job(wait).status is Status.CANCELLED
    assert life.job(done).status is Status.COMPLETED
    assert fire(life) == 0
    assert beat(life, "orch-b", max_adopt=5).adopted_job_ids == []


def test_an_adopted_orphan_does_not_time_out(life: Life) -> None:
    beat(life, "orch-a")
    m = manager(life, "orch-a")
    release(life, "orch-a")
    beat(life, "orch-b", max_adopt=1, lease_s=10 * ORPHAN_TIMEOUT_S)
    life.later(ORPHAN_TIMEOUT_S + 1)
    assert fire(life) == 0
    assert life.job(m.id).status is Status.PENDING


# -- rule 5 and 6: fencing -----------------------------------------------------------------------
def test_a_previous_owner_is_fenced_and_other_writers_are_not(life: Life) -> None:
    beat(life, "orch-a")
    m, s0, run, wait, _ = job_with_children(life, "orch-a")
    release(life, "orch-a")

    with pytest.raises(FailedPrecondition, match=f"^fenced: job {m.id} is orphaned"):
        status(life, s0.id, Status.COMPLETED, owner="orch-a")
    beat(life, "orch-b", max_adopt=1)

    owned_by_b = f"^fenced: job {m.id} is owned by orch-b$"
    with pytest.raises(FailedPrecondition, match=owned_by_b):
        status(life, s0.id, Status.COMPLETED, owner="orch-a")
    with pytest.raises(FailedPrecondition, match=owned_by_b):
        life.run(
            lambda tx: lifecycle.update_metadata(tx, m.id, {"x": 1}, None, life.limits, "orch-a")
        )
    with pytest.raises(FailedPrecondition, match=owned_by_b):
        step(life, m.id, index=2, owner="orch-a")
    rejected = events(life, s0.id, (run, "completed"), (wait, "running"), owner="orch-a")
    assert rejected == [f"fenced: job {m.id} was adopted by orch-b"] * 2
    assert (life.job(run).status, life.job(wait).status) == (Status.RUNNING, Status.PENDING)
    assert life.job(s0.id).status is Status.RUNNING

    assert events(life, s0.id, (run, "completed"), owner="orch-b") == []
    assert events(life, s0.id, (wait, "running")) == []  # no owner: not fenced
    life.run(lambda tx: lifecycle.update_metadata(tx, m.id, {"x": 1}, None, life.limits))
    assert step(life, m.id, index=2, owner="orch-b").owner == "orch-b"
    assert status(life, s0.id, Status.COMPLETED, owner="orch-b").status is Status.COMPLETED


def test_orchestrator_lost_is_reported_by_the_owner_only(life: Life) -> None:
    beat(life, "orch-a")
    m = manager(life, "orch-a")
    s0 = step(life, m.id)
    status(life, s0.id, Status.RUNNING)
    with pytest.raises(InvalidArgument, match="orchestrator_lost"):
        status(life, s0.id, Status.FAILED, end_reason=EndReason.ORCHESTRATOR_LOST)
    ended = status(life, s0.id, Status.FAILED, owner="orch-a", end_reason="orchestrator_lost")
    assert ended.end_reason == EndReason.ORCHESTRATOR_LOST


@pytest.mark.parametrize("reason", ["timeout", "no_children", "children_terminal", "whatever"])
def test_a_client_cannot_give_the_monitors_own_end_reasons(life: Life, reason: str) -> None:
    m = manager(life, "")
    s0 = step(life, m.id)
    with pytest.raises(InvalidArgument, match="cannot be set by a client"):
        status(life, s0.id, Status.FAILED, owner="orch-a", end_reason=reason)
    assert life.job(s0.id).status is Status.PENDING


# -- attempts and the definition -------------------------------------------------------------------
def test_attempts_rise_with_running_events_and_step_runs(life: Life) -> None:
    beat(life, "orch-a", "i1")
    m = manager(life, "orch-a")
    s0 = step(life, m.id)
    assert s0.attempt == 0
    assert status(life, s0.id, Status.RUNNING).attempt == 1
    assert status(life, s0.id, Status.RUNNING).attempt == 1  # the same run, told twice
    child = f"{s0.id}-kid"
    assert events(life, s0.id, (child, "created")) == []
    assert life.job(child).attempt == 0
    assert events(life, s0.id, (child, "running")) == []
    assert life.job(child).attempt == 1
    version = life.job(child).version
    assert events(life, s0.id, (child, "running", 2), (child, "running", 3)) == []
    assert (life.job(child).attempt, life.job(child).version) == (3, version + 2)
    assert events(life, s0.id, (child, "running", 2), (child, "completed", 3)) == []
    assert (life.job(child).attempt, life.job(child).status) == (3, Status.COMPLETED)
    assert life.tally(s0.id) == ChildTally(completed=1)  # one child, whatever its attempts
    other = f"{s0.id}-other"
    assert events(life, s0.id, (other, "completed")) == []
    assert life.job(other).attempt == 1

    beat(life, "orch-a", "i2")  # a restart: the running step was interrupted
    assert status(life, s0.id, Status.RUNNING).attempt == 2
    assert status(life, s0.id, Status.RUNNING).attempt == 2


def test_a_manager_keeps_its_definition_and_only_a_manager_has_one(life: Life) -> None:
    definition = {"name": "job", "steps": [{"name": "s0", "type": "simulate", "retries": 2}]}
    m = manager(life, "orch-a", definition)
    assert life.run(lambda tx: tx.definition_of(m.id)) == definition
    s0 = step(life, m.id)
    assert life.run(lambda tx: tx.definition_of(s0.id)) is None
