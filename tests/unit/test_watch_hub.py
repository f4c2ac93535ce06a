"""WatchHub: states read on the committing thread reach the watchers; a failed read there
falls back to the feed's own read; older states never overtake newer ones."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from monitor_svc.records import JobState, JobView
from monitor_svc.watch import WatchHub
from stepflow_common.status import Kind, Status

JOB = "j-hub"


def view(change_seq: int, status: Status = Status.RUNNING) -> JobView:
    state = JobState(
        id=JOB,
        kind=Kind.STEP,
        parent_id="m-hub",
        manager_id="m-hub",
        name="s",
        type="",
        status=status,
        error="",
        end_reason="",
        metadata={},
        version=change_seq,
        change_seq=change_seq,
        step_index=0,
        timeout_s=None,
        deadline=None,
        created_at=datetime.now(UTC),
        started_at=None,
        finished_at=None,
        request_id=None,
        owner="",
    )
    return JobView(state, {})


class Store:
    """The job's committed state, read through the pool (async) or on a thread (sync)."""

    def __init__(self) -> None:
        self.current = view(1)
        self.pool_reads = 0
        self.pool_read = asyncio.Event()
        self.thread_reads = 0

    async def read(self, job_id: str) -> JobView | None:
        self.pool_reads += 1
        self.pool_read.set()
        return self.current if job_id == JOB else None

    def read_now(self, job_ids: list[str]) -> dict[str, JobView | None]:
        self.thread_reads += 1
        return {j: (self.current if j == JOB else None) for j in job_ids}


def failing_read(job_ids: list[str]) -> dict[str, JobView | None]:
    raise RuntimeError("connection lost")


async def commit_on_thread(
    hub: WatchHub, read_now: Callable[[list[str]], dict[str, JobView | None]]
) -> None:
    thread = threading.Thread(target=hub.committed, args=({JOB, "other"}, read_now))
    thread.start()
    await asyncio.to_thread(thread.join)


async def test_states_read_after_commit_reach_watchers_without_a_pool_read() -> None:
    store = Store()
    hub = WatchHub(store.read)
    hub.bind_loop(asyncio.get_running_loop())
    watchers = [hub.watch(JOB, 0) for _ in range(3)]
    first = [await anext(w) for w in watchers]
    assert {v.job.change_seq for v in first} == {1}
    pool_reads = store.pool_reads
    store.current = view(2)
    await commit_on_thread(hub, store.read_now)
    second = [await anext(w) for w in watchers]
    assert {v.job.change_seq for v in second} == {2}
    assert store.thread_reads == 1  # one read for three watchers
    assert store.pool_reads == pool_reads
    store.current = view(3, Status.COMPLETED)
    await commit_on_thread(hub, store.read_now)
    for w in watchers:
        assert (await anext(w)).job.status is Status.COMPLETED
        assert [v async for v in w] == []  # the terminal state ends the watch
    assert not hub.watching(JOB)


async def test_a_failed_read_after_commit_falls_back_to_the_feed_read() -> None:
    store = Store()
    hub = WatchHub(store.read)
    hub.bind_loop(asyncio.get_running_loop())
    watcher = hub.watch(JOB, 1)  # already has change 1
    next_state = asyncio.ensure_future(anext(watcher))
    await store.pool_read.wait()  # the joining watcher's read of the current state
    store.current = view(2)
    await commit_on_thread(hub, failing_read)
    assert (await next_state).job.change_seq == 2
    assert store.pool_reads == 2
    await watcher.aclose()
    hub.close()


async def test_an_older_state_never_replaces_a_newer_one() -> None:
    store = Store()
    hub = WatchHub(store.read)
    hub.bind_loop(asyncio.get_running_loop())
    watcher = hub.watch(JOB, 0)
    assert (await anext(watcher)).job.change_seq == 1
    store.current = view(5)
    await commit_on_thread(hub, store.read_now)
    assert (await anext(watcher)).job.change_seq == 5
    stale = view(4)
    await commit_on_thread(hub, lambda ids: {JOB: stale})
    store.current = view(6)
    await commit_on_thread(hub, store.read_now)
    assert (await anext(watcher)).job.change_seq == 6
    await watcher.aclose()
    hub.close()
