"""The job log, on SQLite and PostgreSQL, each figure beside its baseline in the same run:
(a) log lines/s committed through one StreamChildEvents stream (batches of 500 keyed lines, as
the orchestrator sends them) beside child events/s through one stream; (b) child-event ingest
and step-end latency with log lines flowing beside them, against the same without; (c) a line
reaching a FollowJobLog follower, p50/p99, under 1,000 lines/s of background lines; (d) the
10 x 2,000-children job (bench_e2e) with one output line per child against the same without.

Servers are subprocesses; this process is the client. Every stored line is checked afterwards
(the log's last seq is exactly the lines sent).

    .venv/bin/python bench/bench_log.py            # full: 3 runs, both databases
    .venv/bin/python bench/bench_log.py --quick    # smoke: small sizes, one run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import bench_e2e
import bench_stream
import common
from grpc import aio

from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc

BATCH_LINES = 500
WINDOW = 16
MESSAGE = "GET /index.html 200 1532 bytes in 12 ms from 10.0.3.7 (keep-alive)"
TARGET_LINES_S = {"sqlite": 100_000, "postgres": 50_000}
TARGET_E2E_RATIO = 0.8
TARGET_FOLLOW_P99_S = 0.100
BACKGROUND_LINES_S = 1_000
BESIDE_LINES_S = 2_000  # (b): lines/s on their own stream while events are measured (a busy job)


@dataclass(frozen=True, slots=True)
class Sizes:
    lines: int
    events: int
    follow_samples: int
    latency_samples: int
    children: int


FULL = Sizes(lines=500_000, events=240_000, follow_samples=300, latency_samples=200, children=2_000)
QUICK = Sizes(lines=50_000, events=30_000, follow_samples=50, latency_samples=40, children=300)


@dataclass(slots=True)
class Figures:
    lines_s: list[float] = field(default_factory=list)
    events_s: list[float] = field(default_factory=list)
    events_beside_s: list[float] = field(default_factory=list)
    exact: bool = True
    follow: list[float] = field(default_factory=list)
    step_end: list[float] = field(default_factory=list)
    step_end_beside: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    e2e_logged: list[float] = field(default_factory=list)


def line_batches(step_ids: list[str], count: int, tag: str) -> list[m.StreamChildEventsRequest]:
    keys = itertools.count(1)
    requests = []
    for batch_id in range(1, count // BATCH_LINES + 1):
        lines = [
            job_pb2.JobLogEntry(
                key=f"{tag}-{(n := next(keys))}",
                step_id=step_ids[n % len(step_ids)],
                child_id=f"{step_ids[n % len(step_ids)]}.{n}",
                source="stdout",
                message=MESSAGE,
            )
            for _ in range(BATCH_LINES)
        ]
        requests.append(m.StreamChildEventsRequest(batch_id=batch_id, log_lines=lines))
    return requests


async def lines_throughput(server: common.ServerProcess, count: int) -> tuple[float, bool]:
    """Lines/s through one stream, and whether the log holds exactly what was sent."""
    async with aio.insecure_channel(server.address, options=common.CHANNEL_OPTIONS) as channel:
        stub = m_grpc.MonitorServiceStub(channel)
        manager_id, step_ids = await bench_stream.make_manager(stub, 10, name="bench-log")
        requests = line_batches(step_ids, count, uuid.uuid4().hex[:8])
        before = await last_seq(stub, manager_id)
        common.analyze(server)
        started, _acks, rejected = await bench_stream.pump(stub, requests, WINDOW)
        finished = time.perf_counter()
        sent = sum(len(r.log_lines) for r in requests)
        exact = rejected == 0 and await last_seq(stub, manager_id) - before == sent
        return sent / (finished - started), exact


async def last_seq(stub: m_grpc.MonitorServiceStub, manager_id: str) -> int:
    page = await stub.ReadJobLog(m.ReadJobLogRequest(job_id=manager_id, limit=1, after_seq=0))
    after = page.next_seq
    while True:  # the head: skip to the end page by page
        page = await stub.ReadJobLog(
            m.ReadJobLogRequest(job_id=manager_id, after_seq=after, limit=1000)
        )
        if page.next_seq == after:
            return after
        after = page.next_seq


async def background_lines(
    stub: m_grpc.MonitorServiceStub, step_ids: list[str], rate: int, stop: asyncio.Event
) -> None:
    """About ``rate`` lines/s on a stream of their own until ``stop``."""
    tick = 0.01
    per_tick = max(1, round(rate * tick))
    tag = uuid.uuid4().hex[:8]
    keys = itertools.count(1)

    async def source() -> AsyncIterator[m.StreamChildEventsRequest]:
        next_at = time.perf_counter()
        for batch_id in itertools.count(1):
            if stop.is_set():
                return
            lines = [
                job_pb2.JobLogEntry(
                    key=f"{tag}-{next(keys)}",
                    step_id=step_ids[0],
                    source="stdout",
                    message=MESSAGE,
                )
                for _ in range(per_tick)
            ]
            yield m.StreamChildEventsRequest(batch_id=batch_id, log_lines=lines)
            next_at += tick
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))

    call = stub.StreamChildEvents(source(), timeout=3600)
    with contextlib.suppress(aio.AioRpcError, asyncio.CancelledError):
        async for _ack in call:
            pass


async def follow_latency(server: common.ServerProcess, samples: int) -> list[float]:
    """From sending one line to a follower holding it, under BACKGROUND_LINES_S lines/s."""
    async with (
        aio.insecure_channel(server.address, options=common.CHANNEL_OPTIONS) as channel,
        aio.insecure_channel(server.address, options=common.CHANNEL_OPTIONS) as bg_channel,
    ):
        stub = m_grpc.MonitorServiceStub(channel)
        manager_id, step_ids = await bench_stream.make_manager(stub, 2, name="bench-follow")
        stop = asyncio.Event()
        background = asyncio.create_task(
            background_lines(
                m_grpc.MonitorServiceStub(bg_channel), step_ids, BACKGROUND_LINES_S, stop
            )
        )
        arrived: dict[str, float] = {}
        seen = asyncio.Event()

        async def follower() -> None:
            async for resp in stub.FollowJobLog(m.FollowJobLogRequest(job_id=manager_id)):
                for line in resp.lines:
                    if line.message.startswith("probe "):
                        arrived[line.message] = time.perf_counter()
                        seen.set()

        following = asyncio.create_task(follower())
        await asyncio.sleep(0.5)
        probe_stream = stub.StreamChildEvents(timeout=3600)
        out: list[float] = []
        try:
            for n in range(samples):
                name = f"probe {n}"
                seen.clear()
                sent = time.perf_counter()
                await probe_stream.write(
                    m.StreamChildEventsRequest(
                        batch_id=n + 1,
                        log_lines=[
                            job_pb2.JobLogEntry(key=f"p-{n}", step_id=step_ids[1], message=name)
                        ],
                    )
                )
                while name not in arrived:
                    await asyncio.wait_for(seen.wait(), 10)
                    seen.clear()
                out.append(arrived[name] - sent)
                await probe_stream.read()
                await asyncio.sleep(0.02)
        finally:
            probe_stream.cancel()
            stop.set()
            following.cancel()
            await asyncio.gather(background, following, return_exceptions=True)
        return out


async def beside_lines(server: common.ServerProcess, coro_factory):  # type: ignore[no-untyped-def]
    """Run ``coro_factory()`` while BESIDE_LINES_S lines/s flow on another stream."""
    async with aio.insecure_channel(server.address, options=common.CHANNEL_OPTIONS) as channel:
        stub = m_grpc.MonitorServiceStub(channel)
        _manager, step_ids = await bench_stream.make_manager(stub, 1, name="bench-beside")
        stop = asyncio.Event()
        background = asyncio.create_task(background_lines(stub, step_ids, BESIDE_LINES_S, stop))
        await asyncio.sleep(0.3)
        try:
            return await coro_factory()
        finally:
            stop.set()
            await asyncio.gather(background, return_exceptions=True)


async def measure(args: argparse.Namespace, db: str, work, sizes: Sizes, runs: int) -> Figures:  # type: ignore[no-untyped-def]
    figures = Figures()
    parts = {p.strip() for p in args.part.split(",")}
    with common.throwaway_database(db, args.postgres_url, work) as url:
        async with common.running(common.monitor_process(url, work)) as server:
            for run_no in range(1, runs + 1):
                if "lines" not in parts:
                    break
                common.progress(f"{db} run {run_no}/{runs}: lines, events, beside")
                rate, exact = await lines_throughput(server, sizes.lines)
                figures.lines_s.append(rate)
                figures.exact = figures.exact and exact
                point = await bench_stream.throughput(
                    server, 1, sizes.events, bench_stream.BATCH_MAX_EVENTS, WINDOW, real=True
                )
                figures.events_s.append(point.events_s)
                beside = await beside_lines(
                    server,
                    lambda: bench_stream.throughput(
                        server, 1, sizes.events, bench_stream.BATCH_MAX_EVENTS, WINDOW, real=True
                    ),
                )
                figures.events_beside_s.append(beside.events_s)
                common.progress(
                    f"  {rate:,.0f} lines/s; events {point.events_s:,.0f}/s alone, "
                    f"{beside.events_s:,.0f}/s beside lines"
                )
            if "follow" in parts:
                common.progress(f"{db}: follow latency, {sizes.follow_samples} samples")
                figures.follow = await follow_latency(server, sizes.follow_samples)
            if "latency" in parts:
                common.progress(f"{db}: step-end latency alone and beside lines")
                alone = await bench_stream.latency(server, sizes.latency_samples, real=True)
                beside_latency = await beside_lines(
                    server, lambda: bench_stream.latency(server, sizes.latency_samples, real=True)
                )
                figures.step_end = alone.get
                figures.step_end_beside = beside_latency.get
        if "e2e" not in parts:
            return figures
        async with common.running(common.monitor_process(url, work)) as monitor:
            owner = f"bench-log-{uuid.uuid4().hex[:8]}"
            orchestrator = common.orchestrator_process(monitor.address, work, owner=owner)
            async with common.running(orchestrator):
                for run_no in range(1, runs + 1):
                    for lines, into in ((0, figures.e2e), (1, figures.e2e_logged)):
                        common.progress(
                            f"{db} e2e run {run_no}/{runs}: 10 x {sizes.children}, "
                            f"{lines} line(s) per child"
                        )
                        outcome = await bench_e2e.run_job(
                            orchestrator, monitor, 10, sizes.children, real=True, log_lines=lines
                        )
                        figures.exact = figures.exact and bool(outcome.exact)
                        into.append(outcome.children_s)
    return figures


def report(results: dict[str, Figures], runs: int, notes: list[str]) -> None:
    med, rate, ms, ratio = common.median, common.fmt_rate, common.fmt_ms, common.fmt_ratio
    rows = []
    for db, f in results.items():
        if not f.lines_s:
            f.lines_s, f.events_s, f.events_beside_s = [float("nan")], [1.0], [float("nan")]
        if not f.step_end:
            f.step_end = f.step_end_beside = [float("nan")]
        if not f.follow:
            f.follow = [float("nan")]
        if not f.e2e:
            f.e2e, f.e2e_logged = [1.0], [float("nan")]
        lines_s, events_s = med(f.lines_s), med(f.events_s)
        rows.append(
            [f"{db}: lines/s, one stream", rate(lines_s), rate(events_s) + " events/s",
             ratio(lines_s / events_s), common.verdict(lines_s >= TARGET_LINES_S[db])]
        )  # fmt: skip
        beside = med(f.events_beside_s)
        rows.append(
            [f"{db}: events/s beside {BESIDE_LINES_S:,} lines/s", rate(beside),
             rate(events_s) + " alone", ratio(beside / events_s), ""]
        )  # fmt: skip
        p99, p99_alone = common.percentile(f.step_end_beside, 99), common.percentile(f.step_end, 99)
        rows.append(
            [f"{db}: step end p99 beside lines", ms(p99), ms(p99_alone) + " alone",
             ratio(p99_alone / p99 if p99 else float("nan")), ""]
        )  # fmt: skip
        follow99 = common.percentile(f.follow, 99)
        rows.append(
            [f"{db}: line to follower p50 / p99", f"{ms(common.percentile(f.follow, 50))} / "
             f"{ms(follow99)}", f"at {BACKGROUND_LINES_S:,} lines/s", "",
             common.verdict(follow99 < TARGET_FOLLOW_P99_S)]
        )  # fmt: skip
        logged, plain = med(f.e2e_logged), med(f.e2e)
        rows.append(
            [f"{db}: 10 x N job, 1 line/child", rate(logged) + " ch/s", rate(plain) + " ch/s",
             ratio(logged / plain), common.verdict(logged / plain >= TARGET_E2E_RATIO)]
        )  # fmt: skip
    common.print_table(
        f"job log (median of {runs} run(s))",
        ["figure", "with the log", "baseline (same run)", "ratio", "target"],
        rows,
        [
            *notes,
            f"lines: batches of {BATCH_LINES} keyed stdout lines of {len(MESSAGE)} characters, "
            f"{WINDOW} batches in flight; events: bench_stream's, 500 per message",
            "targets: >= 100,000 lines/s (SQLite), >= 50,000 (PostgreSQL); follower p99 < 100 ms; "
            "the job with one line per child >= 0.8x its children/s without; events and step "
            "ends beside lines not lower than alone (ratio ~1)",
            "every line checked: the log's last seq is exactly the lines sent, and every job "
            f"exact: {all(f.exact for f in results.values())}",
        ],
    )


async def run(args: argparse.Namespace) -> None:
    sizes = QUICK if args.quick else FULL
    runs = common.runs_for(args)
    databases, notes = common.available_databases(args)
    results: dict[str, Figures] = {}
    with common.workdir(args, "bench-log") as work:
        for db in databases:
            results[db] = await measure(args, db, work, sizes, runs)
    notes.append(common.machine_note())
    report(results, runs, notes)


def main() -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--part",
        default="lines,follow,latency,e2e",
        help="which parts to run: lines, follow, latency, e2e (default: all)",
    )
    args = parser.parse_args()
    if args.timeout is None:
        args.timeout = 900.0 if args.quick else 3600.0
    return common.run_main(run, args)


if __name__ == "__main__":
    sys.exit(main())
