"""One shell command run to completion, a timeout, or cancellation (shared by ``command``
and ``fanout``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import structlog

from orchestrator_svc import process_guard
from orchestrator_svc.workers.base import CancelSignal, ChildStatus
from stepflow_common.limits import MAX_LOG_LINE_BYTES

log = structlog.get_logger(__name__)

KILL_GRACE_S = 2.0
"""Time between SIGTERM and SIGKILL when a command is stopped."""
DRAIN_TIMEOUT_S = 1.0
"""How long to wait for more output after the shell exits while none comes: a background
process that inherited the pipe could otherwise hold the step open forever."""
DRAIN_MAX_S = 60.0
"""However busy the pipes are after the shell exits (the job's log slowing their reading),
the step ends after this long."""
OUTPUT_TAIL_BYTES = 4096
"""Output kept per stream (older output is dropped as it is read): for the job's error and the
"command output" log line."""
OUTPUT_LOG_LINES = 20
"""Lines of each stream the "command output" log line carries (within OUTPUT_TAIL_BYTES)."""
ERROR_OUTPUT_CHARS = 500
READ_CHUNK_BYTES = 64 * 1024

OnLine = Callable[[str, str], Awaitable[None]]
"""``on_line(source, text)``: one line the command printed (``stdout`` or ``stderr``), without
its newline; a line longer than the log's line limit comes in pieces of at most that size."""


@dataclass(frozen=True, slots=True)
class ShellOutcome:
    status: ChildStatus
    error: str = ""
    returncode: int | None = None
    stdout: str = ""  # the last lines of each stream (OUTPUT_LOG_LINES, OUTPUT_TAIL_BYTES)
    stderr: str = ""

    def log_output(self, **job: str) -> None:
        """One "command output" event with the job's ids (``job``), if there was output: where
        a person debugging a step looks first, as the job record keeps only the error."""
        if self.stdout or self.stderr:
            log.info(
                "command output",
                **job,
                status=self.status,
                exit_status=self.returncode,
                stdout=self.stdout,
                stderr=self.stderr,
            )


class _Tail:
    """Reads a stream to its end, keeping only the last OUTPUT_TAIL_BYTES, and hands each
    line to ``on_line`` as it is printed (awaited: a slow log slows the command's pipe, it
    never fills memory)."""

    def __init__(self, source: str, on_line: OnLine | None = None) -> None:
        self.data = b""
        self._source = source
        self._on_line = on_line
        self._partial = b""
        self.progressed = time.monotonic()  # the last time a chunk was read or a line sent

    async def read(self, stream: asyncio.StreamReader | None) -> None:
        if stream is None:
            return
        while chunk := await stream.read(READ_CHUNK_BYTES):
            self.progressed = time.monotonic()
            self.data = (self.data + chunk)[-OUTPUT_TAIL_BYTES:]
            if self._on_line is not None:
                await self._lines(chunk)
        if self._on_line is not None and self._partial:
            await self._emit(self._partial)  # the last line, printed without a newline
            self._partial = b""

    async def _lines(self, chunk: bytes) -> None:
        data = self._partial + chunk
        *complete, self._partial = data.split(b"\n")
        for line in complete:
            await self._emit(line)
            self.progressed = time.monotonic()
        while len(self._partial) > MAX_LOG_LINE_BYTES:  # a line without end: in pieces
            piece, self._partial = (
                self._partial[:MAX_LOG_LINE_BYTES],
                self._partial[MAX_LOG_LINE_BYTES:],
            )
            await self._emit(piece)

    async def _emit(self, line: bytes) -> None:
        assert self._on_line is not None
        await self._on_line(self._source, line.decode("utf-8", "replace").rstrip("\r"))

    def text(self) -> str:
        return self.data.decode("utf-8", "replace").strip()

    def last_lines(self) -> str:
        lines = self.text().splitlines()
        if len(self.data) >= OUTPUT_TAIL_BYTES and len(lines) > 1:
            lines = lines[1:]  # the first kept line was cut by the byte limit
        return "\n".join(lines[-OUTPUT_LOG_LINES:])


async def run_shell(
    command: str,
    *,
    cancelled: CancelSignal,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
    on_line: OnLine | None = None,
) -> ShellOutcome:
    """Run ``command`` with ``/bin/sh``: completed on exit status 0, failed otherwise or on
    timeout, cancelled when ``cancelled`` is set first. The command gets its own process
    group so that stopping it also stops whatever it started (POSIX only). Each line it
    prints goes to ``on_line`` as it is printed."""
    if cancelled.is_set():
        return ShellOutcome("cancelled", "cancelled before it started")
    full_env = {**os.environ, **env} if env else None
    try:
        proc = await asyncio.create_subprocess_shell(
            command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=cwd,
            env=full_env,
            start_new_session=True,
        )
    except OSError as exc:
        return ShellOutcome("failed", f"cannot start command: {exc}")
    guard = process_guard.current()
    if guard is not None:
        guard.started(proc.pid)

    out, err = _Tail("stdout", on_line), _Tail("stderr", on_line)
    readers = {
        asyncio.ensure_future(out.read(proc.stdout)),
        asyncio.ensure_future(err.read(proc.stderr)),
    }
    exited = asyncio.ensure_future(proc.wait())
    cancel_seen = asyncio.ensure_future(cancelled.wait())
    outcome: ShellOutcome | None = None
    try:
        await asyncio.wait(
            {exited, cancel_seen}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        if not exited.done():
            if cancel_seen.done():
                outcome = ShellOutcome("cancelled", "cancelled while running")
            else:
                outcome = ShellOutcome("failed", f"timed out after {timeout_s:g}s")
            await _stop(proc)
    finally:
        cancel_seen.cancel()
        if proc.returncode is None:  # we are being cancelled ourselves: no time to be polite
            _signal_group(proc, signal.SIGKILL)
            exited.cancel()
        try:
            await _drain(readers, (out, err))
        finally:
            for reader in readers:
                reader.cancel()
            # What the command left running in its group (a background process) ends with it:
            # nothing a step started outlives the step.
            _signal_group(proc, signal.SIGKILL)
            if guard is not None:
                guard.ended(proc.pid)
    tails = {"stdout": out.last_lines(), "stderr": err.last_lines()}
    if outcome is not None:
        return ShellOutcome(outcome.status, outcome.error, proc.returncode, **tails)
    code = proc.returncode
    assert code is not None
    if code == 0:
        return ShellOutcome("completed", "", 0, **tails)
    why = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
    detail = (err.text() or out.text())[-ERROR_OUTPUT_CHARS:]
    return ShellOutcome("failed", f"{why}: {detail}" if detail else why, code, **tails)


async def _drain(readers: AbstractSet[asyncio.Future[None]], tails: tuple[_Tail, _Tail]) -> None:
    """Let the readers finish what the command left in its pipes: while they make progress
    (up to DRAIN_MAX_S), or until nothing has come for DRAIN_TIMEOUT_S."""
    started = time.monotonic()
    while True:
        _, pending = await asyncio.wait(readers, timeout=DRAIN_TIMEOUT_S)
        if not pending:
            return
        now = time.monotonic()
        idle = now - max(tail.progressed for tail in tails)
        if idle >= DRAIN_TIMEOUT_S or now - started >= DRAIN_MAX_S:
            return


async def _stop(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM the command's process group, then SIGKILL it after KILL_GRACE_S."""
    _signal_group(proc, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), KILL_GRACE_S)
    except TimeoutError:
        _signal_group(proc, signal.SIGKILL)
        await proc.wait()


def _signal_group(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    """The command leads its own session (start_new_session), so its pid is the group id."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
