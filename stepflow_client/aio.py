"""The asyncio client of stepflow's services: the names and methods of ``stepflow_client``,
awaited."""

from __future__ import annotations

from stepflow_client._channel import ChannelSettings, Keepalive, RetryPolicy, aio_channel

__all__ = ["ChannelSettings", "Keepalive", "RetryPolicy", "aio_channel"]
