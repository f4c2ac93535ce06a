"""Shared plumbing for the benchmarks: free ports, server subprocesses polled through the
health service, throwaway databases, command-line options, statistics and table printing.

Every benchmark starts its servers as separate processes (the console scripts the project
installs), talks to them over loopback only, and cleans up after itself: servers are stopped
with SIGTERM (then SIGKILL), a PostgreSQL database created for the run is dropped, and a
SQLite file lives in a temporary directory that is removed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The benchmarks start servers while their own gRPC channels are busy; fork handlers would
# only log "skipping fork() handlers" (the children exec at once and use nothing inherited).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

BENCH_DIR = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent  # the venv's bin: the console scripts live next to python
MONITOR_SVC = BIN / "monitor-svc"
ORCHESTRATOR_SVC = BIN / "orchestrator-svc"
NOOP_MONITOR = BENCH_DIR / "noop_monitor.py"

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
POSTGRES_URL_ENVS = ("STEPFLOW_BENCH_POSTGRES_URL", "STEPFLOW_TEST_POSTGRES_URL")
STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
CALL_TIMEOUT_S = 30.0
# Big enough for the largest batch a benchmark sends (and the stream limit of 10,000 events).
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
]
_PR_SET_PDEATHSIG = 1
PYSPY = BIN / "py-spy"
PYSPY_RATE_HZ = 200
PROFILE_DIR: Path | None = None  # set by --profile
PG_ANALYZE = True  # cleared by --no-pg-analyze
SQLITE_SYNCHRONOUS: str | None = None  # --sqlite-synchronous; None: the monitor's default


# -- command line --------------------------------------------------------------------------
def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes and one run instead of three (a smoke test, e.g. in CI)",
    )
    parser.add_argument(
        "--db",
        default="sqlite,postgres",
        help="comma-separated databases to measure: sqlite, postgres (default: both)",
    )
    parser.add_argument(
        "--postgres-url",
        default=_env_postgres_url(),
        help="admin URL of a PostgreSQL server; the benchmark creates and drops its own "
        "database there [env: STEPFLOW_BENCH_POSTGRES_URL, STEPFLOW_TEST_POSTGRES_URL; "
        f"default: {DEFAULT_POSTGRES_URL}]",
    )
    parser.add_argument("--runs", type=int, default=None, help="runs per figure (median taken)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="give up after this many seconds (the benchmark stops its servers and exits 1)",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        default=None,
        help="sample every server with py-spy (pip install py-spy) into DIR/*.txt (collapsed "
        "stacks: open in speedscope.app or flamegraph.pl) and print where each spent its time",
    )
    parser.add_argument(
        "--no-pg-analyze",
        dest="pg_analyze",
        action="store_false",
        help="do not ANALYZE the PostgreSQL database before each measured run (by default "
        "the benchmark does, as autovacuum would on a server that has it on)",
    )
    parser.add_argument(
        "--sqlite-synchronous",
        choices=("full", "normal"),
        default=None,
        help="the monitors' --sqlite-synchronous (default: theirs, full): compare the durable "
        "default with NORMAL",
    )
    parser.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep the temporary directory with the servers' logs (its path is printed)",
    )
    return parser


def _env_postgres_url() -> str:
    for name in POSTGRES_URL_ENVS:
        if os.environ.get(name):
            return os.environ[name]
    return DEFAULT_POSTGRES_URL


def selected_databases(args: argparse.Namespace) -> list[str]:
    names = [d.strip() for d in args.db.split(",") if d.strip()]
    for name in names:
        if name not in ("sqlite", "postgres"):
            raise SystemExit(f"--db: unknown database {name!r} (sqlite, postgres)")
    return names


def runs_for(args: argparse.Namespace, full: int = 3) -> int:
    if args.runs is not None:
        return max(1, args.runs)
    return 1 if args.quick else full


def run_main(main: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """Run ``main(args)`` (a coroutine function) within ``--timeout``; servers are stopped
    by their context managers whatever happens."""

    global PROFILE_DIR, PG_ANALYZE, SQLITE_SYNCHRONOUS
    PG_ANALYZE = args.pg_analyze
    SQLITE_SYNCHRONOUS = args.sqlite_synchronous
    if args.profile:
        PROFILE_DIR = Path(args.profile).resolve()
        PROFILE_DIR.mkdir(parents=True, exist_ok=True)

    async def bounded() -> Any:
        if args.timeout is None:
            return await main(args)
        return await asyncio.wait_for(main(args), args.timeout)

    try:
        asyncio.run(bounded())
        if PROFILE_DIR is not None:
            print_profiles(PROFILE_DIR)
    except TimeoutError:
        print(f"benchmark gave up after --timeout {args.timeout:g}s", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


# -- processes -----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM if the benchmark dies, so nothing is left behind."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _clean_env() -> dict[str, str]:
    """Without STEPFLOW_* settings, so flags exported in the shell cannot change the servers."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("STEPFLOW_") and k != "GRPC_ENABLE_FORK_SUPPORT"
    }


@dataclass
class ServerProcess:
    """A server subprocess, its port and its log file."""

    name: str
    argv: list[str]
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    database_url: str = ""
    _log: Any = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=_clean_env(),
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )

    async def wait_serving(self, startup_s: float = STARTUP_TIMEOUT_S) -> None:
        """Poll grpc.health.v1 Check until SERVING; fail early if the process exits."""
        deadline = time.monotonic() + startup_s
        async with aio.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                    )
                try:
                    resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except aio.AioRpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self.name} not SERVING after {startup_s:g}s:\n{self.log_tail()}"
                    )
                await asyncio.sleep(0.1)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (graceful shutdown), then SIGKILL if it takes longer than ``timeout``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
        return self.proc.returncode

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


@contextlib.asynccontextmanager
async def running(server: ServerProcess) -> AsyncIterator[ServerProcess]:
    """Start ``server``, wait until it is SERVING, and stop it on the way out."""
    server.start()
    spy: subprocess.Popen[bytes] | None = None
    try:
        await server.wait_serving()
        if PROFILE_DIR is not None:
            spy = start_profiler(server, PROFILE_DIR)
        yield server
    finally:
        if spy is not None:
            await asyncio.to_thread(stop_profiler, spy)
        await asyncio.to_thread(server.stop)


# -- CPU -------------------------------------------------------------------------------------
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc); NaN where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return math.nan
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


PidSource = int | Sequence[int] | Callable[[], Sequence[int]]


class CpuMeter:
    """CPU used by groups of processes over a window, as a share of one core (1.0 = one core
    busy the whole time; a Python process above 1.0 runs C code outside the GIL). This
    process is always measured, as ``client``. A group given as a callable is listed again at
    the end, and a process that appeared meanwhile counts with all its CPU (e.g. a database
    connection opened during the window)."""

    def __init__(self, groups: dict[str, PidSource]) -> None:
        self.groups: dict[str, PidSource] = {"client": os.getpid(), **groups}
        self._start: dict[str, dict[int, float]] = {}
        self._t0 = 0.0
        self.shares: dict[str, float] = {}

    @staticmethod
    def _pids(source: PidSource) -> list[int]:
        if isinstance(source, int):
            return [source]
        return list(source() if callable(source) else source)

    def __enter__(self) -> CpuMeter:
        self._start = {
            name: {pid: process_cpu_s(pid) for pid in self._pids(source)}
            for name, source in self.groups.items()
        }
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *_exc: object) -> None:
        elapsed = time.perf_counter() - self._t0
        for name, source in self.groups.items():
            start = self._start[name]
            pids = set(start) | set(self._pids(source))
            if not pids:
                self.shares[name] = math.nan
                continue
            used = 0.0
            for pid in pids:
                now, base = process_cpu_s(pid), start.get(pid, 0.0)
                if not math.isnan(now):
                    used += now - (0.0 if math.isnan(base) else base)
            self.shares[name] = used / elapsed if elapsed > 0 else math.nan


def cpu_groups(server: ServerProcess, name: str = "server") -> dict[str, PidSource]:
    """The server's process and, on PostgreSQL, its database backends (as ``db``)."""
    groups: dict[str, PidSource] = {name: server.pid}
    url = server.database_url
    if url.startswith("postgresql"):
        groups["db"] = lambda: database_pids(url)
    return groups


def database_pids(database_url: str) -> list[int]:
    """The PostgreSQL backends serving ``database_url``'s database (their CPU is the
    database's share of the work); empty for SQLite, which runs inside the monitor."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    if url.get_backend_name() != "postgresql":
        return []
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT pid FROM pg_stat_activity "
                    "WHERE datname = :db AND pid <> pg_backend_pid()"
                ),
                {"db": url.database},
            )
            return [int(r.pid) for r in rows]
    finally:
        engine.dispose()


def fmt_cpu(share: float | None) -> str:
    return "-" if share is None or math.isnan(share) else f"{share:.0%}"


# -- profiling -----------------------------------------------------------------------------
def start_profiler(server: ServerProcess, directory: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling ``server`` (all threads, not pausing it) into collapsed stacks."""
    if not PYSPY.exists():
        raise SystemExit(f"--profile needs py-spy: {BIN / 'pip'} install py-spy")
    out = directory / f"{server.name}-{server.pid}.txt"
    argv = [str(PYSPY), "record", "-p", str(server.pid), "-o", str(out), "-f", "raw"]
    argv += ["-r", str(PYSPY_RATE_HZ), "--threads", "--nonblocking"]
    log = (directory / f"{server.name}-{server.pid}.py-spy.log").open("wb")
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)


def stop_profiler(spy: subprocess.Popen[bytes]) -> None:
    spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    try:
        spy.wait(30)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()


def _frame_name(frame: str) -> str:
    """``func (path/module.py:12)`` -> ``func (module.py)``."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({where.rsplit('/', 1)[-1]})" if where else name


def summarise_profile(path: Path, top: int = 12) -> list[str]:
    """Per thread: its share of the samples, then the functions with the most inclusive
    time (counted once per sample however deep they recurse; frames on nearly every sample,
    like the event loop's, are left out) and the most self time (the sampled leaf)."""
    threads: dict[str, int] = {}
    inclusive: dict[str, dict[str, int]] = {}
    leaf: dict[str, dict[str, int]] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = frames[0]
        total += count
        threads[thread] = threads.get(thread, 0) + count
        per = inclusive.setdefault(thread, {})
        for name in {_frame_name(f) for f in frames[1:]}:
            per[name] = per.get(name, 0) + count
        if len(frames) > 1:
            own = leaf.setdefault(thread, {})
            name = _frame_name(frames[-1])
            own[name] = own.get(name, 0) + count
    if not total:
        return [f"{path.name}: no samples"]
    seconds = total / PYSPY_RATE_HZ
    lines = [f"{path.name}: {total} samples (~{seconds:.1f} s of busy threads)"]
    for thread, count in sorted(threads.items(), key=lambda kv: -kv[1]):
        if count < total * 0.03:
            continue
        lines.append(f"  {thread}: {count / total:.0%} of samples")
        ranked = [
            (name, n)
            for name, n in sorted(inclusive[thread].items(), key=lambda kv: -kv[1])
            if n < count * 0.9
        ]
        lines.append("    inclusive:")
        lines += [f"      {n / count:6.1%}  {name}" for name, n in ranked[:top]]
        lines.append("    self:")
        own = sorted(leaf.get(thread, {}).items(), key=lambda kv: -kv[1])
        lines += [f"      {n / count:6.1%}  {name}" for name, n in own[: top // 2]]
    return lines


def print_profiles(directory: Path) -> None:
    print()
    print(f"py-spy profiles in {directory} (inclusive share of each thread's samples)")
    for path in sorted(directory.glob("*.txt")):
        for line in summarise_profile(path):
            print(line)


def monitor_process(
    database_url: str,
    workdir: Path,
    *,
    grace_period: str | None = None,
    tag: str = "monitor",
    metrics_port: int = 0,
    http_port: int = 0,
) -> ServerProcess:
    """A ``monitor-svc serve`` process; its web view is off unless ``http_port`` is given."""
    port = free_port()
    argv = [
        str(MONITOR_SVC),
        "serve",
        "--port",
        str(port),
        "--http-port",
        str(http_port),
        "--database-url",
        database_url,
        "--log-format",
        "json",
    ]
    if grace_period is not None:
        argv += ["--grace-period", grace_period]
    if metrics_port:
        argv += ["--metrics-port", str(metrics_port)]
    if SQLITE_SYNCHRONOUS is not None:
        argv += ["--sqlite-synchronous", SQLITE_SYNCHRONOUS]
    return ServerProcess(tag, argv, port, workdir / f"{tag}-{port}.log", database_url=database_url)


def orchestrator_process(
    monitor_address: str, workdir: Path, *, owner: str, tag: str = "orchestrator"
) -> ServerProcess:
    port = free_port()
    argv = [
        str(ORCHESTRATOR_SVC),
        "serve",
        "--port",
        str(port),
        "--monitor",
        monitor_address,
        "--owner",
        owner,
        "--log-format",
        "json",
    ]
    return ServerProcess(tag, argv, port, workdir / f"{tag}-{port}.log")


def noop_monitor_process(workdir: Path, tag: str = "noop-monitor") -> ServerProcess:
    port = free_port()
    argv = [sys.executable, str(NOOP_MONITOR), "--port", str(port)]
    return ServerProcess(tag, argv, port, workdir / f"{tag}-{port}.log")


@contextlib.contextmanager
def workdir(args: argparse.Namespace, prefix: str) -> Iterator[Path]:
    """A temporary directory for SQLite files and server logs."""
    path = Path(tempfile.mkdtemp(prefix=f"stepflow-{prefix}-"))
    try:
        yield path
    finally:
        if args.keep_logs:
            print(f"logs kept in {path}", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(path, ignore_errors=True)


# -- databases -----------------------------------------------------------------------------
def postgres_available(admin_url: str) -> str | None:
    """None when PostgreSQL answers at ``admin_url``, else why not."""
    from sqlalchemy import create_engine, text

    try:
        engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text("select 1"))
        finally:
            engine.dispose()
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    return None


@contextlib.contextmanager
def throwaway_database(kind: str, admin_url: str, directory: Path) -> Iterator[str]:
    """A fresh, empty database for one server: a SQLite file in ``directory``, or a new
    PostgreSQL database ``bench_<random>`` that is dropped afterwards (only that one)."""
    if kind == "sqlite":
        yield f"sqlite:///{directory / f'bench-{uuid.uuid4().hex[:8]}.db'}"
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"bench_{uuid.uuid4().hex[:12]}"
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        finally:
            with engine.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        engine.dispose()


def analyze(server: ServerProcess) -> None:
    """ANALYZE the server's PostgreSQL database (nothing for SQLite), unless
    --no-pg-analyze. A monitor's connections cache query plans; with no statistics (a fresh
    database on a server with autovacuum off) those plans stay the ones made for empty
    tables, so lookups by id turn into sequential scans as the tables grow. ANALYZE updates
    the statistics and invalidates the cached plans, as autoanalyze does on a default server."""
    if not PG_ANALYZE or not server.database_url.startswith("postgresql"):
        return
    from sqlalchemy import create_engine, text

    engine = create_engine(server.database_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text("ANALYZE"))
    finally:
        engine.dispose()


def postgres_note(admin_url: str) -> str:
    """What the tables should say about statistics on PostgreSQL."""
    from sqlalchemy import create_engine, text

    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            autovacuum = conn.execute(text("SHOW autovacuum")).scalar()
    except Exception:
        autovacuum = "unknown"
    finally:
        engine.dispose()
    done = (
        "this benchmark ran ANALYZE on its database before each measured run"
        if PG_ANALYZE
        else "ANALYZE was NOT run (--no-pg-analyze): plans cached for empty tables stay"
    )
    return f"PostgreSQL: autovacuum is {autovacuum} on this server; {done}"


def available_databases(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The databases to measure, and notes on those that were asked for but are missing."""
    wanted = selected_databases(args)
    notes = []
    if "postgres" in wanted:
        why = postgres_available(args.postgres_url)
        if why is not None:
            wanted.remove("postgres")
            notes.append(f"PostgreSQL skipped: not reachable at {args.postgres_url} ({why})")
        else:
            notes.append(postgres_note(args.postgres_url))
    return wanted, notes


# -- statistics ----------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def median(values: Sequence[float]) -> float:
    clean = [v for v in values if not math.isnan(v)]
    return statistics.median(clean) if clean else math.nan


# -- printing ------------------------------------------------------------------------------
def fmt_rate(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:,.0f}"


def fmt_ms(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    ms = seconds * 1000
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 100 else f"{ms:,.0f}"


def fmt_ratio(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}x" if value >= 10 else f"{value:.1%}"


def fmt_multiple(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}x"


def verdict(ok: bool | None) -> str:
    return "" if ok is None else "pass" if ok else "MISS"


def print_table(
    title: str,
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    notes: Sequence[str] = (),
    *,
    left: int = 1,
) -> None:
    """A plain-text table: the first ``left`` columns left-aligned, the rest right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.ljust(widths[i]) if i < left else cell.rjust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return "  ".join(parts).rstrip()

    rule = "-" * len(line(headers))
    print()
    print(title)
    print(rule)
    print(line(headers))
    print(rule)
    for row in rows:
        print(line(row))
    print(rule)
    for note in notes:
        print(f"  {note}")
    sys.stdout.flush()


def progress(message: str) -> None:
    """A progress line on stderr (the tables go to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine_note() -> str:
    load = os.getloadavg()
    return (
        f"machine: {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} "
        f"{load[2]:.2f} at the end; python {sys.version.split()[0]}"
    )
