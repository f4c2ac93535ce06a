"""Children on many machines: one step of no-op ``simulate`` children run ``local`` (in the
orchestrator) and ``celery`` (through RabbitMQ by two ``orchestrator-svc runner`` processes of
8 slots each), on SQLite, in the same run. Wall time runs from SubmitJob until WatchJob shows
the manager terminal; children/s = children / wall time. Afterwards GetJob must show every
child completed, and on the celery row every child must name one of the two runners. CPU per
process over the wall time says what bounds it.

    .venv/bin/python bench/bench_remote.py            # 20,000 children, 3 runs
    .venv/bin/python bench/bench_remote.py --quick    # 3,000 children, one run

Needs RabbitMQ (``--broker-url``, default amqp://guest:guest@127.0.0.1:5672//).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import common
from google.protobuf import struct_pb2
from grpc import aio

from stepflow_common.proto_status import TERMINAL_PB as TERMINAL
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from stepflow_proto.v1 import orchestrator_service_pb2 as o
from stepflow_proto.v1 import orchestrator_service_pb2_grpc as o_grpc

CHILDREN = 20_000
QUICK_CHILDREN = 3_000
RUNNERS = 2
SLOTS = 8
# A celery step's concurrency is the children in flight; above 256 they travel several to a
# message (orchestrator_svc/remote/parcel.py): 4,096 in flight, 16 to a message.
REMOTE_CONCURRENCY = 4096
TARGET_REMOTE = 2_000
JOB_TIMEOUT_S = 600.0
DEFAULT_BROKER = "amqp://guest:guest@127.0.0.1:5672//"


@dataclass
class Outcome:
    wall_s: float
    children: int
    exact: bool
    runners: int
    cpu: dict[str, float]

    @property
    def rate(self) -> float:
        return self.children / self.wall_s if self.wall_s > 0 else math.nan


# The same through one message per child (256 in flight: below the parcel threshold).
SINGLE_CONCURRENCY = 256
ROWS = {
    "local": ("local", 16),
    "celery": ("celery", REMOTE_CONCURRENCY),
    "celery, 1 per message": ("celery", SINGLE_CONCURRENCY),
}


def definition(children: int, row: str) -> o.JobDefinition:
    executor, concurrency = ROWS[row]
    config = struct_pb2.Struct()
    config.update({"children": children, "duration_ms": 0, "concurrency": concurrency})
    step = o.StepDefinition(name="noop", type="simulate", config=config)
    step.executor = o.EXECUTOR_CELERY if executor == "celery" else o.EXECUTOR_LOCAL
    return o.JobDefinition(name=f"bench-remote-{executor}-{concurrency}", steps=[step])


def runner_process(
    broker: str, queue: str, monitor: str, work: Path, name: str
) -> subprocess.Popen[bytes]:
    log = (work / f"{name}.log").open("ab")
    return subprocess.Popen(
        [
            str(common.ORCHESTRATOR_SVC),
            "runner",
            "--broker-url",
            broker,
            "--queue",
            queue,
            "--monitor",
            monitor,
            "--concurrency",
            str(SLOTS),
            "--name",
            name,
            "--log-format",
            "json",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


async def wait_ready(work: Path, names: list[str], within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while not all(" ready." in (work / f"{n}.log").read_text(errors="replace") for n in names):
        if time.monotonic() > deadline:
            raise RuntimeError("runners did not start:\n" + (work / f"{names[0]}.log").read_text())
        await asyncio.sleep(0.1)


async def run_job(
    orchestrator: common.ServerProcess,
    monitor: common.ServerProcess,
    children: int,
    executor: str,
    runner_pids: list[int],
) -> Outcome:
    async with (
        aio.insecure_channel(orchestrator.address) as o_channel,
        aio.insecure_channel(monitor.address, options=common.CHANNEL_OPTIONS) as m_channel,
    ):
        ostub = o_grpc.OrchestratorServiceStub(o_channel)
        mstub = m_grpc.MonitorServiceStub(m_channel)
        request = o.SubmitJobRequest(definition=definition(children, executor))
        groups: dict[str, common.PidSource] = {
            "monitor": monitor.pid,
            "orchestrator": orchestrator.pid,
            "runners": runner_pids,
            "rabbitmq": rabbit_pids,
        }
        meter = common.CpuMeter(groups)
        with meter:
            started = time.perf_counter()
            manager_id = (await ostub.SubmitJob(request, timeout=60)).manager_id
            async for msg in mstub.WatchJob(
                m.WatchJobRequest(job_id=manager_id), timeout=JOB_TIMEOUT_S
            ):
                if msg.job.status in TERMINAL:
                    break
            wall = time.perf_counter() - started
        job = (await mstub.GetJob(m.GetJobRequest(job_id=manager_id))).job
        stat = job.step_stats[0]
        exact = (
            job.status == job_pb2.JOB_STATUS_COMPLETED
            and stat.children.completed == children
            and stat.child_count == children
        )
        names: set[str] = set()
        if executor != "local":
            token = ""
            while True:
                page = await mstub.ListJobs(
                    m.ListJobsRequest(parent_id=stat.step_id, page_size=1000, page_token=token)
                )
                names.update(k.runner for k in page.jobs)
                token = page.next_page_token
                if not token:
                    break
        return Outcome(wall, children, exact, len(names - {""}), meter.shares)


def rabbit_pids() -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as comm:
                    if comm.read().strip() == "beam.smp":
                        found.append(int(entry))
            except OSError:
                continue
    return found


async def run(args: argparse.Namespace) -> None:
    runs = common.runs_for(args)
    children = args.children or (QUICK_CHILDREN if args.quick else CHILDREN)
    queue = f"stepflow.bench.{uuid.uuid4().hex[:8]}"
    results: dict[str, list[Outcome]] = {}
    with common.workdir(args, "bench-remote") as work:
        monitor = common.monitor_process(f"sqlite:///{work / 'bench.db'}", work)
        async with common.running(monitor):
            orchestrator = common.orchestrator_process(
                monitor.address, work, owner=f"bench-remote-{uuid.uuid4().hex[:6]}"
            )
            orchestrator.argv += ["--broker-url", args.broker_url, "--queue", queue]
            names = [f"bench-runner-{i}" for i in range(RUNNERS)]
            runners = [
                runner_process(args.broker_url, queue, monitor.address, work, n) for n in names
            ]
            try:
                async with common.running(orchestrator):
                    await wait_ready(work, names)
                    for executor in ROWS:
                        for run_no in range(1, runs + 1):
                            common.progress(f"{executor} run {run_no}/{runs}: {children:,}")
                            outcome = await run_job(
                                orchestrator, monitor, children, executor, [r.pid for r in runners]
                            )
                            common.progress(f"  {outcome.rate:,.0f} children/s")
                            results.setdefault(executor, []).append(outcome)
            finally:
                for runner in runners:
                    runner.terminate()
                for runner in runners:
                    try:
                        runner.wait(15)
                    except subprocess.TimeoutExpired:
                        runner.kill()
                delete_queue(args.broker_url, queue)
    report(results, runs, children)


def delete_queue(url: str, queue: str) -> None:
    from kombu import Connection

    try:
        with Connection(url) as connection:
            channel = connection.default_channel
            for name in (queue, f"{queue}.dead"):
                channel.queue_delete(name)
                channel.exchange_delete(name)
    except Exception as exc:
        common.progress(f"could not delete the bench's queues: {exc}")


def report(results: dict[str, list[Outcome]], runs: int, children: int) -> None:
    local = common.median([o.rate for o in results.get("local", [])])
    rows = []
    for executor in ROWS:
        outcomes = results.get(executor, [])
        if not outcomes:
            continue
        rate = common.median([o.rate for o in outcomes])

        def share(name: str, outs: list[Outcome] = outcomes) -> str:
            return common.fmt_cpu(common.median([o.cpu.get(name, math.nan) for o in outs]))

        celery = executor != "local"
        rows.append(
            [
                executor,
                f"{children:,}",
                f"{RUNNERS} x {SLOTS}" if celery else "-",
                f"{common.median([o.wall_s for o in outcomes]):.2f}",
                common.fmt_rate(rate),
                common.fmt_ratio(rate / local) if celery else "-",
                share("monitor"),
                share("orchestrator"),
                share("runners") if celery else "-",
                share("rabbitmq") if celery else "-",
                "yes" if all(o.exact for o in outcomes) else "NO",
                str(min(o.runners for o in outcomes)) if celery else "-",
                f">= {TARGET_REMOTE:,}/s" if executor == "celery" else "",
                common.verdict(rate >= TARGET_REMOTE) if executor == "celery" else "",
            ]
        )
    headers = [
        "executor",
        "children",
        "runners x slots",
        "wall s",
        "children/s",
        "vs local",
        "monitor CPU",
        "orch. CPU",
        "runners CPU",
        "RabbitMQ CPU",
        "all exact",
        "runners used",
        "target",
        "result",
    ]
    notes = [
        f"median of {runs} run(s); one step of simulate children of 0 ms on SQLite; wall = "
        "SubmitJob -> WatchJob shows the manager terminal",
        f"celery: concurrency {REMOTE_CONCURRENCY:,} children in flight, 16 to a message; each "
        "runner claims a message's children in one commit, runs them, reports their ends, and "
        "acknowledges the message after they are committed; 1 per message: concurrency "
        f"{SINGLE_CONCURRENCY} (each child its own message, claim and commit)",
        "CPU: share of one core over the wall time "
        f"({os.cpu_count()} cores here, shared by every process of the row): the sum is what "
        "bounds the rate",
        common.machine_note(),
    ]
    common.print_table("Children on many machines: local vs runners", headers, rows, notes)


def main() -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--children",
        type=int,
        default=0,
        help=f"children of the step (default {CHILDREN:,}; {QUICK_CHILDREN:,} with --quick)",
    )
    parser.add_argument(
        "--broker-url",
        default=os.environ.get("STEPFLOW_TEST_BROKER_URL", DEFAULT_BROKER),
        help=f"RabbitMQ [env: STEPFLOW_TEST_BROKER_URL; default {DEFAULT_BROKER}]",
    )
    args = parser.parse_args()
    if args.timeout is None:
        args.timeout = 600.0 if args.quick else 1800.0
    missing = broker_missing(args.broker_url)
    if missing:
        print(f"\nChildren on many machines: skipped, no RabbitMQ at {args.broker_url} ({missing})")
        return 0
    return common.run_main(run, args)


def broker_missing(url: str) -> str:
    """Why the broker cannot be used ('' when it can)."""
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=3) as connection:
            connection.ensure_connection(max_retries=1)
    except Exception as exc:
        return str(exc) or type(exc).__name__
    return ""


if __name__ == "__main__":
    sys.exit(main())
