"""FollowJobLog fan-out: one read per commit that grew a followed log, however many follow it.

The writer reports the managers whose log a commit grew (``log:<id>`` among its changed ids;
another replica's commits arrive through the change listener). Each followed log has a feed
that reads the new lines once and offers them to its followers. A follower that is behind the
feed's last read (it just joined, or it was slow) reads the stored lines itself, so nobody
misses a line and nobody sees one twice: a follower's position is a ``seq``, not a queue.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable

import structlog

from monitor_svc import metrics
from monitor_svc.log_lines import LogPage, StoredLine
from monitor_svc.store.tx import LOG_CHANGE_PREFIX

log = structlog.get_logger(__name__)

POLL_S = 5.0


# Reads (manager_id, after_seq) -> a page of every source and step, up to the log's head.
ReadPage = Callable[[str, int], Awaitable[LogPage]]
Matches = Callable[[StoredLine], bool]


class _Follower:
    __slots__ = ("wake",)

    def __init__(self) -> None:
        self.wake = asyncio.Event()


class _Feed:
    """Reads one log's new lines once per change and offers the page to every follower."""

    def __init__(self, manager_id: str, read: ReadPage, after_seq: int) -> None:
        self.manager_id = manager_id
        self.followers: set[_Follower] = set()
        self.latest: tuple[int, LogPage] | None = None  # (the after_seq it was read from, page)
        self.reads = 0
        self._after = after_seq
        self._read = read
        self._dirty = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name=f"log-feed-{manager_id}")

    def changed(self) -> None:
        self._dirty.set()

    async def _run(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                page = await self._read(self.manager_id, self._after)
            except Exception as exc:
                log.warning("log read failed; retrying", job_id=self.manager_id, error=str(exc))
                await asyncio.sleep(0.2)
                self._dirty.set()
                continue
            self.reads += 1
            metrics.observe_log_read()
            self.latest = (self._after, page)
            if page.more:
                self._dirty.set()
            self._after = page.next_seq
            for follower in list(self.followers):
                follower.wake.set()

    def close(self) -> None:
        self._task.cancel()


class LogHub:
    def __init__(self, read: ReadPage) -> None:
        self._read = read
        self._feeds: dict[str, _Feed] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def committed(self, changed: set[str]) -> None:
        """From the writer thread, after each commit: wake the feeds whose log grew."""
        if not self._feeds or self._loop is None:
            return
        grown = [c[len(LOG_CHANGE_PREFIX) :] for c in changed if c.startswith(LOG_CHANGE_PREFIX)]
        if grown:
            with contextlib.suppress(RuntimeError):  # loop closed during shutdown
                self._loop.call_soon_threadsafe(self._wake, grown)

    def notify_any_threadsafe(self, changed: set[str] | None) -> None:
        """From another replica (``None``: anything may have changed)."""
        if not self._feeds or self._loop is None:
            return
        with contextlib.suppress(RuntimeError):
            if changed is None:
                self._loop.call_soon_threadsafe(self._wake, list(self._feeds))
            else:
                self.committed(changed)

    def _wake(self, managers: list[str]) -> None:
        for manager_id in managers:
            feed = self._feeds.get(manager_id)
            if feed is not None:
                feed.changed()

    def feed_reads(self, manager_id: str) -> int:
        feed = self._feeds.get(manager_id)
        return feed.reads if feed is not None else 0

    async def follow(
        self, manager_id: str, after_seq: int, matches: Matches
    ) -> AsyncGenerator[LogPage]:
        """Pages of the lines after ``after_seq`` that ``matches``, in seq order, each line
        once; the last page is ``complete`` (the job ended and its last line was sent)."""
        feed = self._feeds.get(manager_id)
        follower = _Follower()
        if feed is not None:
            feed.followers.add(follower)  # before the catch-up: no change in between is missed
        last = after_seq
        try:
            while True:
                # Catch up on what is stored (also after falling behind the feed).
                while True:
                    page = await self._read(manager_id, last)
                    chosen = [line for line in page.lines if matches(line)]
                    moved = page.next_seq > last
                    last = max(last, page.next_seq)
                    if chosen or page.complete:
                        yield LogPage(chosen, last, page.complete)
                    if page.complete:
                        return
                    if not (moved and page.more):
                        break
                if feed is None:
                    feed = self._feeds.get(manager_id)
                    if feed is None:
                        feed = self._feeds[manager_id] = _Feed(manager_id, self._read, last)
                    feed.followers.add(follower)
                    feed.changed()  # a commit between the catch-up and now is not missed
                # Live: the feed's pages, while they start where this follower is.
                while True:
                    woke = True
                    try:
                        await asyncio.wait_for(follower.wake.wait(), POLL_S)
                    except TimeoutError:
                        woke = False
                    follower.wake.clear()
                    latest = feed.latest
                    if latest is None or latest[1].next_seq <= last:
                        if latest is not None and latest[1].complete:
                            yield LogPage([], last, True)
                            return
                        if not woke:
                            # A missed notification (a replica's listener reconnecting)
                            # costs at most POLL_S: then the feed reads anyway.
                            feed.changed()
                        continue
                    start, page = latest
                    if start > last:
                        break  # this follower fell behind the feed: read the gap itself
                    chosen = [line for line in page.lines if line.seq > last and matches(line)]
                    last = page.next_seq
                    if chosen or page.complete:
                        yield LogPage(chosen, last, page.complete)
                    if page.complete:
                        return
        finally:
            if feed is not None:
                feed.followers.discard(follower)
                if not feed.followers:
                    feed.close()
                    if self._feeds.get(manager_id) is feed:
                        del self._feeds[manager_id]

    def close(self) -> None:
        for feed in self._feeds.values():
            feed.close()
        self._feeds.clear()
