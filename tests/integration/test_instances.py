"""A lease belongs to one instance (process): the newer instance under an owner supersedes the
older for good; every fence checks the instance; adoption by worker types; give-backs; orphans
that a live orchestrator could run wait for it. On the lifecycle rules directly, over the
in-memory unit of work and the SQL one on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from monitor_svc import lifecycle
from monitor_svc.lifecycle import leases
from monitor_svc.lifecycle.leases import HeartbeatResult
from stepflow_common.errors import Fenced
from stepflow_common.job_keys import RUNNERS_TYPE
from stepflow_common.status import EndReason, Status
from tests.lease_calls import (
    LEASE_S,
    ORPHAN_TIMEOUT_S,
    TIMERS,
    events,
    fire,
    job_with_children,
    manager,
    status,
    step,
)
from tests.lifecycle_harness import Life

pytestmark = pytest.mark.timeout(30)


def beat(
    life: Life,
    owner: str,
    instance: str,
    *,
    max_adopt: int = 0,
    types: Sequence[str] = (),
    running: Sequence[str] = (),
) -> HeartbeatResult:
    return life.run(
        lambda tx: leases.heartbeat(tx, owner, instance, LEASE_S, max_adopt, TIMERS, types, running)
    )


def write(life: Life, job_id: str, owner: str, instance: str) -> None:
    result = life.run(
        lambda tx: lifecycle.update_status(
            tx, job_id, Status.RUNNING, "", "", TIMERS, owner, instance
        )
    )
    assert not isinstance(result, Exception), result


def test_a_newer_instance_supersedes_the_older_for_good(life: Life) -> None:
    m, _s0, run, _wait, _done = job_with_children(life, "orch")
    beat(life, "orch", "old")
    life.later(1)
    answer = beat(life, "orch", "new")
    assert answer.resumed_job_ids == [m.id]
    assert answer.superseded_instance == "old"
    assert 0 < answer.superseded_lease_remaining_s <= LEASE_S
    assert life.job(run).interruptions == 1
    # The older process wakes up: its heartbeat is fenced, every time, and takes nothing back.
    for _ in range(3):
        with pytest.raises(Fenced, match="superseded by a newer instance"):
            beat(life, "orch", "old", max_adopt=10)
        life.later(1)
        assert beat(life, "orch", "new").resumed_job_ids == []
    assert life.job(run).interruptions == 1  # one take-over, not one per heartbeat
    assert life.job(m.id).owner == "orch"


def test_every_write_of_a_superseded_instance_is_fenced(life: Life) -> None:
    m, s0, _run, wait, _done = job_with_children(life, "orch")
    beat(life, "orch", "old")
    beat(life, "orch", "new")
    with pytest.raises(Fenced, match="superseded"):
        write(life, m.id, "orch", "old")
    with pytest.raises(Fenced, match="superseded"):
        life.run(
            lambda tx: lifecycle.update_metadata(
                tx, m.id, {"x": 1}, None, life.limits, "orch", "old"
            )
        )
    rejected = life.run(
        lambda tx: lifecycle.apply_events(
            tx,
            [events_in(s0.id, wait, "completed")],
            TIMERS,
            "orch",
            "old",
        )
    )
    assert rejected and "superseded" in rejected[0][1]
    assert life.job(wait).status is Status.PENDING
    # The current instance writes; a client without an instance is fenced by name only.
    write(life, m.id, "orch", "new")
    assert events(life, s0.id, (wait, "running"), owner="orch") == []
    # A superseded instance cannot release the newer one's lease either.
    with pytest.raises(Fenced):
        life.run(lambda tx: leases.release_lease(tx, "orch", TIMERS, "old"))
    assert life.job(m.id).owner == "orch"


def events_in(step_id: str, child_id: str, kind: str) -> object:
    from monitor_svc.records import ChildEventIn

    return ChildEventIn(f"{child_id}-{kind}", step_id, child_id, kind, "", 0, False, "", 0)


def test_update_step_stat_in_manager_has_an_optional_owner_fence(life: Life) -> None:
    m, s0, *_ = job_with_children(life, "orch")
    beat(life, "orch", "a")
    life.run(
        lambda tx: lifecycle.update_metadata(
            tx,
            m.id,
            {"step_stats": [{"step_id": s0.id, "step_index": 0, "status": "running"}]},
            None,
            life.limits,
        )
    )
    with pytest.raises(Fenced):
        life.run(lambda tx: lifecycle.update_step_stat(tx, m.id, s0.id, Status.SPAWNED, "other"))
    beat(life, "orch", "b")
    with pytest.raises(Fenced, match="superseded"):
        life.run(
            lambda tx: lifecycle.update_step_stat(tx, m.id, s0.id, Status.SPAWNED, "orch", "a")
        )
    result = life.run(
        lambda tx: lifecycle.update_step_stat(tx, m.id, s0.id, Status.SPAWNED, "orch", "b")
    )
    assert result.entry["status"] == "spawned"


def test_orphans_go_only_to_orchestrators_that_run_their_worker_types(life: Life) -> None:
    m, s0, run, wait, _done = job_with_children(life, "lost")
    beat(life, "lost", "x")
    life.later(LEASE_S + 1)
    fire(life)
    assert life.job(m.id).owner == ""
    # An orchestrator without "simulate" adopts nothing, however much room it has.
    assert beat(life, "lacking", "l", max_adopt=10, types=["command"]).adopted_job_ids == []
    assert life.job(m.id).owner == ""
    # The orphan timeout passes while it lives: it cannot run the job, so the job fails.
    life.later(ORPHAN_TIMEOUT_S / 2)
    answer = beat(life, "able", "a", max_adopt=10, types=["command", "simulate"])
    assert answer.adopted_job_ids == [m.id]
    assert life.job(m.id).owner == "able"
    # The steps and live children follow their manager's owner.
    assert life.job(s0.id).owner == "able"
    assert life.job(run).owner == "able" and life.job(wait).owner == "able"


def test_an_orphan_waits_while_a_live_orchestrator_could_run_it(life: Life) -> None:
    m, *_ = job_with_children(life, "lost")
    beat(life, "lost", "x")
    life.later(LEASE_S + 1)
    fire(life)
    beats = int(2 * ORPHAN_TIMEOUT_S / (LEASE_S / 2))  # past the orphan timeout twice over
    for _ in range(beats):  # busy: it adopts nothing (max_adopt 0), but it lives and could
        beat(life, "busy", "b", max_adopt=0, types=["simulate"])
        life.later(LEASE_S / 2)
        fire(life)
        assert not life.job(m.id).status.terminal
    # Once no orchestrator that could run it is alive, the orphan timeout fails it.
    life.later(LEASE_S + ORPHAN_TIMEOUT_S + 1)
    fire(life)
    fire(life)
    job = life.job(m.id)
    assert job.status is Status.FAILED and job.end_reason == EndReason.ORCHESTRATOR_LOST


def test_a_restart_lacking_a_worker_type_gives_its_jobs_back(life: Life) -> None:
    m, *_ = job_with_children(life, "orch")
    beat(life, "orch", "with-plugin", types=["simulate"])
    answer = beat(life, "orch", "without-plugin", types=["command"])
    assert answer.resumed_job_ids == []
    assert life.job(m.id).owner == ""  # orphaned at once, for an orchestrator that can
    assert beat(life, "other", "o", max_adopt=5, types=["simulate"]).adopted_job_ids == [m.id]


def test_an_orchestrator_gives_back_one_job(life: Life) -> None:
    m1, *_ = job_with_children(life, "orch")
    m2 = manager(life, "orch", {"name": "b", "steps": [{"name": "s", "type": "simulate"}]})
    step(life, m2.id)
    status(life, m2.id, Status.RUNNING)
    beat(life, "orch", "i")
    given = life.run(
        lambda tx: leases.release_lease(tx, "orch", TIMERS, "i", [m1.id], "cannot load it")
    )
    assert given == [m1.id]
    assert life.job(m1.id).owner == "" and life.job(m2.id).owner == "orch"


def test_fenced_job_ids_answer_for_what_the_caller_runs(life: Life) -> None:
    m, *_ = job_with_children(life, "orch")
    beat(life, "orch", "i")
    other = manager(life, "someone-else")
    answer = beat(life, "orch", "i", running=[m.id, other.id, "f" * 32])
    assert answer.fenced_job_ids == [other.id, "f" * 32]


def test_a_job_with_a_celery_step_goes_only_to_an_orchestrator_with_a_broker(life: Life) -> None:
    definition = {
        "name": "job",
        "steps": [{"name": "s0", "type": "simulate", "executor": "celery"}],
    }
    m = manager(life, "lost", definition)
    step(life, m.id, index=0)
    status(life, m.id, Status.RUNNING)
    beat(life, "lost", "x")
    life.later(LEASE_S + 1)
    fire(life)
    # It runs "simulate", but has no broker: it adopts nothing.
    assert beat(life, "local", "l", max_adopt=10, types=["simulate"]).adopted_job_ids == []
    answer = beat(life, "broker", "b", max_adopt=10, types=[RUNNERS_TYPE, "simulate"])
    assert answer.adopted_job_ids == [m.id]
