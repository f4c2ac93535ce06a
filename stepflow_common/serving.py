"""Server and channel plumbing both services share: TLS, bearer tokens, health, reflection,
graceful shutdown."""

from __future__ import annotations

import asyncio
import gc
import hmac
import signal
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from stepflow_common import tracing
from stepflow_common.channels import ChannelSettings, Keepalive, aio_channel
from stepflow_common.limits import MAX_REQUEST_BYTES

log = structlog.get_logger(__name__)

MAX_MESSAGE_BYTES = MAX_REQUEST_BYTES
HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICES = (
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)


@dataclass(frozen=True, slots=True)
class ServerKeepalive:
    """What a server permits of its clients' keepalive pings.

    gRPC counts a ping that arrives sooner than ``min_ping_interval_s`` after the previous one
    (with no data sent in between) as a strike, and after ``max_ping_strikes`` strikes ends the
    connection with GOAWAY ``too_many_pings``. Its default permit is one ping per 5 minutes, so
    a client pinging more often loses every idle stream; this permit must stay at or below the
    clients' ``time_s``.
    """

    min_ping_interval_s: float = 10.0
    max_ping_strikes: int = 2

    def options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", _ms(self.min_ping_interval_s)),
            ("grpc.http2.max_ping_strikes", self.max_ping_strikes),
        ]


# What a client pings: defined with the client library's channel, so there is one copy.
ClientKeepalive = Keepalive


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]


@dataclass(frozen=True, slots=True)
class Security:
    """TLS files and the bearer token; all optional (plaintext, no auth by default)."""

    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""  # server: require client certificates signed by it; client: trust it
    auth_token: str = ""
    reflection_needs_token: bool = False


class BearerTokenInterceptor(aio.ServerInterceptor):  # type: ignore[misc]
    """Rejects calls without ``authorization: Bearer <token>``; health (and, unless configured
    otherwise, reflection) stays open so probes and grpcurl's discovery work."""

    def __init__(self, token: str, *, reflection_needs_token: bool = False) -> None:
        self._expected = f"Bearer {token}".encode()
        self._open = {HEALTH_SERVICE}
        if not reflection_needs_token:
            self._open.update(REFLECTION_SERVICES)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        service = handler_call_details.method.lstrip("/").split("/", 1)[0]
        if service in self._open:
            return await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = metadata.get("authorization", "")
        given_bytes = given.encode() if isinstance(given, str) else given
        handler = await continuation(handler_call_details)
        if hmac.compare_digest(given_bytes, self._expected) or handler is None:
            return handler
        return _deny(handler)


UNAUTHENTICATED_MESSAGE = "missing or wrong bearer token (metadata 'authorization: Bearer <token>')"


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that refuses the call."""

    async def refuse(_request: object, context: aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)
    return grpc.stream_stream_rpc_method_handler(refuse, **kwargs)


def make_server(
    security: Security,
    interceptors: Sequence[aio.ServerInterceptor] = (),
    keepalive: ServerKeepalive | None = None,
) -> aio.Server:
    # Tracing first, so a call the token check refuses has its span too ([] when off).
    chain: list[aio.ServerInterceptor] = tracing.server_interceptors()
    if security.auth_token:
        chain.append(
            BearerTokenInterceptor(
                security.auth_token, reflection_needs_token=security.reflection_needs_token
            )
        )
    chain.extend(interceptors)
    options = [*SERVER_OPTIONS, *(keepalive or ServerKeepalive()).options()]
    return aio.server(interceptors=chain, options=options)


class CannotListen(OSError):
    """The server cannot listen on its address: in use, or not an address of this host."""


def bind(server: aio.Server, address: str, security: Security) -> int:
    """Bind ``address`` (port 0 picks a free one) and return the port."""
    try:
        if security.tls_cert and security.tls_key:
            ca = Path(security.tls_ca).read_bytes() if security.tls_ca else None
            credentials = grpc.ssl_server_credentials(
                [(Path(security.tls_key).read_bytes(), Path(security.tls_cert).read_bytes())],
                root_certificates=ca,
                require_client_auth=ca is not None,
            )
            port: int = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc's "Failed to bind to address"
        raise CannotListen(f"cannot listen on {address}: {exc}") from exc
    if port == 0:
        raise CannotListen(f"cannot listen on {address}")
    return port


def add_health_and_reflection(
    server: aio.Server, service_names: Iterable[str]
) -> health.aio.HealthServicer:
    names = list(service_names)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [
            *names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    return health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, names: Iterable[str]) -> None:
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


async def set_not_serving(health_servicer: health.aio.HealthServicer, names: Iterable[str]) -> None:
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)


def channel(
    target: str, security: Security, keepalive: ClientKeepalive | None = None
) -> aio.Channel:
    """A client channel to the other service, with TLS (mutual with a certificate and key) and
    the token when configured: the client library's channel, with its retry policy."""
    return aio_channel(
        ChannelSettings(
            target=target,
            tls_ca=security.tls_ca,
            tls_cert=security.tls_cert,
            tls_key=security.tls_key,
            token=security.auth_token,
            keepalive=keepalive or ClientKeepalive(),
        ),
        interceptors=tracing.client_interceptors(),
    )


# Young-generation collections every this many allocations instead of 700: a server's hot
# paths allocate records by the thousand (a group of stream batches holds tens of thousands
# until its commit), and most are freed by reference counting before a collection would have
# to traverse them.
GC_YOUNG_THRESHOLD = 50_000


def tune_gc() -> None:
    """Garbage collection for a long-running server: what exists once it is serving (modules,
    stubs, the engine) is left out of every later collection, and the young generation is
    collected less often. Reference cycles are still collected."""
    gc.collect()
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
