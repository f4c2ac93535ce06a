"""The asyncio client of stepflow's services: the names and methods of ``stepflow_client``,
awaited (``async for`` over ``watch`` and ``follow``)."""

from __future__ import annotations

from stepflow_client._aio import MonitorClient
from stepflow_client._aio_orchestrator import OrchestratorClient
from stepflow_client._channel import (
    ChannelSettings,
    ClientSettings,
    Keepalive,
    RetryPolicy,
    aio_channel,
)
from stepflow_client._events import ChildEventEmitter, EmitterClosed, EmitterHooks, EmitterStats

__all__ = [
    "ChannelSettings",
    "ChildEventEmitter",
    "ClientSettings",
    "EmitterClosed",
    "EmitterHooks",
    "EmitterStats",
    "Keepalive",
    "MonitorClient",
    "OrchestratorClient",
    "RetryPolicy",
    "aio_channel",
]
