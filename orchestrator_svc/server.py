"""Orchestrator server bootstrap: ``create_server`` (tests bind port 0) and ``serve``."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field

import structlog
from grpc import aio

from orchestrator_svc.event_stream import EventStream
from orchestrator_svc.monitor_client import MonitorClient
from orchestrator_svc.orchestrator import Orchestrator
from orchestrator_svc.servicer import OrchestratorServicer
from orchestrator_svc.workers.registry import load_registry
from stepflow_common import metrics, serving
from stepflow_common.grpc_errors import DomainErrorInterceptor
from stepflow_proto.v1 import orchestrator_service_pb2, orchestrator_service_pb2_grpc

log = structlog.get_logger(__name__)

SERVICE_NAME = orchestrator_service_pb2.DESCRIPTOR.services_by_name["OrchestratorService"].full_name
DEFAULT_PORT = 50052
DEFAULT_MONITOR = "127.0.0.1:50051"


@dataclass(frozen=True, slots=True)
class OrchestratorConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    monitor: str = DEFAULT_MONITOR
    # Stable across restarts of this instance: its unfinished jobs are failed on start.
    owner: str = ""
    security: serving.Security = field(default_factory=serving.Security)
    monitor_security: serving.Security = field(default_factory=serving.Security)
    shutdown_grace_s: float = 10.0
    metrics_port: int = 0  # Prometheus /metrics on this port; 0 = off


@dataclass(slots=True)
class RunningOrchestrator:
    server: aio.Server
    port: int
    orchestrator: Orchestrator
    stream: EventStream
    channel: aio.Channel
    health: object
    shutdown_grace_s: float

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        await serving.set_not_serving(self.health, [SERVICE_NAME])
        await self.server.stop(self.shutdown_grace_s if grace is None else grace)
        await self.orchestrator.abandon()
        await self.stream.close(flush_timeout=self.shutdown_grace_s if grace is None else grace)
        await self.channel.close()


def default_owner(port: int) -> str:
    return f"orchestrator@{socket.gethostname()}:{port}"


async def create_server(config: OrchestratorConfig) -> RunningOrchestrator:
    workers = load_registry()
    channel = serving.channel(config.monitor, config.monitor_security)
    stream = EventStream(lambda: serving.channel(config.monitor, config.monitor_security))
    stream.start()
    metrics.track_unacked(lambda: stream.buffered)
    server = serving.make_server(config.security, [DomainErrorInterceptor(metrics.observe_rpc)])
    port = serving.bind(server, f"{config.host}:{config.port}", config.security)
    owner = config.owner or default_owner(port)
    orchestrator = Orchestrator(MonitorClient(channel), stream, workers, owner=owner)
    orchestrator_service_pb2_grpc.add_OrchestratorServiceServicer_to_server(
        OrchestratorServicer(orchestrator), server
    )
    health = serving.add_health_and_reflection(server, [SERVICE_NAME])
    await orchestrator.recover()
    await server.start()
    await serving.set_serving(health, [SERVICE_NAME])
    log.info(
        "orchestrator serving",
        port=port,
        monitor=config.monitor,
        owner=owner,
        workers=sorted(workers),
    )
    return RunningOrchestrator(
        server, port, orchestrator, stream, channel, health, config.shutdown_grace_s
    )


async def serve(config: OrchestratorConfig) -> None:
    running = await create_server(config)
    metrics.start_metrics_server(config.metrics_port, config.host)
    stop = asyncio.Event()
    serving.install_signal_handlers(stop)
    await stop.wait()
    log.info("orchestrator shutting down")
    await running.stop()
    log.info("orchestrator stopped")
