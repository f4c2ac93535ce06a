"""The Python client and the console scripts against server processes: a watch that resumes
across a monitor killed and started again on the same port and database, and mutual TLS
everywhere (a monitor requiring client certificates; an orchestrator that has one, and one that
has not; ``orchestrator-svc submit --follow`` and ``cancel`` with their TLS flags)."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

import stepflow_client
from stepflow_client import aio as client
from stepflow_client._channel import ChannelSettings, aio_channel
from stepflow_proto.v1 import job_pb2
from tests.process_helpers import (
    ORCHESTRATOR_SVC,
    Certs,
    ServerProcess,
    clean_env,
    make_certs,
    monitor_process,
    orchestrator_process,
    running,
)

pytestmark = pytest.mark.timeout(120)

S = job_pb2
WITHIN_S = 60.0


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("mtls-certs"))


def mtls(certs: Certs) -> stepflow_client.ClientSettings:
    return {
        "tls_ca": str(certs.ca),
        "tls_cert": str(certs.client_cert),
        "tls_key": str(certs.client_key),
    }


def mtls_flags(certs: Certs, prefix: str = "--") -> list[str]:
    return [
        f"{prefix}tls-ca", str(certs.ca),
        f"{prefix}tls-cert", str(certs.client_cert),
        f"{prefix}tls-key", str(certs.client_key),
    ]  # fmt: skip


def server_tls_flags(certs: Certs) -> list[str]:
    """Serve TLS and require client certificates signed by the test CA."""
    return [
        "--tls-cert", str(certs.server_cert),
        "--tls-key", str(certs.server_key),
        "--tls-ca", str(certs.ca),
    ]  # fmt: skip


async def cli(*argv: str, timeout: float = WITHIN_S) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        str(ORCHESTRATOR_SVC),
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# -- watch across a monitor restart ----------------------------------------------------------
async def test_watch_resumes_across_a_monitor_restart(database_url: str, tmp_path: Path) -> None:
    """Both clients watch a job; the monitor is killed (SIGKILL) and started again on the same
    port and database; the job moves on and ends; each watch shows the later states, with
    change_seq rising, and stops at the terminal one."""
    monitor = monitor_process(database_url, tmp_path)
    async with running(monitor), client.MonitorClient(monitor.address, timeout=10.0) as mon:
        manager = await mon.create_job(kind="manager", name="watched")
        seen: list[job_pb2.Job] = []
        first = asyncio.Event()

        async def watch() -> None:
            async for job in mon.watch(manager.id):
                seen.append(job)
                first.set()

        sync_seen: list[job_pb2.Job] = []
        sync_first = threading.Event()

        def watch_blocking() -> None:
            with stepflow_client.MonitorClient(monitor.address) as sync:
                for job in sync.watch(manager.id):
                    sync_seen.append(job)
                    sync_first.set()

        watcher = asyncio.create_task(watch())
        sync_watcher = asyncio.create_task(asyncio.to_thread(watch_blocking))
        await asyncio.wait_for(first.wait(), WITHIN_S)
        await asyncio.wait_for(asyncio.to_thread(sync_first.wait), WITHIN_S)

        monitor.kill()
        monitor.start()
        await monitor.wait_serving()
        await mon.update_job_status(manager.id, "running", wait_for_ready=True)
        await mon.update_job_metadata(manager.id, {"after": "restart"})
        await mon.update_job_status(manager.id, "completed")
        await asyncio.wait_for(watcher, WITHIN_S)
        await asyncio.wait_for(sync_watcher, WITHIN_S)

    assert monitor.starts == 2
    for states in (seen, sync_seen):
        seqs = [job.change_seq for job in states]
        assert seqs == sorted(set(seqs)), seqs
        assert states[0].status == S.JOB_STATUS_PENDING
        assert states[-1].status == S.JOB_STATUS_COMPLETED
        assert stepflow_client.metadata_of(states[-1]) == {"after": "restart"}


# -- mutual TLS everywhere -------------------------------------------------------------------
JOB = {
    "name": "mtls",
    "steps": [
        {"name": "fan", "type": "simulate", "config": {"children": 12, "duration_ms": 5}},
        {"name": "shell", "type": "command", "config": {"command": "true"}},
    ],
}
LONG_JOB = {
    "name": "long",
    "steps": [{"name": "wait", "type": "command", "config": {"command": "sleep 60"}}],
}


def secure_channel(certs: Certs) -> Callable[[str], aio.Channel]:
    def factory(address: str) -> aio.Channel:
        return aio_channel(ChannelSettings(target=address, **mtls(certs)))

    return factory


async def health_of(server: ServerProcess, certs: Certs) -> int:
    async with aio_channel(ChannelSettings(target=server.address, **mtls(certs))) as channel:
        resp = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="stepflow.v1.OrchestratorService"), timeout=10
        )
        return int(resp.status)


async def wait_for_log(server: ServerProcess, text: str) -> str:
    async def poll() -> str:
        while text not in server.log_text():
            assert server.proc is not None and server.proc.poll() is None, server.log_tail()
            await asyncio.sleep(0.1)
        return server.log_text()

    return await asyncio.wait_for(poll(), WITHIN_S)


async def test_mutual_tls_from_the_orchestrator_and_the_cli(
    database_url: str, certs: Certs, tmp_path: Path
) -> None:
    factory = secure_channel(certs)
    monitor = monitor_process(
        database_url, tmp_path, extra=server_tls_flags(certs), channel_factory=factory
    )
    orchestrator = orchestrator_process(
        monitor.address,
        tmp_path,
        extra=[*server_tls_flags(certs), *mtls_flags(certs, "--monitor-")],
        channel_factory=factory,
    )
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(JOB))
    long_file = tmp_path / "long.json"
    long_file.write_text(json.dumps(LONG_JOB))
    where = ["--orchestrator", orchestrator.address, "--monitor", monitor.address]
    async with running(monitor, orchestrator):
        # The orchestrator reached the monitor with its client certificate (it is SERVING).
        code, out, err = await cli("submit", "--follow", *where, *mtls_flags(certs), str(job_file))
        assert code == 0, err
        assert "completed" in out

        code, out, err = await cli("submit", *where, *mtls_flags(certs), str(long_file))
        assert code == 0, err
        manager_id = out.strip()
        async with client.MonitorClient(monitor.address, **mtls(certs)) as mon:
            async for job in mon.watch(manager_id):
                if job.step_stats and job.step_stats[0].status == S.JOB_STATUS_RUNNING:
                    break
        code, out, err = await cli(
            "cancel", "--orchestrator", orchestrator.address, *mtls_flags(certs), manager_id
        )
        assert code == 0, err
        assert out.strip() == f"{manager_id}: cancelled"

        # Without a client certificate the orchestrator cannot get in: one line says so.
        code, _, err = await cli(
            "submit", *where, "--tls-ca", str(certs.ca), "--connect-timeout", "1s", str(job_file)
        )
        assert code == 4, err
        assert f"cannot reach the orchestrator at {orchestrator.address}" in err
        assert "if it requires client certificates, give --tls-cert and --tls-key" in err


async def test_an_orchestrator_without_a_client_certificate_waits_not_serving(
    database_url: str, certs: Certs, tmp_path: Path
) -> None:
    """The monitor requires client certificates; an orchestrator that trusts its CA but has no
    certificate of its own does not crash: it says why it waits and stays NOT_SERVING."""
    factory = secure_channel(certs)
    monitor = monitor_process(
        database_url, tmp_path, extra=server_tls_flags(certs), channel_factory=factory
    )
    orchestrator = orchestrator_process(
        monitor.address,
        tmp_path,
        extra=[*server_tls_flags(certs), "--monitor-tls-ca", str(certs.ca)],
        channel_factory=factory,
    )
    async with running(monitor):
        orchestrator.start()
        try:
            log = await wait_for_log(orchestrator, "waiting for the monitor")
            line = next(x for x in log.splitlines() if "waiting for the monitor" in x)
            why = json.loads(line)["why"]
            assert why.startswith("UNAVAILABLE"), line
            assert "--monitor-tls-cert and --monitor-tls-key" in why
            assert (
                await health_of(orchestrator, certs) == health_pb2.HealthCheckResponse.NOT_SERVING
            )
            assert orchestrator.proc is not None and orchestrator.proc.poll() is None
            orchestrator.send(signal.SIGTERM)
            assert await asyncio.to_thread(orchestrator.proc.wait, 30) == 0
        finally:
            orchestrator.stop()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tls-cert", "{cert}"], "--tls-cert needs --tls-key too"),
        (["--tls-key", "{key}"], "--tls-key needs --tls-cert too"),
        (["--tls-ca", "/no/such/ca.pem"], "--tls-ca: no file at /no/such/ca.pem"),
    ],
)
@pytest.mark.parametrize("command", ["submit", "cancel"])
async def test_client_tls_flags_that_cannot_work_are_usage_errors(
    certs: Certs, tmp_path: Path, command: str, argv: list[str], message: str
) -> None:
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(JOB))
    filled = [a.format(cert=certs.client_cert, key=certs.client_key) for a in argv]
    target = str(job_file) if command == "submit" else "some-job"
    code, _, err = await cli(command, "--orchestrator", "127.0.0.1:1", *filled, target)
    assert code == 2, err
    assert err.strip().startswith(f"orchestrator-svc: {message}")
    assert len(err.strip().splitlines()) == 1


async def test_serve_refuses_a_monitor_certificate_without_its_key(certs: Certs) -> None:
    code, _, err = await cli("serve", "--port", "0", "--monitor-tls-cert", str(certs.client_cert))
    assert code == 2, err
    assert "--monitor-tls-cert needs --monitor-tls-key too" in err
