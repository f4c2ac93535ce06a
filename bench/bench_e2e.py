"""End to end: a job of 10 steps x 2,000 ``simulate`` children of zero duration
(``wait`` left at its default, true), submitted through SubmitJob to a real orchestrator and
a real monitor (subprocesses), on SQLite and PostgreSQL, beside the same job against a no-op
monitor (bench/noop_monitor.py: jobs in memory, child events acknowledged, not stored), all in
the same run. Wall time runs from SubmitJob until WatchJob (on the monitor) shows the manager
terminal; children/s = children / wall time. Afterwards GetJob on the real monitor must show
every child: each step completed, with 2,000 children completed in its live counts.

    .venv/bin/python bench/bench_e2e.py            # full: 3 runs, both databases
    .venv/bin/python bench/bench_e2e.py --quick    # smoke: 10 x 300 children, one run
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass

import common
from google.protobuf import struct_pb2
from grpc import aio

from stepflow_common.proto_status import STATUS_TO_PB
from stepflow_common.proto_status import TERMINAL_PB as TERMINAL
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from stepflow_proto.v1 import orchestrator_service_pb2 as o
from stepflow_proto.v1 import orchestrator_service_pb2_grpc as o_grpc

STEPS = 10
CHILDREN = 2_000
QUICK_CHILDREN = 300
JOB_TIMEOUT_S = 600.0
TARGET_CHILDREN_S = {"sqlite": 25_000}
STATUS_NAME = {pb: status.value for status, pb in STATUS_TO_PB.items()}


@dataclass
class Outcome:
    wall_s: float
    children: int
    status: str
    recorded: int | None = None  # children GetJob shows ended (real monitors)
    exact: bool | None = None  # every step completed with all its children completed
    monitor_cpu: float = math.nan
    orchestrator_cpu: float = math.nan
    db_cpu: float = math.nan

    @property
    def children_s(self) -> float:
        return self.children / self.wall_s if self.wall_s > 0 else math.nan


def definition(steps: int, children: int, log_lines: int = 0) -> o.JobDefinition:
    """Built from the protos alone, as any client would (``log_lines``: lines each child
    writes to the job's log)."""
    job = o.JobDefinition(name=f"bench-e2e-{steps}x{children}")
    for index in range(steps):
        config = struct_pb2.Struct()
        config.update({"children": children, "duration_ms": 0})
        if log_lines:
            config.update({"log_lines": log_lines})
        job.steps.append(o.StepDefinition(name=f"step-{index}", type="simulate", config=config))
    return job


async def run_job(
    orchestrator: common.ServerProcess,
    monitor: common.ServerProcess,
    steps: int,
    children: int,
    *,
    real: bool,
    log_lines: int = 0,
) -> Outcome:
    async with (
        aio.insecure_channel(orchestrator.address) as o_channel,
        aio.insecure_channel(monitor.address, options=common.CHANNEL_OPTIONS) as m_channel,
    ):
        ostub = o_grpc.OrchestratorServiceStub(o_channel)
        mstub = m_grpc.MonitorServiceStub(m_channel)
        request = o.SubmitJobRequest(
            definition=definition(steps, children, log_lines), request_id=uuid.uuid4().hex
        )
        common.analyze(monitor)
        groups = common.cpu_groups(monitor, "monitor")
        cpu = common.CpuMeter({**groups, "orchestrator": orchestrator.pid})
        with cpu:
            started = time.perf_counter()
            manager_id = (await ostub.SubmitJob(request, timeout=60)).manager_id
            last: job_pb2.Job | None = None
            async for msg in mstub.WatchJob(
                m.WatchJobRequest(job_id=manager_id), timeout=JOB_TIMEOUT_S
            ):
                last = msg.job
                if last.status in TERMINAL:
                    break
            wall = time.perf_counter() - started
        assert last is not None
        outcome = Outcome(
            wall_s=wall,
            children=steps * children,
            status=STATUS_NAME.get(last.status, str(last.status)),
            monitor_cpu=cpu.shares["monitor"],
            orchestrator_cpu=cpu.shares["orchestrator"],
            db_cpu=cpu.shares.get("db", math.nan),
        )
        if real:
            job = (await mstub.GetJob(m.GetJobRequest(job_id=manager_id))).job
            outcome.recorded = sum(
                s.children.completed + s.children.failed + s.children.cancelled
                for s in job.step_stats
            )
            outcome.exact = len(job.step_stats) == steps and all(
                s.status == job_pb2.JOB_STATUS_COMPLETED
                and s.children.completed == children
                and s.child_count == children
                and s.children.pending + s.children.running == 0
                for s in job.step_stats
            )
        return outcome


def report(
    results: dict[str, list[Outcome]],
    order: list[str],
    runs: int,
    steps: int,
    children: int,
    notes: list[str],
) -> None:
    noop_rate = common.median([o.children_s for o in results.get("no-op", [])])
    rows = []
    for key in order:
        outcomes = results.get(key)
        if not outcomes:
            continue
        rate = common.median([o.children_s for o in outcomes])
        recorded = [o.recorded for o in outcomes if o.recorded is not None]
        exact = [o.exact for o in outcomes if o.exact is not None]
        target = TARGET_CHILDREN_S.get(key)
        rows.append(
            [
                "no-op monitor" if key == "no-op" else key,
                f"{steps} x {children:,}",
                f"{common.median([o.wall_s for o in outcomes]):.2f}",
                common.fmt_rate(rate),
                "-" if key == "no-op" else common.fmt_ratio(rate / noop_rate),
                common.fmt_cpu(common.median([o.monitor_cpu for o in outcomes])),
                common.fmt_cpu(common.median([o.db_cpu for o in outcomes])),
                common.fmt_cpu(common.median([o.orchestrator_cpu for o in outcomes])),
                "/".join(sorted({o.status for o in outcomes})),
                "-" if not recorded else f"{min(recorded):,}",
                "-" if not exact else ("yes" if all(exact) else "NO"),
                f">= {target:,}/s" if target else "",
                common.verdict(rate >= target) if target else "",
            ]
        )
    headers = [
        "monitor",
        "steps x children",
        "wall s",
        "children/s",
        "vs no-op",
        "monitor CPU",
        "db CPU",
        "orch. CPU",
        "job",
        "children recorded",
        "all exact",
        "target",
        "result",
    ]
    all_notes = [
        f"median of {runs} run(s); wall = SubmitJob -> WatchJob shows the manager terminal; "
        "simulate children of 0 ms, concurrency 16 (the default), wait = true",
        "no-op monitor: bench/noop_monitor.py (jobs in memory, events acknowledged and "
        "dropped); orchestrator and monitors are separate processes, the client is this one",
        "monitor / db / orch. CPU: CPU time of the monitor, its PostgreSQL backends and the "
        f"orchestrator over the wall time, as a share of one core ({os.cpu_count()} cores here)",
        "children recorded: ended children in the manager's live step counts after the job "
        "(the smallest over the runs); all exact: every step completed with all its children "
        "completed and child_count right",
        "target: 25,000 children/s or more on SQLite, each child's lifecycle recorded",
    ]
    common.print_table("End to end: one job through SubmitJob", headers, rows, all_notes + notes)


async def run(args: argparse.Namespace) -> None:
    runs = common.runs_for(args)
    steps = args.steps
    children = args.children or (QUICK_CHILDREN if args.quick else CHILDREN)
    databases, notes = common.available_databases(args)
    results: dict[str, list[Outcome]] = {}
    with common.workdir(args, "bench-e2e") as work:
        targets: list[str] = ["no-op", *databases]
        for key in targets:
            owner = f"bench-e2e-{key}-{uuid.uuid4().hex[:8]}"
            with contextlib.ExitStack() as stack:
                if key == "no-op":
                    monitor = common.noop_monitor_process(work)
                else:
                    url = stack.enter_context(
                        common.throwaway_database(key, args.postgres_url, work)
                    )
                    monitor = common.monitor_process(url, work)
                async with common.running(monitor):
                    orchestrator = common.orchestrator_process(monitor.address, work, owner=owner)
                    async with common.running(orchestrator):
                        for run_no in range(1, runs + 1):
                            common.progress(
                                f"{key} run {run_no}/{runs}: {steps} x {children} children"
                            )
                            outcome = await run_job(
                                orchestrator, monitor, steps, children, real=key != "no-op"
                            )
                            common.progress(
                                f"  {outcome.wall_s:.2f} s, {outcome.children_s:,.0f} "
                                f"children/s, job {outcome.status}"
                            )
                            results.setdefault(key, []).append(outcome)
    notes.append(common.machine_note())
    report(results, targets, runs, steps, children, notes)


def main() -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS, help=f"steps of the job ({STEPS})")
    parser.add_argument(
        "--children",
        type=int,
        default=0,
        help=f"children per step (default {CHILDREN:,}; {QUICK_CHILDREN} with --quick)",
    )
    args = parser.parse_args()
    if args.timeout is None:
        args.timeout = 600.0 if args.quick else 2400.0
    return common.run_main(run, args)


if __name__ == "__main__":
    sys.exit(main())
