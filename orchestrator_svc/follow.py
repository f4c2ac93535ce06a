"""The live per-step view of ``orchestrator-svc submit --follow``, fed by WatchJob."""

from __future__ import annotations

from collections.abc import AsyncIterator

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table

from stepflow_proto.v1 import job_pb2

STATUS_NAMES = {
    job_pb2.JOB_STATUS_UNSPECIFIED: "-",
    job_pb2.JOB_STATUS_PENDING: "pending",
    job_pb2.JOB_STATUS_RUNNING: "running",
    job_pb2.JOB_STATUS_SPAWNED: "spawned",
    job_pb2.JOB_STATUS_COMPLETED: "completed",
    job_pb2.JOB_STATUS_FAILED: "failed",
    job_pb2.JOB_STATUS_CANCELLED: "cancelled",
    job_pb2.JOB_STATUS_SKIPPED: "skipped",
}
STYLE = {
    "completed": "green",
    "failed": "red",
    "cancelled": "yellow",
    "skipped": "dim",
    "running": "cyan",
    "spawned": "magenta",
}


def status_name(value: int) -> str:
    return STATUS_NAMES.get(value, str(value))


def final_table(job: job_pb2.Job) -> Table:
    table = Table(title=f"{job.name} ({job.id}): {status_name(job.status)}")
    for column in ("#", "step", "type", "status", "children", "completed", "failed", "cancelled", "error"):
        table.add_column(column)
    for stat in job.step_stats:
        name = status_name(stat.status)
        c = stat.children
        table.add_row(
            str(stat.step_index + 1),
            stat.step_name,
            stat.step_type,
            f"[{STYLE.get(name, '')}]{name}[/]" if name in STYLE else name,
            str(stat.child_count or (c.pending + c.running + c.completed + c.failed + c.cancelled)),
            str(c.completed),
            str(c.failed),
            str(c.cancelled),
            stat.error[:60],
        )
    return table


async def follow(states: AsyncIterator[job_pb2.Job], console: Console | None = None) -> job_pb2.Job:
    """Show a bar per step with its child counts until the job ends; return the last state."""
    console = console or Console()
    progress = Progress(
        TextColumn("{task.fields[label]:<24}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[counts]}"),
        console=console,
    )
    tasks: dict[str, TaskID] = {}
    header = Table.grid()
    last: job_pb2.Job | None = None
    with Live(Group(header, progress), console=console, refresh_per_second=8, transient=False) as live:
        async for job in states:
            last = job
            for stat in job.step_stats:
                c = stat.children
                seen = c.pending + c.running + c.completed + c.failed + c.cancelled
                total = max(stat.child_count, seen, 1)
                done = c.completed + c.failed + c.cancelled
                status = status_name(stat.status)
                if status in ("completed", "failed", "cancelled", "skipped") and seen == 0:
                    done = total = 1
                label = f"{stat.step_name} [{status}]"
                counts = f"run {c.running} ok {c.completed} fail {c.failed} cancel {c.cancelled}"
                if stat.step_id not in tasks:
                    tasks[stat.step_id] = progress.add_task("", total=total, label=label, counts=counts)
                progress.update(tasks[stat.step_id], total=total, completed=done, label=label, counts=counts)
            live.update(Group(_header(job), progress))
    assert last is not None, "the watch ended before sending any state"
    console.print(final_table(last))
    return last


def _header(job: job_pb2.Job) -> Table:
    grid = Table.grid(padding=(0, 1))
    grid.add_row(f"[bold]{job.name}[/]", job.id, f"status: {status_name(job.status)}")
    return grid
