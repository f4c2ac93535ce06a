"""Real processes for the fault, access and scale-out tests: server subprocesses polled
through the health service, a throwaway PostgreSQL cluster the test owns, test certificates,
and the checks every fault test ends with (each child counted once, each step ended once).

Everything here is bounded: every wait has a timeout, and every process started is stopped
(SIGTERM, then SIGKILL) by the context manager that started it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stepflow_common.proto_status import TERMINAL_PB as TERMINAL
from stepflow_common.subprocesses import server_env
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from stepflow_proto.v1 import orchestrator_service_pb2_grpc as o_grpc
from tests.helpers import meta
from tests.jobs import get, list_all, submit

BIN = Path(sys.executable).parent
MONITOR_SVC = BIN / "monitor-svc"
ORCHESTRATOR_SVC = BIN / "orchestrator-svc"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
# Reconnect fast after a server restart (gRPC's default first backoff is a second).
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

S = job_pb2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def clean_env() -> dict[str, str]:
    """The environment without STEPFLOW_* settings (every flag reads one), so a token or a
    database URL exported in the developer's shell cannot change the servers under test."""
    return server_env()


# -- server subprocesses ---------------------------------------------------------------------
@dataclass
class ServerProcess:
    """A ``monitor-svc serve`` or ``orchestrator-svc serve`` subprocess on a fixed port, so it
    can be killed and started again where its clients expect it."""

    name: str
    argv: list[str]
    port: int
    log_path: Path
    # How the health poll reaches it (TLS servers need credentials).
    channel_factory: Callable[[str], aio.Channel] = field(
        default=lambda address: aio.insecure_channel(address)
    )
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    # Added to its (clean) environment: PYTHONPATH for a plugin, say.
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is running"
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts}: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**clean_env(), **self.extra_env},
            )

    async def run(self) -> None:
        """Start it and wait until it reports SERVING."""
        self.start()
        await self.wait_serving()

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait_serving(self, within: float = STARTUP_TIMEOUT_S) -> None:
        """Poll grpc.health.v1 until SERVING; fail at once if the process exits."""
        deadline = time.monotonic() + within
        last: object = None
        async with self.channel_factory(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                    )
                try:
                    resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                    last = resp.status
                except aio.AioRpcError as exc:
                    last = exc.code()
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"{self.name} not SERVING after {within:g}s (last: {last}):\n"
                        f"{self.log_tail()}"
                    )
                await asyncio.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, no flush, as a crash or the OOM killer would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(STOP_TIMEOUT_S)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (graceful), then SIGKILL if it takes longer than ``timeout``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a test may have left it stopped
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT_S)
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def monitor_process(
    database_url: str,
    workdir: Path,
    *,
    name: str = "monitor",
    grace_period: str = "0.5s",
    default_wait_timeout: str = "30s",
    http_port: int = 0,
    extra: Sequence[str] = (),
    channel_factory: Callable[[str], aio.Channel] | None = None,
) -> ServerProcess:
    """A ``monitor-svc serve`` process; its web view is off unless ``http_port`` is given."""
    port = free_port()
    argv = [
        str(MONITOR_SVC), "serve",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--http-port", str(http_port),
        "--database-url", database_url,
        "--grace-period", grace_period,
        "--default-wait-timeout", default_wait_timeout,
        "--shutdown-grace", "1s",
        "--log-format", "json",
        *extra,
    ]  # fmt: skip
    server = ServerProcess(name, argv, port, workdir / f"{name}.log")
    if channel_factory is not None:
        server.channel_factory = channel_factory
    return server


def orchestrator_process(
    monitor_address: str,
    workdir: Path,
    *,
    name: str = "orchestrator",
    owner: str = "orchestrator-under-test",
    extra: Sequence[str] = (),
    channel_factory: Callable[[str], aio.Channel] | None = None,
) -> ServerProcess:
    port = free_port()
    argv = [
        str(ORCHESTRATOR_SVC), "serve",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--monitor", monitor_address,
        "--owner", owner,
        "--shutdown-grace", "1s",
        "--log-format", "json",
        *extra,
    ]  # fmt: skip
    server = ServerProcess(name, argv, port, workdir / f"{name}.log")
    if channel_factory is not None:
        server.channel_factory = channel_factory
    return server


@contextlib.asynccontextmanager
async def running(*servers: ServerProcess) -> AsyncIterator[tuple[ServerProcess, ...]]:
    """Start the servers (in order, each SERVING before the next), stop them all on exit."""
    try:
        for server in servers:
            server.start()
            await server.wait_serving()
        yield servers
    finally:
        for server in reversed(servers):
            await asyncio.to_thread(server.stop)


# -- a throwaway PostgreSQL cluster ------------------------------------------------------------
def postgres_binaries_missing() -> str:
    """Why a private PostgreSQL cannot be started here ('' when it can)."""
    for tool in ("initdb", "pg_ctl", "postgres"):
        if not (PG_BIN / tool).exists():
            return f"{PG_BIN / tool} is not installed"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser (initdb refuses root)"
    return ""


class PostgresCluster:
    """A private PostgreSQL in a temporary directory on a free port.

    initdb and postgres refuse to run as root, so as root every command runs as the
    ``postgres`` OS user (the directory is handed to it). Only this cluster is ever stopped:
    every pg_ctl call names its own data directory.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="stepflow-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.dir, "postgres", "postgres")
        self._initialised = False

    def _run(self, *argv: str, timeout: float = 60.0) -> None:
        cmd = [*(["runuser", "-u", "postgres", "--"] if self._as_postgres else []), *argv]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}\n"
                f"{self.log.read_text(errors='replace') if self.log.exists() else ''}"
            )

    def init(self) -> None:
        self._run(
            str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres",
            "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions",
        )  # fmt: skip
        self._initialised = True

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._run(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
            "-o", options, "-w", "-t", "30", "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """Stop this cluster: ``fast`` ends every session (clients see their connections
        drop), ``immediate`` is a crash without shutdown checkpoint."""
        self._run(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop"
        )

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        from sqlalchemy import create_engine, text

        engine = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(f"CREATE DATABASE {name}"))
        finally:
            engine.dispose()
        return self.url(name)

    def destroy(self) -> None:
        if self._initialised and (self.data / "postmaster.pid").exists():
            with contextlib.suppress(Exception):
                self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def postgres_cluster() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster()
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


# -- test certificates (openssl CLI: the venv has no `cryptography`) -------------------------------
@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here: trusting it must fail


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args)} failed:\n{done.stderr}")


def make_certs(directory: Path) -> Certs:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate signed by
    it, and an unrelated second CA."""
    directory.mkdir(parents=True, exist_ok=True)
    d = directory

    def ca(name: str) -> None:
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=d,
        )  # fmt: skip

    def leaf(name: str, ext: str) -> None:
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d,
        )  # fmt: skip
        (d / f"{name}.ext").write_text(ext)
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext",
            cwd=d,
        )  # fmt: skip

    ca("ca")
    ca("other-ca")
    leaf(
        "server",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
        "basicConstraints=CA:FALSE\n",
    )
    leaf("client", "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n")
    return Certs(
        ca=d / "ca.pem",
        server_cert=d / "server.pem",
        server_key=d / "server.key",
        client_cert=d / "client.pem",
        client_key=d / "client.key",
        other_ca=d / "other-ca.pem",
    )


# -- reading the monitor ---------------------------------------------------------------------
Stub = m_grpc.MonitorServiceStub


def counts(c: job_pb2.ChildCounts) -> tuple[int, int, int, int, int]:
    return (c.pending, c.running, c.completed, c.failed, c.cancelled)


def rows_to_counts(children: Sequence[job_pb2.Job]) -> tuple[int, int, int, int, int]:
    by = collections.Counter(c.status for c in children)
    return (
        by[S.JOB_STATUS_PENDING],
        by[S.JOB_STATUS_RUNNING],
        by[S.JOB_STATUS_COMPLETED],
        by[S.JOB_STATUS_FAILED],
        by[S.JOB_STATUS_CANCELLED],
    )


def assert_ended_once(job: job_pb2.Job, *, versions: Sequence[int] | None = None) -> None:
    """A terminal job recorded as ended exactly once: terminal status, one end reason, the
    finish time set after the start, no deadline left to fire, and (when given) the version
    its history allows — each status change raises it by one, so a second ending shows."""
    where = f"{job.kind} {job.id} ({job.name})"
    assert job.status in TERMINAL, f"{where} is not terminal: {job.status}"
    assert job.end_reason, f"{where} has no end_reason"
    assert job.HasField("finished_at"), f"{where} has no finished_at"
    assert not job.HasField("deadline"), f"{where} still has a deadline"
    if job.HasField("started_at"):
        assert job.started_at.ToDatetime() <= job.finished_at.ToDatetime(), where
    if versions is not None:
        assert job.version in versions, f"{where}: version {job.version}, expected {versions}"


async def assert_tree_consistent(
    stub: Stub,
    manager_id: str,
    *,
    expected_counts: dict[str, tuple[int, int, int, int, int]] | None = None,
) -> job_pb2.Job:
    """Every child counted once and every step ended once, through the API only.

    For each step: terminal and ended once, its step_stats entry equals its row, its live
    counts equal its child rows (no child counted twice or lost), no child left live, and every
    child ended once. ``expected_counts`` (step name -> pending, running, completed, failed,
    cancelled) pins the exact numbers when the test knows them.
    """
    manager = await get(stub, manager_id)
    assert_ended_once(manager)
    steps = await list_all(stub, parent_id=manager_id)
    assert {s.id for s in steps} == {st.step_id for st in manager.step_stats}
    ended = [s for s in steps if s.status in TERMINAL]
    md = meta(manager)
    if "completed_steps" in md:
        assert int(md["completed_steps"]) == len(ended) == len(steps), md
    for stat in manager.step_stats:
        step = next(s for s in steps if s.id == stat.step_id)
        assert_ended_once(step)
        assert stat.status == step.status, f"{step.name}: entry {stat.status} row {step.status}"
        children = await list_all(stub, parent_id=step.id)
        assert len({c.id for c in children}) == len(children)
        from_rows = rows_to_counts(children)
        assert counts(stat.children) == from_rows, f"{step.name}: {stat.children} vs rows"
        assert from_rows[:2] == (0, 0), f"{step.name} has live children"
        for child in children:
            assert_ended_once(child)
        if expected_counts is not None and step.name in expected_counts:
            assert from_rows == expected_counts[step.name], f"{step.name}: {from_rows}"
    return manager


async def wait_job(
    stub: Stub, job_id: str, predicate: Callable[[job_pb2.Job], bool], within: float
) -> job_pb2.Job:
    """The first state WatchJob shows that satisfies ``predicate`` (resumes when the stream
    breaks, e.g. while the database is down)."""

    async def go() -> job_pb2.Job:
        seen = 0
        while True:
            call = stub.WatchJob(m.WatchJobRequest(job_id=job_id, after_change_seq=seen))
            try:
                async for msg in call:
                    seen = msg.job.change_seq
                    if predicate(msg.job):
                        return msg.job
                job = await get(stub, job_id)
                if predicate(job):
                    return job
                raise AssertionError(f"job {job_id} ended before the condition held: {job}")
            except aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL):
                    raise
                await asyncio.sleep(0.1)
            finally:
                call.cancel()

    return await asyncio.wait_for(go(), within)


# -- orchestrators under leases (the failover tests) ---------------------------------------------
FAILOVER_LEASE = "1.5s"
"""The lease of the orchestrators the failover tests start: short, so a take-over is quick."""


def orchestrator(
    monitor: ServerProcess,
    tmp_path: Path,
    name: str,
    *,
    grace: str = "1s",
    lease: str = FAILOVER_LEASE,
) -> ServerProcess:
    proc = orchestrator_process(
        monitor.address, tmp_path, name=name, owner=name, extra=["--lease", lease]
    )
    # The helper's own grace (1s) first, then this test's.
    proc.argv += ["--shutdown-grace", grace]
    return proc


@contextlib.asynccontextmanager
async def running_orchestrators(
    monitor: ServerProcess,
    tmp_path: Path,
    *names: str,
    grace: str = "1s",
    lease: str = FAILOVER_LEASE,
) -> AsyncIterator[tuple[ServerProcess, ...]]:
    """Orchestrators named (and owning as) ``names`` on ``monitor``, started in that order and
    stopped on the way out, however the test ends (one it killed or stopped is left as is)."""
    procs = tuple(orchestrator(monitor, tmp_path, name, grace=grace, lease=lease) for name in names)
    try:
        for proc in procs:
            await proc.run()
        yield procs
    finally:
        for proc in procs:
            proc.stop()


async def submit_to(proc: ServerProcess, data: dict[str, Any], request_id: str = "") -> str:
    async with aio.insecure_channel(proc.address) as channel:
        return await submit(o_grpc.OrchestratorServiceStub(channel), data, request_id)


def install(root: Path, name: str, source: str, entry: str) -> Path:
    """A distribution ``name`` with one ``stepflow.workers`` entry point, laid out in ``root``
    as ``pip install --target`` lays it out (a module and its ``.dist-info``)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{name}.py").write_text(source)
    dist = root / f"{name}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[stepflow.workers]\n{entry}\n")
    return root
