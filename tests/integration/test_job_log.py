"""The job log (SPEC §6) through a real monitor and channel, on both databases: the monitor's
own event lines written with the change they describe, writers' lines on the stream and
through AppendJobLog stored once per key, ReadJobLog's pages and filters, FollowJobLog's
backfill, live lines, exact resume and end, and the bounds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc import aio

from monitor_svc.log_lines import MAX_LINE_BYTES
from monitor_svc.records import DocumentLimits
from monitor_svc.server import MonitorConfig, RunningMonitor, create_server
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from tests.conftest import FAST_TIMERS
from tests.helpers import create_manager, create_step
from tests.stream_helpers import completed, created, failed, running, sealed

pytestmark = pytest.mark.timeout(60)

S = job_pb2
C = grpc.StatusCode
Stub = m_grpc.MonitorServiceStub
CALL_S = 10.0


async def read_all(stub: Stub, job_id: str, **kw: object) -> list[job_pb2.JobLogLine]:
    """Every line of a log, page by page."""
    lines: list[job_pb2.JobLogLine] = []
    after = 0
    while True:
        page = await stub.ReadJobLog(
            m.ReadJobLogRequest(job_id=job_id, after_seq=after, **kw),  # type: ignore[arg-type]
            timeout=CALL_S,
        )
        lines.extend(page.lines)
        if page.next_seq == after:
            return lines
        after = page.next_seq


async def set_status(stub: Stub, job_id: str, status: int, error: str = "") -> None:
    await stub.UpdateJobStatus(
        m.UpdateJobStatusRequest(job_id=job_id, status=status, error=error), timeout=CALL_S
    )


def entry(step_id: str, message: str, key: str = "", **kw: object) -> job_pb2.JobLogEntry:
    return job_pb2.JobLogEntry(step_id=step_id, message=message, key=key, **kw)  # type: ignore[arg-type]


async def stream(
    stub: Stub, *requests: m.StreamChildEventsRequest
) -> list[m.StreamChildEventsResponse]:
    async def gen() -> AsyncIterator[m.StreamChildEventsRequest]:
        for request in requests:
            yield request

    return [ack async for ack in stub.StreamChildEvents(gen(), timeout=CALL_S)]


async def test_status_changes_are_written_as_event_lines_in_commit_order(stub: Stub) -> None:
    manager = await create_manager(stub, "nightly")
    step = await create_step(stub, manager.id, 0, "crawl")
    await set_status(stub, manager.id, S.JOB_STATUS_RUNNING)
    await set_status(stub, step.id, S.JOB_STATUS_RUNNING)
    await set_status(stub, step.id, S.JOB_STATUS_FAILED, "disk full")
    await set_status(stub, manager.id, S.JOB_STATUS_FAILED, "step crawl failed")
    lines = await read_all(stub, manager.id)
    assert [line.seq for line in lines] == list(range(1, len(lines) + 1))
    assert {line.source for line in lines} == {"event"}
    assert [line.message for line in lines] == [
        "job nightly created",
        "job nightly running",
        "step crawl running",
        "step crawl failed (api): disk full",
        "job nightly failed (api): step crawl failed",
    ]
    assert [line.level for line in lines][-2:] == ["error", "error"]
    assert lines[2].step_id == step.id and lines[0].step_id == ""
    page = await stub.ReadJobLog(m.ReadJobLogRequest(job_id=manager.id), timeout=CALL_S)
    assert page.complete and page.next_seq == len(lines)


async def test_a_step_ended_by_its_children_is_told_once_with_its_reason(stub: Stub) -> None:
    manager = await create_manager(stub, "j")
    step = await create_step(stub, manager.id, 0, "fan")
    await set_status(stub, step.id, S.JOB_STATUS_RUNNING)
    acks = await stream(
        stub,
        m.StreamChildEventsRequest(
            batch_id=1,
            events=[
                created(step.id, "c1"),
                running(step.id, "c1"),
                created(step.id, "c2"),
                failed(step.id, "c2", "exit 3"),
                completed(step.id, "c1"),
                sealed(step.id, 2),
            ],
        ),
    )
    assert not acks[0].rejected
    messages = [line.message for line in await read_all(stub, manager.id)]
    assert "child c2 failed: exit 3" in messages
    assert "step fan sealed with 2 children; the monitor ends the step" in messages
    ends = [msg for msg in messages if msg.startswith("step fan ") and "completed" in msg]
    assert ends == ["step fan completed (children_terminal)"]
    # Seal before the step's end, the failure before the seal: commit order.
    assert messages.index("child c2 failed: exit 3") < messages.index(ends[0])
    ended = (await stub.GetJob(m.GetJobRequest(job_id=step.id), timeout=CALL_S)).job
    assert (ended.status, ended.end_reason) == (S.JOB_STATUS_COMPLETED, "children_terminal")


async def test_stream_lines_are_stored_once_whatever_is_resent(stub: Stub) -> None:
    manager = await create_manager(stub, "j")
    step = await create_step(stub, manager.id, 0, "cmd")
    batch = m.StreamChildEventsRequest(
        batch_id=1,
        events=[created(step.id, "c1")],
        log_lines=[
            entry(step.id, "hello", "i1:1", source="stdout", child_id="c1"),
            entry(step.id, "oops", "i1:2", source="stderr", level="warning", child_id="c1"),
            entry(step.id, "no key: stored each time"),
        ],
    )
    first = await stream(stub, batch)
    again = await stream(stub, m.StreamChildEventsRequest(batch_id=2, log_lines=batch.log_lines))
    assert not first[0].rejected and not again[0].rejected
    lines = await read_all(stub, manager.id, sources=["stdout", "stderr", "log"])
    assert [(line.source, line.message) for line in lines] == [
        ("stdout", "hello"),
        ("stderr", "oops"),
        ("log", "no key: stored each time"),
        ("log", "no key: stored each time"),
    ]
    assert lines[0].child_id == "c1" and lines[0].step_id == step.id
    everything = await read_all(stub, manager.id)
    assert [line.seq for line in everything] == list(range(1, len(everything) + 1))


async def test_a_line_for_an_unknown_step_is_refused_in_the_ack_and_the_rest_kept(
    stub: Stub,
) -> None:
    manager = await create_manager(stub, "j")
    step = await create_step(stub, manager.id, 0, "cmd")
    acks = await stream(
        stub,
        m.StreamChildEventsRequest(
            batch_id=1,
            log_lines=[
                entry("no-such-step", "lost", "k1"),
                entry(step.id, "bad source", "k2", source="event"),
                entry(step.id, "kept", "k3"),
                job_pb2.JobLogEntry(key="k4", message="no step"),
            ],
        ),
    )
    assert [r.event_id for r in acks[0].rejected] == ["k4", "k1", "k2"]
    assert "unknown step" in acks[0].rejected[1].reason
    assert "monitor's own" in acks[0].rejected[2].reason
    assert [line.message for line in await read_all(stub, manager.id, sources=["log"])] == ["kept"]


async def test_append_job_log_is_idempotent_by_key_and_places_lines_by_the_job_named(
    stub: Stub,
) -> None:
    manager = await create_manager(stub, "j")
    step = await create_step(stub, manager.id, 0, "outside")
    lines = [job_pb2.JobLogEntry(key=f"w:{i}", message=f"line {i}") for i in range(3)]
    first = await stub.AppendJobLog(
        m.AppendJobLogRequest(job_id=step.id, lines=lines), timeout=CALL_S
    )
    again = await stub.AppendJobLog(
        m.AppendJobLogRequest(job_id=step.id, lines=lines), timeout=CALL_S
    )
    assert (first.appended, again.appended) == (3, 0)
    assert again.last_seq == first.last_seq
    stored = await read_all(stub, step.id)  # a step's id: its lines only
    assert [(line.message, line.step_id) for line in stored] == [
        (f"line {i}", step.id) for i in range(3)
    ]
    for bad, words in [
        (job_pb2.JobLogEntry(message="x", source="event"), "monitor's own"),
        (job_pb2.JobLogEntry(message="x", level="loud"), "level"),
        (job_pb2.JobLogEntry(message="x", key="k" * 200), "key"),
    ]:
        with pytest.raises(aio.AioRpcError) as err:
            await stub.AppendJobLog(
                m.AppendJobLogRequest(job_id=step.id, lines=[bad]), timeout=CALL_S
            )
        assert err.value.code() == C.INVALID_ARGUMENT and words in (err.value.details() or "")
    with pytest.raises(aio.AioRpcError) as err:
        await stub.AppendJobLog(m.AppendJobLogRequest(job_id="nope", lines=lines), timeout=CALL_S)
    assert err.value.code() == C.NOT_FOUND
    assert len(await read_all(stub, step.id)) == 3  # nothing refused was stored


async def test_read_job_log_pages_and_filters(stub: Stub) -> None:
    manager = await create_manager(stub, "j")
    a = await create_step(stub, manager.id, 0, "a")
    b = await create_step(stub, manager.id, 1, "b")
    for step in (a, b):
        await stub.AppendJobLog(
            m.AppendJobLogRequest(
                job_id=step.id,
                lines=[job_pb2.JobLogEntry(message=f"{step.name}{i}") for i in range(25)],
            ),
            timeout=CALL_S,
        )
    page = await stub.ReadJobLog(m.ReadJobLogRequest(job_id=manager.id, limit=10), timeout=CALL_S)
    assert [line.seq for line in page.lines] == list(range(1, 11)) and not page.complete
    assert page.next_seq == 10
    only_b = await read_all(stub, manager.id, step_id=b.id, limit=7)
    assert [line.message for line in only_b] == [f"b{i}" for i in range(25)]
    events = await read_all(stub, manager.id, sources=["event"])
    assert [line.message for line in events] == ["job j created"]
    with pytest.raises(aio.AioRpcError) as err:
        await stub.ReadJobLog(
            m.ReadJobLogRequest(job_id=manager.id, sources=["syslog"]), timeout=CALL_S
        )
    assert err.value.code() == C.INVALID_ARGUMENT
    with pytest.raises(aio.AioRpcError) as err:
        await stub.ReadJobLog(m.ReadJobLogRequest(job_id=manager.id, after_seq=-1))
    assert err.value.code() == C.INVALID_ARGUMENT
    with pytest.raises(aio.AioRpcError) as err:
        await stub.ReadJobLog(m.ReadJobLogRequest(job_id="missing"), timeout=CALL_S)
    assert err.value.code() == C.NOT_FOUND


async def test_follow_backfills_goes_live_resumes_exactly_and_ends_with_the_job(
    stub: Stub,
) -> None:
    manager = await create_manager(stub, "j")
    step = await create_step(stub, manager.id, 0, "s")
    await set_status(stub, manager.id, S.JOB_STATUS_RUNNING)
    await stub.AppendJobLog(
        m.AppendJobLogRequest(
            job_id=step.id, lines=[job_pb2.JobLogEntry(message=f"early {i}") for i in range(3)]
        ),
        timeout=CALL_S,
    )
    seen: list[job_pb2.JobLogLine] = []
    followers = [
        stub.FollowJobLog(m.FollowJobLogRequest(job_id=manager.id), timeout=30) for _ in range(3)
    ]

    async def drain(call: object, into: list[job_pb2.JobLogLine]) -> bool:
        complete = False
        async for message in call:  # type: ignore[attr-defined]
            into.extend(message.lines)
            complete = message.complete
        return complete

    lists: list[list[job_pb2.JobLogLine]] = [seen, [], []]
    tasks = [asyncio.create_task(drain(c, into)) for c, into in zip(followers, lists, strict=True)]
    await asyncio.sleep(0.3)
    for i in range(5):
        await stub.AppendJobLog(
            m.AppendJobLogRequest(job_id=step.id, lines=[job_pb2.JobLogEntry(message=f"live {i}")]),
            timeout=CALL_S,
        )
    await set_status(stub, step.id, S.JOB_STATUS_COMPLETED)
    await set_status(stub, manager.id, S.JOB_STATUS_COMPLETED)
    assert await asyncio.wait_for(asyncio.gather(*tasks), 20) == [True, True, True]
    stored = await read_all(stub, manager.id)
    for got in lists:
        assert [line.seq for line in got] == [line.seq for line in stored]
    assert seen[-1].message == "job j completed (api)"
    # A follower that reconnects with the last seq it has misses nothing, sees nothing twice.
    resumed: list[job_pb2.JobLogLine] = []
    assert await drain(
        stub.FollowJobLog(m.FollowJobLogRequest(job_id=manager.id, after_seq=4), timeout=10),
        resumed,
    )
    assert [line.seq for line in resumed] == [line.seq for line in stored if line.seq > 4]
    only_step: list[job_pb2.JobLogLine] = []
    assert await drain(
        stub.FollowJobLog(
            m.FollowJobLogRequest(job_id=manager.id, step_id=step.id, sources=["log"]),
            timeout=10,
        ),
        only_step,
    )
    assert [line.message for line in only_step] == [f"early {i}" for i in range(3)] + [
        f"live {i}" for i in range(5)
    ]


async def test_a_line_over_the_limit_is_cut_with_a_marker(stub: Stub) -> None:
    manager = await create_manager(stub, "j")
    await stub.AppendJobLog(
        m.AppendJobLogRequest(
            job_id=manager.id, lines=[job_pb2.JobLogEntry(message="é" * MAX_LINE_BYTES)]
        ),
        timeout=CALL_S,
    )
    (line,) = await read_all(stub, manager.id, sources=["log"])
    assert line.truncated and "line cut" in line.message
    assert len(line.message.encode()) <= MAX_LINE_BYTES


@pytest.fixture
async def small_log_stub(database_url: str) -> AsyncIterator[Stub]:
    running = await create_server(
        MonitorConfig(
            database_url=database_url,
            port=0,
            timers=FAST_TIMERS,
            shutdown_grace_s=1.0,
            limits=DocumentLimits(max_log_bytes=2_000),
        )
    )
    try:
        async with aio.insecure_channel(running.address) as ch:
            yield m_grpc.MonitorServiceStub(ch)
    finally:
        await running.stop(grace=0.5)


async def test_past_the_budget_each_step_keeps_its_first_and_last_lines_and_says_what_was_dropped(
    small_log_stub: Stub,
) -> None:
    stub = small_log_stub
    manager = await create_manager(stub, "j")
    a = await create_step(stub, manager.id, 0, "a")
    b = await create_step(stub, manager.id, 1, "b")
    await set_status(stub, a.id, S.JOB_STATUS_RUNNING)
    for i in range(100):
        await stream(
            stub,
            m.StreamChildEventsRequest(
                batch_id=1, log_lines=[entry(a.id, f"a line {i:03d} " + "x" * 40, f"a{i}")]
            ),
        )
    await set_status(stub, b.id, S.JOB_STATUS_RUNNING)
    await stream(
        stub, m.StreamChildEventsRequest(batch_id=1, log_lines=[entry(b.id, "b first", "b0")])
    )
    await set_status(stub, a.id, S.JOB_STATUS_COMPLETED)
    await set_status(stub, b.id, S.JOB_STATUS_COMPLETED)
    lines = await read_all(stub, manager.id)
    a_out = [line.message for line in lines if line.step_id == a.id and line.source == "log"]
    assert a_out[0].startswith("a line 000") and a_out[-1].startswith("a line 099")
    assert len(a_out) < 100
    dropped = [line.message for line in lines if "dropped" in line.message]
    assert dropped == [
        f"{100 - len(a_out):,} output lines dropped: the job's log is over its limit of 2,000 "
        "bytes (each step's first and last lines are kept)"
    ]
    assert [line.message for line in lines if line.step_id == b.id and line.source == "log"] == [
        "b first"
    ]
    events = [line.message for line in lines if line.source == "event"]
    assert "step a completed (api)" in events and "step b completed (api)" in events
    assert [line.seq for line in lines] == list(range(1, len(lines) + 1))


async def test_many_followers_of_one_log_cost_one_read_per_commit(
    monitor: RunningMonitor, stub: Stub
) -> None:
    manager = await create_manager(stub, "j")
    followers = [
        stub.FollowJobLog(m.FollowJobLogRequest(job_id=manager.id), timeout=30) for _ in range(20)
    ]
    got: list[list[int]] = [[] for _ in followers]

    async def drain(call: object, into: list[int]) -> None:
        async for message in call:  # type: ignore[attr-defined]
            into.extend(line.seq for line in message.lines)

    tasks = [asyncio.create_task(drain(c, into)) for c, into in zip(followers, got, strict=True)]
    for _ in range(100):  # every follower caught up with the job's first line
        if all(into == [1] for into in got):
            break
        await asyncio.sleep(0.05)
    reads_before = monitor.logs.feed_reads(manager.id)
    commits = 10
    for i in range(commits):
        await stub.AppendJobLog(
            m.AppendJobLogRequest(job_id=manager.id, lines=[job_pb2.JobLogEntry(message=f"{i}")]),
            timeout=CALL_S,
        )
        for _ in range(100):
            if all(len(into) == i + 2 for into in got):
                break
            await asyncio.sleep(0.02)
    reads = monitor.logs.feed_reads(manager.id) - reads_before
    await set_status(stub, manager.id, S.JOB_STATUS_CANCELLED)
    await asyncio.wait_for(asyncio.gather(*tasks), 20)
    assert all(into == list(range(1, commits + 3)) for into in got), got[0]
    # One read per commit for all 20 (a poll or a wake-up race may add a few), not 20 each.
    assert commits <= reads <= commits + 5, reads


async def test_a_page_of_long_lines_stays_under_four_mib_and_paging_reads_them_all(
    stub: Stub,
) -> None:
    manager = await create_manager(stub, "j")
    long = "x" * (MAX_LINE_BYTES - 100)
    for _ in range(3):
        await stub.AppendJobLog(
            m.AppendJobLogRequest(
                job_id=manager.id, lines=[job_pb2.JobLogEntry(message=long) for _ in range(100)]
            ),
            timeout=CALL_S,
        )
    page = await stub.ReadJobLog(m.ReadJobLogRequest(job_id=manager.id, limit=1000), timeout=CALL_S)
    assert 0 < len(page.lines) < 301 and page.ByteSize() < 4 * 1024 * 1024
    assert page.next_seq == page.lines[-1].seq
    assert len(await read_all(stub, manager.id, limit=1000)) == 301
