"""An orchestrator started before its monitor serves at once, says what it waits for, and
starts working as soon as the monitor comes up (real processes)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from stepflow_proto.v1 import orchestrator_service_pb2 as o
from stepflow_proto.v1 import orchestrator_service_pb2_grpc as o_grpc
from tests.orchestrator_fixtures import definition
from tests.process_helpers import monitor_process, orchestrator_process, running

SERVICE = "stepflow.v1.OrchestratorService"
JOB = {
    "name": "after-the-wait",
    "steps": [
        {"name": "sim", "type": "simulate", "config": {"children": 10, "fail_every": 5}},
        {"name": "cmd", "type": "command", "config": {"command": "true"}},
    ],
}


async def health(address: str, service: str) -> int:
    async with aio.insecure_channel(address) as channel:
        resp = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5.0, wait_for_ready=True
        )
        return resp.status


def log_events(path: Path) -> list[dict[str, object]]:
    events = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


async def test_an_orchestrator_waits_for_a_monitor_that_is_not_up_yet(
    database_url: str, tmp_path: Path
) -> None:
    monitor = monitor_process(database_url, tmp_path)  # not started: nothing listens there
    orch = orchestrator_process(monitor.address, tmp_path, extra=["--monitor-wait-log-every", "1s"])
    orch.start()
    try:
        for service in ("", SERVICE):
            assert await health(orch.address, service) == health_pb2.HealthCheckResponse.NOT_SERVING
        async with aio.insecure_channel(orch.address) as channel:
            ostub = o_grpc.OrchestratorServiceStub(channel)
            with pytest.raises(aio.AioRpcError) as info:
                await ostub.SubmitJob(o.SubmitJobRequest(definition=definition(JOB)), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert monitor.address in (info.value.details() or "")

        # It keeps saying what it waits for: the first line, then repeats.
        deadline = time.monotonic() + 30.0
        while True:
            waits = [
                e
                for e in log_events(orch.log_path)
                if "waiting for the monitor" in str(e.get("event"))
            ]
            if len(waits) >= 3:
                break
            assert time.monotonic() < deadline, orch.log_tail()
            await asyncio.sleep(0.2)
        assert all(e.get("monitor") == monitor.address for e in waits)
        assert "still waiting" in str(waits[-1]["event"])
        assert "Traceback" not in orch.log_text()
        assert orch.proc is not None and orch.proc.poll() is None

        async with running(monitor):
            await orch.wait_serving()
            assert await health(orch.address, SERVICE) == health_pb2.HealthCheckResponse.SERVING
            async with (
                aio.insecure_channel(orch.address) as och,
                aio.insecure_channel(monitor.address) as mch,
            ):
                submitted = await o_grpc.OrchestratorServiceStub(och).SubmitJob(
                    o.SubmitJobRequest(definition=definition(JOB)), timeout=10
                )
                last = None
                async with asyncio.timeout(60):
                    async for msg in m_grpc.MonitorServiceStub(mch).WatchJob(
                        m.WatchJobRequest(job_id=submitted.manager_id)
                    ):
                        last = msg.job
            assert last is not None and last.status == job_pb2.JOB_STATUS_COMPLETED, last
            sim = next(s for s in last.step_stats if s.step_name == "sim")
            assert (sim.children.completed, sim.children.failed) == (8, 2)
        assert "Traceback" not in orch.log_text()
    finally:
        await asyncio.to_thread(orch.stop)
