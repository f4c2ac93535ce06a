"""Monitor server bootstrap: ``create_server`` (tests bind port 0) and ``serve`` (signals)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime

import structlog
from grpc import aio

from monitor_svc.deadlines import DeadlineTimer
from monitor_svc.lifecycle import StepTimers
from monitor_svc.log_follow import LogHub
from monitor_svc.log_lines import MAX_READ_LIMIT, LogFilter, LogPage
from monitor_svc.records import DocumentLimits, JobView
from monitor_svc.servicer import MonitorServicer
from monitor_svc.store.engine import SQLITE_SYNCHRONOUS_DEFAULT, safe_url
from monitor_svc.store.migrate import upgrade
from monitor_svc.store.notify import Listener
from monitor_svc.store.store import MonitorStore, read_view
from monitor_svc.watch import WatchHub
from monitor_svc.web.view import WebView
from monitor_svc.wire.prebuilt import add_to_server
from stepflow_common import metrics, serving, tracing
from stepflow_common.grpc_errors import DomainErrorInterceptor
from stepflow_proto.v1 import monitor_service_pb2

log = structlog.get_logger(__name__)

SERVICE_NAME = monitor_service_pb2.DESCRIPTOR.services_by_name["MonitorService"].full_name
DEFAULT_PORT = 50051
DEFAULT_HTTP_PORT = 8080
SHUTDOWN_GRACE_S = 10.0


@dataclass(frozen=True, slots=True)
class MonitorConfig:
    database_url: str = "sqlite:///stepflow.db"
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    timers: StepTimers = field(default_factory=StepTimers)
    security: serving.Security = field(default_factory=serving.Security)
    migrate: bool = True
    shutdown_grace_s: float = SHUTDOWN_GRACE_S
    metrics_port: int = 0  # Prometheus /metrics on this port; 0 = off
    keepalive: serving.ServerKeepalive = field(default_factory=serving.ServerKeepalive)
    limits: DocumentLimits = field(default_factory=DocumentLimits)
    sqlite_synchronous: str = SQLITE_SYNCHRONOUS_DEFAULT
    otlp_endpoint: str = ""  # OpenTelemetry traces to this OTLP/gRPC collector; "" = off
    http_port: int | None = None  # the web view on this port (0: a free one); None = off


@dataclass(slots=True)
class RunningMonitor:
    server: aio.Server
    port: int
    store: MonitorStore
    hub: WatchHub
    timer: DeadlineTimer
    health: object
    shutdown_grace_s: float
    logs: LogHub
    listener: Listener | None = None
    web: WebView | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight ones (and stream acks) finish, then close storage."""
        await serving.set_not_serving(self.health, [SERVICE_NAME])
        if self.web is not None:
            await self.web.stop()
        await self.timer.stop()
        await self.server.stop(self.shutdown_grace_s if grace is None else grace)
        if self.listener is not None:
            await asyncio.to_thread(self.listener.stop)
        self.hub.close()
        self.logs.close()
        await asyncio.to_thread(self.store.close)


async def create_server(config: MonitorConfig) -> RunningMonitor:
    """Migrate, open storage, and start serving on ``config.host:config.port`` (0 = free)."""
    if config.migrate:
        await asyncio.to_thread(upgrade, config.database_url)
    loop = asyncio.get_running_loop()

    def read_now(job_ids: list[str]) -> dict[str, JobView | None]:
        return store.writer.read_now(lambda conn: {j: read_view(conn, j) for j in job_ids})

    def on_commit(changed: set[str], earliest: datetime | None) -> None:
        # On the writer thread: the watched jobs among ``changed`` are read here and now.
        hub.committed(changed, read_now)
        logs.committed(changed)
        if earliest is not None:
            timer.offer_threadsafe(earliest)

    store = MonitorStore(
        config.database_url,
        config.timers,
        on_commit=on_commit,
        limits=config.limits,
        sqlite_synchronous=config.sqlite_synchronous,
    )

    async def read(job_id: str):  # type: ignore[no-untyped-def]
        return await store.reader.run(lambda conn: read_view(conn, job_id))

    hub = WatchHub(read)
    hub.bind_loop(loop)

    async def read_log(manager_id: str, after_seq: int) -> LogPage:
        return await store.read_log(manager_id, after_seq, MAX_READ_LIMIT, LogFilter())

    logs = LogHub(read_log)
    logs.bind_loop(loop)
    timer = DeadlineTimer(store)
    server = serving.make_server(
        config.security, [DomainErrorInterceptor(metrics.observe_rpc)], config.keepalive
    )
    add_to_server(MonitorServicer(store, hub, logs), server)
    health = serving.add_health_and_reflection(server, [SERVICE_NAME])
    port = serving.bind(server, f"{config.host}:{config.port}", config.security)
    loopback = WebView.bind_loopback(server) if config.http_port is not None else None
    await server.start()
    timer.start()
    listener = None
    if not store.sqlite:
        # Other replicas on this database: their commits wake our watchers too.
        def on_change(changed: set[str] | None) -> None:
            hub.notify_any_threadsafe(changed)
            logs.notify_any_threadsafe(changed)

        listener = Listener(config.database_url, on_change)
        listener.start()
        await asyncio.to_thread(listener.ready.wait, 5.0)
    running = RunningMonitor(
        server, port, store, hub, timer, health, config.shutdown_grace_s, logs, listener
    )
    if loopback is not None and config.http_port is not None:
        try:
            running.web = await WebView.start(
                loopback, config.host, config.http_port, config.security
            )
        except BaseException:
            await running.stop(0)  # the timer, the listener and the store too
            raise
    await serving.set_serving(health, [SERVICE_NAME])
    log.info(
        "monitor serving",
        port=port,
        database=safe_url(config.database_url),
        **({"web": running.web.url} if running.web else {}),
    )
    return running


async def serve(config: MonitorConfig) -> None:
    """``_serve``, traced to ``config.otlp_endpoint`` when one is given (flushed at the end)."""
    if tracing.setup(config.otlp_endpoint, tracing.MONITOR_SERVICE):
        log.info("tracing", otlp_endpoint=config.otlp_endpoint)
    try:
        await _serve(config)
    finally:
        await asyncio.to_thread(tracing.shutdown)  # the last spans are sent


async def _serve(config: MonitorConfig) -> None:
    running = await create_server(config)
    metrics.start_metrics_server(config.metrics_port, config.host)
    serving.tune_gc()
    stop = asyncio.Event()
    serving.install_signal_handlers(stop)
    await stop.wait()
    log.info("monitor shutting down", grace_s=config.shutdown_grace_s)
    await running.stop()
    log.info("monitor stopped")
