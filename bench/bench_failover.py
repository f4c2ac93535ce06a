"""Failover: from kill -9 of a job's orchestrator to its adoption by another one, and to the
first interrupted child running again there, against the lease.

Each run starts a fresh orchestrator, submits a job to it (one step: 40 children of 500 ms,
8 at a time), kills it with SIGKILL once 8 children have ended, and times from the kill

  - adoption: the manager's ``owner`` becomes the surviving orchestrator's (WatchJob);
  - re-run: the first child recorded running as its second attempt (polled every 20 ms).

The job must then complete with every child counted once. Expected: adoption within about
one lease (the lease lapses up to a lease after the last heartbeat, which came at most a third
of a lease before the kill; then the monitor's deadline timer fires and the survivor's next
heartbeat, at most a third of a lease later, adopts).

    .venv/bin/python bench/bench_failover.py            # 10 runs per database
    .venv/bin/python bench/bench_failover.py --quick    # 3 runs, SQLite and PostgreSQL
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import common
from grpc import aio

from orchestrator_svc import definitions
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from stepflow_proto.v1 import orchestrator_service_pb2 as o
from stepflow_proto.v1 import orchestrator_service_pb2_grpc as o_grpc

RUNS = 10
QUICK_RUNS = 3
LEASE_S = 3.0
CHILDREN = 40
KILL_AFTER = 8
POLL_S = 0.02
SURVIVOR = "bench-failover-survivor"


@dataclass(frozen=True, slots=True)
class Outcome:
    adopt_s: float
    rerun_s: float


def job() -> o.JobDefinition:
    return definitions.to_proto(
        definitions.from_mapping(
            {
                "name": "failover",
                "steps": [
                    {
                        "name": "busy",
                        "type": "simulate",
                        "config": {"children": CHILDREN, "duration_ms": 500, "concurrency": 8},
                    }
                ],
            }
        )
    )


def orchestrator(monitor: str, work: Path, owner: str, lease_s: float) -> common.ServerProcess:
    proc = common.orchestrator_process(monitor, work, owner=owner, tag=owner)
    proc.argv += ["--lease", f"{lease_s:g}s"]
    return proc


async def one_run(monitor: common.ServerProcess, work: Path, lease_s: float) -> Outcome:
    victim = orchestrator(monitor.address, work, f"bench-failover-{uuid.uuid4().hex[:6]}", lease_s)
    victim.start()
    try:
        await victim.wait_serving()
        async with aio.insecure_channel(victim.address) as channel:
            resp = await o_grpc.OrchestratorServiceStub(channel).SubmitJob(
                o.SubmitJobRequest(definition=job()), timeout=common.CALL_TIMEOUT_S
            )
        manager_id = resp.manager_id
        async with aio.insecure_channel(monitor.address) as channel:
            stub = m_grpc.MonitorServiceStub(channel)
            step_id = ""
            async for msg in stub.WatchJob(m.WatchJobRequest(job_id=manager_id)):
                stats = msg.job.step_stats
                if stats and stats[0].children.completed >= KILL_AFTER:
                    step_id = stats[0].step_id
                    break
            assert victim.proc is not None
            victim.proc.kill()
            killed = time.monotonic()
            victim.proc.wait()
            async for msg in stub.WatchJob(m.WatchJobRequest(job_id=manager_id)):
                if msg.job.owner == SURVIVOR:
                    break
            adopted = time.monotonic()
            while True:
                running = await stub.ListJobs(
                    m.ListJobsRequest(parent_id=step_id, status=job_pb2.JOB_STATUS_RUNNING)
                )
                if any(child.attempt >= 2 for child in running.jobs):
                    break
                await asyncio.sleep(POLL_S)
            rerun = time.monotonic()
            async for msg in stub.WatchJob(m.WatchJobRequest(job_id=manager_id)):
                final = msg.job
            c = final.step_stats[0].children
            if final.status != job_pb2.JOB_STATUS_COMPLETED or c.completed != CHILDREN:
                raise RuntimeError(f"the job ended {final.status} with {c}")
        return Outcome(adopted - killed, rerun - killed)
    finally:
        victim.stop()


async def run(args: argparse.Namespace) -> None:
    runs = args.runs or (QUICK_RUNS if args.quick else RUNS)
    lease_s = args.lease
    databases, notes = common.available_databases(args)
    rows = []
    with common.workdir(args, "bench-failover") as work:
        for key in databases:
            with contextlib.ExitStack() as stack:
                url = stack.enter_context(common.throwaway_database(key, args.postgres_url, work))
                monitor = common.monitor_process(url, work)
                monitor.argv += ["--orphan-timeout", "5m"]
                async with common.running(monitor):
                    survivor = orchestrator(monitor.address, work, SURVIVOR, lease_s)
                    async with common.running(survivor):
                        outcomes = []
                        for run_no in range(1, runs + 1):
                            outcome = await one_run(monitor, work, lease_s)
                            common.progress(
                                f"{key} run {run_no}/{runs}: adopted after "
                                f"{outcome.adopt_s:.2f} s, first re-run after "
                                f"{outcome.rerun_s:.2f} s"
                            )
                            outcomes.append(outcome)
            for what, values in (
                ("kill -9 -> adoption", [o_.adopt_s for o_ in outcomes]),
                ("kill -9 -> first re-run child", [o_.rerun_s for o_ in outcomes]),
            ):
                p50, p99 = common.percentile(values, 50), common.percentile(values, 99)
                rows.append(
                    [
                        key,
                        what,
                        common.fmt_ms(p50),
                        common.fmt_ms(p99),
                        f"{p50 / lease_s:.2f}",
                        f"{p99 / lease_s:.2f}",
                    ]
                )
    notes.append(
        f"lease {lease_s:g}s (heartbeat every {lease_s / 3:.2f}s); {runs} runs per database; "
        f"one step of {CHILDREN} children x 500 ms, 8 at a time, killed after {KILL_AFTER}"
    )
    notes.append(common.machine_note())
    common.print_table(
        "failover: time from kill -9 of the owner",
        ["database", "to", "p50 ms", "p99 ms", "p50/lease", "p99/lease"],
        rows,
        notes,
        left=2,
    )


def main() -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--lease", type=float, default=LEASE_S, help=f"orchestrator --lease, seconds ({LEASE_S:g})"
    )
    args = parser.parse_args()
    if args.timeout is None:
        args.timeout = 900.0
    return common.run_main(run, args)


if __name__ == "__main__":
    sys.exit(main())
