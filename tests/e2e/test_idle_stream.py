"""An idle pair of services stays usable: keepalive pings the monitor permits, and a stream that
breaks while idle (a GOAWAY, a monitor restart) reconnects without mixing two streams' batches.

Each test leaves a real monitor and a real orchestrator idle past the ping limits (short
keepalive settings stand in for the defaults' minutes), then runs a job like
examples/quick.toml and checks its exact counts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from grpc import aio
from structlog.testing import capture_logs

from monitor_svc.server import MonitorConfig, RunningMonitor, create_server
from orchestrator_svc.server import OrchestratorConfig, RunningOrchestrator
from orchestrator_svc.server import create_server as create_orchestrator
from stepflow_common import serving
from stepflow_common.serving import ClientKeepalive, ServerKeepalive
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from stepflow_proto.v1 import orchestrator_service_pb2_grpc as o_grpc
from tests.conftest import FAST_TIMERS
from tests.orchestrator_fixtures import run_to_end

S = job_pb2
# Pings every 0.3 s: with gRPC's default permit (one ping per 5 minutes, 2 strikes) the
# monitor answers GOAWAY too_many_pings after about three seconds of idling.
FAST_PINGS = ClientKeepalive(time_s=0.3, timeout_s=2.0, max_reconnect_backoff_s=0.5)
IDLE_S = 8.0  # more than twice the time to a GOAWAY, and some 25 pings

QUICK: dict[str, Any] = {
    "name": "quick",
    "timeout": "2m",
    "steps": [
        {
            "name": "crawl",
            "type": "simulate",
            "on_error": "continue",
            "config": {"children": 40, "duration_ms": 20, "concurrency": 4, "fail_every": 10},
        },
        {
            "name": "handoff",
            "type": "simulate",
            "wait": False,
            "config": {"children": 20, "duration_ms": 10, "concurrency": 4},
        },
        {
            "name": "report",
            "type": "command",
            "depends_on": ["crawl"],
            "config": {"command": "echo report ready"},
        },
    ],
}


async def start_monitor(
    database_url: str, keepalive: ServerKeepalive, port: int = 0
) -> RunningMonitor:
    return await create_server(
        MonitorConfig(
            database_url=database_url,
            port=port,
            timers=FAST_TIMERS,
            shutdown_grace_s=0.5,
            keepalive=keepalive,
        )
    )


@pytest.fixture
async def pair_factory(
    database_url: str,
) -> AsyncIterator[Any]:
    started: list[Any] = []

    async def make(
        server_keepalive: ServerKeepalive,
    ) -> tuple[RunningMonitor, RunningOrchestrator]:
        monitor = await start_monitor(database_url, server_keepalive)
        orchestrator = await create_orchestrator(
            OrchestratorConfig(
                port=0,
                monitor=monitor.address,
                owner="idle-test",
                shutdown_grace_s=0.5,
                keepalive=FAST_PINGS,
            )
        )
        started.append(orchestrator)
        started.append(monitor)
        return monitor, orchestrator

    yield make
    for server in started:
        await server.stop(grace=0.5)


async def run_quick(monitor_address: str, orchestrator: RunningOrchestrator) -> job_pb2.Job:
    async with (
        aio.insecure_channel(monitor_address) as mch,
        aio.insecure_channel(orchestrator.address) as och,
    ):
        return await run_to_end(
            m_grpc.MonitorServiceStub(mch), o_grpc.OrchestratorServiceStub(och), QUICK, 60.0
        )


def assert_quick_completed(job: job_pb2.Job) -> None:
    assert job.status == S.JOB_STATUS_COMPLETED, job
    stats = {s.step_name: s for s in job.step_stats}
    crawl, handoff, report = stats["crawl"], stats["handoff"], stats["report"]
    assert crawl.status == S.JOB_STATUS_COMPLETED
    assert (crawl.children.completed, crawl.children.failed) == (36, 4)
    assert handoff.status == S.JOB_STATUS_COMPLETED and handoff.children.completed == 20
    assert report.status == S.JOB_STATUS_COMPLETED
    for stat in job.step_stats:
        assert stat.children.pending == stat.children.running == 0


async def test_pings_the_monitor_permits_keep_an_idle_stream_open(pair_factory: Any) -> None:
    monitor, orchestrator = await pair_factory(
        ServerKeepalive(min_ping_interval_s=FAST_PINGS.time_s, max_ping_strikes=2)
    )
    assert_quick_completed(await run_quick(monitor.address, orchestrator))
    reconnects = orchestrator.stream.stats.reconnects
    await asyncio.sleep(IDLE_S)  # idle: only keepalive pings on the connection
    assert orchestrator.stream.stats.reconnects == reconnects  # never broken
    assert_quick_completed(await run_quick(monitor.address, orchestrator))
    assert orchestrator.stream.stats.rejected == []


async def test_a_stream_broken_by_too_many_pings_reconnects_cleanly(pair_factory: Any) -> None:
    """A monitor that permits fewer pings than the orchestrator sends (gRPC's default permit)
    sends GOAWAY too_many_pings on every idle stretch; each new stream must take over cleanly,
    and the next job still completes with exact counts."""
    monitor, orchestrator = await pair_factory(
        ServerKeepalive(min_ping_interval_s=300.0, max_ping_strikes=2)
    )
    with capture_logs() as logs:
        assert_quick_completed(await run_quick(monitor.address, orchestrator))
        for _ in range(2):
            reconnects = orchestrator.stream.stats.reconnects
            await asyncio.sleep(IDLE_S / 2)
            assert orchestrator.stream.stats.reconnects > reconnects  # the case is reproduced
            assert_quick_completed(await run_quick(monitor.address, orchestrator))
    stats = orchestrator.stream.stats
    assert stats.rejected == [] and orchestrator.stream.buffered == 0
    # Every break was a clean reconnect: no stream saw another stream's batch or ack.
    assert [e for e in logs if e["log_level"] in ("error", "critical")] == []
    assert not [e for e in logs if "out of order" in str(e)]


async def test_a_monitor_restarted_while_idle_is_used_again(database_url: str) -> None:
    keepalive = ServerKeepalive(min_ping_interval_s=FAST_PINGS.time_s)
    monitor = await start_monitor(database_url, keepalive)
    port = monitor.port
    orchestrator = await create_orchestrator(
        OrchestratorConfig(
            port=0,
            monitor=monitor.address,
            owner="idle-test",
            shutdown_grace_s=0.5,
            keepalive=FAST_PINGS,
        )
    )
    try:
        assert_quick_completed(await run_quick(monitor.address, orchestrator))
        for _ in range(2):
            await monitor.stop(grace=0.5)
            await asyncio.sleep(1.0)  # idle with the monitor gone: pings go unanswered
            monitor = await start_monitor(database_url, keepalive, port=port)
            await asyncio.sleep(1.0)  # idle again on the new monitor
            assert_quick_completed(await run_quick(monitor.address, orchestrator))
        assert orchestrator.stream.stats.rejected == []
    finally:
        await orchestrator.stop(grace=0.5)
        await monitor.stop(grace=0.5)


def test_the_default_keepalive_agrees_with_the_default_permit() -> None:
    assert ClientKeepalive().time_s >= ServerKeepalive().min_ping_interval_s
    options = dict(ServerKeepalive().options())
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert dict(serving.ClientKeepalive().options())["grpc.http2.max_pings_without_data"] == 0
