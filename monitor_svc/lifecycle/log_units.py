"""The units that add writers' lines to a job's log: a stream batch's lines (each under the
step it names) and ``AppendJobLog``'s (under the job it names)."""

from __future__ import annotations

from collections.abc import Sequence

from monitor_svc.lifecycle.uow import UnitOfWork
from monitor_svc.log_lines import LogLine, entry_line, fenced_write_line
from monitor_svc.records import JobState, LogEntryIn
from stepflow_common.errors import InvalidArgument, NotFound, StepflowError
from stepflow_common.status import Kind


def stream_lines(tx: UnitOfWork, entries: Sequence[LogEntryIn]) -> list[tuple[str, str]]:
    """Lines that came with a batch of child events; the (key, reason) of each refused. The
    output of a run is a fact even when its orchestrator has been fenced since: it is kept."""
    refused: list[tuple[str, str]] = []
    for entry in entries:
        step = tx.job(entry.step_id)
        if step is None or step.kind is not Kind.STEP:
            refused.append((entry.key, f"log line for unknown step {entry.step_id!r}"))
            continue
        try:
            tx.log(_line(step.manager_id, step.id, entry.child_id, entry))
        except StepflowError as exc:
            refused.append((entry.key, str(exc)))
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
    if entry.attempt < 0:
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
