"""Fixtures for end-to-end tests through a real monitor and a real orchestrator (in-process,
free ports, real channels and the real event stream)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from grpc import aio

from monitor_svc.server import RunningMonitor
from orchestrator_svc.server import OrchestratorConfig, RunningOrchestrator, create_server
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import orchestrator_service_pb2 as o
from stepflow_proto.v1 import orchestrator_service_pb2_grpc as o_grpc


@pytest.fixture
async def orchestrator(monitor: RunningMonitor) -> AsyncIterator[RunningOrchestrator]:
    running = await create_server(
        OrchestratorConfig(
            port=0, monitor=monitor.address, owner="test-orchestrator", shutdown_grace_s=1.0
        )
    )
    try:
        yield running
    finally:
        await running.stop(grace=0.5)


@pytest.fixture
async def ostub(orchestrator: RunningOrchestrator) -> AsyncIterator[o_grpc.OrchestratorServiceStub]:
    async with aio.insecure_channel(orchestrator.address) as ch:
        yield o_grpc.OrchestratorServiceStub(ch)


def definition(data: dict[str, Any]) -> o.JobDefinition:
    from orchestrator_svc.definitions import from_mapping, to_proto

    return to_proto(from_mapping(data))


async def run_to_end(stub, ostub, data: dict[str, Any], timeout: float = 30.0) -> job_pb2.Job:
    """Submit a definition and follow the manager through WatchJob until it is terminal."""
    resp = await ostub.SubmitJob(o.SubmitJobRequest(definition=definition(data)))
    last = None

    async def follow() -> job_pb2.Job:
        nonlocal last
        async for msg in stub.WatchJob(m.WatchJobRequest(job_id=resp.manager_id)):
            last = msg.job
        assert last is not None
        return last

    return await asyncio.wait_for(follow(), timeout)
