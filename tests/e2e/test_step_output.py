"""Where a step's output goes: the last lines of a ``command`` step's and of each ``fanout``
child's stdout and stderr, in one "command output" log event carrying the job's id, bounded
in lines and bytes."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

from grpc import aio

from orchestrator_svc import definitions
from orchestrator_svc.workers.shell import OUTPUT_LOG_LINES, OUTPUT_TAIL_BYTES, run_shell
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from stepflow_proto.v1 import orchestrator_service_pb2 as o
from stepflow_proto.v1 import orchestrator_service_pb2_grpc as o_grpc
from tests.process_helpers import (
    TERMINAL,
    monitor_process,
    orchestrator_process,
    running,
    wait_job,
)

JOB = {
    "name": "output",
    "steps": [
        {
            "name": "talk",
            "type": "command",
            "on_error": "continue",
            "config": {"command": "for i in $(seq 1 50); do echo out-$i; done; echo oops >&2"},
        },
        {
            "name": "each",
            "type": "fanout",
            "config": {"items": ["a", "b"], "command": "echo item-{item}"},
        },
        {"name": "quiet", "type": "command", "config": {"command": "true"}},
    ],
}


async def test_output_tails_are_bounded() -> None:
    outcome = await run_shell(
        "for i in $(seq 1 5000); do echo line-$i; done; echo last-err >&2; exit 1",
        cancelled=asyncio.Event(),
    )
    assert outcome.status == "failed"
    lines = outcome.stdout.splitlines()
    assert len(lines) == OUTPUT_LOG_LINES
    assert lines[-1] == "line-5000" and lines[0] == f"line-{5000 - OUTPUT_LOG_LINES + 1}"
    assert len(outcome.stdout.encode()) <= OUTPUT_TAIL_BYTES
    assert outcome.stderr == "last-err"
    assert outcome.error == "exit status 1: last-err"


async def test_output_is_logged_with_the_job_id(database_url: str, tmp_path: Path) -> None:
    monitor = monitor_process(database_url, tmp_path)
    async with running(monitor, orchestrator_process(monitor.address, tmp_path)) as (
        _,
        orchestrator,
    ):
        async with aio.insecure_channel(orchestrator.address) as channel:
            submitted = await o_grpc.OrchestratorServiceStub(channel).SubmitJob(
                o.SubmitJobRequest(
                    definition=definitions.to_proto(definitions.from_mapping(JOB)),
                    request_id=uuid.uuid4().hex,
                ),
                timeout=10,
            )
        async with aio.insecure_channel(monitor.address) as channel:
            job = await wait_job(
                m_grpc.MonitorServiceStub(channel),
                submitted.manager_id,
                lambda j: j.status in TERMINAL,
                within=30,
            )
        assert job.status == job_pb2.JOB_STATUS_COMPLETED
        steps = {stat.step_name: stat.step_id for stat in job.step_stats}
    events = [json.loads(line) for line in orchestrator.log_text().splitlines() if "{" in line]
    output = [e for e in events if e.get("event") == "command output"]
    by_job = {e["job_id"]: e for e in output}

    talk = by_job[steps["talk"]]
    assert talk["stdout"].splitlines() == [f"out-{i}" for i in range(31, 51)]
    assert talk["stderr"] == "oops" and talk["status"] == "completed"
    assert talk["exit_status"] == 0
    for index, item in enumerate(("a", "b")):
        child = by_job[f"{steps['each']}.{index}"]
        assert child["stdout"] == f"item-{item}" and child["step_id"] == steps["each"]
    assert steps["quiet"] not in by_job  # nothing printed, nothing logged
