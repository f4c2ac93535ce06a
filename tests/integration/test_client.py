"""The Python client (``stepflow_client`` and ``stepflow_client.aio``) against a real monitor:
every RPC round trip, typed errors decoded from the reason the monitor sends, the
update_metadata loop under concurrent writers, token auth, mutual TLS, and gRPC's retry of
UNAVAILABLE as the channel's service config asks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc import aio

import stepflow_client
from monitor_svc.server import MonitorConfig, RunningMonitor, create_server
from stepflow_client import aio as client
from stepflow_client._channel import RETRIED_METHODS, ChannelSettings
from stepflow_common.serving import Security
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from tests.conftest import FAST_TIMERS
from tests.process_helpers import Certs, make_certs

pytestmark = pytest.mark.timeout(60)

S = job_pb2
TOKEN = "client-test-token"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("client-certs"))


@contextlib.asynccontextmanager
async def monitor_with(database_url: str, security: Security) -> AsyncIterator[RunningMonitor]:
    running = await create_server(
        MonitorConfig(
            database_url=database_url,
            port=0,
            timers=FAST_TIMERS,
            shutdown_grace_s=0.5,
            security=security,
        )
    )
    try:
        yield running
    finally:
        await running.stop(grace=0.5)


@pytest.fixture
async def mon(monitor: RunningMonitor) -> AsyncIterator[client.MonitorClient]:
    async with client.MonitorClient(monitor.address, timeout=10.0) as c:
        yield c


async def manager_with_steps(
    mon: client.MonitorClient, n: int
) -> tuple[job_pb2.Job, list[job_pb2.Job]]:
    """A manager, n steps and their step_stats entries (the first step current)."""
    manager = await mon.create_job(kind="manager", name="m", metadata={"total_steps": n})
    steps = [
        await mon.create_job(kind="step", name=f"s{i}", parent_id=manager.id, type="t")
        for i in range(n)
    ]
    entries = [
        {
            "step_index": i,
            "step_id": s.id,
            "step_name": s.name,
            "step_type": "t",
            "status": "pending",
        }
        for i, s in enumerate(steps)
    ]
    await mon.update_job_metadata(
        manager.id,
        {"step_stats": entries, "current_step_id": steps[0].id, "current_step_status": "pending"},
    )
    return manager, steps


# -- every RPC -------------------------------------------------------------------------------
async def test_every_monitor_rpc_round_trips(mon: client.MonitorClient) -> None:
    manager = await mon.create_job(
        kind="manager",
        name="report",
        metadata={"team": "data"},
        job_timeout="1h",
        request_id="req-1",
        definition={"name": "report", "steps": []},
    )
    assert manager.kind == S.JOB_KIND_MANAGER and manager.status == S.JOB_STATUS_PENDING
    assert manager.HasField("deadline")
    again = await mon.create_job(
        kind="manager",
        name="report",
        metadata={"team": "data"},
        job_timeout="1h",
        request_id="req-1",
        definition={"name": "report", "steps": []},
    )
    assert again.id == manager.id  # idempotent by request_id

    got = await mon.get_job(manager.id, include_definition=True)
    assert stepflow_client.metadata_of(got) == {"team": "data"}
    assert got.definition["name"] == "report"

    manager, steps = await manager_with_steps(mon, 2)
    child = await mon.create_job(kind=S.JOB_KIND_CHILD, name="c", parent_id=steps[0].id)
    assert child.manager_id == manager.id

    page = await mon.list_jobs(parent_id=manager.id, page_size=1)
    assert len(page.jobs) == 1 and page.next_page_token
    every = [job.id async for job in mon.iter_jobs(parent_id=manager.id, page_size=1)]
    assert sorted(every) == sorted(s.id for s in steps)
    assert [j.id async for j in mon.iter_jobs(kind="child", manager_id=manager.id)] == [child.id]

    running = await mon.update_job_status(steps[0].id, "running")
    assert running.status == S.JOB_STATUS_RUNNING

    stat = await mon.update_step_stat_in_manager(manager.id, steps[1].id, "running")
    assert stat.step_stat.status == S.JOB_STATUS_RUNNING and stat.version > manager.version

    merged = await mon.update_job_metadata(manager.id, {"note": "hi"})
    assert stepflow_client.metadata_of(merged)["note"] == "hi"
    checked = await mon.update_job_metadata(
        manager.id, {"note": None}, expected_version=merged.version
    )
    assert "note" not in stepflow_client.metadata_of(checked)

    lease = await mon.heartbeat(owner="orch-a", instance="i1", lease="30s")
    assert lease.HasField("lease_expires_at")
    released = await mon.release_lease("orch-a")
    assert list(released.orphaned_job_ids) == []

    cancelled = await mon.cancel_job(manager.id, reason="enough")
    assert cancelled.status == S.JOB_STATUS_CANCELLED
    states = [job async for job in mon.watch_job(manager.id)]
    assert states[-1].status == S.JOB_STATUS_CANCELLED


async def test_failures_raise_the_typed_error_the_monitor_sends(mon: client.MonitorClient) -> None:
    with pytest.raises(stepflow_client.NotFound) as missing:
        await mon.get_job("no-such-job")
    assert isinstance(missing.value.__cause__, aio.AioRpcError)

    manager = await mon.create_job(kind="manager", name="m")
    await mon.update_job_status(manager.id, "completed")
    with pytest.raises(stepflow_client.StatusConflict) as conflict:
        await mon.update_job_status(manager.id, "running")
    assert (conflict.value.current, conflict.value.requested) == ("completed", "running")

    with pytest.raises(stepflow_client.VersionConflict):
        await mon.update_job_metadata(manager.id, {"x": 1}, expected_version=manager.version)
    with pytest.raises(stepflow_client.InvalidArgument):
        await mon.create_job(kind="step", name="orphan")  # a step needs its manager
    with pytest.raises(stepflow_client.NotFound):
        await anext(aiter(mon.watch("no-such-job")))


async def test_the_blocking_client_mirrors_the_asyncio_one(monitor: RunningMonitor) -> None:
    """The same calls through ``stepflow_client.MonitorClient``, in a thread (the monitor runs
    on this event loop)."""

    def scenario() -> list[int]:
        with stepflow_client.MonitorClient(monitor.address, timeout=10.0) as mon:
            manager = mon.create_job(kind="manager", name="sync", metadata={"n": 1})
            step = mon.create_job(kind="step", name="s", parent_id=manager.id, type="t")
            assert [j.id for j in mon.iter_jobs(parent_id=manager.id)] == [step.id]
            assert mon.get_job(manager.id).name == "sync"
            mon.update_job_status(step.id, "running")
            with pytest.raises(stepflow_client.StatusConflict):
                mon.update_job_status(step.id, "pending")
            with pytest.raises(stepflow_client.NotFound):
                mon.get_job("missing")
            done = mon.update_metadata(manager.id, lambda md: {**md, "n": md["n"] + 1})
            assert stepflow_client.metadata_of(done)["n"] == 2
            mon.heartbeat(owner="sync-orch", instance="i", lease=30.0)
            mon.release_lease("sync-orch")
            mon.update_job_status(manager.id, "completed")
            return [int(job.status) for job in mon.watch(manager.id)]

    statuses = await asyncio.to_thread(scenario)
    assert statuses[-1] == S.JOB_STATUS_COMPLETED


# -- update_metadata -------------------------------------------------------------------------
async def test_update_metadata_loses_no_increment_among_concurrent_writers(
    mon: client.MonitorClient, monitor: RunningMonitor
) -> None:
    """Eight asyncio writers and four threads with their own blocking clients each add to one
    counter; version conflicts are retried, so the total is exact."""
    manager = await mon.create_job(kind="manager", name="counted", metadata={"keep": "me"})
    per_writer = 6

    def bump(md: dict[str, Any]) -> None:
        md["counter"] = md.get("counter", 0) + 1

    async def task_writer() -> None:
        for _ in range(per_writer):
            await mon.update_metadata(manager.id, bump, attempts=100)

    def thread_writer(errors: list[BaseException]) -> None:
        try:
            with stepflow_client.MonitorClient(monitor.address, timeout=10.0) as sync:
                for _ in range(per_writer):
                    sync.update_metadata(manager.id, bump, attempts=100)
        except BaseException as exc:
            errors.append(exc)

    errors: list[BaseException] = []
    threads = [threading.Thread(target=thread_writer, args=(errors,)) for _ in range(4)]
    for t in threads:
        t.start()
    await asyncio.gather(*(task_writer() for _ in range(8)))
    await asyncio.gather(*(asyncio.to_thread(t.join) for t in threads))
    assert errors == []
    final = stepflow_client.metadata_of(await mon.get_job(manager.id))
    assert final == {"keep": "me", "counter": (8 + 4) * per_writer}


async def test_update_metadata_gives_up_after_its_attempts(
    mon: client.MonitorClient, monitor: RunningMonitor
) -> None:
    """A writer that always finds the job moved on raises VersionConflict after ``attempts``
    reads, and nothing of its own is written. (Blocking clients in a thread, so the meddling
    write surely lands between each read and its conditional write.)"""
    manager = await mon.create_job(kind="manager", name="contended")

    def contend() -> int:
        calls = 0
        with (
            stepflow_client.MonitorClient(monitor.address, timeout=10.0) as writer,
            stepflow_client.MonitorClient(monitor.address, timeout=10.0) as other,
        ):

            def meddle(md: dict[str, Any]) -> dict[str, Any]:
                nonlocal calls
                calls += 1
                other.update_job_metadata(manager.id, {"other": calls})
                return {**md, "mine": True}

            with pytest.raises(stepflow_client.VersionConflict):
                writer.update_metadata(manager.id, meddle, attempts=3)
        return calls

    assert await asyncio.to_thread(contend) == 3
    md = stepflow_client.metadata_of(await mon.get_job(manager.id))
    assert md == {"other": 3}


async def test_update_metadata_writes_only_what_changed_and_deletes_dropped_keys(
    mon: client.MonitorClient,
) -> None:
    manager, steps = await manager_with_steps(mon, 1)
    before = await mon.get_job(manager.id)
    same = await mon.update_metadata(manager.id, lambda md: md)
    assert same.version == before.version  # nothing changed: nothing written

    def edit(md: dict[str, Any]) -> dict[str, Any]:
        del md["total_steps"]
        md["owner_note"] = "x"
        return md  # step_stats untouched: not sent, so its merge rules never come into play

    after = await mon.update_metadata(manager.id, edit)
    md = stepflow_client.metadata_of(after)
    assert "total_steps" not in md and md["owner_note"] == "x"
    assert md["step_stats"][0]["step_id"] == steps[0].id
    assert after.version == before.version + 1


# -- access ----------------------------------------------------------------------------------
async def test_the_token_is_sent_on_every_kind_of_call(database_url: str) -> None:
    async with monitor_with(database_url, Security(auth_token=TOKEN)) as running:
        async with client.MonitorClient(running.address, timeout=10.0) as anonymous:
            with pytest.raises(stepflow_client.Unauthenticated):
                await anonymous.create_job(kind="manager", name="m")
            with pytest.raises(stepflow_client.Unauthenticated):
                await anext(aiter(anonymous.watch_job("x")))
        async with client.MonitorClient(running.address, token=TOKEN, timeout=10.0) as mon:
            manager = await mon.create_job(kind="manager", name="m")
            await mon.update_job_status(manager.id, "completed")
            assert [j.status async for j in mon.watch(manager.id)] == [S.JOB_STATUS_COMPLETED]

        def blocking() -> None:
            with stepflow_client.MonitorClient(running.address, token=TOKEN) as mon:
                assert mon.get_job(manager.id).id == manager.id
                assert [j.status for j in mon.watch(manager.id)] == [S.JOB_STATUS_COMPLETED]
            with (
                stepflow_client.MonitorClient(running.address, token="wrong") as mon,
                pytest.raises(stepflow_client.Unauthenticated),
            ):
                mon.get_job(manager.id)

        await asyncio.to_thread(blocking)


async def test_mutual_tls_needs_the_client_certificate(database_url: str, certs: Certs) -> None:
    security = Security(
        tls_cert=str(certs.server_cert),
        tls_key=str(certs.server_key),
        tls_ca=str(certs.ca),
        auth_token=TOKEN,
    )
    async with monitor_with(database_url, security) as running:
        mtls: stepflow_client.ClientSettings = {
            "tls_ca": str(certs.ca),
            "tls_cert": str(certs.client_cert),
            "tls_key": str(certs.client_key),
        }
        async with client.MonitorClient(running.address, token=TOKEN, **mtls) as mon:
            job = await mon.create_job(kind="manager", name="over-mtls")
            assert (await mon.get_job(job.id)).name == "over-mtls"

        def blocking() -> str:
            with stepflow_client.MonitorClient(
                f"localhost:{running.port}", token=TOKEN, tls_server_name="localhost", **mtls
            ) as mon:
                return mon.get_job(job.id).name

        assert await asyncio.to_thread(blocking) == "over-mtls"

        async with client.MonitorClient(
            running.address, token=TOKEN, tls_ca=str(certs.ca), timeout=5.0, retry=None
        ) as no_cert:
            with pytest.raises(stepflow_client.Unavailable):
                await no_cert.get_job(job.id)


def test_tls_settings_that_cannot_work_are_refused_before_dialling(certs: Certs) -> None:
    with pytest.raises(stepflow_client.ChannelConfigError, match="tls_cert needs tls_key"):
        stepflow_client.MonitorClient("127.0.0.1:1", tls_cert=str(certs.client_cert))
    with pytest.raises(stepflow_client.ChannelConfigError, match="tls_key needs tls_cert"):
        stepflow_client.MonitorClient("127.0.0.1:1", tls_key=str(certs.client_key))
    with pytest.raises(stepflow_client.ChannelConfigError, match="tls_ca: no file at /nope"):
        stepflow_client.MonitorClient("127.0.0.1:1", tls_ca="/nope")


# -- the channel: deadlines, retries ---------------------------------------------------------
def test_the_service_config_retries_unavailable_on_every_idempotent_method() -> None:
    options = dict(ChannelSettings(target="x").options())
    assert options["grpc.enable_retries"] == 1
    config = json.loads(options["grpc.service_config"])
    (method_config,) = config["methodConfig"]
    assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    names = {(n["service"], n["method"]) for n in method_config["name"]}
    assert names == set(RETRIED_METHODS)
    assert ("stepflow.v1.MonitorService", "StreamChildEvents") not in names
    services = {s.full_name: s for s in m.DESCRIPTOR.services_by_name.values()}
    monitor_methods = {meth.name for meth in services["stepflow.v1.MonitorService"].methods}
    assert {meth for svc, meth in names if svc == "stepflow.v1.MonitorService"} == (
        monitor_methods - {"StreamChildEvents"}
    )


class _FlakyMonitor(m_grpc.MonitorServiceServicer):
    """Answers UNAVAILABLE to the first ``failures`` GetJob calls, then a job: a monitor whose
    database is coming back."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def GetJob(self, request: m.GetJobRequest, context: aio.ServicerContext) -> Any:
        self.calls += 1
        if self.calls <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "database unreachable")
        return m.GetJobResponse(job=job_pb2.Job(id=request.job_id))


@contextlib.asynccontextmanager
async def flaky_server(failures: int) -> AsyncIterator[tuple[str, _FlakyMonitor]]:
    servicer = _FlakyMonitor(failures)
    server = aio.server()
    m_grpc.add_MonitorServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await server.stop(0)


async def test_grpc_retries_unavailable_as_the_service_config_says() -> None:
    async with flaky_server(failures=2) as (address, servicer):
        async with client.MonitorClient(address, timeout=10.0) as mon:
            assert (await mon.get_job("j")).id == "j"
        assert servicer.calls == 3
    async with flaky_server(failures=2) as (address, servicer):
        async with client.MonitorClient(address, timeout=10.0, retry=None) as mon:
            with pytest.raises(stepflow_client.Unavailable, match="database unreachable"):
                await mon.get_job("j")
        assert servicer.calls == 1


async def test_every_call_has_a_deadline_by_default() -> None:
    """A service that accepts the call and never answers: the client's default deadline ends
    it (DeadlineExceeded), and a call's own timeout overrides the default."""
    hung = asyncio.Event()

    class Silent(m_grpc.MonitorServiceServicer):
        async def GetJob(self, request: m.GetJobRequest, context: aio.ServicerContext) -> Any:
            await hung.wait()
            return m.GetJobResponse()

    server = aio.server()
    m_grpc.add_MonitorServiceServicer_to_server(Silent(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with client.MonitorClient(f"127.0.0.1:{port}", timeout=0.2) as mon:
            with pytest.raises(stepflow_client.DeadlineExceeded):
                await mon.get_job("j")
            with pytest.raises(stepflow_client.DeadlineExceeded):
                await mon.get_job("j", timeout=0.1)
    finally:
        hung.set()
        await server.stop(0)


async def test_the_client_uses_a_channel_it_is_given_and_leaves_it_open(
    monitor: RunningMonitor,
) -> None:
    async with aio.insecure_channel(monitor.address) as channel:
        async with client.MonitorClient(channel) as mon:
            job = await mon.create_job(kind="manager", name="shared")
        assert channel.get_state() != grpc.ChannelConnectivity.SHUTDOWN
        stub = m_grpc.MonitorServiceStub(channel)
        assert (await stub.GetJob(m.GetJobRequest(job_id=job.id), timeout=10)).job.name == "shared"


# -- the orchestrator ------------------------------------------------------------------------
LONG_JOB = {
    "name": "long",
    "steps": [{"name": "wait", "type": "command", "config": {"command": "sleep 30"}}],
}
QUICK_JOB = {
    "name": "quick",
    "timeout": "5m",
    "steps": [
        {"name": "fan", "type": "simulate", "config": {"children": 5, "duration_ms": 1}},
        {"name": "after", "type": "command", "depends_on": ["fan"], "config": {"command": "true"}},
    ],
}


async def test_every_orchestrator_rpc_round_trips(
    monitor: RunningMonitor, orchestrator: Any, mon: client.MonitorClient
) -> None:
    async with client.OrchestratorClient(orchestrator.address, monitor=mon) as orch:
        workers = {w.type: w for w in await orch.list_workers()}
        assert workers["simulate"].spawns_children and not workers["command"].spawns_children

        manager_id = await orch.submit(QUICK_JOB, request_id="quick-1")
        assert await orch.submit(QUICK_JOB, request_id="quick-1") == manager_id
        states = [job async for job in orch.follow(manager_id)]
        assert states[-1].status == S.JOB_STATUS_COMPLETED
        assert [s.step_name for s in states[-1].step_stats] == ["fan", "after"]

        long_id = await orch.submit(LONG_JOB)
        cancelled = await orch.cancel(long_id, reason="not today")
        assert cancelled.id == long_id and cancelled.status == S.JOB_STATUS_CANCELLED
        with pytest.raises(stepflow_client.NotFound):
            await orch.cancel("no-such-job")
        with pytest.raises(stepflow_client.InvalidArgument, match="depends_on"):
            await orch.submit({"name": "bad", "steps": [{"name": "a", "type": "command",
                                                          "depends_on": ["z"]}]})  # fmt: skip

    def blocking() -> int:
        with (
            stepflow_client.MonitorClient(monitor.address) as sync_mon,
            stepflow_client.OrchestratorClient(orchestrator.address, monitor=sync_mon) as orch,
        ):
            job_id = orch.submit(QUICK_JOB)
            return int(list(orch.follow(job_id))[-1].status)

    assert await asyncio.to_thread(blocking) == S.JOB_STATUS_COMPLETED


async def test_events_from_the_asyncio_client_count_each_child_once(
    mon: client.MonitorClient,
) -> None:
    """``MonitorClient.events()`` streams on the client's own channel: children created,
    run and ended through it are counted exactly in the manager's step_stats, and the seal
    ends the step."""
    manager = await mon.create_job(kind="manager", name="reported")
    step = await mon.create_job(
        kind="step", parent_id=manager.id, name="work", metadata={"step_index": 0}
    )
    await mon.update_job_status(manager.id, "running")
    await mon.update_job_status(step.id, "running")
    async with mon.events() as events:
        for i in range(30):
            child_id = f"{step.id}.c{i}"
            await events.created(step.id, child_id)
            await events.running(step.id, child_id)
            if i % 3:
                await events.completed(step.id, child_id)
            else:
                await events.failed(step.id, child_id, "boom")
        await events.sealed(step.id, 30)
        await events.flush()
    stats = (await mon.get_job(manager.id)).step_stats[0]
    assert (stats.children.completed, stats.children.failed) == (20, 10), stats
    assert stats.child_count == 30
    assert stepflow_client.is_terminal(await mon.get_job(step.id))
