"""The client's channel settings: its keywords (``ClientSettings``), and the channels of
``stepflow_common.channels`` (which the services dial with too), re-exported."""

from __future__ import annotations

from typing import Any, TypedDict

from stepflow_common.channels import (
    MAX_MESSAGE_BYTES,
    MONITOR_SERVICE,
    ORCHESTRATOR_SERVICE,
    RETRIED_METHODS,
    ChannelConfigError,
    ChannelSettings,
    Keepalive,
    RetryPolicy,
    aio_channel,
    check_tls_files,
    sync_channel,
)

__all__ = [
    "MAX_MESSAGE_BYTES",
    "MONITOR_SERVICE",
    "ORCHESTRATOR_SERVICE",
    "RETRIED_METHODS",
    "ChannelConfigError",
    "ChannelSettings",
    "ClientSettings",
    "Keepalive",
    "RetryPolicy",
    "aio_channel",
    "check_tls_files",
    "sync_channel",
]


class ClientSettings(TypedDict, total=False):
    """The keywords every client takes beside its target: how to reach the service (see
    ``ChannelSettings``; ``options`` are extra channel arguments) and each call's defaults
    (``timeout``: the deadline in seconds, None for none; ``wait_for_ready``: wait for the
    service to come up instead of failing at once)."""

    tls: bool
    tls_ca: str
    tls_cert: str
    tls_key: str
    tls_server_name: str
    token: str
    keepalive: Keepalive | None
    retry: RetryPolicy | None
    options: tuple[tuple[str, Any], ...]
    timeout: float | None
    wait_for_ready: bool
