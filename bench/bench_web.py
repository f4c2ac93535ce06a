"""The web view, in Debian's Chromium (Playwright) against a real monitor process, each figure
beside its baseline in the same run: (a) a job page's first render (every step with its
counts) for a manager with 100,000 children, beside one with ten; (b) the page's JS heap and
DOM while a step's 100,000 children run; (c) a committed change reaching the page, p50/p99,
under 1,000 child events/s of background, beside the same change reaching a WatchJob client;
(d) database reads per change with 200 pages open on one job, beside one page; (e) the
monitor's memory with 50 pages open (a short soak here; ``make soak-web`` runs an hour).

    .venv/bin/python bench/bench_web.py            # full: 3 runs, both databases
    .venv/bin/python bench/bench_web.py --quick    # smoke: small sizes, one run
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shutil
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import common
from bench_stream import scrape_counter
from google.protobuf import struct_pb2
from grpc import aio

from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc

K = job_pb2
TARGET_LOAD_S = 0.500
TARGET_LATENCY_P99_S = 0.050
BACKGROUND_EVENTS_S = 1_000
BATCH_EVENTS = 5_000  # per StreamChildEvents message (the stream takes up to 10,000)
PROBE_INTERVAL_S = 0.05
CHROMIUM_FLAGS = ["--no-sandbox", "--enable-precise-memory-info", "--js-flags=--expose-gc"]


@dataclass(frozen=True, slots=True)
class Sizes:
    big: int  # children of the big job
    loads: int  # page loads timed per job
    probes: int  # changes timed in (c)
    pages: int  # pages on one job in (d)
    changes: int  # changes counted in (d)
    soak_pages: int
    soak_s: float


FULL = Sizes(big=100_000, loads=7, probes=300, pages=200, changes=50, soak_pages=50, soak_s=120)
QUICK = Sizes(big=10_000, loads=3, probes=60, pages=50, changes=10, soak_pages=10, soak_s=15)


@dataclass(slots=True)
class Figures:
    load_big: list[float] = field(default_factory=list)
    load_small: list[float] = field(default_factory=list)
    heap_mb: list[tuple[str, float, int]] = field(default_factory=list)  # (when, MB, DOM nodes)
    page_latency: list[float] = field(default_factory=list)
    watch_latency: list[float] = field(default_factory=list)
    reads_one: tuple[float, float] = (0.0, 0.0)  # (watch reads, log reads) per change
    reads_many: tuple[float, float] = (0.0, 0.0)
    soak_rss: list[tuple[float, float]] = field(default_factory=list)  # (seconds, MB)


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise SystemExit("bench_web needs Chromium (apt-get install chromium)")
    return found


# -- jobs, written through the monitor's API as an orchestrator would -----------------------
async def create_manager(
    stub: m_grpc.MonitorServiceStub, name: str, steps: int
) -> tuple[str, list[str]]:
    manager = (await stub.CreateJob(m.CreateJobRequest(kind=K.JOB_KIND_MANAGER, name=name))).job
    step_ids = []
    stats = []
    for i in range(steps):
        meta = struct_pb2.Struct()
        meta.update({"step_index": i})
        step = (
            await stub.CreateJob(
                m.CreateJobRequest(
                    kind=K.JOB_KIND_STEP, parent_id=manager.id, name=f"step-{i}",
                    type="simulate", metadata=meta,
                )
            )
        ).job  # fmt: skip
        step_ids.append(step.id)
        stats.append({
            "step_index": i, "step_id": step.id, "step_name": step.name, "step_type": "simulate",
            "child_count": 0, "document_count": 0, "status": "pending", "error": "",
        })  # fmt: skip
    document = struct_pb2.Struct()
    document.update({"step_stats": stats, "total_steps": steps})
    await stub.UpdateJobMetadata(m.UpdateJobMetadataRequest(job_id=manager.id, metadata=document))
    await stub.UpdateJobStatus(
        m.UpdateJobStatusRequest(job_id=manager.id, status=K.JOB_STATUS_RUNNING)
    )
    return manager.id, step_ids


def child_events(step_id: str, start: int, count: int, kind: int) -> list[job_pb2.ChildEvent]:
    return [
        job_pb2.ChildEvent(
            event_id=f"{step_id}-{kind}-{n}", step_id=step_id, child_id=f"{step_id}.{n}", kind=kind
        )
        for n in range(start, start + count)
    ]


async def send(stub: m_grpc.MonitorServiceStub, batches: list[list[job_pb2.ChildEvent]]) -> None:
    async def requests() -> AsyncIterator[m.StreamChildEventsRequest]:
        for i, batch in enumerate(batches, start=1):
            yield m.StreamChildEventsRequest(batch_id=i, events=batch)

    async for _ack in stub.StreamChildEvents(requests()):
        pass


async def fill(
    stub: m_grpc.MonitorServiceStub, step_id: str, children: int, *, finish: bool
) -> None:
    """``children`` created (and, with ``finish``, completed) children of a step."""
    batches = []
    for start in range(0, children, BATCH_EVENTS):
        count = min(BATCH_EVENTS, children - start)
        batches.append(child_events(step_id, start, count, K.CHILD_EVENT_KIND_CREATED))
        if finish:
            batches.append(child_events(step_id, start, count, K.CHILD_EVENT_KIND_COMPLETED))
    await send(stub, batches)


# -- the browser ------------------------------------------------------------------------------
FIRST_RENDER = "performance.getEntriesByName('stepflow:first-state').length > 0"
FIRST_RENDER_MS = "performance.getEntriesByName('stepflow:first-state')[0].startTime"
HEAP = """() => { if (window.gc) window.gc();
  return [performance.memory.usedJSHeapSize, document.getElementsByTagName('*').length]; }"""
COMPLETED_AT_LEAST = """(n) =>
  Number(document.querySelector('[data-count="completed"]').textContent) >= n"""
RECORD_ARRIVALS = """() => {
  window.__arrivals = {};
  const live = document.querySelector('[data-live]');
  new MutationObserver(() => { window.__arrivals[live.dataset.changeSeq] = Date.now(); })
    .observe(live, {attributes: true, attributeFilter: ['data-change-seq']});
}"""


async def time_loads(context: Any, url: str, loads: int) -> list[float]:
    page = await context.new_page()
    times = []
    for _ in range(loads + 1):  # the first load warms the cache; it is not counted
        await page.goto(url)
        await page.wait_for_function(FIRST_RENDER, timeout=30_000)
        times.append(await page.evaluate(FIRST_RENDER_MS) / 1000)
    await page.close()
    return times[1:]


# -- the parts ---------------------------------------------------------------------------------
async def part_load(stub: Any, context: Any, web: str, sizes: Sizes, figures: Figures) -> None:
    common.progress(f"load: a manager with {sizes.big:,} children, beside one with 10")
    big, big_steps = await create_manager(stub, "big", 3)
    for step in big_steps:
        await fill(stub, step, sizes.big // len(big_steps), finish=True)
    small, small_steps = await create_manager(stub, "small", 3)
    for step in small_steps[:1]:
        await fill(stub, step, 10, finish=True)
    figures.load_big += await time_loads(context, f"{web}/jobs/{big}", sizes.loads)
    figures.load_small += await time_loads(context, f"{web}/jobs/{small}", sizes.loads)


async def part_memory(stub: Any, context: Any, web: str, sizes: Sizes, figures: Figures) -> None:
    common.progress(f"memory: the page while {sizes.big:,} children run")
    manager, (step,) = await create_manager(stub, "running", 1)
    page = await context.new_page()
    await page.goto(f"{web}/jobs/{manager}")
    await page.wait_for_function(FIRST_RENDER)
    heap, nodes = await page.evaluate(HEAP)
    figures.heap_mb.append(("open", heap / 2**20, nodes))
    chunk = sizes.big // 10
    for tenth in range(10):
        start = tenth * chunk
        kinds = (
            K.CHILD_EVENT_KIND_CREATED,
            K.CHILD_EVENT_KIND_RUNNING,
            K.CHILD_EVENT_KIND_COMPLETED,
        )
        await send(stub, [child_events(step, start, chunk, kind) for kind in kinds])
        done = (tenth + 1) * chunk
        await page.wait_for_function(COMPLETED_AT_LEAST, arg=done, timeout=60_000)
        if tenth in (0, 4, 9):
            heap, nodes = await page.evaluate(HEAP)
            figures.heap_mb.append((f"{done:,} done", heap / 2**20, nodes))
    await page.close()


async def part_latency(stub: Any, context: Any, web: str, sizes: Sizes, figures: Figures) -> None:
    common.progress(f"latency: {sizes.probes} changes, {BACKGROUND_EVENTS_S:,} events/s beside")
    watched, _ = await create_manager(stub, "watched", 1)
    _, (busy_step,) = await create_manager(stub, "busy", 1)
    page = await context.new_page()
    await page.goto(f"{web}/jobs/{watched}")
    await page.wait_for_function(FIRST_RENDER)
    await page.evaluate(RECORD_ARRIVALS)
    watch_arrivals: dict[int, float] = {}

    async def watch() -> None:
        async for resp in stub.WatchJob(m.WatchJobRequest(job_id=watched)):
            watch_arrivals[resp.job.change_seq] = time.time()

    async def background(stop: asyncio.Event) -> None:
        per_tick = BACKGROUND_EVENTS_S // 100

        async def requests() -> AsyncIterator[m.StreamChildEventsRequest]:
            n = 0
            while not stop.is_set():
                events = child_events(busy_step, n, per_tick, K.CHILD_EVENT_KIND_CREATED)
                n += per_tick
                yield m.StreamChildEventsRequest(batch_id=n, events=events)
                await asyncio.sleep(0.01)

        async for _ack in stub.StreamChildEvents(requests()):
            pass

    stop = asyncio.Event()
    tasks = [asyncio.create_task(watch()), asyncio.create_task(background(stop))]
    await asyncio.sleep(1.0)
    sent: dict[int, float] = {}
    for i in range(sizes.probes):
        document = struct_pb2.Struct()
        document.update({"probe": i})
        before = time.time()
        resp = await stub.UpdateJobMetadata(
            m.UpdateJobMetadataRequest(job_id=watched, metadata=document)
        )
        sent[resp.job.change_seq] = before
        await asyncio.sleep(PROBE_INTERVAL_S)
    await asyncio.sleep(1.0)
    stop.set()
    for task in tasks:
        task.cancel()
    arrivals = await page.evaluate("() => window.__arrivals")
    for seq, before in sent.items():
        if str(seq) in arrivals:
            figures.page_latency.append(arrivals[str(seq)] / 1000 - before)
        if seq in watch_arrivals:
            figures.watch_latency.append(watch_arrivals[seq] - before)
    await page.close()


async def part_fanout(
    stub: Any, web: str, metrics_port: int, sizes: Sizes, figures: Figures
) -> None:
    common.progress(f"fan-out: database reads per change, {sizes.pages} pages beside 1")
    for pages in (1, sizes.pages):
        manager, _ = await create_manager(stub, f"fan-{pages}", 1)
        async with aiohttp.ClientSession(web, connector=aiohttp.TCPConnector(limit=0)) as http:
            streams = [await http.get(f"/api/v1/jobs/{manager}/events") for _ in range(pages)]
            readers = [Reader(r) for r in streams]
            tasks = [asyncio.create_task(r.run()) for r in readers]
            await wait_all(readers, lambda r: r.change > 0)
            reads0 = scrape_counter(metrics_port, "stepflow_monitor_watch_reads_total")
            log0 = scrape_counter(metrics_port, "stepflow_monitor_log_reads_total")
            for i in range(sizes.changes):
                document = struct_pb2.Struct()
                document.update({"change": i})
                resp = await stub.UpdateJobMetadata(
                    m.UpdateJobMetadataRequest(job_id=manager, metadata=document)
                )
                await stub.AppendJobLog(m.AppendJobLogRequest(
                    job_id=manager, lines=[job_pb2.JobLogEntry(key=f"l{i}", message=f"line {i}")]
                ))  # fmt: skip
                target = resp.job.change_seq
                await wait_all(readers, lambda r, t=target: r.change >= t)
            reads = scrape_counter(metrics_port, "stepflow_monitor_watch_reads_total") - reads0
            log_reads = scrape_counter(metrics_port, "stepflow_monitor_log_reads_total") - log0
            for task in tasks:
                task.cancel()
            for r in streams:
                r.close()
        per_change = (reads / sizes.changes, log_reads / sizes.changes)
        if pages == 1:
            figures.reads_one = per_change
        else:
            figures.reads_many = per_change


class Reader:
    """One page's event stream, read as fast as it comes; remembers the newest state."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.change = 0

    async def run(self) -> None:
        async for raw in self.response.content:
            if raw.startswith(b"id: "):
                self.change = int(raw[4:].split(b".")[0])


async def wait_all(readers: list[Reader], ready: Any, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not all(ready(r) for r in readers):
        if time.monotonic() > deadline:
            raise TimeoutError("the pages did not all get the change")
        await asyncio.sleep(0.002)


async def part_soak(
    stub: Any, web: str, monitor: common.ServerProcess, sizes: Sizes, figures: Figures
) -> None:
    common.progress(f"soak: {sizes.soak_pages} pages open for {sizes.soak_s:.0f}s")
    manager, (step,) = await create_manager(stub, "soak", 1)
    start = time.monotonic()
    async with aiohttp.ClientSession(web, connector=aiohttp.TCPConnector(limit=0)) as http:
        streams = [
            await http.get(f"/api/v1/jobs/{manager}/events") for _ in range(sizes.soak_pages)
        ]
        tasks = [asyncio.create_task(Reader(r).run()) for r in streams]
        n = 0
        next_sample = 0.0
        while (elapsed := time.monotonic() - start) < sizes.soak_s:
            await send(stub, [child_events(step, n, 20, K.CHILD_EVENT_KIND_CREATED)])
            await stub.AppendJobLog(m.AppendJobLogRequest(
                job_id=manager, lines=[job_pb2.JobLogEntry(key=f"s{n}", message=f"tick {n}")]
            ))  # fmt: skip
            n += 20
            if elapsed >= next_sample:
                figures.soak_rss.append((elapsed, rss_mb(monitor.pid)))
                next_sample += sizes.soak_s / 6
            await asyncio.sleep(0.1)
        figures.soak_rss.append((time.monotonic() - start, rss_mb(monitor.pid)))
        for task in tasks:
            task.cancel()
        for r in streams:
            r.close()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# -- one database --------------------------------------------------------------------------------
async def measure(args: argparse.Namespace, db: str, work: Any, sizes: Sizes, runs: int) -> Figures:
    from playwright.async_api import async_playwright

    figures = Figures()
    parts = set(args.part.split(","))
    with common.throwaway_database(db, args.postgres_url, work) as url:
        web_port, metrics_port = common.free_port(), common.free_port()
        monitor = common.monitor_process(
            url, work, tag=f"monitor-{db}", http_port=web_port, metrics_port=metrics_port
        )
        web = f"http://127.0.0.1:{web_port}"
        async with (
            common.running(monitor),
            aio.insecure_channel(monitor.address, options=common.CHANNEL_OPTIONS) as channel,
            async_playwright() as playwright,
        ):
            stub = m_grpc.MonitorServiceStub(channel)
            browser = await playwright.chromium.launch(
                executable_path=chromium_path(), args=CHROMIUM_FLAGS
            )
            context = await browser.new_context()
            for run in range(runs):
                common.progress(f"{db}: run {run + 1} of {runs}")
                if "load" in parts:
                    await part_load(stub, context, web, sizes, figures)
                if "latency" in parts:
                    await part_latency(stub, context, web, sizes, figures)
            if "memory" in parts:
                await part_memory(stub, context, web, sizes, figures)
            if "fanout" in parts:
                await part_fanout(stub, web, metrics_port, sizes, figures)
            if "soak" in parts:
                await part_soak(stub, web, monitor, sizes, figures)
            await browser.close()
    return figures


def report(results: dict[str, Figures], sizes: Sizes, notes: list[str]) -> None:
    rows = []
    for db, f in results.items():
        if f.load_big:
            big, small = common.median(f.load_big), common.median(f.load_small)
            rows.append([
                db, f"first render, {sizes.big:,} children", f"{common.fmt_ms(big)} ms",
                f"10 children: {common.fmt_ms(small)} ms", common.fmt_multiple(big / small),
                common.verdict(big < TARGET_LOAD_S),
            ])  # fmt: skip
        if f.page_latency:
            p99 = common.percentile(f.page_latency, 99)
            watch99 = common.percentile(f.watch_latency, 99)
            rows.append([
                db, "change -> page p50/p99",
                f"{common.fmt_ms(common.percentile(f.page_latency, 50))} / {common.fmt_ms(p99)} ms",
                f"WatchJob: {common.fmt_ms(common.percentile(f.watch_latency, 50))} / "
                f"{common.fmt_ms(watch99)} ms",
                common.fmt_multiple(p99 / watch99), common.verdict(p99 < TARGET_LATENCY_P99_S),
            ])  # fmt: skip
        if f.reads_many != (0.0, 0.0):
            rows.append([
                db, f"db reads/change, {sizes.pages} pages",
                f"{f.reads_many[0]:.2f} state + {f.reads_many[1]:.2f} log",
                f"1 page: {f.reads_one[0]:.2f} + {f.reads_one[1]:.2f}",
                common.fmt_multiple(sum(f.reads_many) / max(sum(f.reads_one), 1e-9)),
                common.verdict(f.reads_many[0] <= 1.05 and f.reads_many[1] <= 1.05),
            ])  # fmt: skip
        if f.heap_mb:
            first, last = f.heap_mb[0], f.heap_mb[-1]
            rows.append([
                db, f"page heap while {sizes.big:,} run",
                " -> ".join(f"{mb:.1f}" for _, mb, _ in f.heap_mb) + " MB",
                f"DOM {first[2]} -> {last[2]} nodes", common.fmt_multiple(last[1] / first[1]),
                common.verdict(last[1] < first[1] * 1.5 and last[2] <= first[2] * 1.2),
            ])  # fmt: skip
        if f.soak_rss:
            first_mb, last_mb = f.soak_rss[0][1], f.soak_rss[-1][1]
            rows.append([
                db, f"monitor RSS, {sizes.soak_pages} pages, {f.soak_rss[-1][0]:.0f}s",
                " -> ".join(f"{mb:.0f}" for _, mb in f.soak_rss) + " MB",
                f"start {first_mb:.0f} MB", common.fmt_multiple(last_mb / first_mb),
                common.verdict(last_mb < first_mb * 1.2),
            ])  # fmt: skip
    common.print_table(
        "web view (Chromium, a monitor process)",
        ["db", "figure", "measured", "beside", "ratio", "target"],
        rows,
        [
            "first render: from navigation to the frame after the page's first state "
            "(every step with its counts), median; target < 500 ms",
            f"change -> page: UpdateJobMetadata sent -> the page's data-change-seq shows it "
            f"(browser clock), under {BACKGROUND_EVENTS_S:,} child events/s on another job; "
            "target p99 < 50 ms",
            "db reads/change: the monitor's watch and log read counters over the changes",
            *notes,
        ],
        left=2,
    )


async def run(args: argparse.Namespace) -> None:
    sizes = QUICK if args.quick else FULL
    if args.soak_seconds is not None:
        sizes = dataclasses.replace(sizes, soak_s=args.soak_seconds)
    runs = common.runs_for(args)
    databases, notes = common.available_databases(args)
    results: dict[str, Figures] = {}
    with common.workdir(args, "bench-web") as work:
        for db in databases:
            results[db] = await measure(args, db, work, sizes, runs)
    notes.append(common.machine_note())
    report(results, sizes, notes)


def main() -> int:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--part",
        default="load,latency,memory,fanout,soak",
        help="which parts to run: load, latency, memory, fanout, soak (default: all)",
    )
    parser.add_argument(
        "--soak-seconds", type=float, default=None, help="how long (e) keeps the pages open"
    )
    args = parser.parse_args()
    if args.timeout is None:
        args.timeout = 900.0 if args.quick else 3600.0 + (args.soak_seconds or 0)
    return common.run_main(run, args)


if __name__ == "__main__":
    sys.exit(main())
