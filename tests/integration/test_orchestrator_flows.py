"""End to end through a real monitor and a real orchestrator (in-process servers on free ports,
real channels, the real event stream), on SQLite and on PostgreSQL.

Every wait is bounded (``asyncio.wait_for``) and event-driven (WatchJob), so a regression fails
fast instead of hanging. Helpers that read the monitor live at the top; the tests follow the
order of design §3.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from grpc import aio

from orchestrator_svc.records import Job
from orchestrator_svc.server import RunningOrchestrator
from orchestrator_svc.workers.base import BaseWorker, StepContext, StepResult
from stepflow_common.proto_status import LIVE_PB as LIVE
from stepflow_common.proto_status import TERMINAL_PB as TERMINAL
from stepflow_common.status import Status
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from stepflow_proto.v1 import orchestrator_service_pb2 as o
from stepflow_proto.v1 import orchestrator_service_pb2_grpc as o_grpc
from tests.helpers import meta, struct
from tests.jobs import (
    WAIT_S,
    Recorder,
    assert_consistent,
    by_name,
    counts_of,
    final,
    get,
    list_all,
    sim,
    submit,
    tally_counts,
    watch_until,
)

S = job_pb2
Stub = m_grpc.MonitorServiceStub
OStub = o_grpc.OrchestratorServiceStub


# -- wait modes ----------------------------------------------------------------------------------
async def test_wait_true_step_is_ended_by_the_orchestrator(stub: Stub, ostub: OStub) -> None:
    config = sim(12, 5, concurrency=4, fail_every=4)
    manager_id = await submit(
        ostub, {"name": "wait-true", "steps": [{"name": "s", "type": "simulate", "config": config}]}
    )
    rec = Recorder(stub, manager_id)
    job = await rec.done()
    assert job.status == S.JOB_STATUS_COMPLETED, job
    stat = by_name(job)["s"]
    assert stat.status == S.JOB_STATUS_COMPLETED
    assert counts_of(stat.children) == tally_counts(config) == (0, 0, 9, 3, 0)
    assert stat.child_count == 12
    step = await get(stub, stat.step_id)
    assert step.end_reason == "orchestrator"
    assert S.JOB_STATUS_SPAWNED not in rec.statuses_seen("s")
    rec.assert_never_backwards()
    await assert_consistent(stub, job)


async def test_wait_false_step_is_handed_to_the_monitor_and_ended_by_it(
    stub: Stub, ostub: OStub
) -> None:
    config = sim(6, 150, concurrency=2, fail_every=3)
    manager_id = await submit(
        ostub,
        {
            "name": "wait-false",
            "steps": [
                {"name": "handed", "type": "simulate", "wait": False, "config": config},
                {"name": "next", "type": "command", "config": {"command": "true"}},
                {"name": "empty", "type": "simulate", "wait": False, "config": sim(0)},
            ],
        },
    )
    rec = Recorder(stub, manager_id)
    # Handed off: the next step ran while this one was still live.
    seen = await watch_until(
        stub, manager_id, lambda j: "next" in by_name(j) and by_name(j)["next"].status in TERMINAL
    )
    assert by_name(seen)["handed"].status in LIVE
    job = await rec.done()
    # Once its first child was committed the monitor showed it handed off.
    assert S.JOB_STATUS_SPAWNED in rec.statuses_seen("handed")
    assert job.status == S.JOB_STATUS_COMPLETED, job
    stats = by_name(job)
    assert stats["handed"].status == S.JOB_STATUS_COMPLETED
    assert counts_of(stats["handed"].children) == tally_counts(config) == (0, 0, 4, 2, 0)
    assert (await get(stub, stats["handed"].step_id)).end_reason == "children_terminal"
    assert stats["empty"].status == S.JOB_STATUS_COMPLETED
    assert (await get(stub, stats["empty"].step_id)).end_reason == "no_children"
    rec.assert_never_backwards()
    await assert_consistent(stub, job)


async def test_wait_false_step_whose_children_all_fail_fails_and_fails_the_job(
    stub: Stub, ostub: OStub
) -> None:
    job = await final(
        stub,
        await submit(
            ostub,
            {
                "name": "handed-fails",
                "steps": [
                    {
                        "name": "handed",
                        "type": "simulate",
                        "wait": False,
                        "config": sim(4, 20, fail_every=1),
                    },
                    {
                        "name": "after",
                        "type": "simulate",
                        "depends_on": ["handed"],
                        "config": sim(1),
                    },
                ],
            },
        ),
    )
    assert job.status == S.JOB_STATUS_FAILED
    assert "handed" in job.error
    stats = by_name(job)
    assert stats["handed"].status == S.JOB_STATUS_FAILED
    assert stats["after"].status == S.JOB_STATUS_SKIPPED
    await assert_consistent(stub, job)


class SlowStartWorker(BaseWorker):
    """A spawning worker that takes a while before its first child (a third-party worker doing
    set-up work): longer than the monitor's grace period in these tests."""

    type = "slow-start"
    description = "sleeps, then spawns config.children children that complete"
    spawns_children = True

    async def run(self, ctx: StepContext) -> StepResult:
        await asyncio.sleep(float(ctx.config.get("delay_s", 1.0)))
        count = int(ctx.config.get("children", 3))
        for i in range(count):
            await ctx.child_created(ctx.child_id(i), f"c{i}")
        for i in range(count):
            await ctx.child_running(ctx.child_id(i))
            await ctx.child_finished(ctx.child_id(i), "completed", "")
        return StepResult.spawned(count)


async def test_a_handed_step_slow_to_spawn_is_not_ended_by_the_grace_period(
    stub: Stub,
    ostub: OStub,
    orchestrator: RunningOrchestrator,
) -> None:
    """The grace period ends a hand-off that never sends anything. A worker that is only slow
    to create its first child must not be ended early (with zero children) by it."""
    orchestrator.orchestrator.workers[SlowStartWorker.type] = SlowStartWorker()  # type: ignore[index]
    job = await final(
        stub,
        await submit(
            ostub,
            {
                "name": "slow-start",
                "steps": [
                    {
                        "name": "slow",
                        "type": "slow-start",
                        "wait": False,
                        "config": {"delay_s": 1.0, "children": 3},
                    },
                ],
            },
        ),
    )
    assert job.status == S.JOB_STATUS_COMPLETED
    stat = by_name(job)["slow"]
    assert stat.status == S.JOB_STATUS_COMPLETED
    assert counts_of(stat.children) == (0, 0, 3, 0, 0)
    assert stat.child_count == 3
    assert (await get(stub, stat.step_id)).end_reason == "children_terminal"
    await assert_consistent(stub, job)


# -- on_error and depends_on ---------------------------------------------------------------------
async def test_on_error_continue_goes_on_and_the_job_completes(stub: Stub, ostub: OStub) -> None:
    job = await final(
        stub,
        await submit(
            ostub,
            {
                "name": "continue",
                "steps": [
                    {
                        "name": "bad",
                        "type": "command",
                        "on_error": "continue",
                        "config": {"command": "exit 3"},
                    },
                    {
                        "name": "bad-children",
                        "type": "simulate",
                        "on_error": "continue",
                        "config": sim(3, fail_every=1),
                    },
                    {"name": "good", "type": "simulate", "config": sim(5)},
                ],
            },
        ),
    )
    assert job.status == S.JOB_STATUS_COMPLETED, job
    assert [s.status for s in job.step_stats] == [
        S.JOB_STATUS_FAILED,
        S.JOB_STATUS_FAILED,
        S.JOB_STATUS_COMPLETED,
    ]
    assert "3" in by_name(job)["bad"].error
    assert by_name(job)["bad-children"].error == "3 of 3 child jobs failed"
    await assert_consistent(stub, job)


async def test_on_error_fail_lets_running_steps_finish_and_skips_the_rest(
    stub: Stub, ostub: OStub
) -> None:
    handed = sim(4, 300, concurrency=4)
    job = await final(
        stub,
        await submit(
            ostub,
            {
                "name": "fail",
                "steps": [
                    {"name": "handed", "type": "simulate", "wait": False, "config": handed},
                    {
                        "name": "bad",
                        "type": "command",
                        "on_error": "fail",
                        "config": {"command": "exit 1"},
                    },
                    {"name": "never", "type": "command", "config": {"command": "true"}},
                ],
            },
        ),
    )
    assert job.status == S.JOB_STATUS_FAILED
    assert job.error.startswith("step bad failed"), job.error
    stats = by_name(job)
    # The running hand-off was let finish: every child completed.
    assert stats["handed"].status == S.JOB_STATUS_COMPLETED
    assert counts_of(stats["handed"].children) == (0, 0, 4, 0, 0)
    assert stats["bad"].status == S.JOB_STATUS_FAILED
    assert stats["never"].status == S.JOB_STATUS_SKIPPED
    await assert_consistent(stub, job)


async def test_on_error_fatal_cancels_running_steps_and_children_at_once(
    stub: Stub, ostub: OStub
) -> None:
    long = sim(4, 60_000, concurrency=2)
    manager_id = await submit(
        ostub,
        {
            "name": "fatal",
            "steps": [
                {"name": "long", "type": "simulate", "wait": False, "config": long},
                {
                    "name": "bad",
                    "type": "command",
                    "on_error": "fatal",
                    "config": {"command": "sleep 0.2; exit 1"},
                },
                {"name": "never", "type": "command", "config": {"command": "true"}},
            ],
        },
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    job = await final(stub, manager_id, within=10)
    assert loop.time() - started < 10
    assert job.status == S.JOB_STATUS_FAILED
    assert job.error.startswith("step bad failed"), job.error
    stats = by_name(job)
    assert stats["long"].status == S.JOB_STATUS_CANCELLED
    assert counts_of(stats["long"].children) == (0, 0, 0, 0, 4)
    assert stats["bad"].status == S.JOB_STATUS_FAILED
    assert stats["never"].status == S.JOB_STATUS_SKIPPED
    await assert_consistent(stub, job)


async def test_on_error_fatal_cancels_a_hand_off_even_when_some_children_completed(
    stub: Stub, ostub: OStub
) -> None:
    """By its children alone the hand-off would end ``completed`` (some completed, the rest
    cancelled); fatal cancels the step itself."""
    manager_id = await submit(
        ostub,
        {
            "name": "fatal-partial",
            "steps": [
                {
                    "name": "handed",
                    "type": "simulate",
                    "wait": False,
                    "config": sim(40, 100, concurrency=1),
                },
                {
                    "name": "bad",
                    "type": "command",
                    "on_error": "fatal",
                    "config": {"command": "sleep 0.5; exit 1"},
                },
            ],
        },
    )
    job = await final(stub, manager_id)
    stats = by_name(job)
    assert stats["handed"].status == S.JOB_STATUS_CANCELLED, stats["handed"]
    c = stats["handed"].children
    assert c.completed >= 1 and c.cancelled >= 1 and c.completed + c.cancelled == 40
    assert job.status == S.JOB_STATUS_FAILED
    await assert_consistent(stub, job)


async def test_depends_on_skips_transitively(stub: Stub, ostub: OStub) -> None:
    job = await final(
        stub,
        await submit(
            ostub,
            {
                "name": "deps",
                "steps": [
                    {
                        "name": "a",
                        "type": "simulate",
                        "on_error": "continue",
                        "config": sim(2, fail_every=1),
                    },
                    {
                        "name": "b",
                        "type": "command",
                        "depends_on": ["a"],
                        "config": {"command": "true"},
                    },
                    {"name": "c", "type": "simulate", "depends_on": ["b"], "config": sim(2)},
                    {"name": "d", "type": "command", "config": {"command": "true"}},
                    {
                        "name": "e",
                        "type": "command",
                        "depends_on": ["d", "c"],
                        "config": {"command": "true"},
                    },
                    {
                        "name": "f",
                        "type": "command",
                        "depends_on": ["d"],
                        "config": {"command": "true"},
                    },
                ],
            },
        ),
    )
    assert job.status == S.JOB_STATUS_COMPLETED, job
    stats = by_name(job)
    assert stats["a"].status == S.JOB_STATUS_FAILED
    for name in ("b", "c", "e"):
        assert stats[name].status == S.JOB_STATUS_SKIPPED, name
    assert "a" in stats["b"].error and "b" in stats["c"].error and "c" in stats["e"].error
    assert stats["d"].status == stats["f"].status == S.JOB_STATUS_COMPLETED
    # A skipped step never ran: no children.
    assert counts_of(stats["c"].children) == (0, 0, 0, 0, 0)
    await assert_consistent(stub, job)


# -- error tolerance -----------------------------------------------------------------------------
async def test_error_tolerance_fail_fails_the_job(stub: Stub, ostub: OStub) -> None:
    job = await final(
        stub,
        await submit(
            ostub,
            {
                "name": "tolerance-fail",
                "error_tolerance": {"max_child_failures": 3, "action": "fail"},
                "steps": [
                    {
                        "name": "flaky",
                        "type": "simulate",
                        "on_error": "continue",
                        "config": sim(40, 20, concurrency=1, fail_every=2),
                    },
                    {"name": "never", "type": "command", "config": {"command": "true"}},
                ],
            },
        ),
    )
    assert job.status == S.JOB_STATUS_FAILED
    assert job.error == "error tolerance exceeded (4 > 3)"
    stats = by_name(job)
    assert stats["flaky"].status == S.JOB_STATUS_CANCELLED
    c = stats["flaky"].children
    assert c.failed == 4 and c.completed == 4 and c.cancelled == 32
    assert stats["never"].status == S.JOB_STATUS_SKIPPED
    await assert_consistent(stub, job)


async def test_error_tolerance_continue_only_records_it(stub: Stub, ostub: OStub) -> None:
    config = sim(10, fail_every=2)
    job = await final(
        stub,
        await submit(
            ostub,
            {
                "name": "tolerance-continue",
                "error_tolerance": {"max_child_failures": 2, "action": "continue"},
                "steps": [
                    {"name": "flaky", "type": "simulate", "config": config},
                    {"name": "after", "type": "command", "config": {"command": "true"}},
                ],
            },
        ),
    )
    assert job.status == S.JOB_STATUS_COMPLETED, job
    assert job.error == ""
    stats = by_name(job)
    assert counts_of(stats["flaky"].children) == tally_counts(config) == (0, 0, 5, 5, 0)
    assert stats["after"].status == S.JOB_STATUS_COMPLETED
    assert "3 > 2" in meta(job).get("error_tolerance_exceeded", ""), meta(job)
    await assert_consistent(stub, job)


# -- timeouts ------------------------------------------------------------------------------------
async def test_job_timeout_fails_the_job_and_cancels_running_steps(
    stub: Stub, ostub: OStub
) -> None:
    job = await final(
        stub,
        await submit(
            ostub,
            {
                "name": "job-timeout",
                "timeout": "700ms",
                "steps": [
                    {"name": "quick", "type": "simulate", "config": sim(2)},
                    {"name": "slow", "type": "simulate", "config": sim(3, 60_000)},
                    {"name": "never", "type": "command", "config": {"command": "true"}},
                ],
            },
        ),
        within=10,
    )
    assert job.status == S.JOB_STATUS_FAILED
    assert job.error == "job timed out"
    assert job.end_reason == "timeout"
    stats = by_name(job)
    assert stats["quick"].status == S.JOB_STATUS_COMPLETED
    assert stats["slow"].status == S.JOB_STATUS_CANCELLED
    assert counts_of(stats["slow"].children) == (0, 0, 0, 0, 3)
    assert stats["never"].status in (S.JOB_STATUS_CANCELLED, S.JOB_STATUS_SKIPPED)
    await assert_consistent(stub, job)


@pytest.mark.parametrize("wait", [True, False])
async def test_step_timeout_cancels_its_children_and_fails_the_step(
    stub: Stub, ostub: OStub, wait: bool
) -> None:
    job = await final(
        stub,
        await submit(
            ostub,
            {
                "name": "step-timeout",
                "steps": [
                    {
                        "name": "slow",
                        "type": "simulate",
                        "wait": wait,
                        "timeout": "400ms",
                        "config": sim(3, 60_000),
                    },
                    {
                        "name": "never",
                        "type": "command",
                        "depends_on": ["slow"],
                        "config": {"command": "true"},
                    },
                ],
            },
        ),
        within=10,
    )
    assert job.status == S.JOB_STATUS_FAILED
    stats = by_name(job)
    assert stats["slow"].status == S.JOB_STATUS_FAILED
    assert stats["slow"].error == "timed out waiting for child jobs"
    assert (await get(stub, stats["slow"].step_id)).end_reason == "timeout"
    assert counts_of(stats["slow"].children) == (0, 0, 0, 0, 3)
    assert stats["never"].status == S.JOB_STATUS_SKIPPED
    await assert_consistent(stub, job)


async def test_a_command_step_timeout_fails_the_step(stub: Stub, ostub: OStub) -> None:
    job = await final(
        stub,
        await submit(
            ostub,
            {
                "name": "command-timeout",
                "steps": [
                    {
                        "name": "slow",
                        "type": "command",
                        "wait": False,
                        "timeout": "300ms",
                        "on_error": "continue",
                        "config": {"command": "sleep 30"},
                    },
                    {"name": "after", "type": "command", "config": {"command": "true"}},
                ],
            },
        ),
        within=10,
    )
    stats = by_name(job)
    assert stats["slow"].status == S.JOB_STATUS_FAILED, stats["slow"]
    assert stats["slow"].error == "timed out waiting for child jobs"
    assert stats["after"].status == S.JOB_STATUS_COMPLETED
    assert job.status == S.JOB_STATUS_COMPLETED
    await assert_consistent(stub, job)


# -- CancelJob -----------------------------------------------------------------------------------
def running_children(name: str, at_least: int = 1) -> Callable[[job_pb2.Job], bool]:
    def check(job: job_pb2.Job) -> bool:
        stat = by_name(job).get(name)
        return stat is not None and stat.children.running >= at_least

    return check


async def test_cancel_a_manager_mid_step_cancels_everything(
    stub: Stub, ostub: OStub, orchestrator: RunningOrchestrator
) -> None:
    manager_id = await submit(
        ostub,
        {
            "name": "cancel-manager",
            "steps": [
                {"name": "first", "type": "simulate", "config": sim(2)},
                {"name": "handed", "type": "simulate", "wait": False, "config": sim(3, 60_000)},
                {"name": "slow", "type": "simulate", "config": sim(4, 60_000, concurrency=2)},
                {"name": "later", "type": "command", "config": {"command": "true"}},
            ],
        },
    )
    await watch_until(stub, manager_id, running_children("slow", 2))
    resp = await ostub.CancelJob(
        o.CancelJobRequest(job_id=manager_id, reason="stop it"), timeout=WAIT_S
    )
    assert resp.job.id == manager_id
    assert resp.job.status == S.JOB_STATUS_CANCELLED
    job = await final(stub, manager_id, within=10)
    assert job.status == S.JOB_STATUS_CANCELLED
    assert (job.error, job.end_reason) == ("stop it", "cancelled")
    # The work stopped before the job ended: the last state a watcher saw is the final one.
    assert orchestrator.orchestrator.running() == []
    assert (await get(stub, manager_id)).change_seq == job.change_seq
    stats = by_name(job)
    assert stats["first"].status == S.JOB_STATUS_COMPLETED
    for name in ("handed", "slow", "later"):
        assert stats[name].status == S.JOB_STATUS_CANCELLED, name
    assert counts_of(stats["handed"].children) == (0, 0, 0, 0, 3)
    assert counts_of(stats["slow"].children) == (0, 0, 0, 0, 4)
    assert meta(job)["current_step_status"] == "cancelled"
    await assert_consistent(stub, job)
    # Cancelling it again is fine.
    again = await ostub.CancelJob(o.CancelJobRequest(job_id=manager_id), timeout=WAIT_S)
    assert again.job.status == S.JOB_STATUS_CANCELLED


@pytest.mark.parametrize("wait", [True, False])
async def test_cancel_a_step_cancels_it_and_its_children_and_the_job_goes_on(
    stub: Stub, ostub: OStub, wait: bool
) -> None:
    """Some children have completed when the step is cancelled: by its children alone the step
    would end ``completed``; cancelled it is, in both wait modes."""
    manager_id = await submit(
        ostub,
        {
            "name": "cancel-step",
            "steps": [
                {
                    "name": "slow",
                    "type": "simulate",
                    "wait": wait,
                    "config": sim(40, 100, concurrency=2),
                },
                {
                    "name": "dependent",
                    "type": "command",
                    "depends_on": ["slow"],
                    "config": {"command": "true"},
                },
                {"name": "independent", "type": "command", "config": {"command": "true"}},
            ],
        },
    )
    seen = await watch_until(
        stub,
        manager_id,
        lambda j: "slow" in by_name(j) and by_name(j)["slow"].children.completed >= 2,
    )
    step_id = by_name(seen)["slow"].step_id
    resp = await ostub.CancelJob(
        o.CancelJobRequest(job_id=step_id, reason="not needed"), timeout=WAIT_S
    )
    assert resp.job.id == step_id and resp.job.status == S.JOB_STATUS_CANCELLED
    job = await final(stub, manager_id)
    stats = by_name(job)
    assert stats["slow"].status == S.JOB_STATUS_CANCELLED
    assert stats["slow"].error == "not needed"
    c = stats["slow"].children
    assert c.completed >= 2 and c.cancelled >= 1 and c.completed + c.cancelled == 40
    assert stats["dependent"].status == S.JOB_STATUS_SKIPPED
    assert stats["independent"].status == S.JOB_STATUS_COMPLETED
    assert job.status == S.JOB_STATUS_COMPLETED
    await assert_consistent(stub, job)


async def test_cancel_a_child_cancels_only_it(stub: Stub, ostub: OStub) -> None:
    manager_id = await submit(
        ostub,
        {
            "name": "cancel-child",
            "steps": [{"name": "s", "type": "simulate", "config": sim(3, 700, concurrency=3)}],
        },
    )
    seen = await watch_until(stub, manager_id, running_children("s", 3))
    step_id = by_name(seen)["s"].step_id
    kids = await list_all(stub, parent_id=step_id)
    victim = next(k for k in kids if k.status == S.JOB_STATUS_RUNNING)
    resp = await ostub.CancelJob(o.CancelJobRequest(job_id=victim.id), timeout=WAIT_S)
    assert resp.job.id == victim.id and resp.job.status == S.JOB_STATUS_CANCELLED
    job = await final(stub, manager_id)
    assert job.status == S.JOB_STATUS_COMPLETED
    stat = by_name(job)["s"]
    assert stat.status == S.JOB_STATUS_COMPLETED
    # The cancelled child stays cancelled though the worker later reported it completed.
    assert (await get(stub, victim.id)).status == S.JOB_STATUS_CANCELLED
    assert counts_of(stat.children) == (0, 0, 2, 0, 1)
    await assert_consistent(stub, job)


async def test_cancel_the_only_child_gives_the_step_the_monitors_outcome(
    stub: Stub, ostub: OStub
) -> None:
    """A wait=true step ends with the status its committed children give (path 5), not with
    what the worker believed: its only child was cancelled through the API, so it is
    cancelled, with entry and counts agreeing."""
    manager_id = await submit(
        ostub,
        {
            "name": "cancel-only-child",
            "steps": [
                {"name": "s", "type": "simulate", "on_error": "continue", "config": sim(1, 700)},
            ],
        },
    )
    seen = await watch_until(stub, manager_id, running_children("s", 1))
    (kid,) = await list_all(stub, parent_id=by_name(seen)["s"].step_id)
    await ostub.CancelJob(o.CancelJobRequest(job_id=kid.id), timeout=WAIT_S)
    job = await final(stub, manager_id)
    stat = by_name(job)["s"]
    assert counts_of(stat.children) == (0, 0, 0, 0, 1)
    assert stat.status == S.JOB_STATUS_CANCELLED
    await assert_consistent(stub, job)


async def test_cancel_a_completed_job_is_failed_precondition(stub: Stub, ostub: OStub) -> None:
    manager_id = await submit(
        ostub, {"name": "done", "steps": [{"name": "s", "type": "simulate", "config": sim(1)}]}
    )
    job = await final(stub, manager_id)
    assert job.status == S.JOB_STATUS_COMPLETED
    for job_id in (manager_id, job.step_stats[0].step_id):
        with pytest.raises(aio.AioRpcError) as err:
            await ostub.CancelJob(o.CancelJobRequest(job_id=job_id), timeout=WAIT_S)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(aio.AioRpcError) as err:
        await ostub.CancelJob(o.CancelJobRequest(job_id="0" * 32), timeout=WAIT_S)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(aio.AioRpcError) as err:
        await ostub.CancelJob(o.CancelJobRequest(job_id=""), timeout=WAIT_S)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_cancel_a_job_no_orchestrator_runs(stub: Stub, ostub: OStub) -> None:
    """A job whose orchestrator is gone (here: created straight in the monitor, as a dead
    orchestrator leaves it) is cancelled by the monitor's cascade alone."""
    manager = (
        await stub.CreateJob(
            m.CreateJobRequest(kind=S.JOB_KIND_MANAGER, name="orphan", owner="gone-orchestrator")
        )
    ).job
    step = (
        await stub.CreateJob(
            m.CreateJobRequest(
                kind=S.JOB_KIND_STEP,
                parent_id=manager.id,
                name="s",
                type="simulate",
                metadata=struct({"step_index": 0}),
            )
        )
    ).job
    for job_id in (manager.id, step.id):
        await stub.UpdateJobStatus(
            m.UpdateJobStatusRequest(job_id=job_id, status=S.JOB_STATUS_RUNNING)
        )
    kid = (
        await stub.CreateJob(m.CreateJobRequest(kind=S.JOB_KIND_CHILD, parent_id=step.id, name="k"))
    ).job
    await stub.UpdateJobStatus(m.UpdateJobStatusRequest(job_id=kid.id, status=S.JOB_STATUS_RUNNING))

    resp = await ostub.CancelJob(o.CancelJobRequest(job_id=manager.id), timeout=WAIT_S)
    assert resp.job.status == S.JOB_STATUS_CANCELLED
    assert (await get(stub, step.id)).status == S.JOB_STATUS_CANCELLED
    assert (await get(stub, kid.id)).status == S.JOB_STATUS_CANCELLED


async def test_a_job_stopped_while_a_step_starts_keeps_current_step_status_true(
    stub: Stub, ostub: OStub, orchestrator: RunningOrchestrator
) -> None:
    """The job is cancelled (as a job timeout would) just as a step starts: the cascade ends
    the step before the orchestrator's metadata makes it current. current_step_status must end
    saying what the step is, not the ``running`` the orchestrator wrote."""
    client = orchestrator.orchestrator.monitor
    real_metadata = client.update_metadata
    cancelled: list[str] = []

    async def cancel_first(job_id: str, metadata: dict[str, Any], *args: Any, **kw: Any) -> Any:
        if metadata.get("current_step_name") == "second" and not cancelled:
            cancelled.append(job_id)
            await stub.UpdateJobStatus(
                m.UpdateJobStatusRequest(job_id=job_id, status=S.JOB_STATUS_CANCELLED)
            )
        return await real_metadata(job_id, metadata, *args, **kw)

    client.update_metadata = cancel_first  # type: ignore[method-assign]
    job = await final(
        stub,
        await submit(
            ostub,
            {
                "name": "stopped-while-starting",
                "steps": [
                    {"name": "first", "type": "simulate", "config": sim(2)},
                    {"name": "second", "type": "simulate", "config": sim(2)},
                    {"name": "third", "type": "command", "config": {"command": "true"}},
                ],
            },
        ),
    )
    assert cancelled
    # The watch ends at the cancel; the orchestrator's last writes may land after it.
    await orchestrator.orchestrator.wait_all(timeout_s=WAIT_S)
    assert orchestrator.orchestrator.running() == []
    job = await get(stub, job.id)
    assert job.status == S.JOB_STATUS_CANCELLED
    stats = by_name(job)
    assert stats["second"].status == S.JOB_STATUS_CANCELLED
    assert meta(job)["current_step_name"] == "second"
    assert meta(job)["current_step_status"] == "cancelled"
    # The cancel may land after the step's row went running: whatever children it spawned
    # then are recorded cancelled, none live.
    assert counts_of(stats["second"].children)[:4] == (0, 0, 0, 0)
    await assert_consistent(stub, job)


# -- SubmitJob -----------------------------------------------------------------------------------
async def test_submit_is_idempotent_by_request_id(stub: Stub, ostub: OStub) -> None:
    data = {"name": "once", "steps": [{"name": "s", "type": "simulate", "config": sim(5, 50)}]}
    ids = await asyncio.gather(*(submit(ostub, data, request_id="req-1") for _ in range(3)))
    assert len(set(ids)) == 1
    job = await final(stub, ids[0])
    assert await submit(ostub, data, request_id="req-1") == ids[0]  # after it ended too
    assert job.status == S.JOB_STATUS_COMPLETED
    managers = await list_all(stub, kind=S.JOB_KIND_MANAGER)
    assert [j.id for j in managers] == [ids[0]]
    assert len(await list_all(stub, manager_id=ids[0])) == 1 + 1 + 5  # manager, step, children
    assert counts_of(job.step_stats[0].children) == (0, 0, 5, 0, 0)
    other = await submit(ostub, data, request_id="req-2")
    assert other != ids[0]
    await final(stub, other)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"name": "x", "steps": [{"name": "a", "type": "nope"}]}, "steps[0].type"),
        (
            {
                "name": "x",
                "steps": [
                    {"name": "a", "type": "command", "config": {"command": "true"}},
                    {"name": "a", "type": "command", "config": {"command": "true"}},
                ],
            },
            "steps[1].name",
        ),
        (
            {
                "name": "x",
                "steps": [
                    {
                        "name": "a",
                        "type": "command",
                        "depends_on": ["b"],
                        "config": {"command": "true"},
                    },
                    {"name": "b", "type": "command", "config": {"command": "true"}},
                ],
            },
            "steps[0].depends_on",
        ),
        (
            {
                "name": "x",
                "steps": [
                    {
                        "name": "a",
                        "type": "command",
                        "depends_on": ["zz"],
                        "config": {"command": "true"},
                    }
                ],
            },
            "steps[0].depends_on",
        ),
        (
            {"name": "x", "steps": [{"name": "a", "type": "simulate", "config": {"children": -1}}]},
            "steps[0].config.children",
        ),
        (
            {
                "name": "x",
                "steps": [{"name": "a", "type": "simulate", "config": {"children": 2, "bogus": 1}}],
            },
            "steps[0].config",
        ),
        (
            {"name": "x", "steps": [{"name": "a", "type": "command", "config": {}}]},
            "steps[0].config.command",
        ),
        (
            {
                "name": "",
                "steps": [{"name": "a", "type": "command", "config": {"command": "true"}}],
            },
            "name",
        ),
        ({"name": "x", "steps": []}, "steps"),
    ],
)
async def test_submit_validation_errors_name_the_field(
    stub: Stub, ostub: OStub, data: dict[str, Any], field: str
) -> None:
    request = o.SubmitJobRequest(definition=_raw_definition(data))
    with pytest.raises(aio.AioRpcError) as err:
        await ostub.SubmitJob(request, timeout=WAIT_S)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (err.value.details() or ""), err.value.details()
    assert await list_all(stub, kind=S.JOB_KIND_MANAGER) == []  # nothing ran


async def test_submit_validation_of_proto_only_fields(stub: Stub, ostub: OStub) -> None:
    step = o.StepDefinition(name="a", type="command")
    step.config.update({"command": "true"})
    bad_timeout = o.JobDefinition(name="x", steps=[step])
    bad_timeout.timeout.seconds = -5
    bad_step_timeout = o.JobDefinition(name="x", steps=[step])
    bad_step_timeout.steps[0].timeout.seconds = -1
    cases = [
        (o.SubmitJobRequest(), "definition"),
        (o.SubmitJobRequest(definition=bad_timeout), "timeout"),
        (o.SubmitJobRequest(definition=bad_step_timeout), "steps[0].timeout"),
        (
            o.SubmitJobRequest(
                definition=o.JobDefinition(name="x", steps=[step]), request_id="r" * 200
            ),
            "request_id",
        ),
    ]
    for request, field in cases:
        with pytest.raises(aio.AioRpcError) as err:
            await ostub.SubmitJob(request, timeout=WAIT_S)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in (err.value.details() or ""), (field, err.value.details())
    assert await list_all(stub, kind=S.JOB_KIND_MANAGER) == []


def _raw_definition(data: dict[str, Any]) -> o.JobDefinition:
    """A JobDefinition built field by field, without the client-side validation of
    ``definition()``, so the server's checks are what is tested."""
    out = o.JobDefinition(name=data.get("name", ""))
    for step in data.get("steps", []):
        pb = out.steps.add(
            name=step["name"], type=step["type"], depends_on=step.get("depends_on", [])
        )
        if "config" in step:
            pb.config.update(step["config"])
    return out


async def test_list_workers(ostub: OStub) -> None:
    resp = await ostub.ListWorkers(o.ListWorkersRequest(), timeout=WAIT_S)
    workers = {w.type: w for w in resp.workers}
    assert {"command", "fanout", "simulate", "python"} <= set(workers)
    assert workers["simulate"].spawns_children and workers["fanout"].spawns_children
    assert not workers["command"].spawns_children and not workers["python"].spawns_children
    assert all(w.description for w in resp.workers)


# -- the stale "spawned" -------------------------------------------------------------------------
async def write_spawned_every_way(stub: Stub, manager_id: str, step_id: str) -> None:
    """What the old orchestrator did once its children had finished, through each API that can
    carry it; every refusal is the guard working."""
    try:
        await stub.UpdateJobStatus(
            m.UpdateJobStatusRequest(job_id=step_id, status=S.JOB_STATUS_SPAWNED)
        )
        raise AssertionError("UpdateJobStatus moved a finished step back to spawned")
    except aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc
    manager = await get(stub, manager_id)
    patch: dict[str, Any] = {"step_stats": [{"step_id": step_id, "status": "spawned"}]}
    if meta(manager).get("current_step_id") == step_id:
        patch["current_step_status"] = "spawned"
    await stub.UpdateJobMetadata(
        m.UpdateJobMetadataRequest(job_id=manager_id, metadata=struct(patch))
    )
    try:
        await stub.UpdateStepStatInManager(
            m.UpdateStepStatInManagerRequest(
                manager_id=manager_id, step_id=step_id, status=S.JOB_STATUS_SPAWNED
            )
        )
        raise AssertionError("UpdateStepStatInManager moved a finished step back to spawned")
    except aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc


async def test_stale_spawned_after_the_step_completed_is_refused_by_the_monitor(
    stub: Stub,
    ostub: OStub,
    orchestrator: RunningOrchestrator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The old failure, reproduced: the children finish and the step completes, then the
    orchestrator writes ``spawned`` for it (here through all three APIs, straight after each
    step ended, as the old code did). The monitor's guard alone keeps every step completed."""
    from orchestrator_svc.runner.context import JobContext

    real_end_step = JobContext.end_step
    stale_writes: list[str] = []

    async def end_step_then_write_spawned(self, step, status, error, **kw):  # type: ignore[no-untyped-def]
        await real_end_step(self, step, status, error, **kw)
        stale_writes.append(step.job_id)
        await write_spawned_every_way(stub, self.manager_id, step.job_id)

    monkeypatch.setattr(JobContext, "end_step", end_step_then_write_spawned)
    manager_id = await submit(
        ostub,
        {
            "name": "stale-spawned",
            "steps": [
                {"name": "a", "type": "simulate", "config": sim(10, 5, fail_every=5)},
                {"name": "b", "type": "simulate", "config": sim(3)},
            ],
        },
    )
    rec = Recorder(stub, manager_id)
    job = await rec.done()
    assert len(stale_writes) == 2
    assert job.status == S.JOB_STATUS_COMPLETED
    assert [s.status for s in job.step_stats] == [S.JOB_STATUS_COMPLETED] * 2
    assert meta(job)["current_step_status"] == "completed"
    rec.assert_never_backwards()
    await assert_consistent(stub, job)
    # And later, once the job is over, from any client.
    for stat in job.step_stats:
        await write_spawned_every_way(stub, manager_id, stat.step_id)
    after = await get(stub, manager_id)
    assert [s.status for s in after.step_stats] == [S.JOB_STATUS_COMPLETED] * 2
    assert meta(after)["current_step_status"] == "completed"
    for stat in after.step_stats:
        assert (await get(stub, stat.step_id)).status == S.JOB_STATUS_COMPLETED


async def test_the_orchestrator_never_writes_spawned_for_a_wait_true_step(
    stub: Stub,
    ostub: OStub,
    orchestrator: RunningOrchestrator,
) -> None:
    """The orchestrator's own rule, observed two ways: every status and metadata write it sends
    to the monitor, and a watcher on the manager through the whole job."""
    client = orchestrator.orchestrator.monitor
    spawned_writes: list[tuple[str, str]] = []
    real_status, real_metadata = client.update_status, client.update_metadata

    async def spy_status(job_id: str, status: Status, *args: Any, **kw: Any) -> Job:
        if status is Status.SPAWNED:
            spawned_writes.append(("status", job_id))
        return await real_status(job_id, status, *args, **kw)

    async def spy_metadata(job_id: str, metadata: dict[str, Any], *args: Any, **kw: Any) -> Job:
        for entry in metadata.get("step_stats", []):
            if entry.get("status") == "spawned":
                spawned_writes.append(("step_stats", entry["step_id"]))
        if metadata.get("current_step_status") == "spawned":
            spawned_writes.append(("current_step_status", metadata.get("current_step_id", "")))
        return await real_metadata(job_id, metadata, *args, **kw)

    client.update_status = spy_status  # type: ignore[method-assign]
    client.update_metadata = spy_metadata  # type: ignore[method-assign]
    manager_id = await submit(
        ostub,
        {
            "name": "rule",
            "steps": [
                {
                    "name": "w1",
                    "type": "simulate",
                    "config": sim(20, 2, concurrency=4, fail_every=7),
                },
                {
                    "name": "h1",
                    "type": "simulate",
                    "wait": False,
                    "config": sim(10, 20, concurrency=2),
                },
                {"name": "w2", "type": "simulate", "config": sim(15, 1)},
                {"name": "w3", "type": "fanout", "config": {"items": [1, 2, 3], "command": "true"}},
            ],
        },
    )
    rec = Recorder(stub, manager_id)
    job = await rec.done()
    assert job.status == S.JOB_STATUS_COMPLETED, job
    rec.assert_never_backwards()
    for name in ("w1", "w2", "w3"):
        assert S.JOB_STATUS_SPAWNED not in rec.statuses_seen(name), name
    wait_true_ids = {s.step_id for s in job.step_stats if s.step_name != "h1"}
    assert not [w for w in spawned_writes if w[1] in wait_true_ids], spawned_writes
    # The hand-off is the one step it writes `spawned` for (once its first child is committed).
    assert spawned_writes == [("status", by_name(job)["h1"].step_id)]
    await assert_consistent(stub, job)


# -- a job no one tuned to -----------------------------------------------------------------------
async def test_an_untuned_job_ends_with_every_entry_equal_to_its_row(
    stub: Stub, ostub: OStub
) -> None:
    steps = [
        {
            "name": "crawl",
            "type": "simulate",
            "on_error": "continue",
            "config": sim(37, 1, concurrency=5, fail_every=6, cancel_every=4),
        },
        {
            "name": "fan",
            "type": "fanout",
            "on_error": "continue",
            "config": {
                "items": ["a", "b", "c", "d", "e"],
                "command": "test {item} != c",
                "concurrency": 2,
            },
        },
        {
            "name": "handed-mixed",
            "type": "simulate",
            "wait": False,
            "on_error": "continue",
            "config": sim(23, 3, concurrency=3, fail_every=5, cancel_every=7),
        },
        {
            "name": "handed-all-fail",
            "type": "simulate",
            "wait": False,
            "on_error": "continue",
            "config": sim(5, 2, fail_every=1),
        },
        {
            "name": "handed-all-cancel",
            "type": "simulate",
            "wait": False,
            "on_error": "continue",
            "config": sim(4, 0, cancel_every=1),
        },
        {"name": "py-ok", "type": "python", "config": {"callable": "builtins:len"}},
        {
            "name": "py-bad",
            "type": "python",
            "on_error": "continue",
            "config": {"callable": "builtins:int"},
        },
        {
            "name": "after-all-fail",
            "type": "command",
            "depends_on": ["handed-all-fail"],
            "config": {"command": "true"},
        },
        {"name": "after-crawl", "type": "simulate", "depends_on": ["crawl"], "config": sim(8, 0)},
        {"name": "tail", "type": "command", "config": {"command": "echo done"}},
    ]
    manager_id = await submit(ostub, {"name": "untuned", "timeout": "1m", "steps": steps})
    rec = Recorder(stub, manager_id)
    job = await rec.done(within=30)
    assert job.status == S.JOB_STATUS_COMPLETED, job
    rec.assert_never_backwards()
    stats = by_name(job)
    expected_status = {
        "crawl": S.JOB_STATUS_COMPLETED,
        "fan": S.JOB_STATUS_COMPLETED,
        "handed-mixed": S.JOB_STATUS_COMPLETED,
        "handed-all-fail": S.JOB_STATUS_FAILED,
        "handed-all-cancel": S.JOB_STATUS_CANCELLED,
        "py-ok": S.JOB_STATUS_COMPLETED,
        "py-bad": S.JOB_STATUS_FAILED,
        "after-all-fail": S.JOB_STATUS_SKIPPED,
        "after-crawl": S.JOB_STATUS_COMPLETED,
        "tail": S.JOB_STATUS_COMPLETED,
    }
    assert {n: s.status for n, s in stats.items()} == expected_status
    for step in steps:
        if step["type"] == "simulate" and step["name"] != "after-all-fail":
            assert counts_of(stats[step["name"]].children) == tally_counts(step["config"]), step[
                "name"
            ]
    assert counts_of(stats["fan"].children) == (0, 0, 4, 1, 0)
    for name in ("handed-mixed", "handed-all-fail", "handed-all-cancel"):
        assert (await get(stub, stats[name].step_id)).end_reason == "children_terminal", name
    await assert_consistent(stub, job)
