"""What a test pays for a real stepflow: start (until SERVING) and stop of a monitor as
``stepflow_client.testing`` runs it (a subprocess), against an in-process server on the test's
own event loop, and of an orchestrator beside it.

    .venv/bin/python bench/bench_testing.py            # 7 rounds, medians
    .venv/bin/python bench/bench_testing.py --runs 3

Each round measures every kind once, one after the other (interleaved, so a busy machine
weighs on all of them alike). Every monitor gets a new SQLite database in a temporary
directory. The figures are wall-clock seconds: on a shared machine, compare ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from stepflow_client.testing import start_monitor, start_orchestrator
from stepflow_common import logs


def in_process() -> tuple[float, float]:
    from monitor_svc.server import MonitorConfig, create_server

    async def go() -> tuple[float, float]:
        with tempfile.TemporaryDirectory(prefix="stepflow-bench-") as tmp:
            url = f"sqlite:///{Path(tmp) / 'stepflow.db'}"
            began = time.perf_counter()
            running = await create_server(MonitorConfig(database_url=url, port=0))
            serving = time.perf_counter()
            await running.stop(grace=0.5)
            return serving - began, time.perf_counter() - serving

    return asyncio.run(go())


def subprocess_monitor() -> tuple[float, float]:
    monitor = start_monitor()
    began = time.perf_counter()
    with monitor:
        serving = time.perf_counter()
    return serving - began, time.perf_counter() - serving


def subprocess_orchestrator() -> tuple[float, float]:
    with start_monitor() as monitor:
        orchestrator = start_orchestrator(monitor)
        began = time.perf_counter()
        with orchestrator:
            serving = time.perf_counter()
        return serving - began, time.perf_counter() - serving


KINDS: dict[str, Callable[[], tuple[float, float]]] = {
    "monitor, in-process (own event loop)": in_process,
    "monitor, subprocess (start_monitor)": subprocess_monitor,
    "orchestrator, subprocess (start_orchestrator)": subprocess_orchestrator,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="rounds (default 7)")
    args = parser.parse_args()
    logs.configure("json", "warning")  # the in-process servers' log lines are not the table
    in_process()  # imports the server modules once, as a test process would have them
    starts: dict[str, list[float]] = {kind: [] for kind in KINDS}
    stops: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for _ in range(args.runs):
        for kind, measure in KINDS.items():
            start, stop = measure()
            starts[kind].append(start)
            stops[kind].append(stop)
    base = statistics.median(starts[next(iter(KINDS))])
    print(f"{'server':<48} {'to SERVING':>11} {'stop':>7} {'start vs in-process':>20}")
    for kind in KINDS:
        start = statistics.median(starts[kind])
        stop = statistics.median(stops[kind])
        print(f"{kind:<48} {start:>10.3f}s {stop:>6.3f}s {start / base:>19.1f}x")
    print(f"medians of {args.runs} interleaved rounds")


if __name__ == "__main__":
    main()
