"""Every channel to a stepflow service is made here, sync or asyncio: TLS and mutual TLS, the
bearer token, keepalive, message sizes and the retry policy, so no caller can forget one.

Below both the client (``stepflow_client`` re-exports it) and the services, which dial each
other with it; it needs only grpcio."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from stepflow_common.limits import MAX_REQUEST_BYTES

MONITOR_SERVICE = "stepflow.v1.MonitorService"
ORCHESTRATOR_SERVICE = "stepflow.v1.OrchestratorService"
MAX_MESSAGE_BYTES = MAX_REQUEST_BYTES

# The calls gRPC itself may send again on UNAVAILABLE: every unary call (each is idempotent on
# the services: a request_id, a status already reached, a merge applied twice, a log line's
# key), WatchJob and FollowJobLog (read-only). Not StreamChildEvents: its client resends
# unacknowledged batches itself.
RETRIED_METHODS: tuple[tuple[str, str], ...] = (
    (MONITOR_SERVICE, "CreateJob"),
    (MONITOR_SERVICE, "GetJob"),
    (MONITOR_SERVICE, "ListJobs"),
    (MONITOR_SERVICE, "UpdateJobStatus"),
    (MONITOR_SERVICE, "UpdateJobMetadata"),
    (MONITOR_SERVICE, "UpdateStepStatInManager"),
    (MONITOR_SERVICE, "WatchJob"),
    (MONITOR_SERVICE, "Heartbeat"),
    (MONITOR_SERVICE, "ReleaseLease"),
    (MONITOR_SERVICE, "ReadJobLog"),
    (MONITOR_SERVICE, "FollowJobLog"),
    (MONITOR_SERVICE, "AppendJobLog"),
    (ORCHESTRATOR_SERVICE, "SubmitJob"),
    (ORCHESTRATOR_SERVICE, "CancelJob"),
    (ORCHESTRATOR_SERVICE, "ListWorkers"),
)


class ChannelConfigError(ValueError):
    """The channel's settings cannot work (a certificate without its key, a missing file)."""


@dataclass(frozen=True, slots=True)
class Keepalive:
    """How a client checks that an idle connection is alive: a ping every ``time_s``, the
    connection dropped (and re-dialled) when one is not answered within ``timeout_s``.

    ``time_s`` must be at least the server's permit (its ``--keepalive-permit``, 10s by
    default), or the server ends the connection for pinging too often.
    """

    time_s: float = 30.0
    timeout_s: float = 10.0
    # Re-dial a server that went away quickly: gRPC's own backoff reaches two minutes.
    max_reconnect_backoff_s: float = 2.0

    def options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.keepalive_time_ms", _ms(self.time_s)),
            ("grpc.keepalive_timeout_ms", _ms(self.timeout_s)),
            # Keep pinging an idle stream: by default a client stops after two pings without
            # data, and an idle stream whose peer vanished would go unnoticed.
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", _ms(self.max_reconnect_backoff_s)),
        ]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """gRPC's own retry of a call answered UNAVAILABLE (the server restarting, a connection
    refused): up to ``max_attempts`` in all (gRPC caps it at 5), each after a random wait of up
    to the current backoff, which starts at ``initial_backoff_s`` and grows by ``multiplier``
    up to ``max_backoff_s``. Every attempt still ends at the call's deadline."""

    max_attempts: int = 5
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def service_config(self) -> str:
        """The channel's service config (JSON) applying this policy to ``RETRIED_METHODS``."""
        return json.dumps(
            {
                "methodConfig": [
                    {
                        "name": [{"service": s, "method": m} for s, m in RETRIED_METHODS],
                        "retryPolicy": {
                            "maxAttempts": self.max_attempts,
                            "initialBackoff": f"{self.initial_backoff_s:.3f}s",
                            "maxBackoff": f"{self.max_backoff_s:.3f}s",
                            "backoffMultiplier": self.multiplier,
                            "retryableStatusCodes": ["UNAVAILABLE"],
                        },
                    }
                ]
            }
        )


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


@dataclass(frozen=True, slots=True)
class ChannelSettings:
    """How to reach one service. ``tls_ca`` alone: TLS, trusting that CA; ``tls_cert`` with
    ``tls_key``: mutual TLS (the client's certificate); ``tls=True`` with neither: TLS trusting
    the system's CAs. ``token`` is sent as ``authorization: Bearer <token>`` on every call."""

    target: str
    tls: bool = False
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_server_name: str = ""  # check the server's certificate for this name, not the target's
    token: str = ""
    keepalive: Keepalive = Keepalive()
    retry: RetryPolicy | None = RetryPolicy()
    max_message_bytes: int = MAX_MESSAGE_BYTES
    extra_options: tuple[tuple[str, Any], ...] = ()

    @property
    def uses_tls(self) -> bool:
        return self.tls or bool(self.tls_ca or self.tls_cert or self.tls_key)

    def options(self) -> list[tuple[str, Any]]:
        """The channel arguments: message sizes, keepalive, retries, the TLS name override."""
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            *self.keepalive.options(),
        ]
        if self.retry is not None:
            options += [
                ("grpc.enable_retries", 1),
                ("grpc.service_config", self.retry.service_config()),
            ]
        else:
            options.append(("grpc.enable_retries", 0))
        if self.tls_server_name:
            options.append(("grpc.ssl_target_name_override", self.tls_server_name))
        return [*options, *self.extra_options]

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials (with the token as call credentials), or None for plaintext."""
        check_tls_files(self.tls_ca, self.tls_cert, self.tls_key)
        if not self.uses_tls:
            return None
        creds = grpc.ssl_channel_credentials(
            _read(self.tls_ca, "tls_ca"),
            _read(self.tls_key, "tls_key"),
            _read(self.tls_cert, "tls_cert"),
        )
        if self.token:
            creds = grpc.composite_channel_credentials(
                creds, grpc.access_token_call_credentials(self.token)
            )
        return creds


def check_tls_files(
    tls_ca: str,
    tls_cert: str,
    tls_key: str,
    *,
    names: Sequence[str] = ("tls_ca", "tls_cert", "tls_key"),
) -> None:
    """ChannelConfigError unless the TLS settings can work: a certificate and its key come
    together, and every file named exists. ``names`` are what the message calls them (a CLI
    passes its flags)."""
    ca_name, cert_name, key_name = names
    if bool(tls_cert) != bool(tls_key):
        given, missing = (cert_name, key_name) if tls_cert else (key_name, cert_name)
        raise ChannelConfigError(
            f"{given} needs {missing} too: a client certificate and its private key go together"
        )
    for path, name in ((tls_ca, ca_name), (tls_cert, cert_name), (tls_key, key_name)):
        if path and not Path(path).is_file():
            raise ChannelConfigError(f"{name}: no file at {path}")


def _read(path: str, name: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ChannelConfigError(f"{name}: cannot read {path}: {exc.strerror or exc}") from exc


def aio_channel(
    settings: ChannelSettings, *, interceptors: Sequence[aio.ClientInterceptor] = ()
) -> aio.Channel:
    """An asyncio channel to ``settings.target``; ``interceptors`` (tracing, say) run first."""
    creds = settings.credentials()
    if creds is not None:
        return aio.secure_channel(
            settings.target, creds, options=settings.options(), interceptors=interceptors or None
        )
    chain = [*interceptors, *(_aio_token_interceptors(settings.token) if settings.token else ())]
    return aio.insecure_channel(
        settings.target, options=settings.options(), interceptors=chain or None
    )


def sync_channel(settings: ChannelSettings) -> grpc.Channel:
    """A blocking channel to ``settings.target``."""
    creds = settings.credentials()
    if creds is not None:
        return grpc.secure_channel(settings.target, creds, options=settings.options())
    channel = grpc.insecure_channel(settings.target, options=settings.options())
    if settings.token:
        channel = grpc.intercept_channel(channel, _SyncToken(_header(settings.token)))
    return channel


# -- the bearer token on a plaintext channel (call credentials need TLS) ---------------------
def _header(token: str) -> tuple[str, str]:
    return ("authorization", f"Bearer {token}")


def _with_header(details: Any, header: tuple[str, str], make: Callable[..., Any]) -> Any:
    metadata = [*(details.metadata or ()), header]
    return make(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _SyncDetails(grpc.ClientCallDetails):  # type: ignore[misc]
    def __init__(
        self,
        method: str,
        timeout: float | None,
        metadata: Any,
        credentials: Any,
        wait_for_ready: bool | None,
    ) -> None:
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = None


class _SyncToken(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    def __init__(self, header: tuple[str, str]) -> None:
        self._header = header

    def _details(self, details: Any) -> Any:
        return _with_header(details, self._header, _SyncDetails)

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), requests)


# One class per call shape: grpc.aio files an interceptor under the first shape it implements
# only, so a single class implementing all four would add the token to unary calls alone.
class _AioUnaryUnary(aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, header: tuple[str, str]) -> None:
        self._header = header

    async def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await continuation(
            _with_header(details, self._header, aio.ClientCallDetails), request
        )


class _AioUnaryStream(aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, header: tuple[str, str]) -> None:
        self._header = header

    async def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await continuation(
            _with_header(details, self._header, aio.ClientCallDetails), request
        )


class _AioStreamUnary(aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, header: tuple[str, str]) -> None:
        self._header = header

    async def intercept_stream_unary(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return await continuation(
            _with_header(details, self._header, aio.ClientCallDetails), requests
        )


class _AioStreamStream(aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, header: tuple[str, str]) -> None:
        self._header = header

    async def intercept_stream_stream(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return await continuation(
            _with_header(details, self._header, aio.ClientCallDetails), requests
        )


def _aio_token_interceptors(token: str) -> list[aio.ClientInterceptor]:
    header = _header(token)
    return [
        _AioUnaryUnary(header),
        _AioUnaryStream(header),
        _AioStreamUnary(header),
        _AioStreamStream(header),
    ]
