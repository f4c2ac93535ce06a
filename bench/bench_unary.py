"""Unary write throughput on one hot manager: UpdateStepStatInManager and
UpdateJobMetadata calls/s and p50/p99 latency at 1, 16 and 64 calls in flight, on SQLite and
PostgreSQL, each beside a no-op (grpc.health.v1 Health/Check on the same server) measured in
the same run. Median of three runs.

The server is a ``monitor-svc serve`` subprocess; this process is the load client (grpc.aio,
one channel, N coroutines each keeping one call in flight). Every measured write really
changes the document, so each one is a committed read-modify-write:

* UpdateStepStatInManager moves step_stats entries forward, pending -> running -> spawned ->
  completed. A hot manager has ``--steps`` entries (at least twice the calls in flight, so no
  two calls in flight touch one entry); when its entries are all completed the calls move on
  to the next prepared manager. A step's next status is sent only after its previous one
  returned, so no call is refused as a backwards move.
* UpdateJobMetadata sets one key per client coroutine to a new value on every call, on a
  manager carrying the same ``--steps``-entry step_stats document, and again on a manager
  with a ``--small-steps``-entry document (a typical job): it returns the whole job, so its
  cost grows with the document.

    .venv/bin/python bench/bench_unary.py            # full: 3 runs, both databases
    .venv/bin/python bench/bench_unary.py --quick    # smoke: small sizes, one run
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import common
from google.protobuf import json_format, struct_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc

IN_FLIGHT = (1, 16, 64)
NOOP = "no-op Health/Check"
STEP_STAT = "UpdateStepStatInManager"
METADATA = "UpdateJobMetadata"
# Targets, at 64 calls in flight: a write's rate as a share of the no-op's, by database and
# row (UpdateJobMetadata answers the whole job, so its target depends on the document).
TARGET_SHARE = {
    ("sqlite", "stepstat"): 0.65,
    ("sqlite", "metadata"): 0.40,
    ("sqlite", "metadata-small"): 0.60,
    ("postgres", "stepstat"): 0.50,
    ("postgres", "metadata"): 0.25,
    ("postgres", "metadata-small"): 0.25,
}
TARGET_IN_FLIGHT = 64
FORWARD = (job_pb2.JOB_STATUS_RUNNING, job_pb2.JOB_STATUS_SPAWNED, job_pb2.JOB_STATUS_COMPLETED)
SETUP_CONCURRENCY = 16


@dataclass(frozen=True)
class Sizes:
    calls: dict[int, int]  # measured calls per point, by calls in flight
    warmup: int

    def calls_at(self, in_flight: int) -> int:
        nearest = min(self.calls, key=lambda n: abs(n - in_flight))
        return self.calls[nearest]


FULL = Sizes(calls={1: 1500, 16: 6000, 64: 8000}, warmup=300)
QUICK = Sizes(calls={1: 200, 16: 800, 64: 1200}, warmup=64)


@dataclass
class Point:
    rate: float
    p50: float
    p99: float
    errors: int
    first_error: str = ""
    server_cpu: float = math.nan
    client_cpu: float = math.nan
    db_cpu: float = math.nan  # PostgreSQL backends (SQLite runs inside the server)


@dataclass
class HotManager:
    manager_id: str
    step_ids: list[str]
    done: dict[tuple[str, int], asyncio.Event] = field(default_factory=dict)


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(value)
    return s


# -- setup ---------------------------------------------------------------------------------
async def bounded_gather(n: int, jobs: list[Callable[[], Awaitable[Any]]]) -> list[Any]:
    gate = asyncio.Semaphore(n)

    async def one(job: Callable[[], Awaitable[Any]]) -> Any:
        async with gate:
            return await job()

    return await asyncio.gather(*(one(j) for j in jobs))


async def make_manager(stub: m_grpc.MonitorServiceStub, steps: int) -> HotManager:
    """A manager with ``steps`` steps and their step_stats entries, as the orchestrator writes
    them (all pending, the first one current)."""
    manager = (
        await stub.CreateJob(
            m.CreateJobRequest(kind=job_pb2.JOB_KIND_MANAGER, name="bench-unary"),
            timeout=common.CALL_TIMEOUT_S,
        )
    ).job

    async def create_step(index: int) -> job_pb2.Job:
        resp = await stub.CreateJob(
            m.CreateJobRequest(
                kind=job_pb2.JOB_KIND_STEP,
                parent_id=manager.id,
                name=f"step-{index}",
                type="simulate",
                metadata=struct({"step_index": index}),
            ),
            timeout=common.CALL_TIMEOUT_S,
        )
        return resp.job

    step_jobs = [await create_step(i) for i in range(steps)]
    entries = [
        {
            "step_index": i,
            "step_id": s.id,
            "step_name": s.name,
            "step_type": s.type,
            "child_count": 0,
            "document_count": 0,
            "status": "pending",
            "error": "",
        }
        for i, s in enumerate(step_jobs)
    ]
    await stub.UpdateJobMetadata(
        m.UpdateJobMetadataRequest(
            job_id=manager.id,
            metadata=struct(
                {
                    "step_stats": entries,
                    "current_step": 1,
                    "current_step_id": step_jobs[0].id,
                    "current_step_name": step_jobs[0].name,
                    "current_step_type": step_jobs[0].type,
                    "current_step_status": "pending",
                    "total_steps": steps,
                    "completed_steps": 0,
                }
            ),
        ),
        timeout=common.CALL_TIMEOUT_S,
    )
    return HotManager(manager.id, [s.id for s in step_jobs])


async def make_managers(
    stub: m_grpc.MonitorServiceStub, count: int, steps: int
) -> list[HotManager]:
    return await bounded_gather(
        SETUP_CONCURRENCY, [lambda: make_manager(stub, steps) for _ in range(count)]
    )


async def document_bytes(stub: m_grpc.MonitorServiceStub, manager_id: str) -> int:
    job = (await stub.GetJob(m.GetJobRequest(job_id=manager_id))).job
    return len(json.dumps(json_format.MessageToDict(job.metadata), separators=(",", ":")))


# -- load ----------------------------------------------------------------------------------
Call = Callable[[int], Awaitable[Any]]  # worker index -> one RPC


async def drive(
    in_flight: int, total: int, call: Call, groups: dict[str, Any] | None = None
) -> Point:
    """``in_flight`` coroutines share ``total`` calls; each keeps one call in flight."""
    latencies: list[float] = []
    errors: list[str] = []
    remaining = itertools.count()

    async def worker(w: int) -> None:
        while next(remaining) < total:
            started = time.perf_counter()
            try:
                await call(w)
            except aio.AioRpcError as exc:
                errors.append(f"{exc.code().name}: {exc.details()}")
                continue
            latencies.append(time.perf_counter() - started)

    with common.CpuMeter(groups or {}) as cpu:
        started = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(in_flight)))
        elapsed = time.perf_counter() - started
    return Point(
        rate=len(latencies) / elapsed if elapsed > 0 else math.nan,
        p50=common.percentile(latencies, 50),
        p99=common.percentile(latencies, 99),
        errors=len(errors),
        first_error=errors[0] if errors else "",
        server_cpu=cpu.shares.get("server", math.nan),
        client_cpu=cpu.shares["client"],
        db_cpu=cpu.shares.get("db", math.nan),
    )


def step_stat_calls(
    stub: m_grpc.MonitorServiceStub, managers: list[HotManager]
) -> tuple[Call, int]:
    """Calls that move each entry of each manager forward, manager after manager."""

    def tasks() -> Iterator[tuple[HotManager, str, int]]:
        for hot in managers:
            for phase in range(len(FORWARD)):
                for step_id in hot.step_ids:
                    yield hot, step_id, phase

    source = tasks()
    for hot in managers:
        for step_id in hot.step_ids:
            for phase in range(len(FORWARD)):
                hot.done[(step_id, phase)] = asyncio.Event()

    async def call(_w: int) -> Any:
        hot, step_id, phase = next(source)
        if phase:
            await hot.done[(step_id, phase - 1)].wait()  # the entry's previous move returned
        try:
            return await stub.UpdateStepStatInManager(
                m.UpdateStepStatInManagerRequest(
                    manager_id=hot.manager_id, step_id=step_id, status=FORWARD[phase]
                ),
                timeout=common.CALL_TIMEOUT_S,
            )
        finally:
            hot.done[(step_id, phase)].set()

    return call, sum(len(h.step_ids) * len(FORWARD) for h in managers)


def metadata_calls(stub: m_grpc.MonitorServiceStub, manager_id: str) -> Call:
    counter = itertools.count(1)

    async def call(w: int) -> Any:
        patch = struct({f"bench_key_{w}": next(counter)})
        return await stub.UpdateJobMetadata(
            m.UpdateJobMetadataRequest(job_id=manager_id, metadata=patch),
            timeout=common.CALL_TIMEOUT_S,
        )

    return call


def noop_calls(channel: aio.Channel) -> Call:
    health_stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest()

    async def call(_w: int) -> Any:
        return await health_stub.Check(request, timeout=common.CALL_TIMEOUT_S)

    return call


@dataclass(frozen=True)
class Variant:
    """One row of the table: an RPC on a hot manager with a document of ``steps`` entries."""

    key: str
    rpc: str
    steps: int = 0

    @property
    def label(self) -> str:
        return self.rpc if self.rpc == NOOP else f"{self.rpc}, {self.steps} steps"


async def measure(
    variant: Variant, in_flight: int, calls: int, sizes: Sizes, server: common.ServerProcess
) -> tuple[Point, dict[str, Any]]:
    """One point: warm up, then ``calls`` measured calls. Returns the point and facts for
    the notes (document size, version check)."""
    facts: dict[str, Any] = {}
    steps = variant.steps
    async with aio.insecure_channel(server.address, options=common.CHANNEL_OPTIONS) as channel:
        stub = m_grpc.MonitorServiceStub(channel)
        if variant.rpc == NOOP:
            call = noop_calls(channel)
            await drive(in_flight, sizes.warmup, call)
            common.analyze(server)
            return await drive(in_flight, calls, call, common.cpu_groups(server)), facts
        if variant.rpc == STEP_STAT:
            per_manager = steps * len(FORWARD)
            warm = await make_managers(stub, math.ceil(sizes.warmup / per_manager), steps)
            hot = await make_managers(stub, math.ceil(calls / per_manager), steps)
            facts["document_bytes"] = await document_bytes(stub, hot[0].manager_id)
            warm_call, warm_total = step_stat_calls(stub, warm)
            await drive(in_flight, warm_total, warm_call)
            call, total = step_stat_calls(stub, hot)
            common.analyze(server)
            groups = common.cpu_groups(server)
            return await drive(in_flight, min(calls, total), call, groups), facts
        hot_manager = (await make_managers(stub, 1, steps))[0]
        facts["document_bytes"] = await document_bytes(stub, hot_manager.manager_id)
        before = (await stub.GetJob(m.GetJobRequest(job_id=hot_manager.manager_id))).job.version
        call = metadata_calls(stub, hot_manager.manager_id)
        warm = await drive(in_flight, sizes.warmup, call)
        common.analyze(server)
        point = await drive(in_flight, calls, call, common.cpu_groups(server))
        after = (await stub.GetJob(m.GetJobRequest(job_id=hot_manager.manager_id))).job.version
        ok_calls = sizes.warmup - warm.errors + calls - point.errors
        facts["version_ok"] = after - before == ok_calls
        return point, facts


# -- report --------------------------------------------------------------------------------
def summarise(points: list[Point]) -> Point:
    errors = sum(p.errors for p in points)
    return Point(
        rate=common.median([p.rate for p in points]),
        p50=common.median([p.p50 for p in points]),
        p99=common.median([p.p99 for p in points]),
        errors=errors,
        first_error=next((p.first_error for p in points if p.first_error), ""),
        server_cpu=common.median([p.server_cpu for p in points]),
        client_cpu=common.median([p.client_cpu for p in points]),
        db_cpu=common.median([p.db_cpu for p in points]),
    )


def report(
    results: dict[tuple[str, str, int], list[Point]],
    databases: list[str],
    in_flights: list[int],
    variants: list[Variant],
    runs: int,
    facts: dict[str, Any],
    notes: list[str],
) -> None:
    rows = []
    for db in databases:
        for in_flight in in_flights:
            noop = summarise(results[(db, "noop", in_flight)])
            for variant in variants:
                point = summarise(results[(db, variant.key, in_flight)])
                share = point.rate / noop.rate if noop.rate else math.nan
                target, result = "", ""
                wanted = TARGET_SHARE.get((db, variant.key))
                if wanted is not None and in_flight == TARGET_IN_FLIGHT:
                    target = f">= {wanted:.0%}"
                    result = common.verdict(share >= wanted)
                size = facts["document_bytes"].get(variant.key)
                rows.append(
                    [
                        db,
                        str(in_flight),
                        variant.label,
                        "" if size is None else f"{size / 1024:.1f} KB",
                        common.fmt_rate(point.rate),
                        common.fmt_ms(point.p50),
                        common.fmt_ms(point.p99),
                        "-" if variant.rpc == NOOP else common.fmt_ratio(share),
                        common.fmt_cpu(point.server_cpu),
                        common.fmt_cpu(point.db_cpu),
                        common.fmt_cpu(point.client_cpu),
                        str(point.errors),
                        target,
                        result,
                    ]
                )
    headers = [
        "database",
        "in flight",
        "RPC on one hot manager",
        "document",
        "calls/s",
        "p50 ms",
        "p99 ms",
        "vs no-op",
        "server CPU",
        "db CPU",
        "client CPU",
        "errors",
        "target",
        "result",
    ]
    all_notes = [
        f"median of {runs} run(s); each no-op (grpc.health.v1 Health/Check) measured on the "
        "same server in the same run; client: this process (grpc.aio, one channel), server: a "
        "monitor-svc subprocess",
        "server / db / client CPU: CPU time of the monitor process / of its PostgreSQL "
        "backends / of this client over the measured window, as a share of one core "
        f"({os.cpu_count()} cores here)",
        "document: the hot manager's metadata as JSON (N step_stats entries); every write "
        "changes it and commits before it returns (durable)",
        "targets (at 64 in flight), share of the no-op rate: SQLite UpdateStepStatInManager "
        ">= 65%, UpdateJobMetadata >= 60% (10 steps) / >= 40% (128 steps); PostgreSQL "
        "UpdateStepStatInManager >= 50%, UpdateJobMetadata >= 25%",
        "reference (quiet machine): no-op Check ~4,200/s at 64 in flight; a bare "
        "read-modify-write RPC with SQLAlchemy Core ~2,100/s on SQLite, ~1,050/s on PostgreSQL",
    ]
    version = facts["version_ok"]
    if version:
        bad = [k for k, ok in version.items() if not ok]
        all_notes.append(
            "UpdateJobMetadata: the version rose by exactly the number of calls: "
            + ("yes, on every hot manager" if not bad else f"NO in {', '.join(bad)}")
        )
    for (db, key, in_flight), points in results.items():
        for p in points:
            if p.first_error:
                all_notes.append(f"{db} {key} @{in_flight}: first error: {p.first_error}")
                break
    all_notes += notes
    all_notes.append(common.machine_note())
    common.print_table("Unary writes on one hot manager", headers, rows, all_notes, left=3)


# -- main ----------------------------------------------------------------------------------
async def run(args: argparse.Namespace) -> None:
    sizes = QUICK if args.quick else FULL
    runs = common.runs_for(args)
    in_flights = [int(n) for n in args.in_flight.split(",")]
    steps = max(args.steps, 2 * max(in_flights))
    catalogue = {
        "noop": Variant("noop", NOOP),
        "stepstat": Variant("stepstat", STEP_STAT, steps),
        "metadata": Variant("metadata", METADATA, steps),
        "metadata-small": Variant("metadata-small", METADATA, args.small_steps),
    }
    keys = [k.strip() for k in args.rpc.split(",")]
    unknown = [k for k in keys if k not in catalogue]
    if unknown:
        raise SystemExit(f"--rpc: unknown {unknown}; choose from {sorted(catalogue)}")
    if "noop" not in keys:
        keys.insert(0, "noop")  # every figure is reported beside its no-op
    variants = [catalogue[k] for k in keys]
    databases, notes = common.available_databases(args)
    results: dict[tuple[str, str, int], list[Point]] = {}
    facts: dict[str, Any] = {"document_bytes": {}, "version_ok": {}}
    with common.workdir(args, "bench-unary") as work:
        for db in databases:
            with common.throwaway_database(db, args.postgres_url, work) as url:
                async with common.running(common.monitor_process(url, work)) as server:
                    for run_no in range(1, runs + 1):
                        for in_flight in in_flights:
                            for variant in variants:
                                common.progress(
                                    f"{db} run {run_no}/{runs}: {variant.label} @ "
                                    f"{in_flight} in flight"
                                )
                                point, found = await measure(
                                    variant,
                                    in_flight,
                                    args.calls or sizes.calls_at(in_flight),
                                    sizes,
                                    server,
                                )
                                results.setdefault((db, variant.key, in_flight), []).append(point)
                                if "document_bytes" in found:
                                    facts["document_bytes"][variant.key] = found["document_bytes"]
                                if "version_ok" in found:
                                    name = f"{db}/{variant.key}@{in_flight}#{run_no}"
                                    facts["version_ok"][name] = found["version_ok"]
    report(results, databases, in_flights, variants, runs, facts, notes)


def main() -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--steps",
        type=int,
        default=128,
        help="step_stats entries on a hot manager (at least 2 x 64; default 128)",
    )
    parser.add_argument(
        "--rpc",
        default="noop,stepstat,metadata,metadata-small",
        help="rows to measure: noop, stepstat, metadata (on a --steps document), "
        "metadata-small (on a --small-steps document); default: all",
    )
    parser.add_argument(
        "--small-steps",
        type=int,
        default=10,
        help="step_stats entries of the small document (default 10, a typical job)",
    )
    parser.add_argument(
        "--in-flight",
        default=",".join(str(n) for n in IN_FLIGHT),
        help="calls in flight to measure at (default: 1,16,64)",
    )
    parser.add_argument("--calls", type=int, default=0, help="measured calls per point")
    args = parser.parse_args()
    if args.timeout is None:
        args.timeout = 600.0 if args.quick else 1800.0
    return common.run_main(run, args)


if __name__ == "__main__":
    sys.exit(main())
