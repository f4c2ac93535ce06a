"""A bounded soak: many concurrent jobs, watchers and metadata writers against a
real monitor and orchestrator (subprocesses, loopback only) for ``--seconds`` (default two
minutes), then it stops by itself.

While it runs it samples the servers' resident memory and open file descriptors (sockets
among them) from /proc/PID/status and /proc/PID/fd, and the monitor's table sizes, and
``monitor-svc prune`` deletes finished jobs older than ``--prune-older-than`` every
``--prune-every`` seconds, as an operator would schedule it. At the end it prints the
samples and a verdict per figure: *flat* when the last third of the run (after warm-up) is
within the tolerance of the first third, else *growing*. Every job must end with exactly the
child counts its definition implies; a mismatch fails the soak.

    .venv/bin/python bench/soak.py                     # two minutes on SQLite
    .venv/bin/python bench/soak.py --seconds 30 --db postgres
    make soak SOAK_ARGS='--seconds 600 --jobs 16'
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common
from grpc import aio

from orchestrator_svc.definitions import from_mapping, to_proto
from orchestrator_svc.workers.simulate import expected_tally
from stepflow_common.proto_status import TERMINAL_PB as TERMINAL
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from stepflow_proto.v1 import orchestrator_service_pb2 as o
from stepflow_proto.v1 import orchestrator_service_pb2_grpc as o_grpc

CALL_S = 30.0
JOB_TIMEOUT_S = 120.0  # one job must end within this, however loaded the soak is
DRAIN_S = JOB_TIMEOUT_S + 10  # the jobs in flight when the time is up finish
WARMUP_SHARE = 0.2  # the first fifth of the samples is warm-up (imports, caches, pools)
RSS_TOLERANCE = 0.10  # 10 % and ...
RSS_SLACK_KB = 8 * 1024  # ... at least 8 MB before memory counts as growing
FD_SLACK = 8  # open descriptors (connections among them) may wobble by this many
WRITER_KEYS = 8  # metadata writers overwrite a fixed set of keys: documents stay bounded


def job_definition(rng: random.Random) -> dict[str, Any]:
    handed = {"children": rng.randint(20, 80), "duration_ms": rng.randint(1, 5),
              "concurrency": 16, "fail_every": 9}  # fmt: skip
    waited = {"children": rng.randint(10, 40), "duration_ms": 2, "cancel_every": 7}
    return {
        "name": "soak",
        "steps": [
            {"name": "handed", "type": "simulate", "wait": False, "config": handed},
            {"name": "waited", "type": "simulate", "config": waited},
            {"name": "shell", "type": "command", "config": {"command": "true"}},
        ],
    }


def expected_counts(data: dict[str, Any]) -> dict[str, tuple[int, int, int]]:
    out = {}
    for step in data["steps"]:
        if step["type"] == "simulate":
            t = expected_tally(step["config"])
            out[step["name"]] = (t.completed, t.failed, t.cancelled)
    return out


# -- /proc -------------------------------------------------------------------------------------
def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def fds(pid: int) -> tuple[int, int]:
    """(open descriptors, of which sockets)."""
    total = sockets = 0
    base = Path(f"/proc/{pid}/fd")
    for entry in base.iterdir():
        total += 1
        with contextlib.suppress(OSError):
            if os.readlink(entry).startswith("socket:"):
                sockets += 1
    return total, sockets


@dataclass
class Sample:
    t: float
    monitor_rss_kb: int
    monitor_fds: int
    monitor_sockets: int
    monitor_threads: int
    orch_rss_kb: int
    orch_fds: int
    jobs_done: int
    job_rows: int


@dataclass
class Stats:
    submitted: int = 0
    done: int = 0
    mismatches: list[str] = field(default_factory=list)
    watch_messages: int = 0
    watches: int = 0
    metadata_writes: int = 0
    prunes: int = 0
    prune_failures: list[str] = field(default_factory=list)
    pruned_jobs: int = 0
    errors: list[str] = field(default_factory=list)
    live: list[str] = field(default_factory=list)  # managers being run right now


# -- the load ----------------------------------------------------------------------------------
async def job_loop(
    ostub: o_grpc.OrchestratorServiceStub,
    mstub: m_grpc.MonitorServiceStub,
    stats: Stats,
    stop: asyncio.Event,
    rng: random.Random,
) -> None:
    """Submit a job, follow it to its end through WatchJob, check its counts; again."""
    while not stop.is_set():
        try:
            await one_job(ostub, mstub, stats, rng)
        except Exception as exc:  # recorded (the soak fails), and the load goes on
            stats.errors.append(f"job: {type(exc).__name__}: {exc}")
            await asyncio.sleep(0.5)


async def one_job(
    ostub: o_grpc.OrchestratorServiceStub,
    mstub: m_grpc.MonitorServiceStub,
    stats: Stats,
    rng: random.Random,
) -> None:
    data = job_definition(rng)
    spec = to_proto(from_mapping(data))
    resp = await ostub.SubmitJob(o.SubmitJobRequest(definition=spec), timeout=CALL_S)
    stats.submitted += 1
    stats.live.append(resp.manager_id)
    try:
        final = await asyncio.wait_for(follow(mstub, resp.manager_id, stats), JOB_TIMEOUT_S)
    finally:
        stats.live.remove(resp.manager_id)
    stats.done += 1
    got = {
        s.step_name: (s.children.completed, s.children.failed, s.children.cancelled)
        for s in final.step_stats
    }
    want = expected_counts(data)
    if final.status != job_pb2.JOB_STATUS_COMPLETED or any(
        got.get(k) != v for k, v in want.items()
    ):
        stats.mismatches.append(f"{resp.manager_id}: {final.status} {got} != {want}")


async def follow(mstub: m_grpc.MonitorServiceStub, job_id: str, stats: Stats) -> job_pb2.Job:
    last = None
    async for msg in mstub.WatchJob(m.WatchJobRequest(job_id=job_id), timeout=JOB_TIMEOUT_S):
        stats.watch_messages += 1
        last = msg.job
    assert last is not None and last.status in TERMINAL
    return last


async def watcher_loop(
    mstub: m_grpc.MonitorServiceStub, stats: Stats, stop: asyncio.Event, rng: random.Random
) -> None:
    """Extra watchers: join a running job part way through and follow it to its end."""
    while not stop.is_set():
        if not stats.live:
            await asyncio.sleep(0.05)
            continue
        job_id = rng.choice(stats.live)
        stats.watches += 1
        with contextlib.suppress(aio.AioRpcError, TimeoutError):
            await asyncio.wait_for(follow(mstub, job_id, stats), JOB_TIMEOUT_S)


async def writer_loop(
    mstub: m_grpc.MonitorServiceStub,
    stats: Stats,
    stop: asyncio.Event,
    rng: random.Random,
    writer: int,
) -> None:
    """Metadata writers racing the monitor's own updates of the same managers."""
    counter = itertools.count()
    while not stop.is_set():
        if not stats.live:
            await asyncio.sleep(0.05)
            continue
        job_id = rng.choice(stats.live)
        n = next(counter)
        patch = {f"soak_{writer}_{n % WRITER_KEYS}": n, f"soak_last_{writer}": n}
        request = m.UpdateJobMetadataRequest(job_id=job_id)
        request.metadata.update(patch)
        try:
            await mstub.UpdateJobMetadata(request, timeout=CALL_S)
            stats.metadata_writes += 1
        except aio.AioRpcError as exc:
            stats.errors.append(f"UpdateJobMetadata: {exc.code().name} {exc.details()}")
        await asyncio.sleep(0.01)


async def prune_loop(
    database_url: str, every_s: float, older_than: str, stats: Stats, stop: asyncio.Event
) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), every_s)
    while not stop.is_set():
        done = await asyncio.to_thread(
            subprocess.run,
            [str(common.MONITOR_SVC), "prune", "--older-than", older_than,
             "--database-url", database_url],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        found = re.search(r"\((\d+) job rows", done.stdout)
        if done.returncode != 0 or found is None:
            lines = [ln for ln in done.stderr.splitlines() if "Error" in ln] or [done.stderr]
            stats.prune_failures.append(lines[-1].strip()[:300])
        else:
            stats.prunes += 1
            stats.pruned_jobs += int(found.group(1))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)


def job_rows(database_url: str) -> int:
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM jobs")).scalar_one())
    finally:
        engine.dispose()


async def sampler(
    monitor_pid: int,
    orch_pid: int,
    database_url: str,
    every_s: float,
    started: float,
    samples: list[Sample],
    stats: Stats,
    stop: asyncio.Event,
) -> None:
    while True:
        monitor_fds, monitor_sockets = fds(monitor_pid)
        samples.append(
            Sample(
                t=time.monotonic() - started,
                monitor_rss_kb=rss_kb(monitor_pid),
                monitor_fds=monitor_fds,
                monitor_sockets=monitor_sockets,
                monitor_threads=threads(monitor_pid),
                orch_rss_kb=rss_kb(orch_pid),
                orch_fds=fds(orch_pid)[0],
                jobs_done=stats.done,
                job_rows=await asyncio.to_thread(job_rows, database_url),
            )
        )
        if stop.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)


# -- the verdict ---------------------------------------------------------------------------------
def verdict(values: list[int], *, share: float, slack: float) -> tuple[str, float, float]:
    """(flat | growing, median of the first third, median of the last third), warm-up
    excluded."""
    steady = values[int(len(values) * WARMUP_SHARE) :]
    if len(steady) < 3:
        return "too short", float("nan"), float("nan")
    third = max(1, len(steady) // 3)
    first, last = statistics.median(steady[:third]), statistics.median(steady[-third:])
    allowed = max(first * share, slack)
    return ("flat" if last - first <= allowed else "growing"), first, last


def report(samples: list[Sample], stats: Stats, seconds: float, db: str) -> bool:
    print()
    print(f"soak: {seconds:.0f} s on {db}; {stats.done} jobs finished ({stats.submitted} "
          f"submitted), {stats.watches} extra watches, {stats.watch_messages} watch messages, "
          f"{stats.metadata_writes} metadata writes, {stats.prunes} prunes deleting "
          f"{stats.pruned_jobs} job rows")  # fmt: skip
    print()
    header = ("t (s)", "monitor RSS MB", "fds", "sockets", "threads", "orch RSS MB",
              "orch fds", "jobs done", "job rows")  # fmt: skip
    print("  ".join(f"{h:>14}" for h in header))
    for s in samples:
        row = (f"{s.t:.0f}", f"{s.monitor_rss_kb / 1024:.1f}", s.monitor_fds, s.monitor_sockets,
               s.monitor_threads, f"{s.orch_rss_kb / 1024:.1f}", s.orch_fds, s.jobs_done,
               s.job_rows)  # fmt: skip
        print("  ".join(f"{v!s:>14}" for v in row))
    print()
    figures: list[tuple[str, Callable[[Sample], int], float, float, Callable[[float], str]]] = [
        ("monitor RSS", lambda s: s.monitor_rss_kb, RSS_TOLERANCE, RSS_SLACK_KB,
         lambda v: f"{v / 1024:.1f} MB"),
        ("monitor open fds", lambda s: s.monitor_fds, 0.0, FD_SLACK, lambda v: f"{v:.0f}"),
        ("monitor sockets", lambda s: s.monitor_sockets, 0.0, FD_SLACK, lambda v: f"{v:.0f}"),
        ("monitor threads", lambda s: s.monitor_threads, 0.0, 4, lambda v: f"{v:.0f}"),
        ("orchestrator RSS", lambda s: s.orch_rss_kb, RSS_TOLERANCE, RSS_SLACK_KB,
         lambda v: f"{v / 1024:.1f} MB"),
        ("orchestrator fds", lambda s: s.orch_fds, 0.0, FD_SLACK, lambda v: f"{v:.0f}"),
    ]  # fmt: skip
    flat = True
    for name, get, share, slack, fmt in figures:
        word, first, last = verdict([get(s) for s in samples], share=share, slack=slack)
        flat = flat and word != "growing"
        print(f"  {name:<18} {word:<8} first third {fmt(first):>10}   last third {fmt(last):>10}")
    ok = flat and not stats.mismatches and not stats.errors and stats.done > 0
    for line in stats.mismatches[:10]:
        print(f"  COUNT MISMATCH {line}")
    for line in stats.errors[:10]:
        print(f"  error: {line}")
    if stats.prune_failures:
        print(
            f"  prune failed {len(stats.prune_failures)} of "
            f"{len(stats.prune_failures) + stats.prunes} times: {stats.prune_failures[-1]}"
        )
    print()
    print(f"verdict: {'FLAT' if flat else 'GROWING'}; "
          f"{'every job counted exactly' if not stats.mismatches else 'COUNTS WRONG'}")  # fmt: skip
    return ok


# -- running it ----------------------------------------------------------------------------------
@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="stepflow-soak-"))
    try:
        yield path
    finally:
        if keep:
            print(f"logs kept in {path}", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(path, ignore_errors=True)


def server(name: str, argv: list[str], port: int, directory: Path) -> common.ServerProcess:
    return common.ServerProcess(name, argv, port, directory / f"{name}.log")


async def soak(args: argparse.Namespace) -> bool:
    rng = random.Random(args.seed)
    with (
        workdir(args.keep_logs) as directory,
        common.throwaway_database(args.db, args.postgres_url, directory) as database_url,
    ):
        mport, oport = common.free_port(), common.free_port()
        monitor = server("monitor", [
            str(common.MONITOR_SVC), "serve", "--port", str(mport),
            "--database-url", database_url, "--grace-period", "5s", "--log-format", "json",
            "--log-level", "warning",
        ], mport, directory)  # fmt: skip
        orchestrator = server("orchestrator", [
            str(common.ORCHESTRATOR_SVC), "serve", "--port", str(oport),
            "--monitor", monitor.address, "--owner", "soak", "--log-format", "json",
            "--log-level", "warning",
        ], oport, directory)  # fmt: skip
        async with (
            common.running(monitor),
            common.running(orchestrator),
            aio.insecure_channel(orchestrator.address) as och,
            aio.insecure_channel(monitor.address) as mch,
        ):
            ostub, mstub = o_grpc.OrchestratorServiceStub(och), m_grpc.MonitorServiceStub(mch)
            stats, samples = Stats(), []
            stop, sampled = asyncio.Event(), asyncio.Event()
            started = time.monotonic()
            print(f"soaking for {args.seconds:g} s: {args.jobs} job loops, {args.watchers} "
                  f"watchers, {args.writers} metadata writers on {args.db} "
                  f"(monitor pid {monitor.pid}, orchestrator pid {orchestrator.pid})")  # fmt: skip
            load = [
                *[asyncio.create_task(job_loop(ostub, mstub, stats, stop, rng))
                  for _ in range(args.jobs)],
                *[asyncio.create_task(watcher_loop(mstub, stats, stop, rng))
                  for _ in range(args.watchers)],
                *[asyncio.create_task(writer_loop(mstub, stats, stop, rng, w))
                  for w in range(args.writers)],
                asyncio.create_task(
                    prune_loop(database_url, args.prune_every, args.prune_older_than, stats, stop)
                ),
            ]  # fmt: skip
            sampling = asyncio.create_task(
                sampler(
                    monitor.pid,
                    orchestrator.pid,
                    database_url,
                    args.sample_every,
                    started,
                    samples,
                    stats,
                    sampled,
                )
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(asyncio.gather(*load)), args.seconds)
            stop.set()
            # Let the jobs in flight finish (bounded), then take the last sample.
            results = await asyncio.wait_for(asyncio.gather(*load, return_exceptions=True), DRAIN_S)
            for result in results:
                if isinstance(result, BaseException):
                    stats.errors.append(f"{type(result).__name__}: {result}")
            sampled.set()
            await sampling
            return report(samples, stats, time.monotonic() - started, args.db)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="how long to soak (120)")
    parser.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("STEPFLOW_BENCH_POSTGRES_URL")
        or os.environ.get("STEPFLOW_TEST_POSTGRES_URL")
        or "postgresql+psycopg://postgres@127.0.0.1:5432/test",
        help="admin URL of a PostgreSQL server; the soak creates and drops its own database",
    )
    parser.add_argument("--jobs", type=int, default=8, help="concurrent job loops (8)")
    parser.add_argument("--watchers", type=int, default=16, help="extra watchers (16)")
    parser.add_argument("--writers", type=int, default=4, help="metadata writers (4)")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds (5)")
    parser.add_argument("--prune-every", type=float, default=20.0, help="seconds (20)")
    parser.add_argument("--prune-older-than", default="10s", help="prune's cutoff (10s)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs")
    args = parser.parse_args()
    if args.db == "postgres":
        why = common.postgres_available(args.postgres_url)
        if why is not None:
            print(f"PostgreSQL not reachable at {args.postgres_url}: {why}", file=sys.stderr)
            return 2
    try:
        ok = asyncio.run(asyncio.wait_for(soak(args), args.seconds + DRAIN_S + 120))
    except KeyboardInterrupt:
        return 130
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
