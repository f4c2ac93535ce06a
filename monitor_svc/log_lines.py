"""The job log's rules, pure: what a line is, how long it may be, and which changes of a job
the monitor writes down as ``event`` lines (in the same transaction as the change, so the log
and ``step_stats`` never disagree).

The store gives lines their ``seq`` and enforces the job's byte budget when it writes them;
everything about their content is decided here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from monitor_svc.records import JobState
from stepflow_common.errors import InvalidArgument
from stepflow_common.limits import MAX_LOG_LINE_BYTES
from stepflow_common.limits import cut_log_line as cut
from stepflow_common.status import Kind, Status

MAX_LINE_BYTES = MAX_LOG_LINE_BYTES
DEFAULT_READ_LIMIT = 500
MAX_READ_LIMIT = 1_000
MAX_PAGE_BYTES = 3 * 1024 * 1024  # a ReadJobLog answer stays well under gRPC's 4 MiB
MAX_KEY_CHARS = 128

EVENT = "event"
OUTPUT_SOURCES = ("stdout", "stderr", "log")
SOURCES = (EVENT, *OUTPUT_SOURCES)
LEVELS = ("debug", "info", "warning", "error")


class Keep(enum.IntEnum):
    """What the byte budget may do with a line."""

    ALWAYS = 0  # an event about a step or the manager
    BUDGET = 1  # output, a child's event: dropped past the budget (but a step's first and last)


@dataclass(slots=True)
class LogLine:
    """A line on its way into a job's log (``seq`` is given when it is written)."""

    manager_id: str
    step_id: str
    child_id: str
    attempt: int
    source: str
    level: str
    message: str
    time: datetime | None = None  # None: the transaction's time
    key: str | None = None  # stored once per (manager, key)
    truncated: bool = False
    keep: Keep = Keep.BUDGET
    ends_step: bool = False  # the step's held last line and drop count are written first


@dataclass(slots=True)
class StoredLine:
    seq: int
    time: datetime
    step_id: str
    child_id: str
    attempt: int
    source: str
    level: str
    message: str
    truncated: bool


@dataclass(frozen=True, slots=True)
class LogPage:
    lines: list[StoredLine]
    next_seq: int  # the lines up to here have been read (some may be filtered out)
    complete: bool  # the job is terminal and no line after next_seq exists
    more: bool = False  # lines after next_seq exist already (the page was full)
    last_seq: int = 0  # the log's last line at this read, whatever the filter


@dataclass(frozen=True, slots=True)
class LogFilter:
    step_id: str = ""
    child_id: str = ""
    sources: tuple[str, ...] = ()

    def matches(self, line: StoredLine) -> bool:
        return (
            (not self.step_id or line.step_id == self.step_id)
            and (not self.child_id or line.child_id == self.child_id)
            and (not self.sources or line.source in self.sources)
        )


def entry_line(
    *,
    manager_id: str,
    step_id: str,
    child_id: str,
    attempt: int,
    source: str,
    level: str,
    message: str,
    time: datetime | None,
    key: str,
) -> LogLine:
    """A writer's line, checked: an unknown source or level, or an over-long key, is refused
    (the caller's mistake, said in words); an over-long message is cut, not refused."""
    source = source or "log"
    level = level or "info"
    if source not in OUTPUT_SOURCES:
        raise InvalidArgument(
            f"log line source {source[:20]!r} is not one of {', '.join(OUTPUT_SOURCES)}"
            + (" (event lines are the monitor's own)" if source == EVENT else "")
        )
    if level not in LEVELS:
        raise InvalidArgument(f"log line level {level[:20]!r} is not one of {', '.join(LEVELS)}")
    if len(key) > MAX_KEY_CHARS:
        raise InvalidArgument(f"log line key is over {MAX_KEY_CHARS} characters")
    text, truncated = cut(message.replace("\x00", "\ufffd"))
    return LogLine(
        manager_id,
        step_id,
        child_id,
        attempt,
        source,
        level,
        text,
        time,
        key or None,
        truncated,
    )


# -- event lines ------------------------------------------------------------------------------
def _level(status: Status) -> str:
    if status is Status.FAILED:
        return "error"
    if status is Status.CANCELLED:
        return "warning"
    return "info"


def _label(job: JobState) -> str:
    return f"job {job.name}" if job.kind is Kind.MANAGER else f"step {job.name}"


def _event(job: JobState, level: str, message: str, *, ends: bool = False) -> LogLine:
    step_id = job.id if job.kind is Kind.STEP else ""
    return LogLine(
        job.manager_id,
        step_id,
        "",
        job.attempt if job.kind is Kind.STEP else 0,
        EVENT,
        level,
        cut(message)[0],
        keep=Keep.ALWAYS,
        ends_step=ends,
    )


def _child_event(child: JobState, level: str, message: str) -> LogLine:
    """An ``event`` line about one child (under its step, with its attempt)."""
    return LogLine(
        child.manager_id,
        child.parent_id or "",
        child.id,
        child.attempt,
        EVENT,
        level,
        cut(message)[0],
    )


def describe_change(old: JobState | None, new: JobState) -> list[LogLine]:
    """The event lines a job's new state calls for (none for most child changes)."""
    if new.kind is Kind.CHILD:
        if new.status is Status.FAILED and (old is None or old.status is not Status.FAILED):
            message = f"child {new.name or new.id} failed"
            if new.error:
                message += f": {new.error}"
            return [_child_event(new, "error", message)]
        if old is not None and new.interruptions > old.interruptions and new.runner:
            lost = "" if old.runner == new.runner else f" on runner {new.runner}"
            return [
                _child_event(
                    new,
                    "warning",
                    f"child {new.name or new.id} runs again as attempt {new.attempt}{lost}: "
                    f"runner {old.runner} was lost ({new.interruptions} so far)",
                )
            ]
        return []
    lines: list[LogLine] = []
    if old is None:
        if new.kind is Kind.MANAGER:
            lines.append(_event(new, "info", f"job {new.name} created"))
        if new.status is Status.PENDING:
            return lines
    if old is None or new.status is not old.status:
        message = f"{_label(new)} {new.status}"
        if new.status.terminal and new.end_reason:
            message += f" ({new.end_reason})"
        if new.status.terminal and new.error:
            message += f": {new.error}"
        lines.append(_event(new, _level(new.status), message, ends=new.status.terminal))
    elif new.kind is Kind.STEP and new.attempt > old.attempt and new.attempt > 1:
        lines.append(_event(new, "info", f"step {new.name} attempt {new.attempt} started"))
    if old is not None:
        if new.kind is Kind.STEP and new.interruptions > old.interruptions:
            lines.append(
                _event(
                    new,
                    "warning",
                    f"step {new.name} interrupted: its orchestrator was lost "
                    f"({new.interruptions} so far)",
                )
            )
        if new.kind is Kind.MANAGER and new.owner != old.owner:
            lines.append(_event(new, "warning", _owner_change(old.owner, new.owner)))
    return lines


def _owner_change(before: str, after: str) -> str:
    if not after:
        return f"orchestrator {before} lost: the job is orphaned until another adopts it"
    if not before:
        return f"job adopted by orchestrator {after}"
    return f"job taken over by orchestrator {after} from {before}"


def resumed_line(manager: JobState, owner: str, before: str, after: str) -> LogLine:
    """A new process under the same owner took the job over from the one before it."""
    return _event(
        manager,
        "warning",
        f"job taken over by instance {after or '?'} of orchestrator {owner} from instance "
        f"{before or '?'}",
    )


def seal_line(step: JobState, child_count: int, handed: bool) -> LogLine:
    ends = "the monitor ends the step" if handed else "its orchestrator ends the step"
    return _event(step, "info", f"step {step.name} sealed with {child_count:,} children; {ends}")


def refused_line(step: JobState, count: int, reason: str) -> LogLine:
    """One line for the events of one batch a fence refused (not one per event)."""
    what = "event" if count == 1 else "events"
    line = _event(step, "warning", f"{count:,} child {what} refused: {reason}")
    line.keep = Keep.BUDGET
    return line


def stale_runner_line(child: JobState, attempt: int, runner: str, reason: str) -> LogLine:
    """A runner's end of an attempt that is no longer the child's current one (refused)."""
    line = _child_event(child, "warning", f"child {child.name or child.id}: {reason}; refused")
    line.attempt = attempt
    line.keep = Keep.BUDGET
    return line


def fenced_write_line(job: JobState, what: str, reason: str) -> LogLine:
    line = _event(job, "warning", f"{what} of {_label(job)} refused: {reason}")
    line.keep = Keep.BUDGET
    if job.kind is Kind.CHILD:
        line.step_id, line.child_id = job.parent_id or "", job.id
    return line


def dropped_line(manager_id: str, step_id: str, dropped: int, limit: int) -> LogLine:
    lines = "line" if dropped == 1 else "lines"
    return LogLine(
        manager_id,
        step_id,
        "",
        0,
        EVENT,
        "warning",
        f"{dropped:,} output {lines} dropped: the job's log is over its limit of "
        f"{limit:,} bytes (each step's first and last lines are kept)",
        keep=Keep.ALWAYS,
    )
