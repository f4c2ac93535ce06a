"""OpenTelemetry traces, received by a real OTLP/gRPC collector endpoint this test serves.

A monitor and an orchestrator (real ``serve`` subprocesses) run one small job with
``--otlp-endpoint`` pointing at the receiver and are stopped gracefully (SIGTERM), which
flushes their last spans. Then: both services reported, the job's spans from both share one
trace (the SubmitJob call, the job, its steps, the monitor's calls and the event batches), RPC
spans carry the semantic-convention attributes, and group commits carry their size. Without
the flag nothing is exported, even with the standard OTEL_* variables pointing at the receiver.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from stepflow_common import tracing
from stepflow_proto.v1 import job_pb2
from stepflow_proto.v1 import monitor_service_pb2 as m
from stepflow_proto.v1 import monitor_service_pb2_grpc as m_grpc
from stepflow_proto.v1 import orchestrator_service_pb2 as o
from stepflow_proto.v1 import orchestrator_service_pb2_grpc as o_grpc
from tests.orchestrator_fixtures import definition
from tests.process_helpers import (
    MONITOR_SVC,
    ORCHESTRATOR_SVC,
    TERMINAL,
    ServerProcess,
    clean_env,
    free_port,
    monitor_process,
    orchestrator_process,
)

JOB = {
    "name": "traced",
    "steps": [
        {"name": "first", "type": "simulate", "config": {"children": 4, "duration_ms": 1}},
        {"name": "second", "type": "simulate", "config": {"children": 3, "duration_ms": 1}},
    ],
}
SPAN = trace_pb2.Span


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """The collector's TraceService: keeps every span it is sent, with its service.name."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: list[tuple[str, trace_pb2.Span]] = []

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self.lock:
            for resource_spans in request.resource_spans:
                service = attributes(resource_spans.resource.attributes).get("service.name", "")
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend((str(service), span) for span in scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def attributes(pairs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in pairs:
        value: common_pb2.AnyValue = kv.value
        out[kv.key] = getattr(value, str(value.WhichOneof("value")), None)
    return out


@dataclass
class Collector:
    receiver: Receiver
    endpoint: str


@pytest.fixture
def collector() -> Iterator[Collector]:
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        yield Collector(receiver, f"127.0.0.1:{port}")
    finally:
        server.stop(None)


async def run_job(monitor: ServerProcess, orchestrator: ServerProcess) -> str:
    """Submit JOB, wait until it is terminal (completed), return the manager id."""
    async with aio.insecure_channel(orchestrator.address) as channel:
        submitted = await o_grpc.OrchestratorServiceStub(channel).SubmitJob(
            o.SubmitJobRequest(definition=definition(JOB)), timeout=10
        )
    async with aio.insecure_channel(monitor.address) as channel:
        stub = m_grpc.MonitorServiceStub(channel)
        for _ in range(600):
            job = (await stub.GetJob(m.GetJobRequest(job_id=submitted.manager_id))).job
            if job.status in TERMINAL:
                assert job.status == job_pb2.JOB_STATUS_COMPLETED, job
                return str(submitted.manager_id)
            await asyncio.sleep(0.05)
    pytest.fail(f"job {submitted.manager_id} did not end")


async def run_and_stop(tmp_path: Path, extra: list[str]) -> str:
    """Both services with ``extra`` flags, one job, then SIGTERM (orchestrator first)."""
    monitor = monitor_process(f"sqlite:///{tmp_path / 'm.db'}", tmp_path, extra=extra)
    monitor.start()
    try:
        await monitor.wait_serving()
        orchestrator = orchestrator_process(monitor.address, tmp_path, extra=extra)
        orchestrator.start()
        try:
            await orchestrator.wait_serving()
            manager_id = await run_job(monitor, orchestrator)
        finally:
            code = await asyncio.to_thread(orchestrator.stop)
        assert code == 0, orchestrator.log_tail()
    finally:
        code = await asyncio.to_thread(monitor.stop)
    assert code == 0, monitor.log_tail()
    return manager_id


async def test_one_job_is_one_trace_across_both_services(
    collector: Collector, tmp_path: Path
) -> None:
    manager_id = await run_and_stop(tmp_path, ["--otlp-endpoint", collector.endpoint])
    spans = list(collector.receiver.spans)
    services = {service for service, _ in spans}
    assert services == {tracing.MONITOR_SERVICE, tracing.ORCHESTRATOR_SERVICE}, services

    def named(service: str, name: str) -> list[trace_pb2.Span]:
        return [s for svc, s in spans if svc == service and s.name == name]

    # The job's span, a child of the SubmitJob call that created it.
    (job,) = [
        s
        for s in named(tracing.ORCHESTRATOR_SERVICE, "job traced")
        if attributes(s.attributes).get(tracing.JOB_ID) == manager_id
    ]
    assert attributes(job.attributes)[tracing.JOB_STATUS] == "completed"
    trace_id = job.trace_id
    in_trace = [(svc, s) for svc, s in spans if s.trace_id == trace_id]
    by_id = {s.span_id: (svc, s) for svc, s in in_trace}
    submit = by_id[job.parent_span_id][1]
    assert submit.name == "/stepflow.v1.OrchestratorService/SubmitJob"
    assert submit.kind == SPAN.SPAN_KIND_SERVER

    # Its steps, children of the job span.
    steps = [s for svc, s in in_trace if s.name.startswith("step ")]
    assert sorted(s.name for s in steps) == ["step first", "step second"]
    assert {s.parent_span_id for s in steps} == {job.span_id}
    step_ids = {s.span_id for s in steps}

    # The monitor's side of the same trace: the calls the orchestrator made for the job...
    monitor_calls = {
        attributes(s.attributes)["rpc.method"]
        for svc, s in in_trace
        if svc == tracing.MONITOR_SERVICE and s.kind == SPAN.SPAN_KIND_SERVER
    }
    assert {"CreateJob", "UpdateJobStatus", "UpdateJobMetadata"} <= monitor_calls, monitor_calls
    # ... and the event batches, each a child of the step whose events it carried.
    batches = [s for svc, s in in_trace if svc == tracing.MONITOR_SERVICE and "batch" in s.name]
    assert batches
    assert {s.parent_span_id for s in batches} <= step_ids
    assert {s.parent_span_id for s in batches} == step_ids  # both steps sent events
    assert sum(attributes(s.attributes)[tracing.BATCH_EVENTS] for s in batches) >= 7 * 3 + 2

    # RPC spans: the semantic-convention attributes, on both ends of a call.
    for svc, kind in (
        (tracing.ORCHESTRATOR_SERVICE, SPAN.SPAN_KIND_CLIENT),
        (tracing.MONITOR_SERVICE, SPAN.SPAN_KIND_SERVER),
    ):
        calls = [s for s in named(svc, "/stepflow.v1.MonitorService/CreateJob") if s.kind == kind]
        assert calls, (svc, kind)
        attrs = attributes(calls[0].attributes)
        assert attrs["rpc.system"] == "grpc"
        assert attrs["rpc.service"] == "stepflow.v1.MonitorService"
        assert attrs["rpc.method"] == "CreateJob"
        assert attrs["rpc.grpc.status_code"] == 0
    # A monitor server span is the child of the orchestrator's client span for that call.
    client_ids = {
        s.span_id
        for svc, s in in_trace
        if svc == tracing.ORCHESTRATOR_SERVICE and s.kind == SPAN.SPAN_KIND_CLIENT
    }
    served = [
        s
        for svc, s in in_trace
        if svc == tracing.MONITOR_SERVICE and s.kind == SPAN.SPAN_KIND_SERVER
    ]
    assert served and all(s.parent_span_id in client_ids for s in served)

    # Group commits: their size, and links to the calls and batches they committed.
    commits = named(tracing.MONITOR_SERVICE, "group commit")
    assert commits
    assert all(attributes(s.attributes)[tracing.COMMIT_UNITS] >= 1 for s in commits)
    # Every event of every batch was committed once, and counted in its commit's size.
    committed = sum(attributes(s.attributes)[tracing.COMMIT_EVENTS] for s in commits)
    assert committed == sum(attributes(s.attributes)[tracing.BATCH_EVENTS] for s in batches)
    linked = {link.span_id for s in commits for link in s.links if link.trace_id == trace_id}
    assert {s.span_id for s in batches} <= linked
    # Health checks (probes, the orchestrator's wait for the monitor) are not traced.
    assert not [s for _, s in spans if "grpc.health" in s.name]


async def test_no_flag_no_tracing(
    collector: Collector, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Off by default: the standard variables alone switch nothing on."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://{collector.endpoint}")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    await run_and_stop(tmp_path, [])
    assert collector.receiver.spans == []


@pytest.mark.parametrize("command", [MONITOR_SVC, ORCHESTRATOR_SVC], ids=lambda p: p.name)
def test_bad_endpoint_is_a_usage_error(command: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [str(command), "serve", "--otlp-endpoint", "nowhere", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=clean_env(),
    )
    assert done.returncode == 2, done.stderr
    assert "--otlp-endpoint: 'nowhere' is not HOST:PORT" in done.stderr


def test_one_variable_serves_both_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    """STEPFLOW_OTLP_ENDPOINT turns tracing on for both; each command's own variable wins."""
    from monitor_svc.cli import build_parser as monitor_parser
    from orchestrator_svc.cli import build_parser as orchestrator_parser

    for name in ("STEPFLOW_MONITOR_OTLP_ENDPOINT", "STEPFLOW_ORCHESTRATOR_OTLP_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("STEPFLOW_OTLP_ENDPOINT", raising=False)
    assert monitor_parser().parse_args(["serve"]).otlp_endpoint == ""
    monkeypatch.setenv("STEPFLOW_OTLP_ENDPOINT", "collector:4317")
    assert monitor_parser().parse_args(["serve"]).otlp_endpoint == "collector:4317"
    assert orchestrator_parser().parse_args(["serve"]).otlp_endpoint == "collector:4317"
    monkeypatch.setenv("STEPFLOW_ORCHESTRATOR_OTLP_ENDPOINT", "other:4317")
    assert orchestrator_parser().parse_args(["serve"]).otlp_endpoint == "other:4317"
