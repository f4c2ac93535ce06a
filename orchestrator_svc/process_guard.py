"""Every process a job starts dies with its orchestrator, kill -9 included, grandchildren too.

One reaper process per orchestrator process (``reaper.py``) is told each process group a
worker starts and ends, and each renewal of the lease; it kills the groups when the
orchestrator dies or its lease lapses unrenewed (the orchestrator frozen). Workers do not see
any of this: ``run_shell`` registers its command's group with the guard of the job it runs
for, found in a context variable the runner sets (tasks inherit it).
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

_REAPER_SCRIPT = Path(__file__).with_name("reaper.py")


class _Reaper:
    """The process-wide reaper, started on first use and started again if it dies."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._groups: dict[str, set[int]] = {}
        self._deadlines: dict[str, float] = {}

    def send(self, line: str) -> None:
        with self._lock:
            self._record(line)
            proc = self._ensure()
            try:
                assert proc.stdin is not None
                os.write(proc.stdin.fileno(), line.encode("ascii") + b"\n")
            except OSError:
                # It died (killed by someone): start another and tell it everything again.
                log.warning("process reaper died; starting another")
                self._proc = None
                self._replay(self._ensure())

    def _record(self, line: str) -> None:
        verb, tag, *rest = line.split()
        if verb == "+":
            self._groups.setdefault(tag, set()).add(int(rest[0]))
        elif verb == "-":
            self._groups.get(tag, set()).discard(int(rest[0]))
        elif verb == "L":
            self._deadlines[tag] = float(rest[0])
        elif verb == "U":
            self._deadlines.pop(tag, None)

    def _replay(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None
        lines = [f"+ {tag} {pgid}" for tag, groups in self._groups.items() for pgid in groups]
        lines += [f"L {tag} {deadline!r}" for tag, deadline in self._deadlines.items()]
        for line in lines:
            os.write(proc.stdin.fileno(), line.encode("ascii") + b"\n")

    def _ensure(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            # Its own session: a signal to the orchestrator's process group does not reach
            # it. The pipe's write end stays here only (not inherited by the job's commands),
            # so end of file means this process is gone.
            self._proc = subprocess.Popen(
                [sys.executable, "-I", str(_REAPER_SCRIPT)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
                cwd="/",  # pins no directory of the orchestrator's (a temporary one, say)
            )
        return self._proc

    def pid(self) -> int:
        with self._lock:
            return self._ensure().pid


_REAPER = _Reaper()
_TAGS = itertools.count(1)


class ProcessGuard:
    """The process groups of one orchestrator's jobs, and its lease deadline, told to the
    reaper."""

    def __init__(self) -> None:
        self.tag = f"g{os.getpid()}-{next(_TAGS)}"

    def start(self) -> None:
        """Start the reaper now (not at the first command), so a slow start is not a child's."""
        _REAPER.pid()

    def started(self, pgid: int) -> None:
        _REAPER.send(f"+ {self.tag} {pgid}")

    def ended(self, pgid: int) -> None:
        _REAPER.send(f"- {self.tag} {pgid}")

    def lease_until(self, monotonic_deadline: float) -> None:
        """The lease was renewed until this ``time.monotonic()`` value: if it passes without
        another renewal, the reaper kills this orchestrator's processes."""
        _REAPER.send(f"L {self.tag} {monotonic_deadline!r}")

    def no_deadline(self) -> None:
        _REAPER.send(f"U {self.tag}")

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Make this the guard of the processes started in this context (and its tasks)."""
        token = _CURRENT.set(self)
        try:
            yield
        finally:
            _CURRENT.reset(token)


_CURRENT: contextvars.ContextVar[ProcessGuard | None] = contextvars.ContextVar(
    "stepflow_process_guard", default=None
)


def current() -> ProcessGuard | None:
    """The guard of the job this code runs for (None outside an orchestrator)."""
    return _CURRENT.get()


def reaper_pid() -> int:
    """The reaper's pid (tests look for it)."""
    return _REAPER.pid()
