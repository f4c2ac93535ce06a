"""A step ends as its children's recorded outcome says, whatever a worker reports, and a
child cancelled through CancelJob has its process stopped.

Real monitor, real orchestrator (in-process), and a worker plugin installed as a real
distribution, for what no built-in worker does: children failing with a 70,000-character
error, or reported under an id the monitor rejects.
"""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from grpc import aio

from monitor_svc.server import RunningMonitor
from orchestrator_svc.server import OrchestratorConfig, RunningOrchestrator, create_server
from stepflow_common.limits import MAX_ERROR_CHARS
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from stepflow_proto.v1 import orchestrator_service_pb2 as o
from stepflow_proto.v1 import orchestrator_service_pb2_grpc as o_grpc
from tests.orchestrator_fixtures import definition, run_to_end

S = job_pb2
PLUGIN = "stepflow_outcome_plugin"
HUGE_ERROR_CHARS = 70_000  # more than the monitor's 65,536-character limit on an event's error


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    (tmp_path / f"{PLUGIN}.py").write_text(
        textwrap.dedent(
            """
            from orchestrator_svc.workers.base import BaseWorker, StepResult

            class Reporter(BaseWorker):
                '''Children that fail with a huge error; with bad_ids, under ids the monitor
                rejects (so their events are rejected too).'''
                type = "reporter"
                description = "test worker"
                spawns_children = True

                async def run(self, ctx):
                    n = int(ctx.config.get("children", 1))
                    for i in range(n):
                        bad = i < int(ctx.config.get("bad_ids", 0))
                        cid = f"not a valid id {i}" if bad else ctx.child_id(i)
                        await ctx.child_created(cid, f"child {i}")
                        await ctx.child_running(cid)
                        if int(ctx.config.get("fail", 1)):
                            await ctx.child_finished(cid, "failed", "\\U0001f4a5" * 70_000)
                        else:
                            await ctx.child_finished(cid, "completed", "")
                    return StepResult.spawned(n)
            """
        )
    )
    dist_info = tmp_path / "stepflow_outcome_plugin-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: stepflow-outcome-plugin\nVersion: 1.0\n"
    )
    (dist_info / "entry_points.txt").write_text(
        f"[stepflow.workers]\nreporter = {PLUGIN}:Reporter\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop(PLUGIN, None)


@pytest.fixture
async def orch(plugin: None, monitor: RunningMonitor) -> AsyncIterator[RunningOrchestrator]:
    running = await create_server(
        OrchestratorConfig(port=0, monitor=monitor.address, owner="outcomes", shutdown_grace_s=1.0)
    )
    try:
        yield running
    finally:
        await running.stop(grace=0.5)


@pytest.fixture
async def clients(
    monitor: RunningMonitor, orch: RunningOrchestrator
) -> AsyncIterator[tuple[m_grpc.MonitorServiceStub, o_grpc.OrchestratorServiceStub]]:
    async with (
        aio.insecure_channel(monitor.address) as mch,
        aio.insecure_channel(orch.address) as och,
    ):
        yield m_grpc.MonitorServiceStub(mch), o_grpc.OrchestratorServiceStub(och)


def one_step(wait: bool, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "outcomes",
        "steps": [{"name": "s", "type": "reporter", "wait": wait, "config": config}],
    }


async def children_of(stub: m_grpc.MonitorServiceStub, step_id: str) -> list[job_pb2.Job]:
    resp = await stub.ListJobs(m.ListJobsRequest(parent_id=step_id, page_size=100))
    return list(resp.jobs)


@pytest.mark.parametrize("wait", [True, False], ids=["wait", "handed-off"])
async def test_a_child_failing_with_a_huge_error_ends_failed_and_so_does_its_step(
    clients: Any, wait: bool
) -> None:
    stub, ostub = clients
    job = await run_to_end(stub, ostub, one_step(wait, {"children": 1}), timeout=30.0)
    (stat,) = job.step_stats
    assert stat.status == S.JOB_STATUS_FAILED, stat
    assert (stat.children.running, stat.children.failed) == (0, 1)
    step = (await stub.GetJob(m.GetJobRequest(job_id=stat.step_id))).job
    assert step.status == S.JOB_STATUS_FAILED
    assert step.end_reason != "timeout"  # ended by its child, not by waiting it out
    (child,) = await children_of(stub, stat.step_id)
    assert child.status == S.JOB_STATUS_FAILED
    assert len(child.error) <= MAX_ERROR_CHARS and "truncated" in child.error


@pytest.mark.parametrize("wait", [True, False], ids=["wait", "handed-off"])
async def test_a_step_whose_child_outcome_the_monitor_rejects_does_not_end_completed(
    clients: Any, wait: bool
) -> None:
    """Two children end completed, but the worker reported a third under an id the monitor
    rejects: its end cannot be recorded, so the step must not claim success from the two."""
    stub, ostub = clients
    config = {"children": 3, "bad_ids": 1, "fail": 0}
    job = await run_to_end(stub, ostub, one_step(wait, config), timeout=30.0)
    (stat,) = job.step_stats
    step = (await stub.GetJob(m.GetJobRequest(job_id=stat.step_id))).job
    assert step.status == S.JOB_STATUS_FAILED, step
    assert "not recorded" in step.error and "not a valid id 0" in step.error
    assert step.end_reason != "timeout"
    assert job.status == S.JOB_STATUS_FAILED


async def test_cancel_job_on_a_child_stops_its_process(clients: Any, tmp_path: Path) -> None:
    stub, ostub = clients
    pid_file = tmp_path / "slow.pid"
    command = f"if [ {{item}} = slow ]; then echo $$ > {pid_file}; exec sleep 60; fi; echo {{item}}"
    data = {
        "name": "cancel-a-child",
        "steps": [
            {
                "name": "fan",
                "type": "fanout",
                "config": {"items": ["slow", "a", "b"], "command": command, "concurrency": 3},
            },
            {"name": "after", "type": "command", "config": {"command": "true"}},
        ],
    }
    submitted = await ostub.SubmitJob(o.SubmitJobRequest(definition=definition(data)))
    deadline = time.monotonic() + 30.0
    while not (pid_file.exists() and pid_file.read_text().strip()):
        assert time.monotonic() < deadline, "the slow child never started"
        await asyncio.sleep(0.05)
    pid = int(pid_file.read_text())
    os.kill(pid, 0)  # running
    manager = (await stub.GetJob(m.GetJobRequest(job_id=submitted.manager_id))).job
    step_id = next(s.step_id for s in manager.step_stats if s.step_name == "fan")
    child_id = f"{step_id}.0"
    while True:  # its process runs; its record follows once the stream's batch is committed
        listed = {c.id: c.status for c in await children_of(stub, step_id)}
        if listed.get(child_id) == S.JOB_STATUS_RUNNING:
            break
        assert time.monotonic() < deadline, listed
        await asyncio.sleep(0.05)

    resp = await ostub.CancelJob(o.CancelJobRequest(job_id=child_id, reason="not needed"))
    assert resp.job.status == S.JOB_STATUS_CANCELLED
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # stopped before CancelJob answered

    # The rest of the job goes on by its rules: 2 completed + 1 cancelled -> completed.
    last = None
    async for msg in stub.WatchJob(m.WatchJobRequest(job_id=submitted.manager_id)):
        last = msg.job
    assert last is not None and last.status == S.JOB_STATUS_COMPLETED, last
    fan = next(s for s in last.step_stats if s.step_name == "fan")
    assert fan.status == S.JOB_STATUS_COMPLETED
    assert (fan.children.completed, fan.children.cancelled) == (2, 1)
    child = (await stub.GetJob(m.GetJobRequest(job_id=child_id))).job
    assert child.status == S.JOB_STATUS_CANCELLED
