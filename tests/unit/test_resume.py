"""Continuing a job from its records: each step's plan, and what the runner rebuilds from the
records before it runs anything (ended steps stand, on_error and the error tolerance count
what already happened)."""

from __future__ import annotations

import pytest
from grpc import aio

from orchestrator_svc import definitions as d
from orchestrator_svc.convert import job_from_pb
from orchestrator_svc.event_stream import EventStream
from orchestrator_svc.monitor_client import MonitorClient
from orchestrator_svc.resume import MAX_INTERRUPTIONS, JobRecord, Plan, StepRecord, plan_step
from orchestrator_svc.runner import JobRunner
from orchestrator_svc.runner.stop import StopReason
from orchestrator_svc.workers.base import ExistingChild
from orchestrator_svc.workers.registry import load_registry
from stepflow_common.status import Status
from stepflow_common.step_outcome import ChildTally
from stepflow_proto.v1 import job_pb2

WORKERS = load_registry(plugins=False)


def step(**overrides: object) -> d.StepSpec:
    fields: dict[str, object] = {"name": "s", "type": "simulate", **overrides}
    return d.StepSpec(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("status", [Status.COMPLETED, Status.FAILED, Status.CANCELLED])
def test_an_ended_step_stands(status: Status) -> None:
    for spawns in (True, False):
        assert plan_step(step(), StepRecord(status), spawns_children=spawns) is Plan.STANDS


def test_a_skipped_step_stands_and_a_pending_one_starts() -> None:
    assert plan_step(step(), StepRecord(Status.SKIPPED), spawns_children=True) is Plan.STANDS
    assert plan_step(step(), StepRecord(Status.PENDING), spawns_children=False) is Plan.START


def test_a_sealed_hand_off_is_watched_an_unsealed_one_continues() -> None:
    handed = step(wait=False)
    spawned = StepRecord(Status.SPAWNED, sealed=True, children={"c": ExistingChild("failed", 1)})
    assert plan_step(handed, spawned, spawns_children=True) is Plan.WATCH
    # Its children still need running: the monitor ends the step, it runs none of them.
    live = StepRecord(Status.SPAWNED, sealed=True, children={"c": ExistingChild("running", 1)})
    assert plan_step(handed, live, spawns_children=True) is Plan.CONTINUE
    unsealed = StepRecord(Status.SPAWNED, sealed=False)
    assert plan_step(handed, unsealed, spawns_children=True) is Plan.CONTINUE
    # A waited-for step is ended by its orchestrator even once sealed: it continues.
    sealed_running = StepRecord(Status.RUNNING, sealed=True)
    assert plan_step(step(), sealed_running, spawns_children=True) is Plan.CONTINUE


def test_a_spawning_step_continues_whatever_its_on_interrupt() -> None:
    """Its children decide (the monitor already failed those that may not run again)."""
    record = StepRecord(Status.RUNNING, interruptions=MAX_INTERRUPTIONS)
    strict = step(on_interrupt=d.OnInterrupt.FAIL)
    assert plan_step(strict, record, spawns_children=True) is Plan.CONTINUE


def test_a_step_without_children_runs_again_or_is_lost() -> None:
    command = step(type="command")
    once = StepRecord(Status.RUNNING, attempt=1, interruptions=1)
    assert plan_step(command, once, spawns_children=False) is Plan.RERUN
    too_often = StepRecord(Status.RUNNING, attempt=3, interruptions=MAX_INTERRUPTIONS)
    assert plan_step(command, too_often, spawns_children=False) is Plan.LOST
    strict = step(type="command", on_interrupt=d.OnInterrupt.FAIL)
    assert plan_step(strict, once, spawns_children=False) is Plan.LOST


def runner_for(spec: d.JobSpec, records: list[StepRecord]) -> JobRunner:
    """A runner continuing ``spec`` from ``records``. Its client and stream point nowhere:
    nothing here may call the monitor (a call would fail the test)."""
    manager = job_from_pb(
        job_pb2.Job(id="m", kind=job_pb2.JOB_KIND_MANAGER, status=job_pb2.JOB_STATUS_RUNNING)
    )
    steps = [
        job_from_pb(
            job_pb2.Job(id=f"m.{i}", kind=job_pb2.JOB_KIND_STEP, status=job_pb2.JOB_STATUS_PENDING)
        )
        for i in range(len(spec.steps))
    ]
    channel = aio.insecure_channel("127.0.0.1:1")
    return JobRunner.resumed(
        JobRecord(manager, spec, steps, records),
        monitor=MonitorClient(channel, retry_for_s=0),
        stream=EventStream(lambda: channel),
        workers=WORKERS,
        owner="me",
    )


async def test_ended_steps_stand_and_their_failures_count() -> None:
    spec = d.JobSpec(
        name="j",
        error_tolerance=d.ToleranceSpec(max_child_failures=5),
        steps=(
            step(name="a", on_error=d.OnError.CONTINUE),
            step(name="b", wait=False),
            step(name="c"),
            step(name="d", type="command", config={"command": "true"}),
            step(name="e"),
        ),
    )
    children = {
        "m.2.0": ExistingChild("completed", 1),
        "m.2.1": ExistingChild("running", 2, 1),
        "m.2.2": ExistingChild("pending"),
        "m.2.3": ExistingChild("failed", 1),
    }
    runner = runner_for(
        spec,
        [
            StepRecord(Status.FAILED, "it broke", failed_children=3),
            StepRecord(Status.SPAWNED, sealed=True, failed_children=1),
            StepRecord(Status.RUNNING, failed_children=1, children=children),
            StepRecord(Status.RUNNING, attempt=1, interruptions=1),
            StepRecord(Status.PENDING),
        ],
    )
    runner.apply_records(runner._resume)  # type: ignore[arg-type]
    a, b, c, d_, e = runner.job.steps
    assert (a.plan, a.final, a.error, a.ended.is_set()) == (
        Plan.STANDS,
        Status.FAILED,
        "it broke",
        True,
    )
    assert (b.plan, b.handed, b.released.is_set(), b.ended.is_set()) == (
        Plan.WATCH,
        True,
        True,
        False,
    )
    assert c.plan is Plan.CONTINUE and c.existing == children
    assert c.counts.tally() == ChildTally(pending=1, running=1, completed=1, failed=1)
    assert c.counts.counted_running == {"m.2.1"}
    assert (d_.plan, d_.attempt) == (Plan.RERUN, 2)
    assert e.plan is Plan.START
    # on_error = continue: the failed step stops nothing; 5 failures are within the tolerance.
    assert runner.job.child_failures.count == 5
    assert not runner.job.stop.starts_no_step and not runner.job.child_failures.exceeded


async def test_a_tolerance_exceeded_before_the_interruption_stops_the_job() -> None:
    spec = d.JobSpec(
        name="j",
        error_tolerance=d.ToleranceSpec(max_child_failures=2),
        steps=(step(name="a", on_error=d.OnError.CONTINUE), step(name="b")),
    )
    runner = runner_for(
        spec, [StepRecord(Status.COMPLETED, failed_children=3), StepRecord(Status.PENDING)]
    )
    runner.apply_records(runner._resume)  # type: ignore[arg-type]
    stop = runner.job.stop
    assert runner.job.child_failures.exceeded and stop.halted
    assert (stop.reason, stop.error) == (StopReason.TOLERANCE, "error tolerance exceeded (3 > 2)")


async def test_a_failed_step_under_on_error_fail_stops_new_steps() -> None:
    spec = d.JobSpec(name="j", steps=(step(name="a"), step(name="b")))
    runner = runner_for(spec, [StepRecord(Status.FAILED, "x"), StepRecord(Status.PENDING)])
    runner.apply_records(runner._resume)  # type: ignore[arg-type]
    assert runner.job.stop.reason is StopReason.STEP_FAILED and not runner.job.stop.halted
    assert runner.driver.skip_reason(runner.job.steps[1]) == "job stopped before this step"
