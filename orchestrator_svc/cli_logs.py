"""``orchestrator-svc logs``: a job's log, a line each (``TIME STEP[/CHILD] SOURCE MESSAGE``),
read to its end or followed until the job ends; and the failing steps' last lines that
``submit --follow`` shows when a job does not complete."""

from __future__ import annotations

import argparse
import collections
import sys
from collections.abc import Mapping
from typing import TextIO

from stepflow_client import aio as client
from stepflow_common import cli
from stepflow_common.errors import NotFound, StepflowError
from stepflow_proto.v1 import job_pb2

LAST_LINES = 20
OUTPUT_SOURCES = ("stdout", "stderr", "log")


def step_names(manager: job_pb2.Job) -> dict[str, str]:
    return {stat.step_id: stat.step_name for stat in manager.step_stats}


def format_line(line: job_pb2.JobLogLine, names: Mapping[str, str]) -> str:
    """``TIME STEP[/CHILD] SOURCE MESSAGE``; a message of several lines goes on, indented."""
    when = line.time.ToDatetime().strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    where = names.get(line.step_id, line.step_id) if line.step_id else "-"
    if line.child_id:
        prefix = f"{line.step_id}."
        child = line.child_id[len(prefix) :] if line.child_id.startswith(prefix) else line.child_id
        where = f"{where}/{child}"
    message = line.message.replace("\n", "\n    ")
    return f"{when} {where} {line.source} {message}"


async def _manager_of(monitor: client.MonitorClient, job: job_pb2.Job) -> job_pb2.Job:
    if job.kind == job_pb2.JOB_KIND_MANAGER:
        return job
    return await monitor.get_job(job.manager_id)


def _step_id(manager: job_pb2.Job, name: str) -> str:
    for stat in manager.step_stats:
        if stat.step_name == name:
            return stat.step_id
    names = ", ".join(stat.step_name for stat in manager.step_stats) or "none"
    raise cli.CliError(
        f"job {manager.id} has no step {name!r} (its steps: {names})", cli.EXIT_USAGE
    )


async def logs(args: argparse.Namespace, settings: client.ClientSettings) -> int:
    async with client.MonitorClient(args.monitor, **settings) as monitor:
        try:
            job = await monitor.get_job(args.job_id)
        except NotFound:
            raise cli.CliError(f"no job {args.job_id}", cli.EXIT_FAILED) from None
        except StepflowError as exc:
            raise _refused(exc, args) from exc
        manager = await _manager_of(monitor, job)
        step_id = _step_id(manager, args.step) if args.step else ""
        names = step_names(manager)
        out = sys.stdout
        try:
            if args.follow:
                async for line in monitor.follow_log(args.job_id, step_id=step_id):
                    if line.step_id and line.step_id not in names:
                        names = step_names(await monitor.get_job(manager.id))
                    print(format_line(line, names), file=out, flush=True)
                final = await monitor.get_job(args.job_id)
                return (
                    cli.EXIT_OK
                    if final.status == job_pb2.JOB_STATUS_COMPLETED
                    else (cli.EXIT_JOB_NOT_COMPLETED)
                )
            after = 0
            while True:
                page = await monitor.read_log(args.job_id, after_seq=after, step_id=step_id)
                for line in page.lines:
                    print(format_line(line, names), file=out)
                if page.next_seq == after or page.complete:
                    break
                after = page.next_seq
            out.flush()
        except StepflowError as exc:
            raise _refused(exc, args) from exc
    return cli.EXIT_OK


def _refused(exc: StepflowError, args: argparse.Namespace) -> cli.CliError:
    from orchestrator_svc.cli_client import refused

    return refused(exc, "monitor", args.monitor, "--monitor")


async def last_lines(
    monitor: client.MonitorClient, step_id: str, count: int = LAST_LINES
) -> list[job_pb2.JobLogLine]:
    """The last ``count`` output lines of a step (its log read through, keeping the tail)."""
    tail: collections.deque[job_pb2.JobLogLine] = collections.deque(maxlen=count)
    after = 0
    while True:
        page = await monitor.read_log(step_id, after_seq=after, sources=OUTPUT_SOURCES, limit=1000)
        tail.extend(page.lines)
        if page.next_seq == after or page.complete or not page.lines:
            return list(tail)
        after = page.next_seq


async def show_failed_steps(
    monitor: client.MonitorClient, manager_id: str, out: TextIO = sys.stderr
) -> None:
    """After a job that did not complete: each failed step's last lines of output."""
    try:
        manager = await monitor.get_job(manager_id)
        names = step_names(manager)
        for stat in manager.step_stats:
            if stat.status != job_pb2.JOB_STATUS_FAILED:
                continue
            lines = await last_lines(monitor, stat.step_id)
            if not lines:
                continue
            print(f"last lines of step {stat.step_name}:", file=out)
            for line in lines:
                print("  " + format_line(line, names), file=out)
        out.flush()
    except StepflowError as exc:  # the outcome stands; the extra view is best effort
        print(f"(cannot read the job's log: {exc})", file=out)
