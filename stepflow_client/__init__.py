"""The Python client of stepflow's services, blocking API (``stepflow_client.aio`` has the same
names for asyncio). It needs only grpcio and protobuf."""

from __future__ import annotations

from stepflow_client._channel import (
    ChannelConfigError,
    ChannelSettings,
    ClientSettings,
    Keepalive,
    RetryPolicy,
    check_tls_files,
    sync_channel,
)
from stepflow_client._events import EmitterClosed, EmitterHooks, EmitterStats
from stepflow_client._events_sync import SyncChildEventEmitter
from stepflow_client._requests import is_terminal, metadata_of, status_of
from stepflow_client._sync import MonitorClient
from stepflow_client._sync_orchestrator import OrchestratorClient
from stepflow_common.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    Fenced,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    StatusConflict,
    StepflowError,
    Unauthenticated,
    Unavailable,
    VersionConflict,
)

__all__ = [
    "AlreadyExists",
    "ChannelConfigError",
    "ChannelSettings",
    "ClientSettings",
    "DeadlineExceeded",
    "EmitterClosed",
    "EmitterHooks",
    "EmitterStats",
    "FailedPrecondition",
    "Fenced",
    "InvalidArgument",
    "Keepalive",
    "MonitorClient",
    "NotFound",
    "OrchestratorClient",
    "ResourceExhausted",
    "RetryPolicy",
    "StatusConflict",
    "StepflowError",
    "SyncChildEventEmitter",
    "Unauthenticated",
    "Unavailable",
    "VersionConflict",
    "check_tls_files",
    "is_terminal",
    "metadata_of",
    "status_of",
    "sync_channel",
]
