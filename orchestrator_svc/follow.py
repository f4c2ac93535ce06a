"""The live per-step view of ``orchestrator-svc submit --follow``, fed by WatchJob."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, Progress, Task, TaskID, TextColumn
from rich.progress_bar import ProgressBar
from rich.table import Column, Table
from rich.text import Text

from orchestrator_svc.records import Job, StepStat
from stepflow_common.status import Status

STYLE = {
    "completed": "green",
    "failed": "red",
    "cancelled": "yellow",
    "skipped": "dim",
    "running": "cyan",
    "spawned": "magenta",
}


def status_name(status: Status | None) -> str:
    return "-" if status is None else status.value


STATUS_WIDTH = max(len(status.value) for status in Status)
STEP_NAME_MAX_WIDTH = 16
ERROR_MAX_CHARS = 200  # the table wraps it; the full text is in GetJob


def final_table(job: Job) -> Table:
    """The job's step_stats, readable in an 80-column terminal: short headers, status names
    never cut, long step names cut with an ellipsis, the error wrapped in the space left."""
    title = Text.assemble((job.name, "bold"), f" {job.id} ", _styled(status_name(job.status)))
    table = Table(
        title=title,
        box=box.SIMPLE_HEAD,
        show_edge=False,
        padding=(0, 1, 0, 0),
        title_justify="left",
    )
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("step", no_wrap=True, overflow="ellipsis", max_width=STEP_NAME_MAX_WIDTH)
    table.add_column("type", no_wrap=True, overflow="ellipsis", max_width=10)
    table.add_column("status", no_wrap=True, min_width=STATUS_WIDTH)
    for header in ("children", "ok", "fail", "cancel"):
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("error", min_width=12, overflow="fold")
    for stat in job.step_stats:
        c = stat.children
        seen = c.pending + c.running + c.completed + c.failed + c.cancelled
        # A step without children shows no counts rather than a row of zeros.
        counts = (
            [str(stat.child_count or seen), str(c.completed), str(c.failed), str(c.cancelled)]
            if stat.child_count or seen
            else ["", "", "", ""]
        )
        table.add_row(
            str(stat.step_index + 1),
            Text(stat.step_name),
            Text(stat.step_type),
            _styled(status_name(stat.status)),
            *counts,
            Text(_shorten(stat.error), style="red"),
        )
    return table


def _styled(status: str) -> Text:
    return Text(status, style=STYLE.get(status, ""))


def _shorten(error: str) -> str:
    error = " ".join(error.split())  # one paragraph: a multi-line error wraps cleanly
    return error if len(error) <= ERROR_MAX_CHARS else error[: ERROR_MAX_CHARS - 1] + "\u2026"


BAR_STYLE = {
    "pending": "bar.back",
    "running": "cyan",
    "spawned": "magenta",
    "completed": "green",
    "failed": "red",
    "cancelled": "yellow",
    "skipped": "bright_black",
}
ENDED = frozenset({"completed", "failed", "cancelled", "skipped"})


@dataclass(frozen=True, slots=True)
class BarState:
    """What one step's bar shows: filled ``completed`` of ``total`` (None: a running step
    without children, whose length is unknown, pulses) in ``style``; child counts only for a
    step with children."""

    total: float | None
    completed: float
    style: str
    children: str  # "done/total", or "" for a step without children
    counts: str  # "run R ok O fail F cancel C", or ""


def bar_state(stat: StepStat) -> BarState:
    c = stat.children
    seen = c.pending + c.running + c.completed + c.failed + c.cancelled
    status = status_name(stat.status)
    style = BAR_STYLE.get(status, "bar.back")
    if stat.child_count == 0 and seen == 0:
        if status in ENDED:
            return BarState(1, 1, style, "", "")
        return BarState(None if status == "running" else 1, 0, style, "", "")
    total = max(stat.child_count, seen, 1)
    done = c.completed + c.failed + c.cancelled
    counts = f"run {c.running} ok {c.completed} fail {c.failed} cancel {c.cancelled}"
    return BarState(total, done, style, f"{done}/{total}", counts)


class _StatusBarColumn(BarColumn):
    """A bar in its step's colour: how it ended, not merely that it is full."""

    def render(self, task: Task) -> ProgressBar:
        style = task.fields.get("bar_style", "bar.complete")
        return ProgressBar(
            total=max(0, task.total) if task.total is not None else None,
            completed=max(0, task.completed),
            width=None if self.bar_width is None else max(1, self.bar_width),
            pulse=task.total is None,
            animation_time=task.get_time(),
            style=self.style,
            complete_style=style,
            finished_style=style,
            pulse_style=style,
        )


class StepBars:
    """The live part of the view: one labelled bar per step."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            # The label is markup (its status is coloured); names in it are escaped.
            TextColumn(
                "{task.fields[label]}",
                table_column=Column(width=24, no_wrap=True, overflow="ellipsis"),
            ),
            _StatusBarColumn(),
            TextColumn("{task.fields[children]}", justify="right"),
            TextColumn("{task.fields[counts]}"),
            console=console,
        )
        self._tasks: dict[str, TaskID] = {}

    def update(self, job: Job) -> None:
        for stat in job.step_stats:
            state = bar_state(stat)
            status = status_name(stat.status)
            style = STYLE.get(status, "default")
            label = f"{escape(stat.step_name)} [{style}]{escape(f'[{status}]')}[/]"
            if stat.step_id not in self._tasks:
                # With its fields: the refresh thread may draw it before the update below.
                self._tasks[stat.step_id] = self.progress.add_task(
                    "",
                    total=state.total,
                    label=label,
                    bar_style=state.style,
                    children=state.children,
                    counts=state.counts,
                )
            self.progress.update(
                self._tasks[stat.step_id],
                total=state.total,
                completed=state.completed,
                label=label,
                bar_style=state.style,
                children=state.children,
                counts=state.counts,
            )


async def follow(states: AsyncIterator[Job], console: Console | None = None) -> Job:
    """Show a bar per step with its child counts until the job ends; return the last state."""
    console = console or Console()
    bars = StepBars(console)
    header = Table.grid()
    last: Job | None = None
    with Live(
        Group(header, bars.progress), console=console, refresh_per_second=8, transient=False
    ) as live:
        async for job in states:
            last = job
            bars.update(job)
            live.update(Group(_header(job), bars.progress))
    assert last is not None, "the watch ended before sending any state"
    console.print()  # ends the live view's last line where the console is not a terminal
    console.print(final_table(last))
    return last


def _header(job: Job) -> Table:
    grid = Table.grid(padding=(0, 1))
    grid.add_row(
        Text(job.name, style="bold"),
        job.id,
        Text.assemble("status: ", _styled(status_name(job.status))),
    )
    return grid
