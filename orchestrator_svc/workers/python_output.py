"""A ``python`` step's output, into its job's log: what the callable prints (``stdout`` and
``stderr`` lines) and the ``logging`` records it makes (``log`` lines, with their level).

Several steps run in one process at once, so the process's streams and root logger cannot be
swapped per step. They are wrapped once: a write or record goes to the step whose call is
running in the current context (a context variable, which ``asyncio.to_thread`` carries into
the thread of a blocking callable), and everywhere else to where it went before.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import io
import logging
import sys
import threading
from collections.abc import AsyncIterator
from typing import Any, TextIO

from orchestrator_svc.workers.base import StepContext

MAX_PENDING_LINES = 10_000
"""Lines printed faster than the event stream takes them are held up to this many; past it
they are counted and the count is written once the stream catches up."""

_CAPTURE: contextvars.ContextVar[_Capture | None] = contextvars.ContextVar(
    "stepflow_python_capture", default=None
)
_installed = threading.Lock()
_LEVELS = ((logging.ERROR, "error"), (logging.WARNING, "warning"), (logging.INFO, "info"))


def _level_name(levelno: int) -> str:
    return next((name for floor, name in _LEVELS if levelno >= floor), "debug")


class _Capture:
    """One step's lines on their way to its log: taken from any thread, written in order on
    the step's event loop."""

    def __init__(self, ctx: StepContext, loop: asyncio.AbstractEventLoop) -> None:
        self._ctx = ctx
        self._loop = loop
        self._pending: collections.deque[tuple[str, str, str]] = collections.deque()
        self._wake = asyncio.Event()
        self._dropped = 0
        self._partial = {"stdout": "", "stderr": ""}
        self._thread = threading.get_ident()  # built on the loop's thread
        self._closing = False

    def write(self, source: str, text: str) -> None:
        data = self._partial[source] + text
        *lines, self._partial[source] = data.split("\n")
        for line in lines:
            self.put(source, "info" if source == "stdout" else "warning", line)

    def put(self, source: str, level: str, message: str) -> None:
        if threading.get_ident() == self._thread:
            self._put(source, level, message)
        else:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody to tell
                self._loop.call_soon_threadsafe(self._put, source, level, message)

    def _put(self, source: str, level: str, message: str) -> None:
        if len(self._pending) >= MAX_PENDING_LINES:
            self._dropped += 1
            return
        self._pending.append((source, level, message))
        self._wake.set()

    async def pump(self) -> None:
        """Writes the lines as they come, until ``finish`` and none is left."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._drain()
            if self._closing:
                return

    async def _drain(self) -> None:
        while self._pending:
            source, level, message = self._pending.popleft()
            await self._ctx.log(message, source=source, level=level)
        if self._dropped:
            dropped, self._dropped = self._dropped, 0
            await self._ctx.log(
                f"{dropped:,} lines dropped: printed faster than they could be sent",
                level="warning",
            )

    def finish(self) -> None:
        """No more lines will come: the unfinished last lines are written, then the pump ends."""
        for source, rest in self._partial.items():
            if rest:
                self._put(source, "info" if source == "stdout" else "warning", rest)
        self._partial = {"stdout": "", "stderr": ""}
        self._closing = True
        self._wake.set()


class _Stream(io.TextIOBase):
    """``sys.stdout`` or ``sys.stderr``: a capturing step's writes go to its log."""

    def __init__(self, real: TextIO, source: str) -> None:
        self._real = real
        self._source = source

    def write(self, text: str) -> int:
        capture = _CAPTURE.get()
        if capture is None:
            return self._real.write(text)
        capture.write(self._source, text)
        return len(text)

    def flush(self) -> None:
        self._real.flush()

    def isatty(self) -> bool:
        return self._real.isatty()

    def fileno(self) -> int:
        return self._real.fileno()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class _Records(logging.Handler):
    """On the root logger: a capturing step's records (info and up) go to its log."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)

    def emit(self, record: logging.LogRecord) -> None:
        capture = _CAPTURE.get()
        if capture is None:
            return
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
        except Exception:  # a record that cannot be formatted is not the step's failure
            message = str(record.msg)
        capture.put("log", _level_name(record.levelno), f"{record.name}: {message}")


def _install() -> None:
    """Wrap the streams and add the records handler, once per process. The root logger
    lets info records through from then on (so a step's ``logger.info`` is heard); its other
    handlers keep the threshold they had, so the orchestrator's own log does not change."""
    with _installed:
        if not isinstance(sys.stdout, _Stream):
            sys.stdout = _Stream(sys.stdout, "stdout")
        if not isinstance(sys.stderr, _Stream):
            sys.stderr = _Stream(sys.stderr, "stderr")
        root = logging.getLogger()
        if not any(isinstance(h, _Records) for h in root.handlers):
            before = root.level
            if before > logging.INFO or before == logging.NOTSET:
                floor = before if before != logging.NOTSET else logging.WARNING
                for handler in root.handlers:
                    if handler.level < floor:
                        handler.setLevel(floor)
                root.setLevel(logging.INFO)
            root.addHandler(_Records())


@contextlib.asynccontextmanager
async def captured(ctx: StepContext) -> AsyncIterator[None]:
    """Within: what the current context prints and logs goes to the step's log. On the way
    out every line is written (the step ends after its output)."""
    _install()
    capture = _Capture(ctx, asyncio.get_running_loop())
    token = _CAPTURE.set(capture)
    pump = asyncio.create_task(capture.pump())
    try:
        yield
    finally:
        _CAPTURE.reset(token)
        capture.finish()
        try:
            await pump
        except asyncio.CancelledError:
            pump.cancel()
            raise
