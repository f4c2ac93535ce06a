"""The JSON routes (``/api/v1/...``) and the two pages' event streams: each a translation of
a request into one public RPC, with the domain's errors mapped to HTTP statuses here only."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from monitor_svc.web import job_events, wire
from monitor_svc.web.feeds import Feeds
from stepflow_client.aio import MonitorClient
from stepflow_common import errors
from stepflow_common.status import Status

CANCEL_REASON = "cancelled from the web view"
CHILD_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
NDJSON = "application/x-ndjson"

# Most specific first: StatusConflict and Fenced are FailedPrecondition.
HTTP_STATUS: list[tuple[type[Exception], int]] = [
    (errors.InvalidArgument, 400),
    (ValueError, 400),
    (errors.Unauthenticated, 401),
    (errors.NotFound, 404),
    (errors.StatusConflict, 409),
    (errors.VersionConflict, 409),
    (errors.AlreadyExists, 409),
    (errors.FailedPrecondition, 412),
    (errors.ResourceExhausted, 429),
    (errors.Unavailable, 503),
    (errors.DeadlineExceeded, 504),
]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(exc: Exception) -> web.Response | None:
    for kind, status in HTTP_STATUS:
        if isinstance(exc, kind):
            code = type(exc).__name__
            return web.json_response({"error": str(exc), "code": code}, status=status)
    return None


@web.middleware
async def map_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except (errors.StepflowError, ValueError) as exc:
        mapped = error_response(exc)
        if mapped is None:
            raise
        return mapped


def _message(text: str) -> web.Response:
    return web.Response(text=text, content_type="application/json")


def _int(request: web.Request, name: str, default: int = 0) -> int:
    raw = request.query.get(name, "")
    if not raw:
        return default
    if not raw.isdigit():
        raise errors.InvalidArgument(f"{name}: {raw!r} is not a non-negative integer")
    return int(raw)


def _status(request: web.Request) -> str:
    status = request.query.get("status", "")
    if status and status not in {s.value for s in Status}:
        raise errors.InvalidArgument(
            f"status: {status!r} is not one of {', '.join(s.value for s in Status)}"
        )
    return status


def _sources(request: web.Request) -> tuple[str, ...]:
    return tuple(s for raw in request.query.getall("source", []) for s in raw.split(",") if s)


def routes(client: MonitorClient, feeds: Feeds) -> list[web.RouteDef]:
    async def list_jobs(request: web.Request) -> web.StreamResponse:
        page = await client.list_jobs(
            kind=request.query.get("kind", "manager"),
            status=_status(request) or None,
            manager_id=request.query.get("manager_id", ""),
            parent_id=request.query.get("parent_id", ""),
            page_size=min(_int(request, "page_size"), MAX_PAGE_SIZE),
            page_token=request.query.get("page_token", ""),
        )
        return _message(wire.as_json(page))

    async def get_job(request: web.Request) -> web.StreamResponse:
        job = await client.get_job(request.match_info["job_id"])
        return _message(wire.as_json(job))

    async def steps(request: web.Request) -> web.StreamResponse:
        """The manager's step jobs (attempt, times): what ``step_stats`` does not carry."""
        page = await client.list_jobs(
            manager_id=request.match_info["job_id"], kind="step", page_size=MAX_PAGE_SIZE
        )
        return _message(wire.as_json(page))

    async def children(request: web.Request) -> web.StreamResponse:
        step_id = request.query.get("step_id", "")
        if not step_id:
            raise errors.InvalidArgument("step_id: required (the step whose children to list)")
        page = await client.list_jobs(
            parent_id=step_id,
            status=_status(request) or None,
            page_size=min(_int(request, "page_size", CHILD_PAGE_SIZE), MAX_PAGE_SIZE),
            page_token=request.query.get("page_token", ""),
        )
        return _message(wire.as_json(page))

    async def cancel(request: web.Request) -> web.StreamResponse:
        job = await client.cancel_job(request.match_info["job_id"], reason=CANCEL_REASON)
        return _message(wire.as_json(job))

    async def read_log(request: web.Request) -> web.StreamResponse:
        """NDJSON, a line each: the whole log after ``after_seq`` (or ``limit`` lines of it),
        or with ``follow=1`` every line until the job ends."""
        job_id = request.match_info["job_id"]
        after = _int(request, "after_seq")
        limit = _int(request, "limit")
        step_id = request.query.get("step_id", "")
        sources = _sources(request)
        follow = request.query.get("follow", "") in ("1", "true", "yes")
        first = await client.read_log(
            job_id,
            after_seq=after,
            limit=min(limit or MAX_PAGE_SIZE, MAX_PAGE_SIZE),
            step_id=step_id,
            sources=sources,
        )
        response = web.StreamResponse(
            headers={
                "Content-Type": NDJSON,
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                "X-Log-Last-Seq": str(first.last_seq),
            }
        )
        await response.prepare(request)
        page, sent = first, 0
        while True:
            lines = page.lines if not limit else page.lines[: max(limit - sent, 0)]
            if lines:
                await response.write("".join(wire.as_json(x) + "\n" for x in lines).encode())
            sent += len(lines)
            done = page.next_seq >= page.last_seq or (limit and sent >= limit)
            if done or page.next_seq <= after:
                break
            after = page.next_seq
            page = await client.read_log(
                job_id, after_seq=after, limit=MAX_PAGE_SIZE, step_id=step_id, sources=sources
            )
        if follow and not (limit and sent >= limit):
            async for line in client.follow_log(
                job_id, after_seq=page.next_seq, step_id=step_id, sources=sources
            ):
                await response.write((wire.as_json(line) + "\n").encode())
        await response.write_eof()
        return response

    async def job_stream(request: web.Request) -> web.StreamResponse:
        job_id = request.match_info["job_id"]
        resume = wire.Position.parse(
            request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
        )
        position = await job_events.start_position(client, job_id, resume)
        scope = job_events.LogScope(request.query.get("step_id", ""), _sources(request))
        return await job_events.stream(request, client, feeds, job_id, position, scope)

    async def list_stream(request: web.Request) -> web.StreamResponse:
        status = _status(request)
        response = web.StreamResponse(headers=job_events.HEADERS)
        async with feeds.job_list(status) as feed:
            await response.prepare(request)
            await response.write(wire.retry(job_events.RETRY_MS) + wire.comment("stepflow"))
            seen = 0
            while True:
                try:
                    if not await asyncio.wait_for(feed.wait_past(seen), job_events.PING_S):
                        break
                except TimeoutError:
                    await response.write(wire.comment("ping"))
                    continue
                seen = feed.version
                await response.write(wire.frame("jobs", feed.json))
        return response

    async def health(_request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "serving", "watched_jobs": feeds.watched})

    return [
        web.get("/healthz", health),
        web.get("/api/v1/jobs", list_jobs),
        web.get("/api/v1/managers/events", list_stream),
        web.get("/api/v1/jobs/{job_id}", get_job),
        web.get("/api/v1/jobs/{job_id}/steps", steps),
        web.get("/api/v1/jobs/{job_id}/children", children),
        web.get("/api/v1/jobs/{job_id}/log", read_log),
        web.get("/api/v1/jobs/{job_id}/events", job_stream),
        web.post("/api/v1/jobs/{job_id}/cancel", cancel),
    ]
