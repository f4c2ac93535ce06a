"""Access: optional TLS for both servers and for the orchestrator's stream client,
optional bearer-token authentication (health always open, reflection configurable), and the
orchestrator sending its token to the monitor.

Certificates are made per session with the ``openssl`` CLI (the venv has no ``cryptography``).
In-process servers for the rules; one end-to-end run of the two console scripts with every
access flag on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from monitor_svc.server import MonitorConfig, RunningMonitor
from monitor_svc.server import create_server as create_monitor
from orchestrator_svc.server import OrchestratorConfig
from orchestrator_svc.server import create_server as create_orchestrator
from orchestrator_svc.workers.simulate import expected_tally
from stepflow_common.serving import Security
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from stepflow_proto.v1 import orchestrator_service_pb2 as o
from stepflow_proto.v1 import orchestrator_service_pb2_grpc as o_grpc
from tests.conftest import FAST_TIMERS
from tests.orchestrator_fixtures import definition
from tests.process_helpers import (
    TERMINAL,
    Certs,
    assert_tree_consistent,
    make_certs,
    monitor_process,
    orchestrator_process,
    running,
    wait_job,
)

pytestmark = pytest.mark.timeout(90)

S = job_pb2
C = grpc.StatusCode
TOKEN = "s3cret-monitor-token"
ORCH_TOKEN = "0rchestrator-token"
CALL_S = 10.0
JOB = {
    "name": "secured",
    "steps": [
        {"name": "handed", "type": "simulate", "wait": False,
         "config": {"children": 30, "duration_ms": 5, "fail_every": 7}},
        {"name": "waited", "type": "simulate",
         "config": {"children": 20, "duration_ms": 5, "cancel_every": 4}},
        {"name": "shell", "type": "command", "config": {"command": "true"}},
    ],
}  # fmt: skip


def expected(step: str) -> tuple[int, int, int, int, int]:
    config = next(s["config"] for s in JOB["steps"] if s["name"] == step)  # type: ignore[index, union-attr]
    t = expected_tally(config)
    return (0, 0, t.completed, t.failed, t.cancelled)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def tls_channel(
    address: str,
    ca: Path,
    *,
    token: str | None = None,
    client: Certs | None = None,
) -> aio.Channel:
    creds = grpc.ssl_channel_credentials(
        ca.read_bytes(),
        client.client_key.read_bytes() if client else None,
        client.client_cert.read_bytes() if client else None,
    )
    if token is not None:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    return aio.secure_channel(address, creds)


@contextlib.asynccontextmanager
async def monitor_with(database_url: str, security: Security) -> AsyncIterator[RunningMonitor]:
    running_monitor = await create_monitor(
        MonitorConfig(
            database_url=database_url,
            port=0,
            timers=FAST_TIMERS,
            security=security,
            shutdown_grace_s=1.0,
        )
    )
    try:
        yield running_monitor
    finally:
        await running_monitor.stop(grace=0.5)


async def code_of(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    try:
        await asyncio.wait_for(call, CALL_S + 5)
    except aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return C.OK, ""


def every_monitor_rpc(stub: m_grpc.MonitorServiceStub) -> dict[str, Callable[[], Awaitable[Any]]]:
    """One call of each MonitorService RPC (the streams read to their end)."""

    async def watch() -> None:
        async for _ in stub.WatchJob(m.WatchJobRequest(job_id="some-job"), timeout=CALL_S):
            pass

    async def stream() -> None:
        call = stub.StreamChildEvents(timeout=CALL_S)
        with contextlib.suppress(aio.AioRpcError, asyncio.InvalidStateError):
            await call.write(m.StreamChildEventsRequest(batch_id=1))
            await call.done_writing()
        while await call.read() is not aio.EOF:
            pass

    return {
        "CreateJob": lambda: stub.CreateJob(
            m.CreateJobRequest(kind=S.JOB_KIND_MANAGER, name="intruder"), timeout=CALL_S
        ),
        "GetJob": lambda: stub.GetJob(m.GetJobRequest(job_id="some-job"), timeout=CALL_S),
        "ListJobs": lambda: stub.ListJobs(m.ListJobsRequest(), timeout=CALL_S),
        "UpdateJobStatus": lambda: stub.UpdateJobStatus(
            m.UpdateJobStatusRequest(job_id="some-job", status=S.JOB_STATUS_CANCELLED),
            timeout=CALL_S,
        ),
        "UpdateJobMetadata": lambda: stub.UpdateJobMetadata(
            m.UpdateJobMetadataRequest(job_id="some-job"), timeout=CALL_S
        ),
        "UpdateStepStatInManager": lambda: stub.UpdateStepStatInManager(
            m.UpdateStepStatInManagerRequest(
                manager_id="m", step_id="s", status=S.JOB_STATUS_RUNNING
            ),
            timeout=CALL_S,
        ),
        "WatchJob": watch,
        "StreamChildEvents": stream,
    }


async def health_of(channel: aio.Channel, service: str = "") -> int:
    resp = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=CALL_S
    )
    status: int = resp.status
    return status


async def list_services(channel: aio.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=CALL_S
    )
    async for resp in call:
        return [s.name for s in resp.list_services_response.service]
    return []


async def reflection_refusal(channel: aio.Channel) -> grpc.StatusCode:
    """The status a reflection stream ends with when the server refuses it at its headers.

    Nothing is written: a request racing the server's refusal can fail in the client's own send
    and surface as INTERNAL, hiding the status the server answered with."""
    call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(timeout=CALL_S)
    with pytest.raises(aio.AioRpcError) as err:
        await call.read()
    return err.value.code()


# -- bearer token ----------------------------------------------------------------------------------
async def test_without_the_right_token_every_rpc_is_unauthenticated(database_url: str) -> None:
    async with (
        monitor_with(database_url, Security(auth_token=TOKEN)) as mon,
        aio.insecure_channel(mon.address) as ch,
    ):
        for label, metadata in {
            "missing": None,
            "wrong": (("authorization", "Bearer not-the-token"),),
            "no Bearer prefix": (("authorization", TOKEN),),
            "other scheme": (("authorization", f"Basic {TOKEN}"),),
            "prefix of the token": (("authorization", f"Bearer {TOKEN[:-1]}"),),
            "token plus more": (("authorization", f"Bearer {TOKEN}x"),),
        }.items():
            if metadata is not None:
                ch2 = aio.insecure_channel(mon.address, interceptors=static_metadata(metadata))
            else:
                ch2 = aio.insecure_channel(mon.address)
            async with ch2:
                calls = every_monitor_rpc(m_grpc.MonitorServiceStub(ch2))
                for rpc, call in calls.items():
                    code, details = await code_of(call())
                    assert code == C.UNAUTHENTICATED, (label, rpc, code, details)
                    assert "bearer" in details.lower(), (label, rpc, details)
        # Nothing the refused calls asked for happened.
        async with aio.insecure_channel(
            mon.address, interceptors=static_metadata((("authorization", f"Bearer {TOKEN}"),))
        ) as good:
            jobs = await m_grpc.MonitorServiceStub(good).ListJobs(
                m.ListJobsRequest(), timeout=CALL_S
            )
            assert list(jobs.jobs) == []
        # Health stays open, and so does reflection by default (probes, grpcurl).
        assert await health_of(ch) == health_pb2.HealthCheckResponse.SERVING
        assert await health_of(ch, "stepflow.v1.MonitorService") == (
            health_pb2.HealthCheckResponse.SERVING
        )
        assert "stepflow.v1.MonitorService" in await list_services(ch)


async def test_the_right_token_is_let_in_on_every_kind_of_call(database_url: str) -> None:
    header = (("authorization", f"Bearer {TOKEN}"),)
    async with (
        monitor_with(database_url, Security(auth_token=TOKEN)) as mon,
        aio.insecure_channel(mon.address, interceptors=static_metadata(header)) as ch,
    ):
        stub = m_grpc.MonitorServiceStub(ch)
        job = (
            await stub.CreateJob(
                m.CreateJobRequest(kind=S.JOB_KIND_MANAGER, name="ok"), timeout=CALL_S
            )
        ).job
        step = (
            await stub.CreateJob(
                m.CreateJobRequest(kind=S.JOB_KIND_STEP, parent_id=job.id, name="s"),
                timeout=CALL_S,
            )
        ).job
        call = stub.StreamChildEvents(timeout=CALL_S)
        await call.write(
            m.StreamChildEventsRequest(
                batch_id=1,
                events=[
                    S.ChildEvent(
                        event_id="e1",
                        step_id=step.id,
                        child_id="c1",
                        kind=S.CHILD_EVENT_KIND_CREATED,
                    )
                ],
            )
        )
        await call.done_writing()
        acks = [a async for a in call]
        assert [a.batch_id for a in acks] == [1] and not acks[0].rejected
        await stub.UpdateJobStatus(
            m.UpdateJobStatusRequest(job_id=job.id, status=S.JOB_STATUS_CANCELLED), timeout=CALL_S
        )
        states = [
            r.job async for r in stub.WatchJob(m.WatchJobRequest(job_id=job.id), timeout=CALL_S)
        ]
        assert states[-1].status == S.JOB_STATUS_CANCELLED


async def test_reflection_can_require_the_token(database_url: str) -> None:
    security = Security(auth_token=TOKEN, reflection_needs_token=True)
    async with monitor_with(database_url, security) as mon, aio.insecure_channel(mon.address) as ch:
        assert await reflection_refusal(ch) == C.UNAUTHENTICATED
        assert await health_of(ch) == health_pb2.HealthCheckResponse.SERVING
        header = (("authorization", f"Bearer {TOKEN}"),)
        async with aio.insecure_channel(mon.address, interceptors=static_metadata(header)) as ok:
            assert "stepflow.v1.MonitorService" in await list_services(ok)


class _WithMetadata:
    """Sends fixed metadata on every call (also what a client with a misconfigured header
    does)."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _with(self, details: aio.ClientCallDetails) -> aio.ClientCallDetails:
        return aio.ClientCallDetails(
            details.method,
            details.timeout,
            [*(details.metadata or []), *self._metadata],
            details.credentials,
            details.wait_for_ready,
        )


class _UnaryUnary(_WithMetadata, aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await continuation(self._with(details), request)


class _UnaryStream(_WithMetadata, aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await continuation(self._with(details), request)


class _StreamStream(_WithMetadata, aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
        return await continuation(self._with(details), request_iterator)


def static_metadata(metadata: tuple[tuple[str, str], ...]) -> list[_WithMetadata]:
    """One interceptor per call shape: grpc.aio files an interceptor under the first shape
    it implements only, so one class implementing all of them would see unary calls only."""
    return [_UnaryUnary(metadata), _UnaryStream(metadata), _StreamStream(metadata)]


# -- TLS ---------------------------------------------------------------------------------------
async def test_tls_monitor_serves_tls_clients_only(database_url: str, certs: Certs) -> None:
    security = Security(
        tls_cert=str(certs.server_cert), tls_key=str(certs.server_key), auth_token=TOKEN
    )
    async with monitor_with(database_url, security) as mon:
        async with tls_channel(mon.address, certs.ca, token=TOKEN) as ch:
            stub = m_grpc.MonitorServiceStub(ch)
            job = await stub.CreateJob(
                m.CreateJobRequest(kind=S.JOB_KIND_MANAGER, name="over-tls"), timeout=CALL_S
            )
            got = await stub.GetJob(m.GetJobRequest(job_id=job.job.id), timeout=CALL_S)
            assert got.job.name == "over-tls"
        # TLS without the token: the handshake works, the call does not.
        async with tls_channel(mon.address, certs.ca) as ch:
            code, _ = await code_of(m_grpc.MonitorServiceStub(ch).ListJobs(m.ListJobsRequest()))
            assert code == C.UNAUTHENTICATED
            assert await health_of(ch) == health_pb2.HealthCheckResponse.SERVING
        # Plaintext, or a client that does not trust the server's CA: no connection at all.
        async with aio.insecure_channel(mon.address) as ch:
            code, _ = await code_of(
                m_grpc.MonitorServiceStub(ch).ListJobs(m.ListJobsRequest(), timeout=3)
            )
            assert code == C.UNAVAILABLE
        async with tls_channel(mon.address, certs.other_ca, token=TOKEN) as ch:
            code, _ = await code_of(
                m_grpc.MonitorServiceStub(ch).ListJobs(m.ListJobsRequest(), timeout=3)
            )
            assert code == C.UNAVAILABLE


async def test_client_certificates_are_required_when_the_server_has_a_ca(
    database_url: str, certs: Certs
) -> None:
    security = Security(
        tls_cert=str(certs.server_cert), tls_key=str(certs.server_key), tls_ca=str(certs.ca)
    )
    async with monitor_with(database_url, security) as mon:
        async with tls_channel(mon.address, certs.ca, client=certs) as ch:
            await m_grpc.MonitorServiceStub(ch).ListJobs(m.ListJobsRequest(), timeout=CALL_S)
        async with tls_channel(mon.address, certs.ca) as ch:
            code, _ = await code_of(
                m_grpc.MonitorServiceStub(ch).ListJobs(m.ListJobsRequest(), timeout=3)
            )
            assert code == C.UNAVAILABLE


# -- the orchestrator: TLS and a token of its own, and the monitor's token on its calls -----------
async def test_a_job_runs_end_to_end_with_tls_and_tokens_on_both_servers(
    database_url: str, certs: Certs
) -> None:
    monitor_security = Security(
        tls_cert=str(certs.server_cert), tls_key=str(certs.server_key), auth_token=TOKEN
    )
    async with monitor_with(database_url, monitor_security) as mon:
        orch = await create_orchestrator(
            OrchestratorConfig(
                port=0,
                monitor=mon.address,
                owner="secured-orchestrator",
                security=Security(
                    tls_cert=str(certs.server_cert),
                    tls_key=str(certs.server_key),
                    auth_token=ORCH_TOKEN,
                ),
                monitor_security=Security(tls_ca=str(certs.ca), auth_token=TOKEN),
                shutdown_grace_s=1.0,
            )
        )
        try:
            async with (
                tls_channel(orch.address, certs.ca, token=ORCH_TOKEN) as och,
                tls_channel(mon.address, certs.ca, token=TOKEN) as mch,
                tls_channel(orch.address, certs.ca, token=TOKEN) as wrong,
            ):
                # The monitor's token does not open the orchestrator.
                code, _ = await code_of(
                    o_grpc.OrchestratorServiceStub(wrong).SubmitJob(
                        o.SubmitJobRequest(definition=definition(JOB)), timeout=CALL_S
                    )
                )
                assert code == C.UNAUTHENTICATED
                assert await health_of(wrong) == health_pb2.HealthCheckResponse.SERVING
                resp = await o_grpc.OrchestratorServiceStub(och).SubmitJob(
                    o.SubmitJobRequest(definition=definition(JOB)), timeout=CALL_S
                )
                stub = m_grpc.MonitorServiceStub(mch)
                job = await wait_job(stub, resp.manager_id, lambda j: j.status in TERMINAL, 30)
                assert job.status == S.JOB_STATUS_COMPLETED, job.error
                await assert_tree_consistent(
                    stub,
                    resp.manager_id,
                    expected_counts={"handed": expected("handed"), "waited": expected("waited")},
                )
                assert orch.stream.stats.rejected == []
                assert orch.stream.stats.acked_events > 0
        finally:
            await orch.stop(grace=1.0)


async def test_the_console_scripts_with_every_access_flag(
    database_url: str, certs: Certs, tmp_path: Path
) -> None:
    """`monitor-svc serve --tls-cert --tls-key --auth-token` and `orchestrator-svc serve
    --tls-cert --tls-key --auth-token --monitor-token --monitor-tls-ca`, as separate
    processes: health answers over TLS without a token, a job runs end to end."""

    def secure(address: str) -> aio.Channel:
        return tls_channel(address, certs.ca)

    tls = ["--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key)]
    monitor = monitor_process(
        database_url, tmp_path, extra=[*tls, "--auth-token", TOKEN], channel_factory=secure
    )
    orchestrator = orchestrator_process(
        monitor.address,
        tmp_path,
        extra=[
            *tls,
            "--auth-token", ORCH_TOKEN,
            "--monitor-token", TOKEN,
            "--monitor-tls-ca", str(certs.ca),
        ],
        channel_factory=secure,
    )  # fmt: skip
    async with (
        running(monitor, orchestrator),
        tls_channel(orchestrator.address, certs.ca, token=ORCH_TOKEN) as och,
        tls_channel(monitor.address, certs.ca, token=TOKEN) as mch,
    ):
        resp = await o_grpc.OrchestratorServiceStub(och).SubmitJob(
            o.SubmitJobRequest(definition=definition(JOB)), timeout=CALL_S
        )
        stub = m_grpc.MonitorServiceStub(mch)
        job = await wait_job(stub, resp.manager_id, lambda j: j.status in TERMINAL, 30)
        assert job.status == S.JOB_STATUS_COMPLETED, job.error
        await assert_tree_consistent(
            stub,
            resp.manager_id,
            expected_counts={"handed": expected("handed"), "waited": expected("waited")},
        )
        async with aio.insecure_channel(orchestrator.address) as plain:
            code, _ = await code_of(
                o_grpc.OrchestratorServiceStub(plain).ListWorkers(o.ListWorkersRequest(), timeout=3)
            )
            assert code == C.UNAVAILABLE
    assert "UNAUTHENTICATED" not in monitor.log_text()


async def test_an_orchestrator_with_the_wrong_monitor_token_is_refused(
    database_url: str, tmp_path: Path
) -> None:
    """The monitor lets no orchestrator in without its token: the orchestrator, which must
    first take its lease in the monitor, stops at start and says why."""
    monitor = monitor_process(database_url, tmp_path, extra=["--auth-token", TOKEN])
    orchestrator = orchestrator_process(
        monitor.address, tmp_path, extra=["--monitor-token", "not-the-token"]
    )
    async with running(monitor):
        orchestrator.start()
        try:
            assert orchestrator.proc is not None
            deadline = asyncio.get_running_loop().time() + 30
            while orchestrator.proc.poll() is None:
                assert asyncio.get_running_loop().time() < deadline, orchestrator.log_tail()
                await asyncio.sleep(0.05)
            assert orchestrator.proc.returncode != 0, orchestrator.log_tail()
            assert "bearer token" in orchestrator.log_text(), orchestrator.log_tail()
        finally:
            await asyncio.to_thread(orchestrator.stop)


async def test_the_orchestrator_sends_its_monitor_token_without_tls(database_url: str) -> None:
    async with monitor_with(database_url, Security(auth_token=TOKEN)) as mon:
        orch = await create_orchestrator(
            OrchestratorConfig(
                port=0,
                monitor=mon.address,
                owner="token-no-tls",
                monitor_security=Security(auth_token=TOKEN),
                shutdown_grace_s=1.0,
            )
        )
        try:
            header = (("authorization", f"Bearer {TOKEN}"),)
            async with (
                aio.insecure_channel(orch.address) as och,
                aio.insecure_channel(mon.address, interceptors=static_metadata(header)) as mch,
            ):
                resp = await o_grpc.OrchestratorServiceStub(och).SubmitJob(
                    o.SubmitJobRequest(definition=definition(JOB)), timeout=CALL_S
                )
                stub = m_grpc.MonitorServiceStub(mch)
                job = await wait_job(stub, resp.manager_id, lambda j: j.status in TERMINAL, 6)
                assert job.status == S.JOB_STATUS_COMPLETED, job.error
                await assert_tree_consistent(
                    stub,
                    resp.manager_id,
                    expected_counts={"handed": expected("handed"), "waited": expected("waited")},
                )
        finally:
            await orch.stop(grace=1.0)
