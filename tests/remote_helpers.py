"""Runners for the tests of ``executor = "celery"``: a RabbitMQ that answers (required in CI,
skipped with a reason elsewhere), a queue of each test's own, and ``orchestrator-svc runner``
processes, each in its own process group as a runner on another machine would be."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from grpc import aio
from kombu import Connection

from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from stepflow_proto.v1 import orchestrator_service_pb2_grpc as o_grpc
from tests.jobs import by_name, list_all, watch_until
from tests.process_helpers import (
    ORCHESTRATOR_SVC,
    STARTUP_TIMEOUT_S,
    STOP_TIMEOUT_S,
    ServerProcess,
    clean_env,
    monitor_process,
    orchestrator_process,
)

WITHIN_S = 60.0

BROKER_URL_ENV = "STEPFLOW_TEST_BROKER_URL"
REQUIRE_BROKER_ENV = "STEPFLOW_TEST_REQUIRE_BROKER"
DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"


def broker_url_or_skip() -> str:
    url = os.environ.get(BROKER_URL_ENV, DEFAULT_BROKER_URL)
    try:
        with Connection(url, connect_timeout=2) as connection:
            connection.ensure_connection(max_retries=1)
    except Exception as exc:
        if os.environ.get(REQUIRE_BROKER_ENV):
            raise RuntimeError(f"RabbitMQ is required but unreachable at {url}: {exc}") from exc
        pytest.skip(f"no RabbitMQ at {url} ({exc}): set {BROKER_URL_ENV} to run these tests")
    return url


@dataclass
class Broker:
    url: str
    queue: str

    def depth(self, queue: str | None = None) -> int:
        """Messages ready in ``queue`` (default: the work queue)."""
        with Connection(self.url) as connection:
            name = queue or self.queue
            _, count, _ = connection.default_channel.queue_declare(name, passive=True)
            return int(count)

    def delete(self) -> None:
        with contextlib.suppress(Exception), Connection(self.url) as connection:
            channel = connection.default_channel
            for name in (self.queue, f"{self.queue}.dead"):
                channel.queue_delete(name)
                channel.exchange_delete(name)


@contextlib.contextmanager
def own_queue() -> Iterator[Broker]:
    """A queue of this test's own on the broker, deleted afterwards."""
    found = Broker(broker_url_or_skip(), f"stepflow.test.{uuid.uuid4().hex[:10]}")
    try:
        yield found
    finally:
        found.delete()


@dataclass
class RunnerProcess:
    """An ``orchestrator-svc runner``, in a process group of its own."""

    name: str
    argv: list[str]
    log_path: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**clean_env(), **self.extra_env},
                start_new_session=True,  # its own process group (and session)
            )

    async def run(self) -> None:
        """Start it and wait until its Celery worker takes messages."""
        self.start()
        await self.wait_ready()

    async def wait_ready(self, within: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + within
        marker = f"--- start {self.starts}\n"
        while True:
            assert self.proc is not None
            text = self.log_text()
            if " ready." in text.rsplit(marker, 1)[-1]:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode}:\n{text[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not ready after {within:g}s:\n{text[-3000:]}")
            await asyncio.sleep(0.1)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal_group(self, sig: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """kill -9 of its whole process group, as a machine's death would."""
        self.signal_group(signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(STOP_TIMEOUT_S)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.signal_group(signal.SIGCONT)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.signal_group(signal.SIGKILL)
            self.proc.wait(STOP_TIMEOUT_S)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def runner_process(
    found: Broker,
    monitor_address: str,
    workdir: Path,
    name: str,
    *,
    concurrency: int = 2,
    heartbeat: str = "6s",
    extra_env: dict[str, str] | None = None,
) -> RunnerProcess:
    argv = [
        str(ORCHESTRATOR_SVC), "runner",
        "--broker-url", found.url,
        "--queue", found.queue,
        "--monitor", monitor_address,
        "--concurrency", str(concurrency),
        "--name", name,
        "--broker-heartbeat", heartbeat,
        "--log-format", "json",
    ]  # fmt: skip
    return RunnerProcess(name, argv, workdir / f"{name}.log", extra_env=dict(extra_env or {}))


def broker_flags(found: Broker) -> list[str]:
    return ["--broker-url", found.url, "--queue", found.queue]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed, not yet reaped by its parent) is gone for every purpose here.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@dataclass
class Cluster:
    broker: Broker
    monitor: ServerProcess
    orchestrators: list[ServerProcess]
    runners: dict[str, RunnerProcess]
    stub: m_grpc.MonitorServiceStub
    tmp_path: Path

    def ostub(self, index: int = 0) -> o_grpc.OrchestratorServiceStub:
        return o_grpc.OrchestratorServiceStub(
            aio.insecure_channel(self.orchestrators[index].address)
        )

    async def children(self, step_id: str) -> list[job_pb2.Job]:
        return await list_all(self.stub, parent_id=step_id)

    async def step_id(self, manager_id: str, name: str = "work") -> str:
        manager = await watch_until(self.stub, manager_id, lambda j: name in by_name(j))
        return by_name(manager)[name].step_id

    async def wait_children(
        self, step_id: str, check: Callable[[list[job_pb2.Job]], bool], within: float = WITHIN_S
    ) -> list[job_pb2.Job]:
        deadline = time.monotonic() + within
        while True:
            kids = await self.children(step_id)
            if check(kids):
                return kids
            if time.monotonic() > deadline:
                summary = [(k.id, k.status, k.runner, k.attempt) for k in kids]
                raise AssertionError(f"children never got there: {summary}")
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def cluster(
    tmp_path: Path,
    *,
    orchestrators: int = 1,
    runners: tuple[str, ...] = ("A", "B"),
    concurrency: int = 2,
    lease: str = "30s",
    runner_env: dict[str, str] | None = None,
    orchestrator_env: dict[str, str] | None = None,
    http_port: int = 0,
    database_url: str = "",
) -> AsyncIterator[Cluster]:
    """A monitor (on ``database_url``, else SQLite), ``orchestrators`` with the broker, and
    ``runners`` by name, on a queue of this test's own; all stopped on the way out."""
    with own_queue() as found:
        monitor = monitor_process(
            database_url or f"sqlite:///{tmp_path / 'stepflow.db'}",
            tmp_path,
            default_wait_timeout="120s",
            http_port=http_port,
            extra=["--orphan-timeout", "60s"],
        )
        orchs = [
            orchestrator_process(
                monitor.address,
                tmp_path,
                name=f"orch{i}",
                owner=f"orch{i}",
                extra=[*broker_flags(found), "--lease", lease],
            )
            for i in range(orchestrators)
        ]
        for proc in orchs:
            proc.extra_env.update(orchestrator_env or {})
        procs = {
            name: runner_process(
                found,
                monitor.address,
                tmp_path,
                name,
                concurrency=concurrency,
                extra_env=runner_env,
            )
            for name in runners
        }
        try:
            await monitor.run()
            for proc in orchs:
                await proc.run()
            await asyncio.gather(*(r.run() for r in procs.values()))
            async with aio.insecure_channel(monitor.address) as channel:
                yield Cluster(
                    found, monitor, orchs, procs, m_grpc.MonitorServiceStub(channel), tmp_path
                )
        finally:
            for runner in procs.values():
                await asyncio.to_thread(runner.stop)
            for proc in orchs:
                await asyncio.to_thread(proc.stop)
            await asyncio.to_thread(monitor.stop)
