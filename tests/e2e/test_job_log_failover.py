"""The job log through what a deployment meets (SPEC §6): the monitor SIGKILLed while a job's
work prints, and the job's orchestrator SIGKILLed mid-step and the job taken over. Every
printed line is in the log exactly once, in the order printed, and the story of the take-over
is told by the monitor's own lines. Real processes, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path
from typing import Any

import pytest
from grpc import aio

from stepflow_client import aio as client
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from tests.jobs import final, whole_log
from tests.process_helpers import (
    ServerProcess,
    monitor_process,
    orchestrator_process,
    running,
    running_orchestrators,
    submit_to,
)

pytestmark = pytest.mark.timeout(180)

WITHIN_S = 90.0
LINES = 40


@pytest.fixture
def monitor_options() -> dict[str, Any]:
    return {
        "grace_period": "1s",
        "default_wait_timeout": "60s",
        "extra": ["--orphan-timeout", "20s"],
    }


async def wait_for_line(monitor: client.MonitorClient, job_id: str, text: str) -> None:
    async def seen() -> None:
        async for line in monitor.follow_log(job_id, sources=["stdout"]):
            if line.message == text:
                return

    await asyncio.wait_for(seen(), WITHIN_S)


async def test_a_take_over_mid_step_keeps_the_lines_before_and_after_it_each_once(
    monitor_proc: ServerProcess, mstub: m_grpc.MonitorServiceStub, tmp_path: Path
) -> None:
    job = {
        "name": "taken-over",
        "steps": [
            {
                "name": "long",
                "type": "command",
                "config": {
                    "command": "echo before-$STEPFLOW_ATTEMPT; sleep 4; "
                    "echo after-$STEPFLOW_ATTEMPT"
                },
            }
        ],
    }
    async with (
        running_orchestrators(monitor_proc, tmp_path, "first", "second") as (first, _second),
        client.MonitorClient(monitor_proc.address) as mon,
    ):
        manager_id = await submit_to(first, job)
        await wait_for_line(mon, manager_id, "before-1")
        first.kill()
        done = await final(mstub, manager_id, within=WITHIN_S)
        lines = await whole_log(mon, manager_id)
    assert done.status == job_pb2.JOB_STATUS_COMPLETED, (done.error, done.end_reason)
    assert done.owner == "second"
    printed = [(line.message, line.attempt) for line in lines if line.source == "stdout"]
    # The first run's line (its run died with its orchestrator before "after-1"), then the
    # second run's two: each once, in order.
    assert printed == [("before-1", 1), ("before-2", 2), ("after-2", 2)], printed
    assert [line.seq for line in lines] == list(range(1, len(lines) + 1))
    story = [line.message for line in lines if line.source == "event"]
    lost = [s for s in story if s.startswith("orchestrator first lost")]
    adopted = [s for s in story if "second" in s and ("adopted" in s or "taken over" in s)]
    assert len(lost) + len(adopted) >= 1 and len(adopted) == 1, story
    assert any(s.startswith("step long interrupted") for s in story), story
    assert [s for s in story if s.startswith("step long completed")] == [
        "step long completed (orchestrator)"
    ]
    assert story[-1] == "job taken-over completed (orchestrator)"


async def test_the_monitor_killed_while_children_print_loses_no_line_and_stores_none_twice(
    database_url: str, tmp_path: Path
) -> None:
    items = [str(i) for i in range(12)]
    job = {
        "name": "chatty",
        "steps": [
            {
                "name": "each",
                "type": "fanout",
                "config": {
                    "items": items,
                    "concurrency": 4,
                    "command": f"for i in $(seq 1 {LINES}); do echo {{item}}-$i; sleep 0.02; done",
                },
            }
        ],
    }
    monitor = monitor_process(database_url, tmp_path, default_wait_timeout="120s")
    orchestrator = orchestrator_process(monitor.address, tmp_path)
    async with running(monitor, orchestrator):
        manager_id = await submit_to(orchestrator, job)
        async with client.MonitorClient(monitor.address) as mon:
            await wait_for_line(mon, manager_id, "0-5")
        for _ in range(2):
            await asyncio.to_thread(monitor.kill)
            await asyncio.sleep(0.3)
            monitor.start()
            await monitor.wait_serving()
            await asyncio.sleep(0.5)
        async with client.MonitorClient(monitor.address) as mon:
            async with aio.insecure_channel(monitor.address) as channel:
                done = await final(m_grpc.MonitorServiceStub(channel), manager_id, within=WITHIN_S)
            lines = await whole_log(mon, manager_id)
    assert monitor.starts == 3
    assert done.status == job_pb2.JOB_STATUS_COMPLETED, done.error
    by_child: dict[str, list[str]] = collections.defaultdict(list)
    for line in lines:
        if line.source == "stdout":
            by_child[line.child_id].append(line.message)
    step_id = done.step_stats[0].step_id
    for index, item in enumerate(items):
        assert by_child[f"{step_id}.{index}"] == [f"{item}-{i}" for i in range(1, LINES + 1)]
    assert [line.seq for line in lines] == list(range(1, len(lines) + 1))
