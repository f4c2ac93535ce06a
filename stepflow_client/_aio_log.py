"""The asyncio client's job-log calls, mixed into ``MonitorClient``. The blocking twin in
``_sync_log`` is generated from this file (``scripts/gen_sync_client.py``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from grpc import aio

from stepflow_client import _requests as r
from stepflow_client._errors import decode
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc

T = TypeVar("T")


class LogCalls:
    """ReadJobLog, FollowJobLog and AppendJobLog (``MonitorClient`` provides the rest)."""

    stub: m_grpc.MonitorServiceStub
    _unary: Callable[..., Awaitable[Any]]

    async def read_log(
        self,
        job_id: str,
        *,
        after_seq: int = 0,
        limit: int = 0,
        step_id: str = "",
        child_id: str = "",
        sources: Sequence[str] = (),
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
    ) -> m.ReadJobLogResponse:
        """One page of a job's log: the lines after ``after_seq`` (``limit`` 0: 500), with
        ``next_seq`` to read on from and ``complete`` once the job ended and its last line
        is in. ``job_id`` may name a step or a child (its lines only)."""
        request = m.ReadJobLogRequest(
            job_id=job_id,
            after_seq=after_seq,
            limit=limit,
            step_id=step_id,
            child_id=child_id,
            sources=list(sources),
        )
        resp: m.ReadJobLogResponse = await self._unary(
            self.stub.ReadJobLog, request, timeout, wait_for_ready
        )
        return resp

    async def follow_log(
        self,
        job_id: str,
        *,
        after_seq: int = 0,
        step_id: str = "",
        child_id: str = "",
        sources: Sequence[str] = (),
        reconnect_for: float | None = None,
    ) -> AsyncIterator[job_pb2.JobLogLine]:
        """Every line of a job's log after ``after_seq``, then each new one as it is
        committed, until the job ends and its last line is given. A broken stream (the
        monitor restarting, the network) is resumed from the last ``seq`` seen, with backoff,
        so no line is missed or given twice. Gives up after ``reconnect_for`` seconds without
        the monitor (None: never)."""
        seen = after_seq
        outage = r.Outage(reconnect_for)
        while True:
            call = self.stub.FollowJobLog(
                m.FollowJobLogRequest(
                    job_id=job_id,
                    after_seq=seen,
                    step_id=step_id,
                    child_id=child_id,
                    sources=list(sources),
                ),
                wait_for_ready=True,
            )
            try:
                async for resp in call:
                    outage.delivered()
                    for line in resp.lines:
                        yield line
                    seen = max(seen, resp.next_seq)
                    if resp.complete:
                        return
            except aio.AioRpcError as exc:
                if outage.gives_up(exc.code()):
                    raise decode(exc) from exc
            finally:
                call.cancel()
            await asyncio.sleep(outage.next_delay())

    async def append_log(
        self,
        job_id: str,
        lines: Sequence[str | job_pb2.JobLogEntry],
        *,
        source: str = "log",
        level: str = "info",
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
    ) -> m.AppendJobLogResponse:
        """Add lines to the log of the manager, step or child ``job_id``: plain strings (with
        ``source`` and ``level``) or ``JobLogEntry`` messages. A line without a key gets one
        for this call, so the client's retry after a lost answer stores it once."""
        call_key = r.new_request_id()
        entries = [
            job_pb2.JobLogEntry(key=f"{call_key}:{i}", message=line, source=source, level=level)
            if isinstance(line, str)
            else _with_key(line, f"{call_key}:{i}")
            for i, line in enumerate(lines)
        ]
        request = m.AppendJobLogRequest(job_id=job_id, lines=entries)
        resp: m.AppendJobLogResponse = await self._unary(
            self.stub.AppendJobLog, request, timeout, wait_for_ready
        )
        return resp


def _with_key(entry: job_pb2.JobLogEntry, key: str) -> job_pb2.JobLogEntry:
    if entry.key:
        return entry
    keyed = job_pb2.JobLogEntry()
    keyed.CopyFrom(entry)
    keyed.key = key
    return keyed
