"""Orchestrators come and go, jobs don't: real monitor and orchestrator processes with short
leases (``--lease 1.5s``) and orphan timeouts (``--orphan-timeout 3s``), each scenario on SQLite
and on PostgreSQL.

Every scenario ends with the same checks: the job's final status, every step_stats entry equal
to its step's row, every count equal to the child rows, nothing left live, and (where the test
knows them) the exact counts, so a child run twice at once or counted twice shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from grpc import aio

from stepflow_common.proto_status import LIVE_PB as LIVE
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from stepflow_proto.v1 import orchestrator_service_pb2 as o
from stepflow_proto.v1 import orchestrator_service_pb2_grpc as o_grpc
from tests.jobs import Recorder, by_name, final, list_all, sim, watch_until
from tests.process_helpers import (
    ServerProcess,
    assert_tree_consistent,
    monitor_process,
    orchestrator,
    running_orchestrators,
    submit_to,
)

S = job_pb2
ORPHAN_TIMEOUT = "3s"
WITHIN_S = 60.0


@pytest.fixture
def monitor_options() -> dict[str, Any]:
    return {
        "grace_period": "1s",
        "default_wait_timeout": "60s",
        "extra": ["--orphan-timeout", ORPHAN_TIMEOUT],
    }


def two_step_job(name: str, children: int = 24, duration_ms: int = 300) -> dict[str, Any]:
    """A quick step, then one long enough to be interrupted (some of its children fail by
    its pattern: the counts are exact), then a command."""
    return {
        "name": name,
        "steps": [
            {"name": "first", "type": "simulate", "config": sim(3)},
            {
                "name": "busy",
                "type": "simulate",
                "on_error": "continue",
                "config": sim(children, duration_ms, concurrency=4, fail_every=6),
            },
            {"name": "after", "type": "command", "config": {"command": "true"}},
        ],
    }


def busy_counts(children: int = 24) -> dict[str, tuple[int, int, int, int, int]]:
    failed = children // 6
    return {
        "first": (0, 0, 3, 0, 0),
        "busy": (0, 0, children - failed, failed, 0),
        "after": (0, 0, 0, 0, 0),
    }


def busy_at_least(done: int) -> Any:
    def check(job: job_pb2.Job) -> bool:
        stats = by_name(job)
        if "busy" not in stats:
            return False
        c = stats["busy"].children
        return c.completed + c.failed >= done and c.running > 0

    return check


async def children_of(stub: m_grpc.MonitorServiceStub, manager_id: str, step: str) -> list[Any]:
    job = await final(stub, manager_id, within=WITHIN_S)
    return await list_all(stub, parent_id=by_name(job)[step].step_id)


# -- kill -9 the owner -------------------------------------------------------------------------
async def test_killed_owner_job_completes_on_the_other_orchestrator(
    monitor_proc: ServerProcess, mstub: m_grpc.MonitorServiceStub, tmp_path: Path
) -> None:
    async with running_orchestrators(monitor_proc, tmp_path, "first", "second") as (first, _second):
        manager_id = await submit_to(first, two_step_job("failover"))
        watcher = Recorder(mstub, manager_id)
        await watch_until(mstub, manager_id, busy_at_least(4), within=WITHIN_S)
        first.kill()
        job = await final(mstub, manager_id, within=WITHIN_S)
        assert job.status == S.JOB_STATUS_COMPLETED, (job.error, job.end_reason)
        assert job.owner == "second"
        await assert_tree_consistent(mstub, manager_id, expected_counts=busy_counts())
        kids = await children_of(mstub, manager_id, "busy")
        # The children running when the owner died ran again as a second attempt.
        assert any(k.attempt == 2 and k.interruptions == 1 for k in kids), [
            (k.attempt, k.interruptions) for k in kids
        ]
        assert all(k.attempt in (1, 2) for k in kids)
        await watcher.done()
        watcher.assert_never_backwards()
        # A retried submit through the survivor returns the same job, run once.


async def test_killed_owner_restarted_under_its_name_resumes_at_once(
    monitor_proc: ServerProcess, mstub: m_grpc.MonitorServiceStub, tmp_path: Path
) -> None:
    # A long lease: only a resume (not an adoption after the lease lapses) can finish in time.
    first = orchestrator(monitor_proc, tmp_path, "solo", lease="60s")
    again: ServerProcess | None = None
    try:
        await first.run()
        manager_id = await submit_to(first, two_step_job("restart"), request_id="restart-1")
        await watch_until(mstub, manager_id, busy_at_least(4), within=WITHIN_S)
        first.kill()
        again = orchestrator(monitor_proc, tmp_path, "solo", lease="60s")
        await again.run()
        job = await final(mstub, manager_id, within=30)
        assert job.status == S.JOB_STATUS_COMPLETED, (job.error, job.end_reason)
        await assert_tree_consistent(mstub, manager_id, expected_counts=busy_counts())
        # The same request again: the same job, not run again.
        assert await submit_to(again, two_step_job("restart"), request_id="restart-1") == manager_id
    finally:
        first.stop()
        if again is not None:
            again.stop()


# -- graceful stops ------------------------------------------------------------------------------
async def test_sigterm_mid_job_then_restart_fails_nothing(
    monitor_proc: ServerProcess, mstub: m_grpc.MonitorServiceStub, tmp_path: Path
) -> None:
    first = orchestrator(monitor_proc, tmp_path, "term", grace="5s")
    again: ServerProcess | None = None
    try:
        await first.run()
        manager_id = await submit_to(first, two_step_job("sigterm"))
        watcher = Recorder(mstub, manager_id)
        await watch_until(mstub, manager_id, busy_at_least(4), within=WITHIN_S)
        assert await asyncio.to_thread(first.stop, 30.0) == 0
        # Drained: running children finished, the job waits (orphaned) with no child running.
        job = (await mstub.GetJob(_get(manager_id))).job
        assert job.status == S.JOB_STATUS_RUNNING and job.owner == ""
        assert by_name(job)["busy"].children.running == 0
        again = orchestrator(monitor_proc, tmp_path, "term-2")
        await again.run()
        job = await final(mstub, manager_id, within=WITHIN_S)
        assert job.status == S.JOB_STATUS_COMPLETED, (job.error, job.end_reason)
        await assert_tree_consistent(mstub, manager_id, expected_counts=busy_counts())
        # Nothing was interrupted: every child ran once.
        assert {k.attempt for k in await children_of(mstub, manager_id, "busy")} == {1}
        await watcher.done()
        watcher.assert_never_backwards()
    finally:
        first.stop()
        if again is not None:
            again.stop()


async def test_rolling_restart_under_a_stream_of_jobs_fails_none(
    monitor_proc: ServerProcess, mstub: m_grpc.MonitorServiceStub, tmp_path: Path
) -> None:
    async with running_orchestrators(monitor_proc, tmp_path, "a", "b", grace="3s") as (a, b):
        ids: list[str] = []
        for round_ in range(2):
            for proc in (a, b):
                for k in range(2):
                    target = b if proc is a else a  # submit to the one that stays up
                    ids.append(await submit_to(target, two_step_job(f"r{round_}{k}", 12, 200)))
                await asyncio.sleep(0.5)
                assert await asyncio.to_thread(proc.stop, 30.0) == 0
                await proc.run()
        for manager_id in ids:
            job = await final(mstub, manager_id, within=WITHIN_S)
            assert job.status == S.JOB_STATUS_COMPLETED, (manager_id, job.error, job.end_reason)
            await assert_tree_consistent(mstub, manager_id, expected_counts=busy_counts(12))


# -- nobody left -------------------------------------------------------------------------------
async def test_with_no_orchestrator_left_the_orphan_fails_after_the_timeout(
    monitor_proc: ServerProcess, mstub: m_grpc.MonitorServiceStub, tmp_path: Path
) -> None:
    async with running_orchestrators(monitor_proc, tmp_path, "only") as (only,):
        manager_id = await submit_to(only, two_step_job("orphan"))
        await watch_until(mstub, manager_id, busy_at_least(2), within=WITHIN_S)
        only.kill()
        orphaned = await watch_until(mstub, manager_id, lambda j: j.owner == "", within=WITHIN_S)
        assert orphaned.status == S.JOB_STATUS_RUNNING
        job = await final(mstub, manager_id, within=WITHIN_S)
        assert (job.status, job.end_reason) == (S.JOB_STATUS_FAILED, "orchestrator_lost")
        assert "no orchestrator took the job over" in job.error
        assert [j for j in await list_all(mstub, manager_id=manager_id) if j.status in LIVE] == []
        await assert_tree_consistent(mstub, manager_id)


# -- a frozen owner ----------------------------------------------------------------------------
async def test_frozen_owner_is_fenced_and_stops_when_it_wakes(
    monitor_proc: ServerProcess, mstub: m_grpc.MonitorServiceStub, tmp_path: Path
) -> None:
    async with running_orchestrators(monitor_proc, tmp_path, "frozen", "other") as (frozen, _other):
        manager_id = await submit_to(frozen, two_step_job("frozen", 24, 400))
        watcher = Recorder(mstub, manager_id)
        await watch_until(mstub, manager_id, busy_at_least(4), within=WITHIN_S)
        frozen.send(signal.SIGSTOP)
        await watch_until(mstub, manager_id, lambda j: j.owner == "other", within=WITHIN_S)
        frozen.send(signal.SIGCONT)
        job = await final(mstub, manager_id, within=WITHIN_S)
        assert job.status == S.JOB_STATUS_COMPLETED, (job.error, job.end_reason)
        assert job.owner == "other"
        await assert_tree_consistent(mstub, manager_id, expected_counts=busy_counts())
        await watcher.done()
        watcher.assert_never_backwards()
        await asyncio.sleep(1.0)  # the woken one's stray writes, if any, would land by now
        assert await _fenced_lines(frozen), frozen.log_tail()
        await assert_tree_consistent(mstub, manager_id, expected_counts=busy_counts())


async def _fenced_lines(proc: ServerProcess) -> list[str]:
    return [line for line in proc.log_text().splitlines() if "work here stops" in line]


# -- retries and on_interrupt ------------------------------------------------------------------
async def test_a_child_failing_twice_then_succeeding_is_completed_on_attempt_3(
    monitor_proc: ServerProcess, mstub: m_grpc.MonitorServiceStub, tmp_path: Path
) -> None:
    async with running_orchestrators(monitor_proc, tmp_path, "retrier") as (proc,):
        manager_id = await submit_to(
            proc,
            {
                "name": "retries",
                "steps": [
                    {
                        "name": "flaky",
                        "type": "fanout",
                        "retries": 2,
                        "retry_backoff": "100ms",
                        "config": {
                            # Item "x" fails its first two attempts; "y" succeeds at once.
                            "items": ["x", "y"],
                            "command": 'test "$STEPFLOW_ITEM" = y || test "$STEPFLOW_ATTEMPT" = 3',
                        },
                    }
                ],
            },
        )
        job = await final(mstub, manager_id, within=WITHIN_S)
        assert job.status == S.JOB_STATUS_COMPLETED, job.error
        await assert_tree_consistent(mstub, manager_id, expected_counts={"flaky": (0, 0, 2, 0, 0)})
        kids = {k.name: k for k in await children_of(mstub, manager_id, "flaky")}
        assert (kids["x"].status, kids["x"].attempt) == (S.JOB_STATUS_COMPLETED, 3)
        assert (kids["y"].status, kids["y"].attempt) == (S.JOB_STATUS_COMPLETED, 1)


async def test_on_interrupt_fail_ends_the_interrupted_children_orchestrator_lost(
    monitor_proc: ServerProcess, mstub: m_grpc.MonitorServiceStub, tmp_path: Path
) -> None:
    async with running_orchestrators(monitor_proc, tmp_path, "first", "second") as (first, _second):
        manager_id = await submit_to(
            first,
            {
                "name": "no-twice",
                "steps": [
                    {
                        "name": "busy",
                        "type": "simulate",
                        "on_interrupt": "fail",
                        "on_error": "continue",
                        "config": sim(12, 400, concurrency=3),
                    },
                    {
                        "name": "once",
                        "type": "command",
                        "on_interrupt": "fail",
                        "config": {"command": "true"},
                    },
                ],
            },
        )
        await watch_until(mstub, manager_id, busy_at_least(3), within=WITHIN_S)
        first.kill()
        job = await final(mstub, manager_id, within=WITHIN_S)
        stats = by_name(job)
        busy = await children_of(mstub, manager_id, "busy")
        lost = [k for k in busy if k.end_reason == "orchestrator_lost"]
        assert lost and all(k.status == S.JOB_STATUS_FAILED for k in lost)
        assert all(k.attempt == 1 for k in busy), "a child ran twice"
        assert stats["busy"].children.failed == len(lost)
        assert stats["busy"].children.completed == 12 - len(lost)
        assert stats["busy"].status == S.JOB_STATUS_COMPLETED  # some completed
        assert stats["once"].status == S.JOB_STATUS_COMPLETED
        await assert_tree_consistent(mstub, manager_id)


@pytest.mark.parametrize("on_interrupt", ["rerun", "fail"])
async def test_a_step_without_children_runs_again_or_fails_as_it_says(
    monitor_proc: ServerProcess,
    mstub: m_grpc.MonitorServiceStub,
    tmp_path: Path,
    on_interrupt: str,
) -> None:
    runs = tmp_path / "runs"
    async with running_orchestrators(monitor_proc, tmp_path, "first", "second") as (first, _second):
        manager_id = await submit_to(
            first,
            {
                "name": "command",
                "steps": [
                    {
                        "name": "cmd",
                        "type": "command",
                        "on_interrupt": on_interrupt,
                        "config": {"command": f'echo "$STEPFLOW_ATTEMPT" >> {runs}; sleep 2'},
                    }
                ],
            },
        )
        await asyncio.to_thread(_wait_for, runs.exists)
        first.kill()
        job = await final(mstub, manager_id, within=WITHIN_S)
        step = by_name(job)["cmd"]
        if on_interrupt == "rerun":
            assert job.status == S.JOB_STATUS_COMPLETED, job.error
            assert runs.read_text().split() == ["1", "2"]
            row = (await mstub.GetJob(_get(step.step_id))).job
            assert (row.attempt, row.interruptions) == (2, 1), row
        else:
            assert job.status == S.JOB_STATUS_FAILED
            assert step.status == S.JOB_STATUS_FAILED
            row = (await mstub.GetJob(_get(step.step_id))).job
            assert row.end_reason == "orchestrator_lost", row
            assert runs.read_text().split() == ["1"]
        await assert_tree_consistent(mstub, manager_id)


def _wait_for(condition: Callable[[], bool], within: float = WITHIN_S) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A finished child the orchestrator has not reaped yet counts as gone.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            return False
    return True


# -- CancelJob through any orchestrator ----------------------------------------------------------
async def test_cancel_through_another_orchestrator_stops_the_owners_processes(
    monitor_proc: ServerProcess, mstub: m_grpc.MonitorServiceStub, tmp_path: Path
) -> None:
    async with running_orchestrators(monitor_proc, tmp_path, "owner", "other") as (owner, other):
        manager_id = await submit_to(
            owner,
            {
                "name": "cancel-anywhere",
                "steps": [
                    {
                        "name": "sleepers",
                        "type": "fanout",
                        "config": {
                            "items": ["a", "b"],
                            "command": f"echo $$ > {tmp_path}/{{item}}.pid; exec sleep 60",
                        },
                    }
                ],
            },
        )
        pid_files = [tmp_path / "a.pid", tmp_path / "b.pid"]
        await asyncio.to_thread(
            _wait_for, lambda: all(p.exists() and p.read_text().strip() for p in pid_files)
        )
        pid_a, pid_b = (int(p.read_text()) for p in pid_files)
        # Both running in the record too (their events may still be on their way).
        job = await watch_until(
            mstub,
            manager_id,
            lambda j: "sleepers" in by_name(j) and by_name(j)["sleepers"].children.running == 2,
            within=WITHIN_S,
        )
        kids = {
            k.name: k for k in await list_all(mstub, parent_id=by_name(job)["sleepers"].step_id)
        }
        async with aio.insecure_channel(other.address) as channel:
            ostub = o_grpc.OrchestratorServiceStub(channel)
            # One child: its process on the owner stops, the other runs on.
            resp = await ostub.CancelJob(o.CancelJobRequest(job_id=kids["a"].id), timeout=10)
            assert resp.job.status == S.JOB_STATUS_CANCELLED
            await asyncio.to_thread(_wait_for, lambda: not _alive(pid_a))
            assert _alive(pid_b)
            # The whole job: the owner's watch sees it and stops the rest.
            await ostub.CancelJob(o.CancelJobRequest(job_id=manager_id), timeout=10)
            await asyncio.to_thread(_wait_for, lambda: not _alive(pid_b))
        job = await final(mstub, manager_id, within=WITHIN_S)
        assert job.status == S.JOB_STATUS_CANCELLED
        await assert_tree_consistent(
            mstub, manager_id, expected_counts={"sleepers": (0, 0, 0, 0, 2)}
        )


def _get(job_id: str) -> Any:
    from stepflow_proto.v1 import monitor_service_pb2 as m

    return m.GetJobRequest(job_id=job_id)


# -- two monitor replicas ------------------------------------------------------------------------
# Replicas share one PostgreSQL database (SQLite has one writer process), so PostgreSQL only.
@pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
async def test_two_monitor_replicas_hand_each_orphan_to_one_adopter(
    database_url: str, monitor_proc: ServerProcess, tmp_path: Path
) -> None:
    replica = monitor_process(
        database_url,
        tmp_path,
        name="replica",
        grace_period="1s",
        default_wait_timeout="60s",
        extra=["--orphan-timeout", ORPHAN_TIMEOUT],
    )
    dies = orchestrator(monitor_proc, tmp_path, "dies")
    left = orchestrator(monitor_proc, tmp_path, "left")
    right = orchestrator(replica, tmp_path, "right")
    try:
        await replica.run()
        for proc in (dies, left, right):
            await proc.run()
        # Long enough that every job is still running when its orchestrator dies, however
        # slowly the six are submitted; one that ended first anyway keeps its owner.
        ids = [await submit_to(dies, two_step_job(f"job{k}", 12, 800)) for k in range(6)]
        async with aio.insecure_channel(monitor_proc.address) as channel:
            stub = m_grpc.MonitorServiceStub(channel)
            await watch_until(stub, ids[-1], busy_at_least(1), within=WITHIN_S)
            dies.kill()
            killed_at = time.time()
            orphaned = set()
            for manager_id in ids:
                job = await final(stub, manager_id, within=WITHIN_S)
                assert job.status == S.JOB_STATUS_COMPLETED, (job.error, job.end_reason)
                if job.owner == "dies":  # it ended before the kill
                    assert job.finished_at.ToSeconds() <= killed_at + 1.0, job
                else:
                    assert job.owner in ("left", "right")
                    orphaned.add(manager_id)
                await assert_tree_consistent(stub, manager_id, expected_counts=busy_counts(12))
                kids = await children_of(stub, manager_id, "busy")
                assert all(k.attempt in (1, 2) for k in kids)
        assert len(orphaned) >= 3, orphaned  # the later ones at least were running
        taken = {name: _taken_over(proc) for name, proc in (("left", left), ("right", right))}
        assert taken["left"].isdisjoint(taken["right"]), taken
        assert taken["left"] | taken["right"] == orphaned, taken
    finally:
        for proc in (dies, left, right, replica):
            proc.stop()


def _taken_over(proc: ServerProcess) -> set[str]:
    ids: set[str] = set()
    for line in proc.log_text().splitlines():
        if '"jobs taken over"' in line:
            ids.update(json.loads(line)["adopted"])
    return ids
