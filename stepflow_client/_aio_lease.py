"""The asyncio client's lease calls (what an orchestrator, or a service acting as one, says to
the monitor), mixed into ``MonitorClient``. The blocking twin in ``_sync_lease`` is generated
from this file (``scripts/gen_sync_client.py``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any

from stepflow_client import _requests as r
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc


class LeaseCalls:
    """Heartbeat and ReleaseLease (``MonitorClient`` provides the channel and ``_unary``)."""

    stub: m_grpc.MonitorServiceStub
    _unary: Callable[..., Awaitable[Any]]

    async def heartbeat(
        self,
        *,
        owner: str,
        instance: str,
        lease: float | str | timedelta,
        max_adopt: int = 0,
        worker_types: Sequence[str] = (),
        running_job_ids: Sequence[str] = (),
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
    ) -> m.HeartbeatResponse:
        """Take or renew an orchestrator's lease (``lease`` seconds, or "30s")."""
        request = r.heartbeat(
            owner=owner,
            instance=instance,
            lease=lease,
            max_adopt=max_adopt,
            worker_types=worker_types,
            running_job_ids=running_job_ids,
        )
        resp: m.HeartbeatResponse = await self._unary(
            self.stub.Heartbeat, request, timeout, wait_for_ready
        )
        return resp

    async def release_lease(
        self,
        owner: str,
        *,
        instance: str = "",
        job_ids: Sequence[str] = (),
        reason: str = "",
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
    ) -> m.ReleaseLeaseResponse:
        """Give the lease up (its jobs are orphaned for others to adopt at once), or with
        ``job_ids`` give back only those jobs, saying ``reason``."""
        request = m.ReleaseLeaseRequest(
            owner=owner, instance=instance, job_ids=list(job_ids), reason=reason
        )
        resp: m.ReleaseLeaseResponse = await self._unary(
            self.stub.ReleaseLease, request, timeout, wait_for_ready
        )
        return resp
