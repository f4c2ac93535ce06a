"""What many pages show at once, fetched once: one WatchJob per watched job, and one job-list
query per filter, shared by every page open on them (200 pages of a job cost the monitor one
stream, and the database one read per change).

A feed keeps only the latest value; each page takes it when it is newer than the one it
has, so a slow page skips states instead of queueing them, and never goes backwards."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, MutableMapping
from typing import TypeVar

import structlog

from monitor_svc.web import wire
from stepflow_client.aio import MonitorClient
from stepflow_common.errors import NotFound, StepflowError, Unauthenticated
from stepflow_common.proto_status import TERMINAL_PB
from stepflow_proto.v1 import job_pb2

log = structlog.get_logger(__name__)

F = TypeVar("F", bound="_Latest")

LIST_REFRESH_S = 1.0  # the job list's one shared query, at most this often
LIST_PAGE_SIZE = 50


class _Latest:
    """The newest value of something, and a way to wait for a newer one."""

    def __init__(self) -> None:
        self.version = 0
        self.done = False
        self.failure: StepflowError | None = None
        self.users = 0  # pages using it now
        self._wakeups: set[asyncio.Event] = set()
        self._task: asyncio.Task[None] | None = None

    def close(self) -> None:
        """Stop, and wake whoever waits (a stream then ends at once)."""
        if self._task is not None:
            self._task.cancel()
        if not self.done:
            self.finish()

    def _wake(self) -> None:
        for event in self._wakeups:
            event.set()

    def finish(self, failure: StepflowError | None = None) -> None:
        self.done = True
        self.failure = failure
        self._wake()

    async def wait_past(self, version: int) -> bool:
        """Wait until there is a value newer than ``version``; False once none will come."""
        while self.version <= version:
            if self.done:
                return False
            event = asyncio.Event()
            self._wakeups.add(event)
            try:
                await event.wait()
            finally:
                self._wakeups.discard(event)
        return True


class StateFeed(_Latest):
    """One job's states from WatchJob (resumed across monitor restarts by the client), until
    the terminal one."""

    def __init__(self, client: MonitorClient, job_id: str) -> None:
        super().__init__()
        self.job_id = job_id
        self.job: job_pb2.Job | None = None
        self.json = ""
        self._task = asyncio.create_task(self._run(client), name=f"web-watch-{job_id}")

    async def _run(self, client: MonitorClient) -> None:
        try:
            async for job in client.watch(self.job_id):
                self.job = job
                self.json = wire.as_json(job)
                self.version = job.change_seq
                self._wake()
            self.finish()
        except (NotFound, Unauthenticated) as exc:
            self.finish(exc)
        except StepflowError as exc:  # pragma: no cover - watch resumes all but the above
            log.warning("web view: watch failed", job_id=self.job_id, error=str(exc))
            self.finish(exc)

    @property
    def terminal(self) -> bool:
        return self.job is not None and self.job.status in TERMINAL_PB

    async def states(self, after_change_seq: int) -> AsyncIterator[tuple[int, str, bool]]:
        """(change_seq, the job as JSON, terminal) for every state newer than the last given,
        starting past ``after_change_seq``; ends after the terminal state."""
        seen = after_change_seq
        while await self.wait_past(seen):
            seen = self.version
            yield seen, self.json, self.terminal
        if self.failure is not None:
            raise self.failure


class ListFeed(_Latest):
    """The newest managers with one status (or any), refreshed while a page shows them."""

    def __init__(self, client: MonitorClient, status: str) -> None:
        super().__init__()
        self.status = status
        self.json = ""
        self._task = asyncio.create_task(self._run(client), name=f"web-list-{status}")

    async def _run(self, client: MonitorClient) -> None:
        while True:
            try:
                page = await client.list_jobs(
                    kind="manager", status=self.status or None, page_size=LIST_PAGE_SIZE
                )
                text = wire.as_json(page)
                if text != self.json:
                    self.json = text
                    self.version += 1
                    self._wake()
            except StepflowError as exc:
                log.info("web view: job list not refreshed", error=str(exc))
            await asyncio.sleep(LIST_REFRESH_S)


class Feeds:
    """The feeds pages are using, each dropped when its last page leaves."""

    def __init__(self, client: MonitorClient) -> None:
        self._client = client
        self._states: dict[str, StateFeed] = {}
        self._lists: dict[str, ListFeed] = {}

    def state(self, job_id: str) -> contextlib.AbstractAsyncContextManager[StateFeed]:
        return _shared(self._states, job_id, lambda: StateFeed(self._client, job_id))

    def job_list(self, status: str) -> contextlib.AbstractAsyncContextManager[ListFeed]:
        return _shared(self._lists, status, lambda: ListFeed(self._client, status))

    @property
    def watched(self) -> int:
        return len(self._states)

    def close(self) -> None:
        for feed in [*self._states.values(), *self._lists.values()]:
            feed.close()
        self._states.clear()
        self._lists.clear()


@contextlib.asynccontextmanager
async def _shared(
    registry: MutableMapping[str, F], key: str, start: Callable[[], F]
) -> AsyncIterator[F]:
    """The feed under ``key`` (started if none runs), for as long as the caller uses it; the
    last user to leave stops it."""
    feed = registry.get(key)
    if feed is None:
        feed = registry[key] = start()
    feed.users += 1
    try:
        yield feed
    finally:
        feed.users -= 1
        if feed.users == 0 and registry.get(key) is feed:
            del registry[key]
            feed.close()
