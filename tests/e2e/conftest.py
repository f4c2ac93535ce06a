"""The monitor process most end-to-end tests run against, and a stub on it.

A module says how its monitor starts by overriding ``monitor_options`` (the keywords of
``process_helpers.monitor_process``); ``monitor_proc`` is that monitor, SERVING, stopped after
the test however it ends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from grpc import aio

from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from tests.process_helpers import ServerProcess, monitor_process, running


@pytest.fixture
def monitor_options() -> dict[str, Any]:
    """A short grace period, and a wait timeout no test reaches."""
    return {"grace_period": "1s", "default_wait_timeout": "60s"}


@pytest.fixture
async def monitor_proc(
    database_url: str, tmp_path: Path, monitor_options: dict[str, Any]
) -> AsyncIterator[ServerProcess]:
    async with running(monitor_process(database_url, tmp_path, **monitor_options)) as (proc,):
        yield proc


@pytest.fixture
async def mstub(monitor_proc: ServerProcess) -> AsyncIterator[m_grpc.MonitorServiceStub]:
    async with aio.insecure_channel(monitor_proc.address) as channel:
        yield m_grpc.MonitorServiceStub(channel)
