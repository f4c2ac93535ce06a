"""WatchJob fan-out: one read per committed change of a job, however many watch it.

The writer thread reports the ids each commit changed. Those being watched it reads at once,
on its own connection right after the commit (no hop to the read pool and back), and the hub
hands each state to the job's feed on the event loop. A feed gives a state to each watcher's
one-slot mailbox, so a slow watcher skips intermediate states (latest wins) instead of queueing
them. A feed reads through the read pool itself only for a watcher that just joined, for a
change another replica committed, and when the writer's read failed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable

import structlog

from monitor_svc import metrics
from monitor_svc.records import JobView

log = structlog.get_logger(__name__)

ReadView = Callable[[str], Awaitable[JobView | None]]
# Reads several jobs in one snapshot, on the calling (writer) thread.
ReadViewsNow = Callable[[list[str]], dict[str, JobView | None]]


class _Watcher:
    __slots__ = ("latest", "wake")

    def __init__(self) -> None:
        self.latest: JobView | None = None
        self.wake = asyncio.Event()

    def offer(self, view: JobView) -> None:
        if self.latest is None or view.job.change_seq > self.latest.job.change_seq:
            self.latest = view
            self.wake.set()


class _Feed:
    """Reads one job after each change notification and fans the state out."""

    def __init__(self, job_id: str, read: ReadView) -> None:
        self.job_id = job_id
        self.watchers: set[_Watcher] = set()
        self._read = read
        self._dirty = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name=f"watch-feed-{job_id}")
        self.reads = 0

    def changed(self) -> None:
        self._dirty.set()

    async def _run(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()  # changes arriving during the read trigger one more read
            try:
                view = await self._read(self.job_id)
            except Exception as exc:
                log.warning("watch read failed; retrying", job_id=self.job_id, error=str(exc))
                await asyncio.sleep(0.2)
                self._dirty.set()
                continue
            self.publish(view)

    def publish(self, view: JobView | None) -> None:
        """Hand a state read once to every watcher."""
        self.reads += 1
        metrics.observe_watch_read()
        if view is not None:
            for watcher in list(self.watchers):
                watcher.offer(view)

    def close(self) -> None:
        self._task.cancel()


class WatchHub:
    def __init__(self, read: ReadView) -> None:
        self._read = read
        self._feeds: dict[str, _Feed] = {}
        # The watched ids, replaced (never mutated) on the loop: the writer thread reads it.
        self._watched: frozenset[str] = frozenset()
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def notify_threadsafe(self, changed: set[str]) -> None:
        """A commit changed ``changed``: the feeds read them through the read pool."""
        loop = self._loop
        if loop is None or not self._feeds:
            return
        with contextlib.suppress(RuntimeError):  # loop closed during shutdown
            loop.call_soon_threadsafe(self.notify, changed)

    def committed(self, changed: set[str], read_now: ReadViewsNow) -> None:
        """Called by the writer thread after each commit: reads the watched jobs among
        ``changed`` with ``read_now`` (the writer's connection, now) and hands the states to
        their feeds. A failed read falls back to the feeds' own reads."""
        loop = self._loop
        watched = self._watched
        if loop is None or not watched:
            return
        if len(changed) < len(watched):
            ids = [job_id for job_id in changed if job_id in watched]
        else:
            ids = [job_id for job_id in watched if job_id in changed]
        if not ids:
            return
        views: dict[str, JobView | None] = {}
        try:
            views = read_now(ids)
        except Exception as exc:
            log.warning("watch read after commit failed", error=str(exc))
        with contextlib.suppress(RuntimeError):  # loop closed during shutdown
            loop.call_soon_threadsafe(self._deliver, ids, views)

    def _deliver(self, ids: list[str], views: dict[str, JobView | None]) -> None:
        feeds = self._feeds
        for job_id in ids:
            feed = feeds.get(job_id)
            if feed is None:
                continue
            if job_id in views:
                feed.publish(views[job_id])
            else:
                feed.changed()

    def notify_any_threadsafe(self, changed: set[str] | None) -> None:
        """From another replica: ``None`` means refresh every watched job."""
        loop = self._loop
        if loop is None or not self._feeds:
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._notify_any, changed)

    def _notify_any(self, changed: set[str] | None) -> None:
        self.notify(set(self._feeds) if changed is None else changed)

    def notify(self, changed: set[str]) -> None:
        feeds = self._feeds
        if len(changed) < len(feeds):
            for job_id in changed:
                feed = feeds.get(job_id)
                if feed is not None:
                    feed.changed()
        else:
            for job_id, feed in feeds.items():
                if job_id in changed:
                    feed.changed()

    def watching(self, job_id: str) -> bool:
        return job_id in self._feeds

    def watchers(self, job_id: str) -> int:
        """How many WatchJob calls are on ``job_id`` now."""
        feed = self._feeds.get(job_id)
        return len(feed.watchers) if feed is not None else 0

    def feed_reads(self, job_id: str) -> int:
        feed = self._feeds.get(job_id)
        return feed.reads if feed is not None else 0

    async def watch(self, job_id: str, after_change_seq: int) -> AsyncGenerator[JobView]:
        """States of ``job_id`` newer than ``after_change_seq``, until it is terminal."""
        feed = self._feeds.get(job_id)
        if feed is None:
            feed = self._feeds[job_id] = _Feed(job_id, self._read)
            self._watched = frozenset(self._feeds)
        watcher = _Watcher()
        feed.watchers.add(watcher)
        try:
            feed.changed()  # the current state, read once for everyone who just joined
            last = after_change_seq
            while True:
                await watcher.wake.wait()
                watcher.wake.clear()
                view = watcher.latest
                if view is None:
                    continue
                if view.job.change_seq > last:
                    last = view.job.change_seq
                    yield view
                if view.job.status.terminal:
                    return  # also when the caller already has the terminal state
        finally:
            feed.watchers.discard(watcher)
            if not feed.watchers:
                feed.close()
                self._feeds.pop(job_id, None)
                self._watched = frozenset(self._feeds)

    def close(self) -> None:
        for feed in self._feeds.values():
            feed.close()
        self._feeds.clear()
        self._watched = frozenset()
