"""One page's event stream (``GET /api/v1/jobs/{id}/events``): the job's state from its
shared feed and its log from FollowJobLog, merged into one Server-Sent Events response.

Every event's id is the position after it (``<change_seq>.<log_seq>``), so a reconnect with
``Last-Event-ID`` sends exactly what the page has not seen: a state only if it is newer, the
log lines after the last one. A new page (no id) gets the current state and the log's last
``LOG_WINDOW`` lines; it pages further back itself. ``end`` comes once the job is terminal
and its last line was sent; then the response closes."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass

from aiohttp import web

from monitor_svc.web import wire
from monitor_svc.web.feeds import Feeds, StateFeed
from stepflow_client.aio import MonitorClient
from stepflow_proto.v1 import job_pb2

PING_S = 15.0  # a comment this often keeps proxies from cutting an idle stream
LOG_WINDOW = 5000  # a new page starts this many lines before the log's end
RETRY_MS = 1000  # how soon an EventSource reconnects
QUEUE_ITEMS = 2048  # lines in flight to one page; past it FollowJobLog waits (flow control)
WRITE_BATCH = 500  # events written to the socket at once

HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",  # nginx: pass each event on as it comes
}


@dataclass(frozen=True, slots=True)
class LogScope:
    """Which lines a stream carries (the page's filter; empty: all)."""

    step_id: str = ""
    sources: Sequence[str] = ()


async def start_position(
    client: MonitorClient, job_id: str, resume: wire.Position | None
) -> wire.Position:
    """Where a stream starts: the page's own position, or the log's tail for a new page.
    Raises the client's NotFound for an unknown job (before any byte of the stream)."""
    head = await client.read_log(job_id, limit=1)
    if resume is not None:
        return resume
    return wire.Position(0, max(0, head.last_seq - LOG_WINDOW))


async def stream(
    request: web.Request,
    client: MonitorClient,
    feeds: Feeds,
    job_id: str,
    position: wire.Position,
    scope: LogScope,
) -> web.StreamResponse:
    response = web.StreamResponse(headers=HEADERS)
    async with feeds.state(job_id) as feed:
        await response.prepare(request)
        await response.write(wire.retry(RETRY_MS) + wire.comment("stepflow"))
        run = _Run(feed)
        lines = _lines(client, job_id, position.log_seq, scope, run)
        tasks = [
            asyncio.create_task(_states(feed, position.change_seq, run)),
            asyncio.create_task(_after_state(feed, position.change_seq, run, lines)),
        ]
        try:
            await _write(response, run, position, feed)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
    return response


class _Run:
    """What one stream's two producers hand its writer: events in a bounded queue (a slow
    page holds FollowJobLog back instead of filling memory), and whether each is done. The
    ``done`` flags are set before a wake-up is queued, and the wake-up is dropped when the
    queue is full (the writer, if still there, drains it and sees the flags): a producer
    never blocks on its way out, so a page that leaves mid-backlog frees everything."""

    def __init__(self, feed: StateFeed) -> None:
        self.queue: asyncio.Queue[tuple[str, int, str]] = asyncio.Queue(QUEUE_ITEMS)
        self.first_state = asyncio.Event()
        self.states_done = False
        self.log_done = False
        self.log_complete = False  # FollowJobLog ended with the job's last line

    def wake(self) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(("wake", 0, ""))

    @property
    def finished(self) -> bool:
        return self.states_done and self.log_done and self.queue.empty()


async def _states(feed: StateFeed, after: int, run: _Run) -> None:
    try:
        async for change_seq, text, _terminal in feed.states(after):
            await run.queue.put(("state", change_seq, text))
            run.first_state.set()
    finally:
        run.first_state.set()
        run.states_done = True
        run.wake()


async def _after_state(feed: StateFeed, after: int, run: _Run, lines: Awaitable[None]) -> None:
    """The log once the page has the job's state (if it is to get one): a page renders its
    steps first, however long the log."""
    await feed.wait_past(0)
    if feed.version > after:
        await run.first_state.wait()
    await lines


async def _lines(
    client: MonitorClient, job_id: str, after: int, scope: LogScope, run: _Run
) -> None:
    try:
        lines: AsyncIterator[job_pb2.JobLogLine] = client.follow_log(
            job_id, after_seq=after, step_id=scope.step_id, sources=scope.sources
        )
        async for line in lines:
            await run.queue.put(("log", line.seq, wire.as_json(line)))
        run.log_complete = True
    finally:
        run.log_done = True
        run.wake()


async def _write(
    response: web.StreamResponse, run: _Run, position: wire.Position, feed: StateFeed
) -> None:
    while not run.finished:
        try:
            items = [await asyncio.wait_for(run.queue.get(), PING_S)]
        except TimeoutError:
            await response.write(wire.comment("ping"))
            continue
        while len(items) < WRITE_BATCH and not run.queue.empty():
            items.append(run.queue.get_nowait())
        out = bytearray()
        for kind, seq, text in items:
            if kind == "state":
                position = wire.Position(seq, position.log_seq)
                out += wire.frame("state", text, position)
            elif kind == "log":
                position = wire.Position(position.change_seq, seq)
                out += wire.frame("log", text, position)
        if out:
            await response.write(bytes(out))
    # The end only when the terminal state and the log's last line were both sent: a log
    # that failed midway ends the stream without it, and the page resumes from its id.
    if feed.failure is None and feed.terminal and run.log_complete:
        end = {"status": job_pb2.JobStatus.Name(feed.job.status) if feed.job else ""}
        await response.write(wire.frame("end", json.dumps(end), position))
