"""The live view's bars, read off a captured rich console: each bar in the colour of how its
step ended, child counts only for a step with children, and the demo's "why each step
ended" list colouring each status by itself (a failure stays red even when designed)."""

from __future__ import annotations

from rich.console import Console
from rich.segment import Segment

from orchestrator_svc import demo
from orchestrator_svc.convert import job_from_pb
from orchestrator_svc.follow import StepBars
from orchestrator_svc.records import Job
from stepflow_proto.v1 import job_pb2

S = job_pb2
BAR_CHARS = set("━╸╺")


def _job(*steps: tuple[str, int, int, int, int], status: int = S.JOB_STATUS_RUNNING) -> Job:
    job = job_pb2.Job(id="f" * 32, kind=S.JOB_KIND_MANAGER, name="demo", status=status)
    for index, (name, status, count, ok, failed) in enumerate(steps):
        stat = job.step_stats.add(
            step_index=index,
            step_id=f"step-{index}",
            step_name=name,
            step_type="simulate" if count else "command",
            status=status,
            child_count=count,
        )
        stat.children.completed, stat.children.failed = ok, failed
    return job_from_pb(job)


def _console() -> Console:
    return Console(width=100, force_terminal=True, color_system="truecolor", record=False)


def _rows(console: Console, renderable: object) -> dict[str, list[Segment]]:
    """Each rendered line's segments, keyed by the step name it starts with."""
    rows = {}
    for line in console.render_lines(renderable, console.options, pad=False):  # type: ignore[arg-type]
        text = "".join(segment.text for segment in line).strip()
        if text:
            rows[text.split()[0]] = line
    return rows


def _bar_colours(line: list[Segment]) -> set[str]:
    colours = set()
    for segment in line:
        if segment.text.strip() and set(segment.text.strip()) <= BAR_CHARS:
            assert segment.style is not None and segment.style.color is not None
            colours.add(segment.style.color.name)
    return colours


def _text(line: list[Segment]) -> str:
    return "".join(segment.text for segment in line)


def test_each_bar_is_coloured_by_how_its_step_ended() -> None:
    console = _console()
    bars = StepBars(console)
    bars.update(
        _job(
            ("crawl", S.JOB_STATUS_COMPLETED, 60, 54, 6),
            ("broken", S.JOB_STATUS_FAILED, 0, 0, 0),
            ("publish", S.JOB_STATUS_SKIPPED, 0, 0, 0),
            ("stopped", S.JOB_STATUS_CANCELLED, 0, 0, 0),
            ("report", S.JOB_STATUS_COMPLETED, 0, 0, 0),
        )
    )
    rows = _rows(console, bars.progress)
    assert _bar_colours(rows["crawl"]) == {"green"}
    assert _bar_colours(rows["broken"]) == {"red"}
    assert _bar_colours(rows["publish"]) == {"bright_black"}
    assert _bar_colours(rows["stopped"]) == {"yellow"}
    assert _bar_colours(rows["report"]) == {"green"}


def test_counts_only_for_steps_with_children() -> None:
    console = _console()
    bars = StepBars(console)
    bars.update(
        _job(
            ("crawl", S.JOB_STATUS_RUNNING, 60, 10, 1),
            ("report", S.JOB_STATUS_COMPLETED, 0, 0, 0),
            ("waiting", S.JOB_STATUS_PENDING, 0, 0, 0),
        )
    )
    rows = _rows(console, bars.progress)
    crawl = _text(rows["crawl"])
    assert "11/60" in crawl and "run 0 ok 10 fail 1 cancel 0" in crawl
    assert _bar_colours(rows["crawl"]) <= {"cyan", "grey23"}  # running: cyan, the rest empty
    for name in ("report", "waiting"):
        line = _text(rows[name])
        assert "/" not in line and "run" not in line and "ok" not in line, line


def test_the_demo_colours_each_status_by_itself() -> None:
    job = _job(
        ("crawl", S.JOB_STATUS_COMPLETED, 60, 54, 6),
        ("enrich", S.JOB_STATUS_COMPLETED, 200, 192, 4),
        ("thumbs", S.JOB_STATUS_COMPLETED, 3, 2, 1),
        ("broken", S.JOB_STATUS_FAILED, 0, 0, 0),
        ("publish", S.JOB_STATUS_SKIPPED, 0, 0, 0),
        ("report", S.JOB_STATUS_COMPLETED, 0, 0, 0),
        status=S.JOB_STATUS_COMPLETED,
    )
    console = Console(width=120, force_terminal=True, color_system="truecolor", record=True)
    assert demo._check(job, console) == demo.EXIT_AS_DESIGNED
    lines = console.export_text(styles=True).splitlines()

    def status_style(name: str) -> str:
        line = next(line for line in lines if line.strip().startswith(f"{name} "))
        return line

    # ANSI SGR codes: 31 red, 32 green, 2 dim.
    assert "\x1b[31mfailed" in status_style("broken")
    assert "\x1b[32mcompleted" in status_style("crawl")
    assert "\x1b[2mskipped" in status_style("publish")
