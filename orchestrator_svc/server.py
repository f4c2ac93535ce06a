"""Orchestrator server bootstrap: ``create_server`` (tests bind port 0) and ``serve``."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from dataclasses import dataclass, field

import grpc
import structlog
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator_svc import metrics as orchestrator_metrics
from orchestrator_svc.event_stream import EventStream
from orchestrator_svc.lease_keeper import DEFAULT_LEASE_S
from orchestrator_svc.monitor_client import MonitorClient
from orchestrator_svc.orchestrator import DEFAULT_CAPACITY, Orchestrator
from orchestrator_svc.remote.broker import BrokerSettings
from orchestrator_svc.remote.publisher import Publisher
from orchestrator_svc.servicer import OrchestratorServicer
from orchestrator_svc.workers.registry import load_registry
from stepflow_common import metrics, serving, tracing
from stepflow_common.errors import StepflowError, Unavailable
from stepflow_common.grpc_errors import DomainErrorInterceptor
from stepflow_proto.v1 import orchestrator_service_pb2, orchestrator_service_pb2_grpc

log = structlog.get_logger(__name__)

SERVICE_NAME = orchestrator_service_pb2.DESCRIPTOR.services_by_name["OrchestratorService"].full_name
DEFAULT_PORT = 50052
DEFAULT_MONITOR = "127.0.0.1:50051"
FLUSH_MIN_S = 2.0  # what a drained job's last events get to reach the monitor at least


@dataclass(frozen=True, slots=True)
class OrchestratorConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    monitor: str = DEFAULT_MONITOR
    # Stable across restarts of this instance: its unfinished jobs are resumed on start.
    owner: str = ""
    # After this long without a heartbeat, this orchestrator's jobs are no longer its own.
    lease_s: float = DEFAULT_LEASE_S
    capacity: int = DEFAULT_CAPACITY
    security: serving.Security = field(default_factory=serving.Security)
    monitor_security: serving.Security = field(default_factory=serving.Security)
    shutdown_grace_s: float = 10.0
    metrics_port: int = 0  # Prometheus /metrics on this port; 0 = off
    keepalive: serving.ClientKeepalive = field(default_factory=serving.ClientKeepalive)
    # While the monitor cannot be reached, a log line says so this often.
    monitor_wait_log_s: float = 10.0
    otlp_endpoint: str = ""  # OpenTelemetry traces to this OTLP/gRPC collector; "" = off
    # The broker executor-celery steps send their children to (None: such jobs are refused).
    broker: BrokerSettings | None = None


@dataclass(slots=True)
class RunningOrchestrator:
    server: aio.Server
    port: int
    orchestrator: Orchestrator
    stream: EventStream
    channel: aio.Channel
    health: object
    shutdown_grace_s: float
    connector: asyncio.Task[None]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _stop_connector(self) -> None:
        self.connector.cancel()
        with contextlib.suppress(asyncio.CancelledError, StepflowError):
            await self.connector

    async def stop(self, grace: float | None = None) -> None:
        """Drain (no new children; running ones get the grace to finish), flush the event
        stream, then release the lease so another orchestrator adopts what is left at once."""
        grace_s = self.shutdown_grace_s if grace is None else grace
        if not self.orchestrator.connected:
            await self._stop_connector()  # still waiting for the monitor: nothing to keep
        await serving.set_not_serving(self.health, [SERVICE_NAME])
        # The lease loop keeps heartbeating through the drain (adopting nothing): a grace
        # longer than the lease must not let the lease lapse under the children it lets finish.
        await asyncio.gather(self.server.stop(grace_s), self.orchestrator.drain(grace_s))
        await self.stream.close(flush_timeout=max(grace_s, FLUSH_MIN_S))
        await self._stop_connector()
        if self.orchestrator.connected:
            await self.orchestrator.release_lease()
        await self.channel.close()
        if self.orchestrator.publisher is not None:
            self.orchestrator.publisher.close()


def default_owner(port: int) -> str:
    return f"orchestrator@{socket.gethostname()}:{port}"


async def create_server(
    config: OrchestratorConfig, *, wait_for_monitor: bool = True
) -> RunningOrchestrator:
    """Serve at once; the OrchestratorService is NOT_SERVING (and SubmitJob UNAVAILABLE) until
    the monitor has answered and this owner's unfinished jobs are recovered. With
    ``wait_for_monitor`` this returns only then."""
    workers = load_registry()
    publisher = None
    if config.broker is not None:
        publisher = Publisher(config.broker)
        # At start: a wrong URL or a queue declared otherwise stops this orchestrator here.
        await asyncio.to_thread(publisher.check)

    def monitor_channel() -> aio.Channel:
        return serving.channel(config.monitor, config.monitor_security, config.keepalive)

    channel = monitor_channel()
    stream = EventStream(monitor_channel)
    if tracing.enabled():
        stream.on_send = tracing.stamp_batch
    stream.start()
    orchestrator_metrics.track_unacked(lambda: stream.buffered)
    server = serving.make_server(config.security, [DomainErrorInterceptor(metrics.observe_rpc)])
    port = serving.bind(server, f"{config.host}:{config.port}", config.security)
    owner = config.owner or default_owner(port)
    stream.owner = owner
    orchestrator = Orchestrator(
        MonitorClient(channel),
        stream,
        workers,
        owner=owner,
        monitor_address=config.monitor,
        lease_s=config.lease_s,
        capacity=config.capacity,
        publisher=publisher,
    )
    stream.on_rejected = orchestrator.on_event_rejected
    stream.on_fenced = orchestrator.on_event_fenced
    orchestrator.guard.start()
    orchestrator_service_pb2_grpc.add_OrchestratorServiceServicer_to_server(
        OrchestratorServicer(orchestrator), server
    )
    health = serving.add_health_and_reflection(server, [SERVICE_NAME])

    async def superseded(reason: str) -> None:
        await serving.set_not_serving(health, [SERVICE_NAME])

    orchestrator.lease.on_superseded = superseded

    async def monitor_reachable(reachable: bool) -> None:
        if reachable:
            await serving.set_serving(health, [SERVICE_NAME])
        else:
            await serving.set_not_serving(health, [SERVICE_NAME])

    orchestrator.lease.on_monitor_reachable = monitor_reachable
    await serving.set_not_serving(health, [SERVICE_NAME])
    await server.start()
    log.info(
        "orchestrator started; connecting to the monitor",
        port=port,
        monitor=config.monitor,
        owner=owner,
        workers=sorted(workers),
    )
    connector = asyncio.create_task(
        _connect(channel, orchestrator, health, config), name="connect-monitor"
    )
    running = RunningOrchestrator(
        server, port, orchestrator, stream, channel, health, config.shutdown_grace_s, connector
    )
    if wait_for_monitor:
        ready = asyncio.ensure_future(orchestrator.ready.wait())
        await asyncio.wait([ready, connector], return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if connector.done():
            connector.result()  # the monitor refused this orchestrator: say why
    return running


async def _connect(
    channel: aio.Channel,
    orchestrator: Orchestrator,
    health: object,
    config: OrchestratorConfig,
) -> None:
    """Wait for the monitor (saying so every ``monitor_wait_log_s``), take the lease (which
    resumes this owner's unfinished jobs), then report SERVING and keep the lease. Never gives
    up: an orchestrator started before its monitor waits for it."""
    stub = health_pb2_grpc.HealthStub(channel)
    started = time.monotonic()
    told_at: float | None = None
    while True:
        timed_out = False
        try:
            # wait_for_ready: the call waits while the channel dials (its reconnect backoff is
            # short), so the first answer comes as soon as the monitor listens.
            resp = await stub.Check(
                health_pb2.HealthCheckRequest(),
                timeout=1.0 if told_at is None else config.monitor_wait_log_s,
                wait_for_ready=True,
            )
            if resp.status == health_pb2.HealthCheckResponse.SERVING:
                await orchestrator.heartbeat()
                break
            why = "the monitor is not serving yet"
        except aio.AioRpcError as exc:
            timed_out = exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            why = await _why_no_answer(stub) if timed_out else f"{exc.code().name}: {exc.details()}"
        except Unavailable as exc:
            why = f"taking the lease failed: {exc}"
        except StepflowError as exc:
            # Not a matter of waiting (a wrong token, say): stop and say why.
            log.error("the monitor refuses this orchestrator", monitor=config.monitor, why=str(exc))
            raise
        security = config.monitor_security
        if why.startswith("UNAVAILABLE") and security.tls_ca and not security.tls_cert:
            why += (
                "; if the monitor requires client certificates (its --tls-ca), give this "
                "orchestrator one with --monitor-tls-cert and --monitor-tls-key"
            )
        now = time.monotonic()
        if told_at is None:
            log.warning(
                "waiting for the monitor; serving NOT_SERVING until it answers",
                monitor=config.monitor,
                why=why,
            )
            told_at = now
        elif now - told_at >= config.monitor_wait_log_s * 0.9:
            log.warning(
                "still waiting for the monitor",
                monitor=config.monitor,
                why=why,
                waited_s=round(now - started),
            )
            told_at = now
        if not timed_out:
            await asyncio.sleep(1.0)
    orchestrator.connected = True
    orchestrator.ready.set()
    await serving.set_serving(health, [SERVICE_NAME])
    log.info(
        "orchestrator serving",
        monitor=config.monitor,
        owner=orchestrator.owner,
        instance=orchestrator.lease.instance,
        lease_s=orchestrator.lease.lease_s,
        waited_s=round(time.monotonic() - started, 1),
    )
    await orchestrator.lease_loop()


async def _why_no_answer(stub: health_pb2_grpc.HealthStub) -> str:
    """Why a call that waited for the monitor got no answer: one call that does not wait
    reports the connection's last error (refused, a TLS handshake the monitor rejected, a
    certificate it does not trust), which a person can act on."""
    try:
        await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0, wait_for_ready=False)
    except aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            return f"UNAVAILABLE: {exc.details()}"
    return "no answer: is the monitor running there?"


async def serve(config: OrchestratorConfig) -> int:
    """``_serve``, traced to ``config.otlp_endpoint`` when one is given (flushed at the end)."""
    if tracing.setup(config.otlp_endpoint, tracing.ORCHESTRATOR_SERVICE):
        log.info("tracing", otlp_endpoint=config.otlp_endpoint)
    try:
        return await _serve(config)
    finally:
        await asyncio.to_thread(tracing.shutdown)  # the last spans are sent


async def _serve(config: OrchestratorConfig) -> int:
    """Run until SIGTERM/SIGINT (0), or until the monitor refuses this orchestrator (1)."""
    running = await create_server(config, wait_for_monitor=False)
    metrics.start_metrics_server(config.metrics_port, config.host)
    serving.tune_gc()
    stop = asyncio.Event()
    serving.install_signal_handlers(stop)
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait([stopping, running.connector], return_when=asyncio.FIRST_COMPLETED)
    refused = running.connector.done() and running.connector.exception() is not None
    if not refused:
        await stopping
    stopping.cancel()
    log.info("orchestrator shutting down")
    await running.stop()
    log.info("orchestrator stopped")
    return 1 if refused else 0
