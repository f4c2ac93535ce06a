"""The units that add writers' lines to a job's log: a stream batch's lines (each under the
step it names) and ``AppendJobLog``'s (under the job it names)."""

from __future__ import annotations

from collections.abc import Sequence

from monitor_svc.lifecycle.uow import UnitOfWork
from monitor_svc.log_lines import (
    LEVELS,
    MAX_LINE_BYTES,
    OUTPUT_SOURCES,
    LogLine,
    entry_line,
    fenced_write_line,
)
from monitor_svc.records import JobState, LogEntryIn
from stepflow_common.errors import InvalidArgument, NotFound, StepflowError
from stepflow_common.limits import cut_log_line as cut
from stepflow_common.status import Kind

OUTPUT_SOURCE_SET = frozenset(OUTPUT_SOURCES)
LEVEL_SET = frozenset(LEVELS)


def stream_lines(tx: UnitOfWork, entries: Sequence[LogEntryIn]) -> list[tuple[str, str]]:
    """Lines that came with a batch of child events; the (key, reason) of each refused. The
    output of a run is a fact even when its orchestrator has been fenced since: it is kept.
    (Hot path: a batch's lines name a few steps, each looked up once.)"""
    refused: list[tuple[str, str]] = []
    steps: dict[str, JobState | None] = {}
    add = tx.log
    sources, levels = OUTPUT_SOURCE_SET, LEVEL_SET
    for entry in entries:
        step_id = entry.step_id
        if step_id in steps:
            step = steps[step_id]
        else:
            found = tx.job(step_id)
            step = steps[step_id] = found if found is not None and found.kind is Kind.STEP else None
        if step is None:
            refused.append((entry.key, f"log line for unknown step {step_id!r}"))
            continue
        source, level, message = entry.source or "log", entry.level or "info", entry.message
        if source not in sources or level not in levels or entry.attempt < 0:
            try:
                _line(step.manager_id, step_id, entry.child_id, entry)
            except StepflowError as exc:
                refused.append((entry.key, str(exc)))
            continue
        truncated = False
        if len(message) * 4 > MAX_LINE_BYTES or "\x00" in message:
            message, truncated = cut(message.replace("\x00", "\ufffd"))
        add(
            LogLine(
                step.manager_id,
                step_id,
                entry.child_id,
                entry.attempt,
                source,
                level,
                message,
                entry.time,
                entry.key or None,
                truncated,
            )
        )
    return refused


def append_lines(tx: UnitOfWork, job_id: str, entries: Sequence[LogEntryIn]) -> tuple[str, int]:
    """``AppendJobLog``: lines for the manager, step or child ``job_id`` (all or none). The
    job's manager, and how many lines are new (a key stored before is not stored again)."""
    job = tx.job(job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found")
    step_id, child_id = _place(job)
    lines = [_line(job.manager_id, step_id, child_id, entry) for entry in entries]
    stored = tx.stored_log_keys(job.manager_id, [e.key for e in entries if e.key])
    appended = 0
    for line in lines:
        if line.key is None or line.key not in stored:
            tx.log(line)
            appended += 1
            if line.key is not None:
                stored.add(line.key)
    return job.manager_id, appended


def log_fenced_write(tx: UnitOfWork, job_id: str, what: str, reason: str) -> None:
    """A write refused by a fence, told in the job's log (its own unit: the write's is gone)."""
    job = tx.job(job_id)
    if job is not None:
        tx.log(fenced_write_line(job, what, reason))


def _place(job: JobState) -> tuple[str, str]:
    if job.kind is Kind.MANAGER:
        return "", ""
    if job.kind is Kind.STEP:
        return job.id, ""
    return job.parent_id or "", job.id


def _line(manager_id: str, step_id: str, child_id: str, entry: LogEntryIn) -> LogLine:
    if entry.attempt < 0:  # (uint32 on the wire: only a record built by hand)
        raise InvalidArgument("log line attempt must be >= 0")
    return entry_line(
        manager_id=manager_id,
        step_id=step_id,
        child_id=child_id,
        attempt=entry.attempt,
        source=entry.source,
        level=entry.level,
        message=entry.message,
        time=entry.time,
        key=entry.key,
    )
