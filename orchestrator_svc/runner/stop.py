"""Why a job stops before all its steps have run, and what it ends as: one answer, kept in
one place (pure; no I/O, no asyncio).

A job stops for one of four reasons, in this order of precedence: it was cancelled, its
deadline passed, the error tolerance was exceeded (action ``fail``), or a step failed under
``on_error = "fail"``/``"fatal"``. A later reason of lower precedence never replaces an earlier
one of higher precedence, so the end is the same whichever event is seen first.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from stepflow_common.status import EndReason, Status


class StopReason(enum.IntEnum):
    """Ordered by precedence: a higher value replaces a lower one, never the reverse."""

    STEP_FAILED = 1
    TOLERANCE = 2
    TIMED_OUT = 3
    CANCELLED = 4


@dataclass(slots=True)
class Stop:
    """The job's stop: its reason (None while it runs on), the manager's error, and whether
    running steps stop too (``halted``) or only no new step starts."""

    reason: StopReason | None = None
    error: str = ""
    halted: bool = False

    @property
    def starts_no_step(self) -> bool:
        return self.reason is not None or self.halted

    @property
    def cancelled(self) -> bool:
        return self.reason is StopReason.CANCELLED

    def step_failed(self, error: str, *, fatal: bool) -> None:
        """A step failed and its ``on_error`` stops the job (``fatal``: its running steps too).
        The first such failure names the manager's error."""
        if self.reason is None:
            self.reason, self.error = StopReason.STEP_FAILED, error
        self.halted = self.halted or fatal

    def tolerance_exceeded(self, message: str) -> None:
        self._raise_to(StopReason.TOLERANCE, message)
        self.halted = True

    def timed_out(self, error: str) -> None:
        self._raise_to(StopReason.TIMED_OUT, error or "job timed out")
        self.halted = True

    def cancel(self, reason: str = "") -> None:
        """Cancelled: by CancelJob here (its ``reason``), or seen in the monitor (no reason:
        an earlier one stands)."""
        if reason or not self.cancelled:
            self._raise_to(StopReason.CANCELLED, reason or "cancelled")
        self.halted = True

    def halt(self) -> None:
        """Stop every step now without a reason of the job's own (its manager ended
        elsewhere)."""
        self.halted = True

    def outcome(self) -> tuple[Status, str, str]:
        """The manager's status, error and end reason once every step is terminal."""
        if self.reason is None:
            return Status.COMPLETED, "", EndReason.ORCHESTRATOR
        if self.reason is StopReason.CANCELLED:
            return Status.CANCELLED, self.error, EndReason.CANCELLED
        return Status.FAILED, self.error, EndReason.ORCHESTRATOR

    def _raise_to(self, reason: StopReason, error: str) -> None:
        if self.reason is None or reason >= self.reason:
            self.reason, self.error = reason, error


@dataclass(slots=True)
class ChildFailures:
    """The job's failed children, counted against its error tolerance."""

    count: int = 0
    exceeded: bool = False

    def add(self, n: int, limit: int | None) -> bool:
        """Count ``n`` more; True the one time the count first goes over ``limit``."""
        self.count += n
        if limit is None or self.exceeded or self.count <= limit:
            return False
        self.exceeded = True
        return True
