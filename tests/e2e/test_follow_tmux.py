"""The live view tried as a person would: in a real terminal (tmux), read off the screen.

``orchestrator-svc submit FILE --follow`` and ``python -m orchestrator_svc.demo`` run in an
80x40 tmux pane; ``capture-pane`` reads the screen while they run and after. A pipe would
not do: rich draws the live view only on a terminal, so only a terminal shows whether
per-step progress appears as it happens (with its "[running]" labels intact), whether the
final table fits 80 columns, and what Ctrl-C leaves behind.

The terminal tests need tmux (``apt-get install -y tmux``; ``.ci/run`` installs it) and are
skipped without it; the last two render the same view into a recording console and run
everywhere.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from rich.console import Console

from orchestrator_svc.convert import job_from_pb
from orchestrator_svc.demo_services import ServiceProcess, start_service, wait_serving
from orchestrator_svc.follow import final_table, follow
from orchestrator_svc.records import Job
from stepflow_proto.v1 import job_pb2

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
WIDTH, HEIGHT = 80, 40
POLL_S = 0.05
RUN_TIMEOUT_S = 60.0
EXIT_MARK = "EXIT="
MONITOR = "stepflow.v1.MonitorService"
ORCHESTRATOR = "stepflow.v1.OrchestratorService"
STATUSES = ("pending", "running", "spawned", "completed", "failed", "cancelled", "skipped")

needs_tmux = pytest.mark.skipif(
    shutil.which("tmux") is None,
    reason="tmux is not installed (apt-get install -y tmux; .ci/run installs it)",
)


class Pane:
    """One command in a detached tmux session on a private server (its own socket)."""

    def __init__(self, command: str) -> None:
        self.socket = f"stepflow-test-{uuid.uuid4().hex[:8]}"
        # What the person's shell would not have: settings for the services, and a fixed
        # COLUMNS/LINES, which rich would prefer to the terminal's real size.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("STEPFLOW_") and k not in ("COLUMNS", "LINES")
        }
        env["TERM"] = "xterm-256color"
        # The pane outlives the command (sleep), so the last screen can still be read.
        script = f"cd {ROOT} && {command}; echo {EXIT_MARK}$?; sleep 600"
        self._tmux(
            "new-session", "-d", "-s", "t", "-x", str(WIDTH), "-y", str(HEIGHT), script, env=env
        )

    def _tmux(self, *args: str, env: dict[str, str] | None = None) -> str:
        done = subprocess.run(
            ["tmux", "-L", self.socket, "-f", "/dev/null", *args],
            capture_output=True,
            text=True,
            timeout=10,
            env=env,
            check=False,
        )
        assert done.returncode == 0, f"tmux {args[0]} failed: {done.stderr}"
        return done.stdout

    def screen(self) -> str:
        """The visible screen plus its scroll-back, wrapped lines joined."""
        return self._tmux("capture-pane", "-p", "-J", "-S", "-", "-t", "t")

    def send_keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "t", *keys)

    def wait_for_exit(self, frames: list[str]) -> tuple[int, str]:
        """Poll the screen until the command has exited; keep every distinct frame."""
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline:
            screen = self.screen()
            if not frames or frames[-1] != screen:
                frames.append(screen)
            found = re.search(rf"^{EXIT_MARK}(\d+)$", screen, re.M)
            if found:
                return int(found.group(1)), screen
            time.sleep(POLL_S)
        pytest.fail(f"still running after {RUN_TIMEOUT_S}s; screen:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(
            ["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=10, check=False
        )


@pytest.fixture
def pane_factory() -> Iterator[list[Pane]]:
    panes: list[Pane] = []
    yield panes
    for pane in panes:
        pane.close()


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    tmp = tmp_path_factory.mktemp("tmux")
    common = ["--shutdown-grace", "2s", "--log-format", "json"]
    started: list[ServiceProcess] = []
    try:
        monitor = [str(BIN / "monitor-svc"), "serve", "--database-url", f"sqlite:///{tmp / 't.db'}",
                   "--grace-period", "1s", "--http-port", "0", *common]  # fmt: skip
        started.append(start_service("monitor", MONITOR, monitor, tmp))
        wait_serving(started[0])
        orchestrator = [str(BIN / "orchestrator-svc"), "serve", "--monitor", started[0].address]
        started.append(start_service("orchestrator", ORCHESTRATOR, [*orchestrator, *common], tmp))
        wait_serving(started[1])
        yield started[1].address, started[0].address
    finally:
        for service in reversed(started):
            service.stop()


def _progress_lines(screen: str, step: str) -> list[str]:
    return [line for line in screen.splitlines() if line.startswith(f"{step} [")]


def _assert_table_fits(screen: str, steps: dict[str, str]) -> None:
    """The final table: its header, one row per step with its whole status, in 80 columns."""
    lines = screen.splitlines()
    heading = re.compile(r"#\s+step\s+type\s+status")
    header = next((i for i, line in enumerate(lines) if heading.match(line)), None)
    assert header is not None, f"no final table on the screen:\n{screen}"
    for step, status in steps.items():
        rows = [line for line in lines[header:] if re.match(rf"\d+\s+{re.escape(step)}\s", line)]
        assert rows, f"no table row for {step}:\n{screen}"
        assert re.search(rf"\s{status}\s", rows[0] + " "), f"{step} is not {status}: {rows[0]!r}"
    for line in lines:
        assert len(line) <= WIDTH
    for status in STATUSES:  # a status cut short would read e.g. "compl…"
        for cut in range(3, len(status)):
            assert f" {status[:cut]}\u2026" not in screen, f"{status} truncated:\n{screen}"


@needs_tmux
def test_submit_follow_in_a_terminal(services: tuple[str, str], pane_factory: list[Pane]) -> None:
    orchestrator, monitor = services
    pane = Pane(
        f"{BIN / 'orchestrator-svc'} submit examples/quick.toml --follow "
        f"--orchestrator {orchestrator} --monitor {monitor}"
    )
    pane_factory.append(pane)
    frames: list[str] = []
    code, final = pane.wait_for_exit(frames)
    assert code == 0, f"submit --follow exited {code}:\n{final}"

    # While it ran: per-step bars with live counts, labels and their [status] intact.
    running = [
        frame
        for frame in frames
        if any("[running]" in line for line in _progress_lines(frame, "crawl"))
    ]
    assert running, "crawl was never seen running:\n" + "\n---\n".join(frames[-3:])
    done_counts = {
        int(found.group(1))
        for frame in running
        for line in _progress_lines(frame, "crawl")
        if (found := re.search(r"(\d+)/40\b", line))
    }
    assert any(0 < n < 40 for n in done_counts), f"no partial progress seen: {done_counts}"
    assert any("run " in line and " ok " in line for line in _progress_lines(running[-1], "crawl"))

    # At the end: every step's bar in its final state, then the table.
    for step in ("crawl", "handoff", "report"):
        assert any("[completed]" in line for line in _progress_lines(final, step)), final
    _assert_table_fits(final, {"crawl": "completed", "handoff": "completed", "report": "completed"})
    crawl_row = next(line for line in final.splitlines() if re.match(r"1\s+crawl\s", line))
    assert re.search(r"completed\s+40\s+36\s+4\s+0", crawl_row), crawl_row


def _strays(directory: str) -> list[str]:
    """Processes working in, or naming, ``directory`` (the demo's temporary directory: both
    services run there, and the monitor's database is in it)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cwd = os.readlink(proc / "cwd")
            text = " ".join(
                a.decode(errors="replace") for a in (proc / "cmdline").read_bytes().split(b"\0")
            )
        except OSError:
            continue
        if cwd == directory or directory in text:
            found.append(f"{proc.name}: {text}")
    return found


def _demo_dir(screen: str) -> str:
    found = re.search(r"SQLite\s+(\S+)/stepflow\.db", screen)
    assert found, f"the demo did not say where its database is:\n{screen}"
    return found.group(1)


@needs_tmux
def test_make_demo_in_a_terminal(pane_factory: list[Pane]) -> None:
    pane = Pane(f"{sys.executable} -m orchestrator_svc.demo")
    pane_factory.append(pane)
    frames: list[str] = []
    # In a terminal the demo leaves time to look at the job's page, whose address it prints;
    # the page answers then, and Enter ends the wait.
    deadline = time.monotonic() + RUN_TIMEOUT_S
    address = re.compile(r"Enter stops it now\):\s+(http://\S+/jobs/(\w+))")
    while not (found := address.search(pane.screen())):
        assert time.monotonic() < deadline, f"no page address to look at:\n{pane.screen()}"
        frames.append(pane.screen())
        time.sleep(POLL_S)
    page_url, job_id = found.groups()
    with urllib.request.urlopen(page_url, timeout=10) as page:
        assert page.status == 200 and b"data-job-status" in page.read()
    api = page_url.replace(f"/jobs/{job_id}", f"/api/v1/jobs/{job_id}")
    with urllib.request.urlopen(api, timeout=10) as answer:
        assert json.loads(answer.read())["status"] == "JOB_STATUS_COMPLETED"
    pane.send_keys("Enter")
    code, final = pane.wait_for_exit(frames)
    assert code == 0, f"the demo exited {code}:\n{final}"
    assert any(_progress_lines(f, "crawl") for f in frames[:-1]), "no live progress was shown"
    _assert_table_fits(
        final,
        {
            "crawl": "completed",
            "enrich": "completed",
            "thumbs": "completed",
            "broken": "failed",
            "publish": "skipped",
            "report": "completed",
        },
    )
    assert "demo ran as designed" in final
    assert "both services stopped cleanly" in final
    assert not _strays(_demo_dir(final))


@needs_tmux
def test_demo_ctrl_c_leaves_nothing_running(pane_factory: list[Pane], tmp_path: Path) -> None:
    job = tmp_path / "long.toml"
    job.write_text(
        'name = "long"\n[[steps]]\nname = "slow"\ntype = "simulate"\n'
        "config = { children = 1000, duration_ms = 500, concurrency = 4 }\n"
    )
    # After stopping the services the demo dies of SIGINT, as a program interrupted should
    # (make then says "Interrupt", not "Error"); a shell that sees that stops too, so the
    # pane's shell ignores SIGINT to live on and show the status (128 + 2).
    pane = Pane(f"trap '' INT; {sys.executable} -m orchestrator_svc.demo --job {job}")
    pane_factory.append(pane)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not _progress_lines(screen := pane.screen(), "slow"):
        assert time.monotonic() < deadline, f"the job never showed progress:\n{screen}"
        time.sleep(POLL_S)
    directory = _demo_dir(screen)
    assert len(_strays(directory)) == 2, "both services should be running now"
    pane.send_keys("C-c")
    code, final = pane.wait_for_exit([])
    assert code == 130, final
    assert "both services stopped cleanly" in final
    assert not _strays(directory)


@needs_tmux
def test_demo_ctrl_c_while_starting_is_a_clean_stop(pane_factory: list[Pane]) -> None:
    """Ctrl-C before the services serve: they die of the SIGTERM that stops them, which is
    the stop asked for, not a failure."""
    pane = Pane(f"trap '' INT; {sys.executable} -m orchestrator_svc.demo")
    pane_factory.append(pane)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while "monitor " not in (screen := pane.screen()):
        assert time.monotonic() < deadline, f"the monitor never started:\n{screen}"
        time.sleep(POLL_S)
    pane.send_keys("C-c")  # the orchestrator is starting now
    code, final = pane.wait_for_exit([])
    assert code == 130, final
    assert "both services stopped cleanly" in final
    assert "exited with status" not in final


# -- the same view without a terminal (these run everywhere, tmux or not) ----------------------
def _job(status: int, steps: list[tuple[str, str, int, int, int, int, int, str]]) -> Job:
    job = job_pb2.Job(
        id="f" * 32, kind=job_pb2.JOB_KIND_MANAGER, name="demo [nightly]", status=status
    )
    for index, (name, type_, step_status, count, ok, failed, cancelled, error) in enumerate(steps):
        stat = job.step_stats.add(
            step_index=index,
            step_id=f"step-{index}",
            step_name=name,
            step_type=type_,
            status=step_status,
            child_count=count,
            error=error,
        )
        stat.children.completed, stat.children.failed, stat.children.cancelled = (
            ok,
            failed,
            cancelled,
        )
    return job_from_pb(job)


FINISHED = _job(
    job_pb2.JOB_STATUS_COMPLETED,
    [
        ("crawl", "simulate", job_pb2.JOB_STATUS_COMPLETED, 60, 54, 6, 0, ""),
        ("enrich", "simulate", job_pb2.JOB_STATUS_COMPLETED, 200, 192, 4, 4, ""),
        ("broken", "command", job_pb2.JOB_STATUS_FAILED, 0, 0, 0, 0, "exit status 3: disk full"),
        ("publish", "command", job_pb2.JOB_STATUS_SKIPPED, 0, 0, 0, 0, "dependency broken ended"),
        ("open", "python", job_pb2.JOB_STATUS_CANCELLED, 0, 0, 0, 0, "[Errno 2] No such file"),
    ],
)


def test_final_table_reads_at_80_columns() -> None:
    console = Console(width=WIDTH, record=True, force_terminal=False, color_system=None)
    console.print(final_table(FINISHED))
    text = console.export_text()
    assert "demo [nightly]" in text  # names are text, not markup
    assert "[Errno 2]" in text  # so are errors
    _assert_table_fits(
        text,
        {
            "crawl": "completed",
            "enrich": "completed",
            "broken": "failed",
            "publish": "skipped",
            "open": "cancelled",
        },
    )
    assert re.search(r"2\s+enrich\s+simulate\s+completed\s+200\s+192\s+4\s+4", text), text


def test_follow_keeps_status_labels() -> None:
    """Names and "[status]" labels are text: rich must not take them for markup."""
    running = _job(
        job_pb2.JOB_STATUS_RUNNING,
        [("crawl [eu]", "simulate", job_pb2.JOB_STATUS_RUNNING, 60, 10, 1, 0, "")],
    )
    for state, shown in ((running, "crawl [eu] [running]"), (FINISHED, "broken [failed]")):

        async def states(state: Job = state) -> AsyncIterator[Job]:
            yield state

        console = Console(width=WIDTH, record=True, force_terminal=False, color_system=None)
        assert asyncio.run(follow(states(), console)) is state
        text = console.export_text()
        assert shown in text, text
        assert "demo [nightly] " in text, text
