"""Shared fixtures: a fresh database per test (SQLite file, or a PostgreSQL database cloned
from a migrated template) and real servers on free ports."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from grpc import aio
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from monitor_svc.lifecycle import StepTimers
from monitor_svc.server import MonitorConfig, RunningMonitor, create_server
from monitor_svc.store.migrate import upgrade
from stepflow_proto.v1 import monitor_service_pb2_grpc

# The orchestrator fixtures (`orchestrator`, `ostub`) and the lifecycle harness (`life`).
pytest_plugins = ["tests.orchestrator_fixtures", "tests.lifecycle_harness"]

POSTGRES_URL_ENV = "STEPFLOW_TEST_POSTGRES_URL"
REQUIRE_POSTGRES_ENV = "STEPFLOW_TEST_REQUIRE_POSTGRES"
# One template per test process: several pytest runs may share the server.
TEMPLATE_DB = f"stepflow_test_template_{os.getpid()}"
DB_PARAMS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def _postgres_admin_url() -> str | None:
    url = os.environ.get(POSTGRES_URL_ENV)
    if not url:
        return None
    try:
        engine = create_engine(url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        engine.dispose()
        return url
    except Exception as exc:
        if os.environ.get(REQUIRE_POSTGRES_ENV):
            raise RuntimeError(f"PostgreSQL is required but unreachable at {url}: {exc}") from exc
        return None


@pytest.fixture(scope="session")
def postgres_template() -> Iterator[str | None]:
    """A migrated template database; each test gets a copy (fast, and isolated)."""
    admin = _postgres_admin_url()
    if admin is None:
        yield None
        return
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {TEMPLATE_DB} WITH (FORCE)"))
        conn.execute(text(f"CREATE DATABASE {TEMPLATE_DB}"))
    template_url = make_url(admin).set(database=TEMPLATE_DB).render_as_string(hide_password=False)
    upgrade(template_url)
    yield admin
    with engine.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {TEMPLATE_DB} WITH (FORCE)"))
    engine.dispose()


@contextlib.contextmanager
def fresh_database(kind: str, tmp_path: Path, postgres_template: str | None) -> Iterator[str]:
    """The URL of an empty database of ``kind`` (sqlite: not migrated yet; postgres: a copy of
    the migrated template), dropped afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'stepflow.db'}"
        return
    if postgres_template is None:
        pytest.skip(f"PostgreSQL not configured: set {POSTGRES_URL_ENV} to run these tests")
    name = f"stepflow_t_{uuid.uuid4().hex[:12]}"
    engine = create_engine(postgres_template, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE_DB}"))
        yield make_url(postgres_template).set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        engine.dispose()


@pytest.fixture(params=DB_PARAMS)
def database_url(
    request: pytest.FixtureRequest, tmp_path: Path, postgres_template: str | None
) -> Iterator[str]:
    with fresh_database(request.param, tmp_path, postgres_template) as url:
        yield url


FAST_TIMERS = StepTimers(default_wait_timeout_s=30.0, grace_period_s=0.5)


@pytest.fixture
def timers() -> StepTimers:
    return FAST_TIMERS


@pytest.fixture
async def monitor(database_url: str, timers: StepTimers) -> AsyncIterator[RunningMonitor]:
    running = await create_server(
        MonitorConfig(database_url=database_url, port=0, timers=timers, shutdown_grace_s=1.0)
    )
    try:
        yield running
    finally:
        await running.stop(grace=0.5)


@pytest.fixture
async def channel(monitor: RunningMonitor) -> AsyncIterator[aio.Channel]:
    async with aio.insecure_channel(monitor.address) as ch:
        yield ch


@pytest.fixture
def stub(channel: aio.Channel) -> monitor_service_pb2_grpc.MonitorServiceStub:
    return monitor_service_pb2_grpc.MonitorServiceStub(channel)


def code_of(exc: BaseException) -> grpc.StatusCode:
    assert isinstance(exc, grpc.aio.AioRpcError), exc
    return exc.code()
