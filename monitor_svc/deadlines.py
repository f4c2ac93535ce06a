"""The step monitor's clock: one timer for every stored deadline (no polling loop per step).

Deadlines live in the database as absolute times, so a restarted monitor fires overdue ones at
start. The timer sleeps until the earliest one; commits that set an earlier deadline wake it.
A long idle sleep is capped so deadlines written by another monitor process are seen too.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime

import structlog

from monitor_svc import metrics
from monitor_svc.records import utcnow
from monitor_svc.store.store import MonitorStore

log = structlog.get_logger(__name__)

MAX_IDLE_SLEEP_S = 5.0
RETRY_AFTER_ERROR_S = 1.0


class DeadlineTimer:
    def __init__(self, store: MonitorStore) -> None:
        self._store = store
        self._wake = asyncio.Event()
        self._target: datetime | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name="deadline-timer")

    def offer_threadsafe(self, when: datetime) -> None:
        """A commit stored a deadline; wake the timer if it is earlier than its target."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._offer, when)

    def _offer(self, when: datetime) -> None:
        if self._target is None or when < self._target:
            self._wake.set()

    async def _run(self) -> None:
        while True:
            self._wake.clear()  # before reading, so a wake-up during the read is not lost
            self._target = None  # any deadline committed meanwhile wakes the next sleep
            try:
                fired = await self._store.fire_due()
                if fired:
                    metrics.DEADLINES_FIRED.inc(fired)
                    log.info("deadlines fired", count=fired)
                self._target = await self._store.next_wakeup()
            except Exception as exc:
                log.warning("deadline check failed; retrying", error=str(exc))
                await asyncio.sleep(RETRY_AFTER_ERROR_S)
                continue
            delay = MAX_IDLE_SLEEP_S
            if self._target is not None:
                delay = min(delay, max(0.0, (self._target - utcnow()).total_seconds()))
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that arrives
            # as the event fires, and stop() would then wait for ever.
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
