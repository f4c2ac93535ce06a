"""The job log with real processes (SPEC §6): what a job's work prints arrives in its log line
by line, once and in order, through the orchestrator's event stream; the event lines match
``step_stats``; ``orchestrator-svc logs`` prints it and, with ``--follow``, exits with the
job's outcome; ``submit --follow`` shows a failed step's last lines; a command that prints
far past the log's budget is bounded and its step still ends."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from grpc import aio

from stepflow_client import aio as client
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from tests.jobs import whole_log
from tests.process_helpers import (
    ORCHESTRATOR_SVC,
    TERMINAL,
    clean_env,
    monitor_process,
    orchestrator_process,
    running,
    submit_to,
    wait_job,
)

pytestmark = pytest.mark.timeout(180)

HELPER = Path(__file__).with_name("job_log_callable.py")

JOB: dict[str, Any] = {
    "name": "printing",
    "steps": [
        {
            "name": "talk",
            "type": "command",
            "config": {"command": "for i in 1 2 3; do echo out-$i; done; echo warn-1 >&2"},
        },
        {
            "name": "each",
            "type": "fanout",
            "config": {
                "items": ["a", "b", "c"],
                "command": "echo item-{item}; echo err-{item} >&2",
            },
        },
        {
            "name": "py",
            "type": "python",
            "config": {"callable": "job_log_callable:talk"},
        },
        {
            "name": "broken",
            "type": "command",
            "on_error": "continue",
            "config": {"command": "echo about to fail; echo the reason >&2; exit 4"},
        },
    ],
}


def services(database_url: str, tmp_path: Path, *monitor_extra: str):  # type: ignore[no-untyped-def]
    monitor = monitor_process(database_url, tmp_path, extra=monitor_extra)
    orchestrator = orchestrator_process(monitor.address, tmp_path)
    orchestrator.extra_env = {"PYTHONPATH": str(HELPER.parent)}
    return monitor, orchestrator


async def test_what_a_job_prints_is_in_its_log_once_in_order_beside_its_events(
    database_url: str, tmp_path: Path
) -> None:
    monitor, orchestrator = services(database_url, tmp_path)
    async with running(monitor, orchestrator):
        manager_id = await submit_to(orchestrator, JOB, uuid.uuid4().hex)
        async with aio.insecure_channel(monitor.address) as channel:
            job = await wait_job(
                m_grpc.MonitorServiceStub(channel),
                manager_id,
                lambda j: j.status in TERMINAL,
                within=60,
            )
        async with client.MonitorClient(monitor.address) as mon:
            lines = await whole_log(mon, manager_id)
            followed = [line async for line in mon.follow_log(manager_id)]
    assert job.status == job_pb2.JOB_STATUS_COMPLETED
    steps = {stat.step_name: stat.step_id for stat in job.step_stats}
    assert [line.seq for line in lines] == list(range(1, len(lines) + 1))
    assert [line.seq for line in followed] == [line.seq for line in lines]

    def output(step: str, child: str = "") -> list[tuple[str, str]]:
        return [
            (line.source, line.message)
            for line in lines
            if line.step_id == steps[step] and line.source != "event" and line.child_id == child
        ]

    # Each stream in the order printed (stdout and stderr are two pipes, read side by side).
    assert [m for s, m in output("talk") if s == "stdout"] == ["out-1", "out-2", "out-3"]
    assert [m for s, m in output("talk") if s == "stderr"] == ["warn-1"]
    for index, item in enumerate("abc"):
        assert sorted(output("each", f"{steps['each']}.{index}")) == [
            ("stderr", f"err-{item}"),
            ("stdout", f"item-{item}"),
        ]
    py = output("py")
    assert ("stdout", "printed by the callable") in py
    assert ("log", "job_log_callable: logged at info") in py
    assert ("log", "job_log_callable: logged at warning") in py
    assert ("stderr", "to stderr") in py
    levels = {line.message: line.level for line in lines if line.step_id == steps["py"]}
    assert levels["job_log_callable: logged at warning"] == "warning"
    assert sorted(output("broken")) == [("stderr", "the reason"), ("stdout", "about to fail")]
    # Every step's ending is described once, as step_stats has it.
    events = [line.message for line in lines if line.source == "event"]
    for stat in job.step_stats:
        status = job_pb2.JobStatus.Name(stat.status).removeprefix("JOB_STATUS_").lower()
        ends = [e for e in events if e.startswith(f"step {stat.step_name} {status}")]
        assert len(ends) == 1, (stat.step_name, events)
    assert events[-1] == "job printing completed (orchestrator)"
    # Each step's output comes before its end.
    for name, step_id in steps.items():
        end = next(
            line.seq
            for line in lines
            if line.step_id == step_id
            and line.source == "event"
            and line.message.startswith(f"step {name} ")
            and ("completed" in line.message or "failed" in line.message)
        )
        assert all(
            line.seq < end for line in lines if line.step_id == step_id and line.source != "event"
        ), name


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ORCHESTRATOR_SVC), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(),
        check=False,
    )


async def test_the_logs_command_prints_follows_and_exits_with_the_outcome(
    database_url: str, tmp_path: Path
) -> None:
    monitor, orchestrator = services(database_url, tmp_path)
    job = {
        "name": "slow",
        "steps": [
            {
                "name": "tick",
                "type": "command",
                "config": {"command": "for i in 1 2 3; do echo tick-$i; sleep 0.3; done; exit 2"},
            }
        ],
    }
    async with running(monitor, orchestrator):
        manager_id = await submit_to(orchestrator, job, uuid.uuid4().hex)
        followed = await asyncio.to_thread(
            cli, "logs", manager_id, "--follow", "--monitor", monitor.address
        )
        printed = await asyncio.to_thread(
            cli, "logs", manager_id, "--step", "tick", "--monitor", monitor.address
        )
        unknown = await asyncio.to_thread(
            cli, "logs", manager_id, "--step", "nope", "--monitor", monitor.address
        )
    assert followed.returncode == 3, followed.stderr
    ticks = [line for line in followed.stdout.splitlines() if " stdout " in line]
    assert [line.split(" stdout ")[1] for line in ticks] == ["tick-1", "tick-2", "tick-3"]
    assert all(line.split()[1] == "tick" for line in ticks)
    last = [line for line in followed.stdout.splitlines() if not line.startswith(" ")][-1]
    assert last.split(" ", 3)[1:3] == ["-", "event"] and "job slow failed" in last
    assert printed.returncode == 0, printed.stderr
    assert [line for line in printed.stdout.splitlines() if " stdout " in line] == ticks
    # --step: the step's lines only (a message of several lines goes on indented).
    heads = [line for line in printed.stdout.splitlines() if not line.startswith(" ")]
    assert heads and all(line.split()[1] == "tick" for line in heads)
    assert unknown.returncode == 2 and "no step 'nope'" in unknown.stderr


async def test_submit_follow_shows_the_failed_steps_last_lines(
    database_url: str, tmp_path: Path
) -> None:
    monitor, orchestrator = services(database_url, tmp_path)
    job_file = tmp_path / "fails.toml"
    job_file.write_text(
        'name = "fails"\n[[steps]]\nname = "breaks"\ntype = "command"\n'
        '[steps.config]\ncommand = "for i in $(seq 1 30); do echo line-$i; done; exit 1"\n'
    )
    async with running(monitor, orchestrator):
        done = await asyncio.to_thread(
            cli,
            "submit",
            str(job_file),
            "--follow",
            "--orchestrator",
            orchestrator.address,
            "--monitor",
            monitor.address,
        )
    assert done.returncode == 3, done.stderr
    assert "last lines of step breaks:" in done.stderr
    shown = [line.split(" stdout ")[1] for line in done.stderr.splitlines() if " stdout " in line]
    assert shown == [f"line-{i}" for i in range(11, 31)]


async def test_a_command_printing_far_past_the_budget_is_bounded_and_its_step_ends(
    database_url: str, tmp_path: Path
) -> None:
    monitor, orchestrator = services(database_url, tmp_path, "--max-log-bytes", "65536")
    job = {
        "name": "flood",
        "steps": [
            {
                "name": "loud",
                "type": "command",
                # 100 MB: 10,000 lines of 10,000 bytes, then one line of 1 MB without a
                # newline until its end (sent in pieces), then the last line.
                "config": {
                    "command": "echo first; head -c 100000000 /dev/zero | tr '\\0' x | "
                    "fold -w 10000; echo; head -c 1000000 /dev/zero | tr '\\0' y; echo; "
                    "echo last"
                },
            }
        ],
    }
    async with running(monitor, orchestrator):
        manager_id = await submit_to(orchestrator, job, uuid.uuid4().hex)
        async with aio.insecure_channel(monitor.address) as channel:
            final = await wait_job(
                m_grpc.MonitorServiceStub(channel),
                manager_id,
                lambda j: j.status in TERMINAL,
                within=150,
            )
        async with client.MonitorClient(monitor.address) as mon:
            lines = await whole_log(mon, manager_id)
    assert final.status == job_pb2.JOB_STATUS_COMPLETED, final.error
    out = [line for line in lines if line.source == "stdout"]
    assert out[0].message == "first" and out[-1].message == "last"
    # The budget, plus the held last line and what a line may overshoot it by.
    assert sum(len(line.message.encode()) for line in lines) < 65536 + 3 * 16384 + 4096
    dropped = [line.message for line in lines if "dropped" in line.message]
    assert len(dropped) == 1 and "output lines dropped" in dropped[0]
    assert lines[-1].message == "job flood completed (orchestrator)"
