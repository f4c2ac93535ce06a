"""The web view's HTTP side (SPEC §7) against a real monitor on both databases: the JSON API
equals the RPCs it stands on, errors carry the right HTTP status, the event stream's ids
resume it exactly (no state older than one sent, no log line twice), it ends after the last
line of a finished job, and many pages of one job share one WatchJob."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from google.protobuf import json_format
from grpc import aio

from monitor_svc.server import MonitorConfig, RunningMonitor, create_server
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from tests.conftest import FAST_TIMERS
from tests.helpers import manager_with_steps
from tests.stream_helpers import completed, created, failed, running, sealed, send_batches
from tests.web_helpers import Event, ndjson, sse

pytestmark = pytest.mark.timeout(60)

S = job_pb2
Stub = m_grpc.MonitorServiceStub


@pytest.fixture
async def web_monitor(database_url: str) -> AsyncIterator[RunningMonitor]:
    running = await create_server(
        MonitorConfig(
            database_url=database_url, port=0, http_port=0, timers=FAST_TIMERS,
            shutdown_grace_s=1.0,
        )
    )  # fmt: skip
    try:
        yield running
    finally:
        await running.stop(grace=0.5)


@pytest.fixture
async def wstub(web_monitor: RunningMonitor) -> AsyncIterator[Stub]:
    async with aio.insecure_channel(web_monitor.address) as channel:
        yield m_grpc.MonitorServiceStub(channel)


@pytest.fixture
async def http(web_monitor: RunningMonitor) -> AsyncIterator[aiohttp.ClientSession]:
    assert web_monitor.web is not None
    async with aiohttp.ClientSession(web_monitor.web.url) as session:
        yield session


async def next_event(events: AsyncIterator[Event | str], name: str | None = None) -> Event:
    """The next event (pings skipped), of ``name`` when given."""
    async with asyncio.timeout(10):
        async for item in events:
            if isinstance(item, Event) and (name is None or item.name == name):
                return item
    raise AssertionError("the stream ended")


def position(event_id: str | None) -> tuple[int, int]:
    """(change_seq, log_seq) of an event id ``<change_seq>.<log_seq>``."""
    change, dot, log_seq = (event_id or "").partition(".")
    assert dot, event_id
    return int(change), int(log_seq)


async def set_status(stub: Stub, job_id: str, status: int, error: str = "") -> None:
    await stub.UpdateJobStatus(m.UpdateJobStatusRequest(job_id=job_id, status=status, error=error))


async def test_job_json_is_get_job_as_protobuf_json(
    wstub: Stub, http: aiohttp.ClientSession
) -> None:
    manager, steps = await manager_with_steps(wstub, 2)
    await send_batches(wstub, [[created(steps[0].id, "c1"), running(steps[0].id, "c1")]])
    async with http.get(f"/api/v1/jobs/{manager.id}") as resp:
        assert resp.status == 200
        body = await resp.json()
    job = (await wstub.GetJob(m.GetJobRequest(job_id=manager.id))).job
    assert json_format.ParseDict(body, S.Job()) == job
    assert body["stepStats"][0]["children"] == {"running": "1"}


async def test_list_is_newest_managers_first_filtered_by_status(
    wstub: Stub, http: aiohttp.ClientSession
) -> None:
    first, _ = await manager_with_steps(wstub, 1)
    second, _ = await manager_with_steps(wstub, 1)
    await set_status(wstub, second.id, S.JOB_STATUS_RUNNING)
    async with http.get("/api/v1/jobs") as resp:
        ids = [j["id"] for j in (await resp.json())["jobs"]]
    assert ids == [second.id, first.id]  # managers only, newest first
    async with http.get("/api/v1/jobs", params={"status": "running"}) as resp:
        assert [j["id"] for j in (await resp.json())["jobs"]] == [second.id]
    async with http.get("/api/v1/jobs", params={"status": "sideways"}) as resp:
        assert resp.status == 400
        assert "sideways" in (await resp.json())["error"]


async def test_errors_map_to_http_statuses(wstub: Stub, http: aiohttp.ClientSession) -> None:
    async with http.get("/api/v1/jobs/no-such-job") as resp:
        assert (resp.status, (await resp.json())["code"]) == (404, "NotFound")
    async with http.get("/api/v1/jobs/no-such-job/events") as resp:
        assert resp.status == 404  # refused before the stream starts
    async with http.get("/api/v1/jobs/no-such-job/log") as resp:
        assert resp.status == 404
    manager, _ = await manager_with_steps(wstub, 1)
    async with http.get(f"/api/v1/jobs/{manager.id}/log", params={"after_seq": "-1"}) as resp:
        assert resp.status == 400
    async with http.get(f"/api/v1/jobs/{manager.id}/children") as resp:
        assert resp.status == 400  # which step's children: required
    await set_status(wstub, manager.id, S.JOB_STATUS_COMPLETED)
    async with http.post(f"/api/v1/jobs/{manager.id}/cancel") as resp:
        assert resp.status == 409  # a finished job is not cancelled, and stays as it was
    assert (await wstub.GetJob(m.GetJobRequest(job_id=manager.id))).job.status == (
        S.JOB_STATUS_COMPLETED
    )


async def test_cancel_cancels_the_job_and_everything_under_it(
    wstub: Stub, http: aiohttp.ClientSession
) -> None:
    manager, steps = await manager_with_steps(wstub, 2)
    await set_status(wstub, manager.id, S.JOB_STATUS_RUNNING)
    await set_status(wstub, steps[0].id, S.JOB_STATUS_RUNNING)
    await send_batches(wstub, [[created(steps[0].id, "c1"), running(steps[0].id, "c1")]])
    async with http.post(f"/api/v1/jobs/{manager.id}/cancel") as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "JOB_STATUS_CANCELLED"
    job = (await wstub.GetJob(m.GetJobRequest(job_id=manager.id))).job
    assert [s.status for s in job.step_stats] == [S.JOB_STATUS_CANCELLED, S.JOB_STATUS_SKIPPED]
    assert job.step_stats[0].children.cancelled == 1
    assert "web view" in job.error


async def test_children_are_paged_and_filtered_by_status(
    wstub: Stub, http: aiohttp.ClientSession
) -> None:
    manager, steps = await manager_with_steps(wstub, 1)
    step = steps[0].id
    events = [created(step, f"c{i}") for i in range(7)]
    events += [failed(step, "c1"), failed(step, "c4"), completed(step, "c2")]
    await send_batches(wstub, [events])
    seen, token = [], ""
    while True:
        params = {"step_id": step, "page_size": "3", "page_token": token}
        async with http.get(f"/api/v1/jobs/{manager.id}/children", params=params) as resp:
            page = await resp.json()
        assert len(page.get("jobs", [])) <= 3
        seen += [j["id"] for j in page.get("jobs", [])]
        token = page.get("nextPageToken", "")
        if not token:
            break
    assert sorted(seen) == sorted(f"c{i}" for i in range(7))
    params = {"step_id": step, "status": "failed"}
    async with http.get(f"/api/v1/jobs/{manager.id}/children", params=params) as resp:
        page = await resp.json()
    assert sorted(j["id"] for j in page["jobs"]) == ["c1", "c4"]
    assert {j["error"] for j in page["jobs"]} == {"boom"}


async def test_log_ndjson_is_read_job_log_and_follow_ends_with_the_job(
    wstub: Stub, http: aiohttp.ClientSession
) -> None:
    manager, steps = await manager_with_steps(wstub, 1)
    await set_status(wstub, manager.id, S.JOB_STATUS_RUNNING)
    await send_batches(wstub, [[created(steps[0].id, "c1"), failed(steps[0].id, "c1", "bad")]])
    async with http.get(f"/api/v1/jobs/{manager.id}/log") as resp:
        assert resp.headers["Content-Type"].startswith("application/x-ndjson")
        lines = ndjson(await resp.text())
    read = await wstub.ReadJobLog(m.ReadJobLogRequest(job_id=manager.id))
    assert [json_format.ParseDict(x, S.JobLogLine()) for x in lines] == list(read.lines)
    assert any("bad" in x["message"] for x in lines)
    params = {"after_seq": "1", "limit": "1"}
    async with http.get(f"/api/v1/jobs/{manager.id}/log", params=params) as resp:
        assert [x["seq"] for x in ndjson(await resp.text())] == ["2"]

    async with http.get(f"/api/v1/jobs/{manager.id}/log", params={"follow": "1"}) as resp:
        first = json_format.ParseDict(
            ndjson((await resp.content.readline()).decode())[0], S.JobLogLine()
        )
        assert first == read.lines[0]
        await set_status(wstub, manager.id, S.JOB_STATUS_CANCELLED)
        async with asyncio.timeout(10):
            rest = ndjson((await resp.content.read()).decode())  # ends with the job
    after = await wstub.ReadJobLog(m.ReadJobLogRequest(job_id=manager.id))
    assert [x["seq"] for x in rest] == [str(x.seq) for x in after.lines[1:]]
    assert after.complete


async def test_event_stream_sends_state_log_and_end_with_resumable_ids(
    wstub: Stub, http: aiohttp.ClientSession
) -> None:
    manager, steps = await manager_with_steps(wstub, 1)
    step = steps[0].id
    url = f"/api/v1/jobs/{manager.id}/events"
    async with http.get(url) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["X-Accel-Buffering"] == "no"
        assert "no-cache" in resp.headers["Cache-Control"]
        events = sse(resp)
        state = await next_event(events, "state")
        assert state.data["id"] == manager.id
        assert position(state.id)[0] == int(state.data["changeSeq"])
        await send_batches(wstub, [[created(step, "c1"), running(step, "c1")]])
        seen: list[Event] = []
        while True:
            event = await next_event(events)
            seen.append(event)
            if event.name == "state" and event.data["stepStats"][0].get("children", {}).get(
                "running"
            ):
                break
        last_id = seen[-1].id
    # Everything after last_id, and nothing before it, once the page reconnects with it.
    await send_batches(wstub, [[completed(step, "c1"), sealed(step, 1, handed=False)]])
    await set_status(wstub, manager.id, S.JOB_STATUS_COMPLETED)
    async with http.get(url, headers={"Last-Event-ID": last_id or ""}) as resp:
        resumed = [e async for e in sse(resp) if isinstance(e, Event)]
    assert resumed[-1].name == "end"
    assert resumed[-1].data == {"status": "JOB_STATUS_COMPLETED"}
    states = [int(e.data["changeSeq"]) for e in resumed if e.name == "state"]
    assert states == sorted(states) and states[0] > position(last_id)[0]
    logged = [int(e.data["seq"]) for e in resumed if e.name == "log"]
    resumed_from = position(last_id)[1]
    whole = await wstub.ReadJobLog(m.ReadJobLogRequest(job_id=manager.id, limit=1000))
    assert logged == [x.seq for x in whole.lines if x.seq > resumed_from]  # none twice, none lost
    before = position(last_id)
    for event in resumed:  # each id is the position after its event, and ids only rise
        now = position(event.id)
        assert now[0] >= before[0] and now[1] >= before[1]
        if event.name == "state":
            assert now[0] == int(event.data["changeSeq"])
        if event.name == "log":
            assert now[1] == int(event.data["seq"])
        before = now
    final_id = resumed[-1].id
    assert position(final_id) == (states[-1], whole.lines[-1].seq)
    # A page that comes back after the end gets the end at once, and nothing again.
    async with http.get(url, headers={"Last-Event-ID": final_id or ""}) as resp:
        again = [e async for e in sse(resp) if isinstance(e, Event)]
    assert [e.name for e in again] == ["end"]


async def test_a_new_page_starts_at_the_log_tail_and_current_state(
    web_monitor: RunningMonitor, wstub: Stub, http: aiohttp.ClientSession
) -> None:
    from monitor_svc.web import job_events

    manager, _ = await manager_with_steps(wstub, 1)
    entries = [S.JobLogEntry(key=f"k{i}", message=f"line {i}") for i in range(30)]
    await wstub.AppendJobLog(m.AppendJobLogRequest(job_id=manager.id, lines=entries))
    last = (await wstub.ReadJobLog(m.ReadJobLogRequest(job_id=manager.id, limit=1))).last_seq
    assert last >= 30
    window = job_events.LOG_WINDOW
    job_events.LOG_WINDOW = 10
    try:
        async with http.get(f"/api/v1/jobs/{manager.id}/events") as resp:
            events = sse(resp)
            first = await next_event(events)
            assert first.name == "state"
            line = await next_event(events, "log")
            assert int(line.data["seq"]) == last - 9
    finally:
        job_events.LOG_WINDOW = window


async def test_pages_of_one_job_share_one_watch(
    web_monitor: RunningMonitor, wstub: Stub, http: aiohttp.ClientSession
) -> None:
    manager, steps = await manager_with_steps(wstub, 1)
    url = f"/api/v1/jobs/{manager.id}/events"
    responses = [await http.get(url) for _ in range(20)]
    try:
        streams = [sse(r) for r in responses]
        for events in streams:
            await next_event(events, "state")
        async with http.get("/healthz") as resp:
            assert (await resp.json())["watched_jobs"] == 1
        assert web_monitor.hub.watchers(manager.id) == 1  # one WatchJob for all 20 pages
        await send_batches(wstub, [[created(steps[0].id, "c1")]])
        for events in streams:  # every page gets the change
            while True:
                event = await next_event(events, "state")
                if event.data["stepStats"][0].get("children", {}).get("pending"):
                    break
    finally:
        for r in responses:
            r.close()
    async with asyncio.timeout(5):
        while True:
            async with http.get("/healthz") as resp:
                if (await resp.json())["watched_jobs"] == 0:
                    break  # the shared watch ends with its last page
            await asyncio.sleep(0.05)


async def test_an_idle_stream_is_pinged(
    web_monitor: RunningMonitor,
    wstub: Stub,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from monitor_svc.web import job_events

    monkeypatch.setattr(job_events, "PING_S", 0.2)
    manager, _ = await manager_with_steps(wstub, 1)
    async with http.get(f"/api/v1/jobs/{manager.id}/events") as resp:
        events = sse(resp)
        pings = 0
        async with asyncio.timeout(10):
            async for item in events:
                pings += item == "ping"
                if pings == 3:
                    break  # nothing changed, and the stream kept talking


async def test_a_page_that_leaves_mid_backlog_frees_its_stream(
    web_monitor: RunningMonitor, wstub: Stub, http: aiohttp.ClientSession
) -> None:
    """A page that stops reading (its socket buffer full) and then goes away ends its
    stream and the shared watch, however much it left unread."""
    manager, _ = await manager_with_steps(wstub, 1)
    text = "x" * 3000
    for start in range(0, 5000, 500):
        entries = [S.JobLogEntry(key=f"k{i}", message=text) for i in range(start, start + 500)]
        await wstub.AppendJobLog(m.AppendJobLogRequest(job_id=manager.id, lines=entries))
    assert web_monitor.web is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", web_monitor.web.port, limit=1024)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    writer.write(
        f"GET /api/v1/jobs/{manager.id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    )
    await writer.drain()
    await reader.read(1024)  # the stream started; nothing more is read
    await asyncio.sleep(1.0)
    assert web_monitor.hub.watchers(manager.id) == 1
    writer.transport.abort()
    async with asyncio.timeout(10):
        while True:
            async with http.get("/healthz") as resp:
                gone = (await resp.json())["watched_jobs"] == 0
            if gone and web_monitor.hub.watchers(manager.id) == 0:
                break  # the page's feed, and the monitor's WatchJob under it, are gone
            await asyncio.sleep(0.05)
