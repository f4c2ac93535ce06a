"""Cost per call and per event as the database grows: UpdateStepStatInManager,
UpdateJobMetadata and the child-event stream measured on a database already holding 10^4,
10^5 and 10^6 child rows (finished jobs), each beside the same figure at 10^4.

Every size gets a fresh database, filled directly (bulk INSERT through SQLAlchemy Core on
SQLite, COPY on PostgreSQL) before the monitor opens it: the history of finished managers,
their steps (with their step_progress rows) and children, as a busy monitor accumulates it.
Then a ``monitor-svc serve`` subprocess measures, at 64 calls in flight on one hot manager,
the writes of ``bench_unary.py`` and one stream of ``bench_stream.py``. The figures should
stay flat (within 20 % of the 10^4 figure): nothing on these paths should scan what is stored.

    .venv/bin/python bench/bench_dbsize.py            # 10^4, 10^5, 10^6 rows; both databases
    .venv/bin/python bench/bench_dbsize.py --quick    # 10^4 and 10^5 only, fewer calls
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import bench_stream
import bench_unary
import common
from sqlalchemy import DateTime, create_engine, text

from monitor_svc.store.migrate import upgrade

FULL_SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (10_000, 100_000)
IN_FLIGHT = 64
STEPS_PER_MANAGER = 10
CHILDREN_PER_STEP = 100
FILL_CHUNK = 20_000
TARGET_WITHIN = 0.20  # every figure within 20 % of its 10^4 value


@dataclass(frozen=True)
class Sizes:
    calls: int  # measured calls per unary figure
    events: int  # events through the stream


FULL = Sizes(calls=3000, events=60_000)
QUICK = Sizes(calls=800, events=12_000)


# -- filling -------------------------------------------------------------------------------
Row = tuple[Any, ...]
JOB_COLUMNS = (
    "id",
    "kind",
    "parent_id",
    "manager_id",
    "name",
    "type",
    "status",
    "error",
    "end_reason",
    "metadata_json",
    "version",
    "change_seq",
    "step_index",
    "created_at",
    "started_at",
    "finished_at",
    "owner",
    "attempt",
)
PROGRESS_COLUMNS = (
    "step_id",
    "manager_id",
    "pending",
    "running",
    "completed",
    "failed",
    "cancelled",
    "sealed_count",
    "handed",
    "grace_deadline",
)


def history(children: int, stamp: Any) -> Iterator[tuple[list[Row], list[Row]]]:
    """Finished managers with their steps and children, one manager at a time: (job rows,
    step_progress rows). ``children`` child rows in all."""
    per_manager = STEPS_PER_MANAGER * CHILDREN_PER_STEP
    start = datetime.now(UTC) - timedelta(days=30)
    for m in range(math.ceil(children / per_manager)):
        at = stamp(start + timedelta(seconds=m))
        manager_id = uuid.uuid4().hex
        jobs: list[Row] = []
        progress: list[Row] = []
        entries = []
        kids_left = min(per_manager, children - m * per_manager)
        for s in range(STEPS_PER_MANAGER):
            step_id = uuid.uuid4().hex
            kids = min(CHILDREN_PER_STEP, max(0, kids_left - s * CHILDREN_PER_STEP))
            entries.append(
                f'{{"step_index":{s},"step_id":"{step_id}","step_name":"step-{s}",'
                f'"step_type":"simulate","child_count":{kids},"document_count":0,'
                f'"status":"completed","error":""}}'
            )
            jobs.append(_row(step_id, "step", manager_id, manager_id, at, step_index=s))
            progress.append((step_id, manager_id, 0, 0, kids, 0, 0, kids, False, None))
            jobs += [_row(uuid.uuid4().hex, "child", step_id, manager_id, at) for _ in range(kids)]
        document = (
            f'{{"step_stats":[{",".join(entries)}],"current_step_id":"","completed_steps":'
            f'{STEPS_PER_MANAGER},"total_steps":{STEPS_PER_MANAGER}}}'
        )
        jobs.append(_row(manager_id, "manager", None, manager_id, at, metadata=document))
        yield jobs, progress


def _row(
    job_id: str,
    kind: str,
    parent_id: str | None,
    manager_id: str,
    at: Any,
    *,
    step_index: int | None = None,
    metadata: str = "{}",
) -> Row:
    """A finished job's row, in ``JOB_COLUMNS`` order (the other columns keep their
    defaults: no deadline, no request_id, no definition)."""
    job_type = "simulate" if kind != "manager" else ""
    reason = "api" if kind == "manager" else ""
    return (
        job_id,
        kind,
        parent_id,
        manager_id,
        kind,
        job_type,
        "completed",
        "",
        reason,
        metadata,
        3,
        1,
        step_index,
        at,
        at,
        at,
        "bench-history",
        1,
    )


def fill(url: str, children: int) -> tuple[int, float]:
    """Create the schema (the migrations) and store ``children`` child rows with their
    managers and steps. Returns the rows written to ``jobs`` and the seconds it took."""
    upgrade(url)
    started = time.perf_counter()
    postgres = url.startswith("postgresql")
    engine = create_engine(url)
    written = 0
    try:
        with engine.begin() as conn:
            # Stored as the dialect stores a DateTime (SQLite: text), converted once per
            # manager rather than per row.
            column_type = DateTime(timezone=True).dialect_impl(conn.dialect)
            stamp = column_type.bind_processor(conn.dialect) or (lambda v: v)
            if not postgres:
                # A bulk load: no fsync per commit, and the indexes' pages kept in memory.
                conn.exec_driver_sql("PRAGMA synchronous=OFF")
                conn.exec_driver_sql("PRAGMA cache_size=-262144")
            jobs: list[Row] = []
            progress: list[Row] = []

            def flush() -> None:
                if not jobs:
                    return
                for table, columns, rows in (
                    ("jobs", JOB_COLUMNS, jobs),
                    ("step_progress", PROGRESS_COLUMNS, progress),
                ):
                    if postgres:
                        _copy(conn, table, columns, rows)
                    else:  # executemany straight to the driver: no per-row processing
                        marks = ", ".join("?" for _ in columns)
                        conn.exec_driver_sql(
                            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows
                        )
                jobs.clear()
                progress.clear()

            for manager_jobs, manager_progress in history(children, stamp):
                jobs += manager_jobs
                progress += manager_progress
                written += len(manager_jobs)
                if len(jobs) >= FILL_CHUNK:
                    flush()
            flush()
        with engine.connect() as conn:
            if postgres:
                conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE"))
            else:
                conn.exec_driver_sql("ANALYZE")
    finally:
        engine.dispose()
    return written, time.perf_counter() - started


def _copy(conn: Any, table: str, columns: tuple[str, ...], rows: list[Row]) -> None:
    """PostgreSQL COPY of ``rows`` into ``table`` (through psycopg, in the same transaction)."""
    cursor = conn.connection.driver_connection.cursor()
    with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


# -- measuring -----------------------------------------------------------------------------
@dataclass
class Figure:
    """One measurement: operations per second, that rate over the no-op's measured just
    before on the same server, and the server's CPU time per operation."""

    rate: float
    vs_noop: float
    cpu_us: float


def per_operation(rate: float, server_cpu: float) -> float:
    return server_cpu / rate * 1e6 if rate else math.nan


async def measure_once(server: common.ServerProcess, sizes: Sizes) -> dict[str, Figure]:
    """Every figure once on ``server``: the no-op, the two unary writes, the stream."""
    unary_sizes = bench_unary.Sizes(calls={IN_FLIGHT: sizes.calls}, warmup=128)
    variants = {
        "noop": bench_unary.Variant("noop", bench_unary.NOOP),
        "stepstat": bench_unary.Variant("stepstat", bench_unary.STEP_STAT, 128),
        "metadata": bench_unary.Variant("metadata-small", bench_unary.METADATA, 10),
    }
    found: dict[str, Figure] = {}
    noop_rate = math.nan
    for key, variant in variants.items():
        point, _facts = await bench_unary.measure(
            variant, IN_FLIGHT, sizes.calls, unary_sizes, server
        )
        if key == "noop":
            noop_rate = point.rate
        cpu_us = per_operation(point.rate, point.server_cpu)
        found[key] = Figure(point.rate, point.rate / noop_rate, cpu_us)
    stream = await bench_stream.throughput(
        server, 1, sizes.events, bench_stream.BATCH_MAX_EVENTS, bench_stream.WINDOW, real=True
    )
    cpu_us = per_operation(stream.events_s, stream.server_cpu)
    found["stream"] = Figure(stream.events_s, stream.events_s / noop_rate, cpu_us)
    return found


LABELS = {
    "noop": "no-op Health/Check (64 in flight)",
    "stepstat": "UpdateStepStatInManager (64 in flight)",
    "metadata": "UpdateJobMetadata, 10 steps (64 in flight)",
    "stream": "child events, 1 stream (per event)",
}


def report(
    results: dict[tuple[str, int], dict[str, list[Figure]]],
    databases: list[str],
    sizes: tuple[int, ...],
    fills: dict[tuple[str, int], tuple[int, float]],
    runs: int,
    notes: list[str],
) -> None:
    rows = []
    for db in databases:
        for key, label in LABELS.items():
            base: Figure | None = None
            for size in sizes:
                figures = results[(db, size)][key]
                figure = Figure(
                    common.median([f.rate for f in figures]),
                    common.median([f.vs_noop for f in figures]),
                    common.median([f.cpu_us for f in figures]),
                )
                if base is None:
                    base = figure
                # The cost of one operation at this size over its cost at the first size:
                # wall time as a share of the no-op's (load on the machine cancels out) and
                # the monitor's CPU time.
                wall = base.vs_noop / figure.vs_noop if figure.vs_noop else math.nan
                cpu = figure.cpu_us / base.cpu_us if base.cpu_us else math.nan
                target = result = ""
                if key != "noop" and size != sizes[0]:
                    target = f"<= {1 + TARGET_WITHIN:.2f}x"
                    result = common.verdict(max(wall, cpu) <= 1 + TARGET_WITHIN)
                unit = "events/s" if key == "stream" else "calls/s"
                rows.append(
                    [
                        db,
                        f"{size:,}",
                        label,
                        f"{common.fmt_rate(figure.rate)} {unit}",
                        "-"
                        if key == "noop"
                        else f"{figure.vs_noop:.1f}x"
                        if key == "stream"
                        else common.fmt_ratio(figure.vs_noop),
                        f"{figure.cpu_us:,.1f}",
                        "-" if key == "noop" else f"{wall:.2f}x",
                        f"{cpu:.2f}x",
                        target,
                        result,
                    ]
                )
    headers = [
        "database",
        "child rows",
        "figure",
        "rate",
        "vs no-op",
        "CPU us/op",
        "wall cost vs first",
        "CPU vs first",
        "target",
        "result",
    ]
    fill_note = ", ".join(
        f"{db} {size:,}: {rows_:,} rows in {seconds:.1f} s"
        for (db, size), (rows_, seconds) in fills.items()
    )
    all_notes = [
        f"median of {runs} run(s), the sizes interleaved (one monitor per size, each on its "
        "own database filled before it starts: finished managers of "
        f"{STEPS_PER_MANAGER} steps x {CHILDREN_PER_STEP} children, with their step_progress "
        "rows)",
        "vs no-op: the rate over the no-op Check's measured just before on the same monitor "
        "(the stream: events/s over the no-op's calls/s); "
        "CPU us/op: the monitor process's CPU time per call or event",
        "wall cost vs first: the time per operation (as a share of the no-op's) at this size "
        "over the same at the smallest size; CPU vs first: the same for CPU us/op",
        "unary figures as in bench_unary.py (one hot manager, 64 calls in flight, 128-step "
        "document for UpdateStepStatInManager); stream as in bench_stream.py (one stream, "
        f"{bench_stream.BATCH_MAX_EVENTS} events per message, each child created, running, "
        "completed)",
        f"target: both costs within {TARGET_WITHIN:.0%} of the smallest size's (flat)",
        f"fill: {fill_note}",
        *notes,
        common.machine_note(),
    ]
    common.print_table("Cost as the database grows", headers, rows, all_notes, left=3)


async def run(args: argparse.Namespace) -> None:
    sizes = QUICK if args.quick else FULL
    row_counts = (
        tuple(int(n) for n in args.rows.split(","))
        if args.rows
        else (QUICK_SIZES if args.quick else FULL_SIZES)
    )
    runs = common.runs_for(args)
    databases, notes = common.available_databases(args)
    results: dict[tuple[str, int], dict[str, list[Figure]]] = {}
    fills: dict[tuple[str, int], tuple[int, float]] = {}
    with common.workdir(args, "bench-dbsize") as work:
        for db in databases:
            with contextlib.ExitStack() as databases_here:
                urls = {}
                for count in row_counts:
                    url = databases_here.enter_context(
                        common.throwaway_database(db, args.postgres_url, work)
                    )
                    common.progress(f"{db}: filling {count:,} child rows")
                    fills[(db, count)] = fill(url, count)
                    urls[count] = url
                async with contextlib.AsyncExitStack() as servers_here:
                    servers = {
                        count: await servers_here.enter_async_context(
                            common.running(
                                common.monitor_process(url, work, tag=f"monitor-{count}")
                            )
                        )
                        for count, url in urls.items()
                    }
                    for run_no in range(1, runs + 1):
                        for count, server in servers.items():
                            common.progress(f"{db} run {run_no}/{runs}: {count:,} child rows")
                            for key, figure in (await measure_once(server, sizes)).items():
                                results.setdefault((db, count), {}).setdefault(key, []).append(
                                    figure
                                )
    report(results, databases, row_counts, fills, runs, notes)


def main() -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--rows",
        default="",
        help="child rows stored before measuring, comma-separated (default 10000,100000,1000000;"
        " --quick: 10000,100000)",
    )
    args = parser.parse_args()
    if args.timeout is None:
        args.timeout = 600.0 if args.quick else 3000.0
    return common.run_main(run, args)


if __name__ == "__main__":
    sys.exit(main())
